"""The drafter's training objective and its held-out figure, on recorded traces.

Targets: the target model's own next-token distribution, recomputed from the recorded final hidden state
through the frozen lm_head rows of the draft vocabulary (softmax over those rows = the target's
distribution restricted to the draft vocabulary and renormalised, as EAGLE-3 trains). Only the ``K`` most
likely draft tokens are kept per position (renormalised): computed once when a chunk arrives, ~200 bytes a
position instead of a 32 KB row, and KL over the top-K carries almost all of the signal. Positions without a
recorded hidden state (prompt positions, until the engine reports them) fall back to a one-hot target on
the token that actually followed.

Loss (the "Aurora" recipe, arXiv 2602.06932, on EAGLE-3's training-time test):

    L = sum_i decay^i * mean_t w_t KL(p_{t+i} || q_i(t))  +  lambda * mean_r w_r KL(p_r || q(r))

* ``q_i(t)``: the drafter's distribution at unroll step ``i`` of position ``t`` (``forward_train``: the
  drafter has drafted ``i`` tokens of its own after real position ``t``), compared with the target's
  distribution of the same token; ``w_t`` is 1 for generated positions and ``prompt_weight`` for prompt
  positions (soft targets at prompt positions multiply the data of short chat answers).
* the "discard" term over rejected tree nodes ``r``: the drafter, at the state the tree put it in (real
  context up to the node's committed ancestor, then the rejected branch), fitted to the target's
  distribution there. Implemented with the drafter's masked ``draft_step`` over branch rows attending to
  the sequence's step-0 keys, so it changes the gradient only through rejected nodes.

Held-out figure: the simulated acceptance length of greedy chain drafting of depth ``k`` at every
generated position of held-out chunks (1 + expected accepted drafts; the drafted token must equal the
token that was actually committed), computed with the same unrolled forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import TrainerConfig
from ..engine.runner import bucket_tokens
from .traces import TraceChunk, padded_cells


@dataclass
class Sample:
    """A chunk ready for training: soft targets instead of hidden states (see the module docstring)."""

    key: str
    tokens: torch.Tensor            # [L] int64
    aux: torch.Tensor               # [L, A]
    lab_ids: torch.Tensor           # [L, K] int64 draft ids: the target's distribution of token t + 1
    lab_p: torch.Tensor             # [L, K] float32 (zero rows where lab_ok is False)
    lab_ok: torch.Tensor            # [L] bool
    weight: torch.Tensor            # [L] float32: 1 for generated tokens, prompt_weight for prompt tokens
    draft_tok: torch.Tensor         # [L] int64: draft id of tokens[t] (-1: outside the draft vocabulary)
    generated: torch.Tensor         # [L] bool
    loss_from: int = 0
    heldout: bool = False
    br_parent: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    br_token: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    br_aux: torch.Tensor | None = None
    br_lab_ids: torch.Tensor | None = None
    br_lab_p: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_branches(self) -> int:
        return int(self.br_token.shape[0])

    def nbytes(self) -> int:
        ts = [self.tokens, self.aux, self.lab_ids, self.lab_p, self.lab_ok, self.weight, self.draft_tok,
              self.generated, self.br_parent, self.br_token, self.br_aux, self.br_lab_ids, self.br_lab_p]
        return sum(t.numel() * t.element_size() for t in ts if t is not None) + 256


class SoftTargets:
    """Target distributions over the draft vocabulary from final hidden states (frozen lm_head rows)."""

    def __init__(self, lm_head_weight: torch.Tensor, draft_ids: torch.Tensor, topk: int) -> None:
        self.w = lm_head_weight.detach()[draft_ids].float()         # [Vd, H]
        self.k = min(topk, self.w.shape[0])
        vocab = lm_head_weight.shape[0]
        self.t2d = torch.full((vocab,), -1, dtype=torch.long)       # target id -> draft id (-1: none)
        self.t2d[draft_ids] = torch.arange(draft_ids.shape[0])

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [n, H] -> (draft ids [n, K], probabilities [n, K] summing to 1)."""
        if hidden.shape[0] == 0:
            return torch.zeros(0, self.k, dtype=torch.long), torch.zeros(0, self.k)
        logits = hidden.float() @ self.w.T
        val, idx = torch.log_softmax(logits, dim=-1).topk(self.k, dim=-1)
        p = val.exp()
        return idx, p / p.sum(-1, keepdim=True)

    def prepare(self, chunk: TraceChunk, prompt_weight: float, labels: bool = True) -> Sample:
        """``labels=False`` skips the soft targets (enough for :func:`simulated_acceptance`)."""
        L = len(chunk)
        K = self.k if labels else 1
        lab_ids = torch.zeros(L, K, dtype=torch.long)
        lab_p = torch.zeros(L, K)
        has = chunk.has_hidden if labels else torch.zeros(L, dtype=torch.bool)
        if bool(has.any()):
            ids, p = self(chunk.hidden[has])
            lab_ids[has], lab_p[has] = ids, p
        # No hidden state: a one-hot target on the token that followed (if it is in the draft vocabulary).
        nxt = torch.full((L,), -1, dtype=torch.long)
        nxt[:-1] = self.t2d[chunk.tokens[1:]]
        hard = ~has & (nxt >= 0)
        lab_ids[hard, 0] = nxt[hard]
        lab_p[hard, 0] = 1.0
        lab_ok = has | hard
        gen_next = torch.cat((chunk.generated[1:], chunk.generated[-1:]))
        weight = torch.where(gen_next, torch.tensor(1.0), torch.tensor(float(prompt_weight)))
        s = Sample(key=chunk.key, tokens=chunk.tokens, aux=chunk.aux, lab_ids=lab_ids, lab_p=lab_p,
                   lab_ok=lab_ok, weight=weight, draft_tok=self.t2d[chunk.tokens], generated=chunk.generated,
                   loss_from=chunk.loss_from, heldout=chunk.heldout)
        if labels and chunk.num_branches and chunk.br_hidden is not None:
            s.br_parent, s.br_token, s.br_aux = chunk.br_parent, chunk.br_token, chunk.br_aux
            s.br_lab_ids, s.br_lab_p = self(chunk.br_hidden)
        return s


