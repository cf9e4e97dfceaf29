"""The learned drafter as a proposer: EAGLE-3 model (re-exported from ``eagle_model``) + EAGLE-2 tree drafting.

``EagleProposer`` is a ``Proposer`` (speculation/proposer.py, name ``"learned"``) that reads aux states and keeps
them. What flows in:

* ``aux_layers()`` is the drafter's ``cfg.aux_layers``: the engine has its runner return, for every token of
  every row of a step that wants aux (``spec.wants_aux``), the concatenated residual states entering those
  target layers, ``[n, 3 Ht]``.
* ``on_prefill(prefill)``: the aux rows of a prefill chunk (tokens ``cache_len - n .. cache_len``).
* ``on_step(result)``: after verification, the aux rows of every tree node; only the accepted path's rows
  are real context (node ``accepted[k]`` sat at position ``verdict.start + k``), the rest are dropped.

Shared prompts (``n > 1`` and ``add_siblings``): the aux rows of a prompt's first ``P - 1`` positions, as the
first sibling to prefill them computed them, are kept by the first sample's seq id until every sibling
finished; a sample that copies those cache rows gets them from ``recall_aux``.

Per sequence the proposer keeps the aux rows of its processed tokens and its own small drafter KV cache
(rows for drafter positions ``1 .. n_kv``; position ``p`` pairs aux of token ``p - 1`` with token ``p``, see
``eagle_model``). ``propose`` first catches the cache up to the root (the last committed token, which the
target has not processed yet), batched over sequences, then grows a tree as EAGLE-2 does (arXiv
2406.16858): starting from the root's draft distribution, repeatedly expand the ``topk`` nodes of the
newest depth with the highest cumulative log-probability (each gets its ``topk`` most likely children),
up to ``max_depth``, and keep the ``budget`` nodes with the highest cumulative probability (a child never
beats its parent, so that set is a tree). Expansion stops early once ``budget`` nodes already beat every
node that could still be added. All sequences expand in one drafter forward per depth.

Children are deterministic top-k choices, so the tree carries no ``child_dists``: the verifier treats them
as point masses, which is lossless for any drafter, trained or not. ``scores`` are the drafter's
conditional probabilities (the controller calibrates them against measured acceptance).

Prefix reuse (``Engine``/``Scheduler``): a finished sequence's aux rows stay with its cache slot, as its KV rows
do, until the slot is taken again. A sequence that starts from those KV rows gets their aux rows from
``recall_aux`` (checked against the tokens they were computed for), so prefix reuse serves the learned
drafter too: without them it could not draft for that sequence (it needs the aux of every processed token).

``swap(drafter)`` replaces the model between steps (and emits the engine's ``drafter_swapped`` event); each
sequence's drafter cache is rebuilt lazily from its stored aux rows at its next ``propose`` (one batched
catch-up forward).

A tree stops growing early where one more depth cannot add enough expected tokens to pay for its forward
at the step's measured rate (``tokens_per_second``, set by the controller; ``_depth_pays``).

``HybridProposer`` (name ``"hybrid"``) merges the learned tree with the suffix tree of the same sequence
(union of paths, the larger path probability where both hold a node) and keeps the best ``budget`` nodes;
rows whose suffix tree is already confident keep it and are not drafted by the head.
``attach_learned(engine, spec_cfg, drafter)`` wires both into an engine through ``attach_speculation``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .eagle_model import (  # noqa: F401  (re-exported: the public API lives here)
    DrafterLoadError,
    EagleConfig,
    EagleDrafter,
    build_vocab_maps,
    chain_acceptance,
    day0_token_counts,
    default_aux_layers,
    eagle3_config_dict,
    expected_shapes,
    init_drafter,
    load_eagle3,
    save_eagle3,
    ttt_loss,
    ttt_valid_mask,
)
from ..engine.step import Prefill, StepResult
from .proposer import Proposer
from .tree import DraftTree, merge_trees


@dataclass
class _SeqState:
    """What the proposer remembers about one sequence."""

    aux: torch.Tensor                 # [cap, 3 Ht] target aux rows of positions 0 .. n_aux - 1
    n_aux: int = 0
    k: torch.Tensor | None = None     # [kvh, cap, D] drafter cache; row p - 1 holds drafter position p
    v: torch.Tensor | None = None
    n_kv: int = 0                     # drafter positions 1 .. n_kv are cached


@dataclass
class _Node:
    token: int
    parent: int
    cum: float                        # log-probability of the path from the root (drafter's)
    prob: float                       # conditional probability given the parent
    depth: int
    feat: int = -1                    # row of its parent's prenorm output in the previous depth's tensor
    anc: list[int] = field(default_factory=list)  # tree-cache rows of its drafted ancestors


@dataclass
class ProposerStats:
    proposals: int = 0
    seqs: int = 0
    nodes: int = 0
    forwards: int = 0
    catch_up_tokens: int = 0
    seconds: float = 0.0
    swaps: int = 0
    extra: dict = field(default_factory=dict)


def _grow(buf: torch.Tensor | None, need: int, dim: int, shape_fn) -> torch.Tensor:
    """Amortised doubling of a buffer along ``dim`` so it holds at least ``need`` rows."""
    if buf is not None and buf.shape[dim] >= need:
        return buf
    cap = max(need, 2 * (buf.shape[dim] if buf is not None else 0), 64)
    new = shape_fn(cap)
    if buf is not None:
        idx = [slice(None)] * new.dim()
        idx[dim] = slice(0, buf.shape[dim])
        new[tuple(idx)] = buf
    return new


class EagleProposer(Proposer):
    """EAGLE-3 drafter + EAGLE-2 dynamic tree (see the module docstring)."""

    name = "learned"
    wants_aux = True
    keeps_aux = True

    def __init__(self, drafter: EagleDrafter, topk: int = 4, max_depth: int = 6,
                 dtype: torch.dtype | None = None, min_path_prob: float = 0.02,
                 expected_acceptance: float | None = None) -> None:
        if topk < 1 or max_depth < 1:
            raise ValueError("topk and max_depth: must be >= 1")
        self.topk = topk
        self.max_depth = max_depth
        # A sequence's tree stops growing once its best frontier path is this unlikely: an untrained head
        # (near-uniform over the draft vocabulary) then costs one drafter forward, not max_depth of them,
        # and a confident one still drafts deep. Each depth is a sequential forward, half a millisecond to
        # several on a CPU, paid whether or not the controller keeps the nodes.
        self.min_log_prob = math.log(min_path_prob) if min_path_prob > 0 else -math.inf
        self.dtype = dtype
        self.drafter = self._prepare(drafter)
        self.engine = None
        self.states: dict[int, _SeqState] = {}
        # cache slot -> (seq id, tokens, state) of the sequence that last finished in it: the aux rows of the
        # KV rows the scheduler retains there (``recall_aux``)
        self.released: dict[int, tuple[int, list[int], _SeqState]] = {}
        # shared prompts: aux rows of the prompt's first P - 1 positions, by the first sibling's seq id, for
        # the siblings that copy those cache rows (dropped once every sibling finished)
        self._prompt_aux: dict[int, list[torch.Tensor]] = {}
        self.stats = ProposerStats()
        # Tokens per verification the serving drafter is expected to reach, as measured on held-out traces
        # (its version's gate figure, or a resumed version's manifest figure; 1.0 for a random day-0 head);
        # None: unknown. The draft policy does not ask a drafter whose estimate cannot pay for its own
        # proposals (speculation/policy.py, gate ``estimate``).
        self.expected_acceptance = expected_acceptance
        # Cost-aware depth (the controller sets these before each proposal, ``Speculation.draft``): one more
        # depth costs ``depth_seconds`` (an EMA measured here over whole depths: the drafter forward, its
        # draft-vocabulary logits and top-k, and the Python bookkeeping), and it pays only if the tokens it
        # can add are worth that time at the step's rate of committed tokens:
        # gain > depth_seconds * tokens_per_second. ``calibration`` scales the drafter's probabilities to
        # measured acceptance. tokens_per_second 0: expand to max_depth (EAGLE-2).
        self.tokens_per_second = 0.0
        self.calibration = 1.0
        self.depth_seconds: float | None = None
        self.depth_stops = 0                  # trees whose growth stopped because a depth would not pay
        self._epoch = 0                       # bumped whenever what a proposal depends on changes
        self._cache: tuple[int, dict[int, int], dict[int, DraftTree]] | None = None

    def _prepare(self, drafter: EagleDrafter) -> EagleDrafter:
        if drafter.embed_weight is None:
            raise ValueError("drafter: has no token embeddings (set_embeddings(target embedding) first)")
        if self.dtype is not None and drafter.dtype != self.dtype:
            return drafter.to_dtype(self.dtype)
        return drafter

    # ---- wiring --------------------------------------------------------------------------------
    def attach(self, engine) -> None:
        """Check the drafter fits ``engine``'s target and remember the engine (its scheduler's prefix-reuse
        switch, its events)."""
        arch = engine.loaded.arch
        c = self.drafter.cfg
        if c.vocab_size != arch.vocab_size or c.target_hidden_size != arch.hidden_size:
            raise ValueError(f"drafter: built for vocab {c.vocab_size} / hidden {c.target_hidden_size}, the "
                             f"engine's target has {arch.vocab_size} / {arch.hidden_size}")
        if c.aux_layers[2] > arch.num_layers:
            raise ValueError(f"drafter: aux_layers {c.aux_layers} exceed the target's {arch.num_layers} layers")
        self.engine = engine

    def aux_layers(self) -> tuple[int, ...]:
        return tuple(self.drafter.cfg.aux_layers)

    @property
    def shared_prompts_kept(self) -> int:
        """Shared prompts whose aux rows it keeps for their siblings (each dropped once every sibling finished)."""
        return len(self._prompt_aux)

    def price_depth(self, tokens_per_second: float, calibration: float) -> None:
        self.tokens_per_second, self.calibration = tokens_per_second, calibration

    def set_expected_acceptance(self, acceptance: float | None) -> None:
        """The serving drafter's held-out acceptance length was measured again (the version manager's gate,
        train/versions.py); None: unknown."""
        self.expected_acceptance = acceptance

    def swap(self, drafter: EagleDrafter, expected_acceptance: float | None = None) -> None:
        """Use ``drafter`` from the next ``propose`` on (call between engine steps). Drafter caches are
        rebuilt lazily from the stored aux rows; if the aux layers change, stored aux rows are useless and
        sequences already running stop drafting (new ones draft normally). ``expected_acceptance``: its
        held-out acceptance length, if measured."""
        old = self.drafter.cfg
        new = drafter.cfg
        if new.vocab_size != old.vocab_size or new.target_hidden_size != old.target_hidden_size:
            raise ValueError(f"swap: the new drafter is for vocab {new.vocab_size} / hidden "
                             f"{new.target_hidden_size}, the current one for {old.vocab_size} / "
                             f"{old.target_hidden_size}")
        self.drafter = self._prepare(drafter)
        layers_changed = tuple(new.aux_layers) != tuple(old.aux_layers)
        if layers_changed and self.engine is not None:
            self.attach(self.engine)
        for st in self.states.values():
            st.n_kv = 0
            st.k = st.v = None      # head counts or dtype may differ
            if layers_changed:
                st.n_aux = 0
        if layers_changed:
            self.released.clear()
        self.expected_acceptance = expected_acceptance
        self.stats.swaps += 1
        self._epoch += 1
        if self.engine is not None:
            self.engine.events.drafter_swapped(self.name)

    # ---- lifecycle -------------------------------------------------------------------------------
    def add_request(self, seq) -> None:
        c = self.drafter.cfg
        dtype = self.engine.runner.model.embed_tokens.weight.dtype if self.engine is not None else self.drafter.dtype
        self.states[seq.seq_id] = _SeqState(aux=torch.zeros(len(seq.tokens) + 64, 3 * c.target_hidden_size,
                                                            dtype=dtype))

    def on_finish(self, seq) -> None:
        st = self.states.pop(seq.seq_id, None)
        # The engine finishes a sequence while it still holds its slot (an abort releases it first). Its last
        # step's aux rows arrive in the same step's ``on_step``, which looks here too.
        reuse = self.engine is not None and self.engine.scheduler.reuse_prefixes
        if st is not None and reuse and seq.slot >= 0:
            st.k = st.v = None
            self.released[seq.slot] = (seq.seq_id, seq.tokens, st)
        if seq.siblings and all(s.finished for s in seq.siblings):
            self._prompt_aux.pop(seq.siblings[0].seq_id, None)

    def recall_aux(self, prefill: Prefill) -> torch.Tensor | None:
        """Aux rows of the cache rows ``prefill`` did not compute: a sibling's prompt rows (``shared``) or the
        rows the sequence reuses from its slot (``reused``)."""
        if prefill.origin == "shared":
            return self._shared_aux(prefill.seq, prefill.n)
        return self._reused_aux(prefill.seq, prefill.n)

    def _shared_aux(self, seq, n_rows: int) -> torch.Tensor | None:
        chunks = self._prompt_aux.get(seq.siblings[0].seq_id) if seq.siblings is not None else None
        if not chunks or sum(c.shape[0] for c in chunks) < n_rows:
            return None  # attached mid-way: this sample drafts from the suffix tree only
        return torch.cat(chunks)[:n_rows] if len(chunks) > 1 else chunks[0][:n_rows]

    def _keep_prompt_aux(self, seq, start: int, aux: torch.Tensor) -> None:
        """Keep the aux rows of the prompt's first P - 1 positions for the siblings that will copy them."""
        need = seq.num_prompt - 1
        if start >= need:  # kept even with no sibling waiting: add_siblings(join=...) may bring one later
            return
        if all(s.finished for s in seq.siblings):
            return  # nobody left to copy them (a sample that finished on its first token)
        chunks = self._prompt_aux.setdefault(seq.siblings[0].seq_id, [])
        if start == 0:
            chunks.clear()  # a recompute after preemption (or another sibling) starts over
        if start != sum(c.shape[0] for c in chunks):
            return
        chunks.append(aux[:need - start].clone())

    def _reused_aux(self, seq, n: int) -> torch.Tensor | None:
        """Aux rows of ``seq``'s first ``n`` tokens, which it reuses from its slot's retained KV rows: those of
        the sequence that finished in the slot (or ``seq``'s own, when it was preempted and comes back), if
        they cover the same tokens; else None (the sequence then drafts from the other sources)."""
        st = self.states.get(seq.seq_id)
        if st is None or st.n_aux < n:
            _, tokens, st = self.released.get(seq.slot, (None, None, None))
            if st is None or st.n_aux < n or tokens[:n] != seq.tokens[:n]:
                return None
        return st.aux[:n]

    def on_weights_changed(self) -> None:
        """The kept aux rows of retained slots are not what the target would compute now."""
        self.released.clear()

    def _write_aux(self, st: _SeqState, start: int, rows: torch.Tensor) -> None:
        if start > st.n_aux:
            return  # a gap (aux missing for earlier tokens): this sequence cannot draft
        end = start + rows.shape[0]
        st.aux = _grow(st.aux, end, 0, lambda cap: st.aux.new_zeros(cap, st.aux.shape[1]))
        st.aux[start:end] = rows.to(st.aux.dtype)
        st.n_aux = end
        # Drafter position p reads aux row p - 1: rewritten rows invalidate positions > start.
        st.n_kv = min(st.n_kv, start)

    def on_prefill(self, prefill: Prefill) -> None:
        seq, aux = prefill.seq, prefill.aux
        if prefill.origin == "computed" and seq.siblings is not None and aux is not None:
            self._keep_prompt_aux(seq, prefill.start, aux)
        st = self.states.get(seq.seq_id)
        if st is None or aux is None:
            return
        self._write_aux(st, prefill.start, aux[:prefill.n])
        self._epoch += 1

    def on_step(self, result: StepResult) -> None:
        for v in result.verdicts:
            seq = v.seq
            st = self.states.get(seq.seq_id)
            if st is None and seq.slot in self.released and self.released[seq.slot][0] == seq.seq_id:
                st = self.released[seq.slot][2]     # finished this step: its final rows, for prefix reuse
            if st is None or v.aux is None:
                continue
            self._write_aux(st, v.start, v.aux[torch.as_tensor(v.accepted)])
        self._epoch += 1

    # ---- drafting ------------------------------------------------------------------------------
    def propose(self, seqs: list, budgets: dict[int, int]) -> dict[int, DraftTree]:
        """Draft trees for the sequences that can draft (root pending, aux complete, budget > 0)."""
        t0 = time.perf_counter()
        active = []
        for seq in seqs:
            st = self.states.get(seq.seq_id)
            budget = budgets.get(seq.seq_id, 0)
            # Drafting needs the aux of every processed token and exactly one pending token (the root).
            if st is None or budget <= 0 or st.n_aux < 1 or st.n_aux != len(seq.tokens) - 1:
                continue
            # The root position is always (re)computed: its output is where the tree grows from.
            st.n_kv = min(st.n_kv, st.n_aux - 1)
            active.append((seq, st, budget))
        if not active:
            return {}
        with torch.inference_mode():
            trees = self._draft(active)
        self.stats.proposals += 1
        self.stats.seqs += len(active)
        self.stats.nodes += sum(t.num_draft for t in trees.values())
        self.stats.seconds += time.perf_counter() - t0
        self._cache = (self._epoch, {s.seq_id: budgets.get(s.seq_id, 0) for s in seqs}, trees)
        return trees

    def _draft(self, active: list) -> dict[int, DraftTree]:
        """The trees of the sequences that can draft (``(seq, state, budget)`` each): catch the drafter cache
        up to the root, then grow the tree depth by depth. The parallel proposer drafts every depth in one
        forward instead (speculation/parallel_proposer.py)."""
        root_hidden, root_logits = self._catch_up(active)
        return self._tree(active, root_hidden, root_logits)

    def propose_cached(self, seqs: list, budgets: dict[int, int]) -> dict[int, DraftTree]:
        """``propose``, reusing this step's result when it was already computed for these sequences and
        budgets (so a hybrid proposer does not draft twice per step)."""
        if self._cache is not None:
            epoch, cached_budgets, trees = self._cache
            if epoch == self._epoch and all(s.seq_id in cached_budgets and
                                            cached_budgets[s.seq_id] == budgets.get(s.seq_id, 0) for s in seqs):
                return {s.seq_id: trees[s.seq_id] for s in seqs if s.seq_id in trees}
        return self.propose(seqs, budgets)

    def _depth_pays(self, nodes: list[list[_Node]], expand: list[tuple[int, list[int]]]) -> bool:
        """Can one more depth add enough expected accepted tokens to pay for its forward?

        Expanding node i adds children whose path probabilities sum to at most i's own (its children's
        conditional probabilities sum to <= 1), so the depth adds at most the sum of the expanded nodes'
        calibrated path probabilities; it pays if that beats ``depth_seconds * tokens_per_second``. An
        upper bound, so the rule errs towards expanding."""
        if self.tokens_per_second <= 0 or self.depth_seconds is None:
            return True
        bound = self.calibration * sum(math.exp(nodes[b][i].cum) for b, sel in expand for i in sel)
        return bound > self.depth_seconds * self.tokens_per_second

    def _catch_up(self, active: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the drafter over every sequence's uncached positions ``n_kv + 1 .. n_aux`` (the last one pairs
        the newest aux row with the root token) in one padded forward; store their cache rows.
        Returns the root position's prenorm output [B, H] and draft logits [B, Vd]."""
        d = self.drafter
        c = d.cfg
        B = len(active)
        pend = [st.n_aux - st.n_kv for _, st, _ in active]
        T, P = max(pend), max(st.n_kv for _, st, _ in active)
        tokens = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        aux = torch.zeros(B, T, 3 * c.target_hidden_size, dtype=active[0][1].aux.dtype)
        for b, (seq, st, _) in enumerate(active):
            p0, n = st.n_kv + 1, pend[b]
            tokens[b, :n] = torch.tensor(seq.tokens[p0:p0 + n])
            positions[b, :n] = torch.arange(p0, p0 + n)
            aux[b, :n] = st.aux[p0 - 1:p0 - 1 + n]
        past_k, past_v = self._past_kv(active, P)
        mask = None
        if B > 1 or T > 1:
            mask = torch.zeros(B, T, P + T, dtype=torch.bool)
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            for b, (_, st, _) in enumerate(active):
                n = pend[b]
                mask[b, :n, :st.n_kv] = True
                mask[b, :n, P:P + n] = causal[:n, :n]
                mask[b, n:, P + n:] = torch.eye(T - n, dtype=torch.bool)  # padding rows: themselves only
        prenorm, k_new, v_new = d.draft_step(tokens, d.project(aux), positions, past_k, past_v, mask)
        self.stats.forwards += 1
        self.stats.catch_up_tokens += sum(pend)
        last = torch.tensor([n - 1 for n in pend])
        root_hidden = prenorm[torch.arange(B), last]
        self._cache_rows(active, pend, k_new, v_new)
        return root_hidden, d.logits(root_hidden)

    def _past_kv(self, active: list, P: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The sequences' cached drafter rows as one zero-padded batch [B, kvh, P, D] each (None if P = 0)."""
        if P == 0:
            return None, None
        d = self.drafter
        past_k = torch.zeros(len(active), d.cfg.num_kv_heads, P, d.cfg.head_dim, dtype=d.dtype)
        past_v = torch.zeros_like(past_k)
        for b, (_, st, _) in enumerate(active):
            if st.n_kv:
                past_k[b, :, :st.n_kv] = st.k[:, :st.n_kv]
                past_v[b, :, :st.n_kv] = st.v[:, :st.n_kv]
        return past_k, past_v

    def _cache_rows(self, active: list, pend: list[int], k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Keep the keys/values of each sequence's first ``pend[b]`` new rows (positions ``n_kv + 1 ..
        n_aux``): its cache then covers every processed token."""
        d = self.drafter
        kvh, D = d.cfg.num_kv_heads, d.cfg.head_dim
        for b, (_, st, _) in enumerate(active):
            n, lo = pend[b], st.n_kv
            st.k = _grow(st.k, lo + n, 1, lambda cap: torch.zeros(kvh, cap, D, dtype=d.dtype))
            st.v = _grow(st.v, lo + n, 1, lambda cap: torch.zeros(kvh, cap, D, dtype=d.dtype))
            st.k[:, lo:lo + n] = k_new[b, :, :n]
            st.v[:, lo:lo + n] = v_new[b, :, :n]
            st.n_kv = st.n_aux

    def _tree(self, active: list, root_hidden: torch.Tensor, root_logits: torch.Tensor) -> dict[int, DraftTree]:
        """EAGLE-2 expansion for all active sequences at once (one drafter forward per depth).

        Bookkeeping is in Python lists (a tree holds a few dozen nodes); tensors are built once per depth.
        Tree nodes' cache rows live in a batch-local area after the longest prefix: the nodes expanded at
        depth d occupy rows ``P + (d - 1) * k .. P + d * k``."""
        d = self.drafter
        c = d.cfg
        kvh, D = c.num_kv_heads, c.head_dim
        k = min(self.topk, c.draft_vocab_size)
        B = len(active)
        draft_ids = d.draft_ids
        n_kv = torch.tensor([st.n_kv for _, st, _ in active])
        P = int(n_kv.max())
        cache_k = torch.zeros(B, kvh, P + k * max(0, self.max_depth - 1), D, dtype=d.dtype)
        cache_v = torch.zeros_like(cache_k)
        for b, (_, st, _) in enumerate(active):
            cache_k[b, :, :st.n_kv] = st.k[:, :st.n_kv]
            cache_v[b, :, :st.n_kv] = st.v[:, :st.n_kv]
        lp = torch.log_softmax(root_logits.float(), dim=-1)
        val, idx = lp.topk(k, dim=-1)
        vals, tids = val.tolist(), draft_ids[idx].tolist()
        nodes: list[list[_Node]] = []
        frontier: list[list[int]] = []
        for b, (seq, _, _) in enumerate(active):
            ns = [_Node(seq.tokens[-1], -1, 0.0, 1.0, 0)]
            ns.extend(_Node(tids[b][j], 0, vals[b][j], math.exp(vals[b][j]), 1, feat=b) for j in range(k))
            nodes.append(ns)
            frontier.append(list(range(1, k + 1)))
        feats = root_hidden                                 # [*, H]: features the next expansion reads
        for depth in range(1, self.max_depth):
            expand: list[tuple[int, list[int]]] = []
            for b, (_, _, budget) in enumerate(active):
                ns = nodes[b]
                sel = sorted(frontier[b], key=lambda i: -ns[i].cum)[:k]
                if ns[sel[0]].cum < self.min_log_prob:
                    continue
                # EAGLE-2 always expands; we stop when it cannot change the result: descendants of the
                # selected nodes score at most the best of them, and `budget` nodes already do better.
                if len(ns) - 1 >= budget:
                    kth = sorted((n.cum for n in ns[1:]), reverse=True)[budget - 1]
                    if kth >= ns[sel[0]].cum:
                        continue
                expand.append((b, sel))
            if not expand:
                break
            if not self._depth_pays(nodes, expand):
                self.depth_stops += len(expand)
                break
            t_depth = time.perf_counter()
            E, R = len(expand), (depth - 1) * k            # R: tree rows written by earlier depths
            bidx = torch.tensor([b for b, _ in expand])
            tokens = torch.tensor([[nodes[b][i].token for i in sel] for b, sel in expand])
            hidden = feats[torch.tensor([nodes[b][i].feat for b, sel in expand for i in sel])].view(E, k, -1)
            positions = (n_kv[bidx] + depth)[:, None].expand(E, k)   # the root sits at position n_kv
            cols = torch.arange(P + R + k)
            mask = (cols[None, None, :] < n_kv[bidx][:, None, None]).expand(E, k, P + R + k).clone()
            me, mj, mc = [], [], []
            for e, (b, sel) in enumerate(expand):
                for j, i in enumerate(sel):
                    for r in nodes[b][i].anc + [R + j]:       # drafted ancestors, then itself
                        me.append(e)
                        mj.append(j)
                        mc.append(P + r)
            mask[me, mj, mc] = True
            prenorm, k_new, v_new = d.draft_step(tokens, hidden, positions, cache_k[bidx, :, :P + R],
                                                 cache_v[bidx, :, :P + R], mask)
            self.stats.forwards += 1
            cache_k[bidx, :, P + R:P + R + k] = k_new
            cache_v[bidx, :, P + R:P + R + k] = v_new
            lp = torch.log_softmax(d.logits(prenorm).float(), dim=-1)   # [E, k, Vd]
            val, idx = lp.topk(k, dim=-1)
            vals, tids = val.tolist(), draft_ids[idx].tolist()
            for e, (b, sel) in enumerate(expand):
                ns = nodes[b]
                new: list[int] = []
                for j, i in enumerate(sel):
                    node = ns[i]
                    anc = node.anc + [R + j]
                    for m in range(k):
                        v = vals[e][j][m]
                        new.append(len(ns))
                        ns.append(_Node(tids[e][j][m], i, node.cum + v, math.exp(v), depth + 1,
                                        feat=e * k + j, anc=anc))
                frontier[b] = new
            feats = prenorm.reshape(E * k, -1)
            dt = time.perf_counter() - t_depth
            self.depth_seconds = dt if self.depth_seconds is None else 0.9 * self.depth_seconds + 0.1 * dt
        out: dict[int, DraftTree] = {}
        for b, (seq, _, budget) in enumerate(active):
            ns = nodes[b]
            # Highest cumulative probability first; ties by creation order, so a parent precedes its child.
            keep = sorted(sorted(range(1, len(ns)), key=lambda i: (-ns[i].cum, i))[:budget])
            remap = {0: 0}
            for new_i, old_i in enumerate(keep, start=1):
                remap[old_i] = new_i
            out[seq.seq_id] = DraftTree(
                tokens=[ns[0].token] + [ns[i].token for i in keep],
                parents=[-1] + [remap[ns[i].parent] for i in keep],
                scores=[1.0] + [ns[i].prob for i in keep],
                source="learned")
        return out


# ------------------------------------------------------------------------------------------------
# hybrid: learned + suffix
# ------------------------------------------------------------------------------------------------


class HybridProposer(Proposer):
    """Learned tree merged with the suffix tree of the same sequence (``source="hybrid"``), asking the learned
    drafter only where the suffix tree is not already confident.

    SuffixDecoding's hybrid (arXiv 2411.04975, section 4.3) drafts from the suffix tree when its score is
    high and falls back to a model drafter otherwise. Here: a sequence whose suffix tree is expected to
    commit at least ``confident`` draft tokens (``score``: the controller's calibrated expectation, the sum
    of its nodes' path probabilities) keeps its suffix tree as it is (source ``"suffix"``); the others get
    the merged tree. Where every row of a step is confident the drafter forward is skipped altogether. Why:
    on this CPU one learned proposal costs ~40% of a target step at batch 2, and where the suffix drafter
    finds a long copy the head mostly proposes the same path again. ``confident`` 0: always ask the head.

    Events are no-ops: the learned and suffix proposers are registered with the engine's ``Speculation``
    themselves and observe everything directly."""

    name = "hybrid"
    arm = "learned"  # judged with the learned strategy: both pay the same drafter forward (speculation/utility.py)
    wants_aux = True

    def __init__(self, learned: EagleProposer, suffix: Proposer | None = None, confident: float = 0.0,
                 score: Callable[[DraftTree], float] | None = None) -> None:
        self.learned = learned
        self.wraps = learned
        self.suffix = suffix
        self.confident = confident
        # expected accepted drafts of a suffix tree; by default its uncalibrated path probabilities
        # (attach_learned passes the controller's calibrated expectation)
        self.score: Callable[[DraftTree], float] = score or (lambda tree: sum(tree.path_scores()[1:]))
        self.suffix_only = 0  # rows given their suffix tree without asking the head

    def aux_layers(self) -> tuple[int, ...]:
        return self.learned.aux_layers()

    def estimate(self) -> float | None:
        return self.learned.estimate()

    def price_depth(self, tokens_per_second: float, calibration: float) -> None:
        self.learned.price_depth(tokens_per_second, calibration)

    def propose(self, seqs: list, budgets: dict[int, int]) -> dict[int, DraftTree]:
        suffix = self.suffix.propose(seqs, budgets) if self.suffix is not None else {}
        out: dict[int, DraftTree] = {}
        ask = []
        for seq in seqs:
            tree = suffix.get(seq.seq_id)
            if self.confident > 0 and tree is not None and tree.num_draft and self.score(tree) >= self.confident:
                out[seq.seq_id] = tree
                self.suffix_only += 1
            else:
                ask.append(seq)
        learned = self.learned.propose_cached(ask, budgets) if ask else {}
        for seq in ask:
            sid = seq.seq_id
            parts = [t for t in (learned.get(sid), suffix.get(sid)) if t is not None and t.num_draft]
            if parts and budgets.get(sid, 0) > 0:
                out[sid] = merge_trees(parts, budgets[sid], "hybrid")
        return out


def attach_learned(engine, spec_cfg, drafter: EagleDrafter, topk: int = 4, max_depth: int = 6,
                   dtype: torch.dtype | None = None, expected_acceptance: float | None = None,
                   extra: dict[str, Proposer] | None = None):
    """Give ``engine`` speculation with the suffix, learned and hybrid strategies (and the ``extra``
    proposers, e.g. a parallel drafter the draft policy measures beside them); returns the
    ``Speculation``. ``expected_acceptance``: the drafter's held-out acceptance length, if measured.

    The drafter runs in ``dtype``, by default the engine's: on this CPU a bfloat16 draft-vocabulary
    lm_head costs 0.6-1.6 ms for 1-32 rows against 1.3-14 ms in float32, and the lm_head is most of a
    drafter step. (The trainer's float32 weights are converted on attach and on every swap.)"""
    from ..models.loader import DTYPES
    from .controller import SuffixAdapter, attach_speculation

    if dtype is None:
        dtype = DTYPES.get(engine.cfg.dtype, drafter.dtype)
    learned = EagleProposer(drafter, topk=topk, max_depth=max_depth, dtype=dtype,
                            expected_acceptance=expected_acceptance)
    learned.attach(engine)
    suffix = SuffixAdapter(spec_cfg)  # registered as strategy "suffix" and merged by the hybrid proposer

    def calibrated(tree: DraftTree) -> float:
        """The controller's calibrated expected accepted drafts (``spec`` is bound below, before any step)."""
        return sum(spec.controller.calibrated(tree)[1:])

    hybrid = HybridProposer(learned, suffix, confident=spec_cfg.hybrid_suffix_confident, score=calibrated)
    spec = attach_speculation(engine, spec_cfg,
                              extra={"suffix": suffix, "learned": learned, "hybrid": hybrid, **(extra or {})})
    return spec


__all__ = [
    "DrafterLoadError", "EagleConfig", "EagleDrafter", "EagleProposer", "HybridProposer", "attach_learned",
    "build_vocab_maps", "chain_acceptance", "day0_token_counts", "default_aux_layers", "eagle3_config_dict",
    "expected_shapes", "init_drafter", "load_eagle3", "merge_trees", "save_eagle3", "ttt_loss", "ttt_valid_mask",
]