@dataclass
class Batch:
    tokens: torch.Tensor            # [B, L]
    aux: torch.Tensor               # [B, L, A]
    lengths: torch.Tensor           # [B]
    lab_ids: torch.Tensor           # [B, L, K]
    lab_p: torch.Tensor             # [B, L, K]
    lab_w: torch.Tensor             # [B, L]: weight of the label at each position (0 = no label)
    draft_tok: torch.Tensor         # [B, L]
    root_ok: torch.Tensor           # [B, L]: position t is a drafting root (token t + 1 generated, new)
    samples: list[Sample]           # the real rows; rows past them (bucket padding) are empty


def collate(samples: list[Sample], bucket: bool = True) -> Batch:
    """Samples as one right-padded batch. With ``bucket`` the batch size and the length are padded up to
    ``bucket_tokens`` sizes (empty rows: length 0, no label, no root; extra positions past every length).

    Why: the trainer's matrix products have ``B * L`` rows (linear layers, padded again by the drafter) and
    ``[B, heads, L, L]`` shapes (attention scores); on a CPU oneDNN caches a compiled primitive per shape
    (~0.7 MB each, onspec/server/memory.py), and batches drawn from the replay buffer come in nearly every
    (B, L), so the trainer process kept growing. Bucketed, they come in a bounded set. Padding changes no
    loss: every term is masked by ``lengths`` / ``lab_w`` / ``root_ok``."""
    n_real = len(samples)
    B = bucket_tokens(n_real) if bucket else n_real
    L = max(len(s) for s in samples)
    L = bucket_tokens(L) if bucket else L
    A = samples[0].aux.shape[1]
    K = samples[0].lab_ids.shape[1]
    tokens = torch.zeros(B, L, dtype=torch.long)
    aux = torch.zeros(B, L, A, dtype=samples[0].aux.dtype)
    lab_ids = torch.zeros(B, L, K, dtype=torch.long)
    lab_p = torch.zeros(B, L, K)
    lab_w = torch.zeros(B, L)
    draft_tok = torch.full((B, L), -1, dtype=torch.long)
    root_ok = torch.zeros(B, L, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = len(s)
        tokens[b, :n], aux[b, :n], lab_ids[b, :n], lab_p[b, :n] = s.tokens, s.aux, s.lab_ids, s.lab_p
        w = s.weight * s.lab_ok
        w[:s.loss_from] = 0.0  # labels the previous chunk already trained
        lab_w[b, :n] = w
        draft_tok[b, :n] = s.draft_tok
        if n > 1:
            r = s.generated[1:].clone()
            r[:max(0, s.loss_from - 1)] = False
            root_ok[b, 1:n - 1] = r[1:]
    lengths = torch.tensor([len(s) for s in samples] + [0] * (B - n_real))
    return Batch(tokens, aux, lengths, lab_ids, lab_p, lab_w, draft_tok, root_ok, samples)


def _kl_sparse(logits: torch.Tensor, ids: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(logits)) with p supported on ``ids``: [..., V], [..., K], [..., K] -> [...]."""
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids)
    return (torch.xlogy(p, p) - p * logq).sum(-1)


def main_loss(logits: list[torch.Tensor], batch: Batch, decay: float) -> tuple[torch.Tensor, list[float]]:
    """sum_i decay^i * weighted mean KL at unroll step i; also the per-step mean KLs (for logs)."""
    B, L = batch.tokens.shape
    t = torch.arange(L)
    total = torch.zeros(())
    per_step = []
    for i, lg in enumerate(logits):
        n = L - i
        if n <= 1:
            break
        # logits[i][:, t] predicts token t + 1 + i; its target is the distribution recorded at t + i.
        w = batch.lab_w[:, i:] * ((t[:n] >= 1)[None] & (t[None, :n] + i < batch.lengths[:, None]))
        if float(w.sum()) <= 0:
            per_step.append(0.0)
            continue
        kl = _kl_sparse(lg[:, :n], batch.lab_ids[:, i:], batch.lab_p[:, i:])
        step = (kl * w).sum() / w.sum()
        per_step.append(float(step.detach()))
        total = total + (decay ** i) * step
    return total, per_step


def discard_loss(drafter, batch: Batch, max_branches: int, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, int]:
    """Weighted mean KL at rejected tree nodes (see the module docstring); (loss, number of branch rows)."""
    samples = batch.samples
    if max_branches <= 0 or not any(s.num_branches for s in samples):
        return torch.zeros(()), 0
    B, L = batch.tokens.shape
    # Step-0 keys of the real sequence: drafter position p (1..L-1) pairs aux[p - 1] with token p.
    feats = drafter.project(batch.aux[:, :-1])
    pos = torch.arange(1, L)[None].expand(B, L - 1)
    _, past_k, past_v = drafter.draft_step(batch.tokens[:, 1:], feats, pos)
    # Branch rows per sample (a random subset when there are too many).
    per = [s.num_branches for s in samples]
    R = max(per)
    budget = max(1, max_branches // max(1, sum(1 for n in per if n)))
    chosen: list[torch.Tensor] = []
    for s in samples:
        n = s.num_branches
        if n > budget:
            keep = torch.randperm(n, generator=generator)[:budget].sort().values
            # Keep ancestors of the kept nested branches too (their rows are the nested rows' context).
            need = set(keep.tolist())
            for r in list(need):
                p = int(s.br_parent[r])
                while p < 0:
                    need.add(-1 - p)
                    p = int(s.br_parent[-1 - p])
            keep = torch.tensor(sorted(need), dtype=torch.long)
        else:
            keep = torch.arange(n)
        chosen.append(keep)
    R = max(len(k) for k in chosen)
    if R == 0:
        return torch.zeros(()), 0
    R = bucket_tokens(R)  # a bounded set of shapes (see ``collate``); padding rows attend to themselves only
    A = batch.aux.shape[2]
    K = samples[0].lab_ids.shape[1]
    tok = torch.zeros(B, R, dtype=torch.long)
    par_aux = torch.zeros(B, R, A, dtype=batch.aux.dtype)
    rpos = torch.ones(B, R, dtype=torch.long)
    lab_ids = torch.zeros(B, R, K, dtype=torch.long)
    lab_p = torch.zeros(B, R, K)
    valid = torch.zeros(B, R, dtype=torch.bool)
    mask = torch.zeros(B, R, (L - 1) + R, dtype=torch.bool)
    for b, (s, keep) in enumerate(zip(samples, chosen)):
        local = {int(r): j for j, r in enumerate(keep.tolist())}
        for r, j in local.items():
            p = int(s.br_parent[r])
            tok[b, j] = s.br_token[r]
            lab_ids[b, j], lab_p[b, j] = s.br_lab_ids[r], s.br_lab_p[r]
            mask[b, j, (L - 1) + j] = True
            depth, anc = 1, p
            while anc < 0:                                   # nested: walk up to the committed ancestor
                src = -1 - anc
                mask[b, j, (L - 1) + local[src]] = True
                depth += 1
                anc = int(s.br_parent[src])
            par_aux[b, j] = s.aux[p] if p >= 0 else s.br_aux[-1 - p]
            rpos[b, j] = anc + depth                         # one position per level below the ancestor
            mask[b, j, :anc] = True                          # keys of positions 1..anc (key index p - 1)
            valid[b, j] = True
        for j in range(len(local), R):                       # padding rows: themselves only
            mask[b, j, (L - 1) + j] = True
    for b in range(len(samples), B):                         # the batch's padding samples too
        mask[b, torch.arange(R), (L - 1) + torch.arange(R)] = True
    pre, _, _ = drafter.draft_step(tok, drafter.project(par_aux), rpos, past_k, past_v, mask)
    kl = _kl_sparse(drafter.logits(pre), lab_ids, lab_p)
    w = valid.float()
    return (kl * w).sum() / w.sum(), int(valid.sum())


def objective(drafter, batch: Batch, cfg: TrainerConfig, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, dict]:
    """The full training loss of one batch and its parts; the unroll is the drafter's (``unroll_steps``: a
    parallel drafter trains every depth it drafts, train/parallel_objective.py)."""
    logits = drafter.forward_train(batch.aux, batch.tokens, lengths=batch.lengths,
                                   ttt_steps=drafter.unroll_steps(cfg.ttt_steps))
    main, per_step = main_loss(logits, batch, cfg.ttt_decay)
    loss = main
    disc, n_br = torch.zeros(()), 0
    if cfg.discard_weight > 0:
        disc, n_br = discard_loss(drafter, batch, cfg.max_branches, generator)
        loss = loss + cfg.discard_weight * disc
    return loss, {"loss": float(loss.detach()), "kl_steps": per_step, "discard": float(disc.detach()),
                  "branches": n_br}


@torch.no_grad()
def simulated_acceptance(drafter, samples: list[Sample], depth: int, batch_cells: int = 1024,
                         autocast: bool = False) -> tuple[float, int]:
    """(1 + mean accepted drafts of greedy chain drafting of ``depth`` tokens, number of roots).

    Samples are evaluated in groups whose padded batch (``traces.padded_cells``) stays within
    ``batch_cells`` (a single longer sample goes alone): the logits are ``cells x draft vocabulary`` floats
    per unroll step, and a group bounded only by its real positions (2048 before) padded to several
    thousand cells when short and long chunks met, a transient of hundreds of MiB before every publish
    (trainer) and every gate decision (server) that the processes then kept."""
    if not samples:
        return 1.0, 0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return _simulated_acceptance(drafter, samples, depth, batch_cells)


def _simulated_acceptance(drafter, samples: list[Sample], depth: int, batch_cells: int
                          ) -> tuple[float, int]:
    accepted, roots = 0.0, 0
    group: list[Sample] = []
    longest = 0
    for s in samples + [None]:  # type: ignore[list-item]
        if s is not None and (not group or padded_cells(len(group) + 1, max(longest, len(s))) <= batch_cells):
            group.append(s)
            longest = max(longest, len(s))
            continue
        if group:
            a, r = _accept_counts(drafter, collate(group), depth)
            accepted += a
            roots += r
        group, longest = ([s], len(s)) if s is not None else ([], 0)
    return (1.0 + accepted / roots if roots else 1.0), roots


def _accept_counts(drafter, batch: Batch, depth: int) -> tuple[float, int]:
    by_depth, roots = accepted_by_depth(drafter, batch, depth)
    return float(sum(by_depth)), roots


@torch.no_grad()
def accepted_by_depth(drafter, batch: Batch, depth: int) -> tuple[list[int], int]:
    """Greedy chain drafting of ``depth`` tokens at every root of ``batch``: how many roots had their first
    1, 2, .. ``depth`` drafted tokens all accepted, and the number of roots."""
    B, L = batch.tokens.shape
    logits = drafter.forward_train(batch.aux, batch.tokens, lengths=batch.lengths, ttt_steps=depth)
    alive = batch.root_ok.clone()
    roots = int(alive.sum())
    out = []
    for i, lg in enumerate(logits):
        # step i at root t drafts token t + 1 + i; accepted when it is the token that was committed.
        truth = torch.full((B, L), -2, dtype=torch.long)
        if L - 1 - i > 0:
            truth[:, :L - 1 - i] = batch.draft_tok[:, 1 + i:]
        inside = torch.arange(L)[None] + 1 + i < batch.lengths[:, None]
        alive = alive & inside & (lg.argmax(-1) == truth)
        out.append(int(alive.sum()))
    return out, roots


def trainable_parameters(drafter, train_head: bool) -> list[torch.nn.Parameter]:
    """fc and the midlayer always; the final norm and lm_head (initialised from the target's) only when
    ``train_head`` (frozen, they anchor the drafter's output space to the target's: fewer parameters to
    fit from little data, and a cheaper backward)."""
    params = []
    for name, p in drafter.named_parameters():
        train = train_head or not name.startswith(("lm_head.", "norm."))
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainerConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))


def clip(params: list[torch.nn.Parameter], max_norm: float) -> float:
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


__all__ = ["Batch", "Sample", "SoftTargets", "accepted_by_depth", "collate", "discard_loss", "main_loss",
           "make_optimizer", "objective", "simulated_acceptance", "trainable_parameters", "F"]
