"""The EAGLE-3 drafter model: config, module, draft vocabulary, training-time-test unroll, checkpoints.

Shape (EAGLE-3, arXiv 2503.01840, as SGLang's ``LlamaForCausalLMEagle3`` and vLLM's
``Eagle3LlamaForCausalLM`` load it), for a target with hidden size ``Ht`` and a drafter of hidden ``H``::

    h   = fc(aux)                       fc: [3 Ht -> H], over the target's low/mid/high layer states
    x   = cat(input_layernorm(embed(token)), hidden_norm(h))          [2 H]
    r   = h + o_proj(attn(q_proj(x), k_proj(x), v_proj(x)))          q/k/v take 2 H
    out = r + mlp(post_attention_layernorm(r))                       "prenorm" output
    logits = lm_head(norm(out))                                      over the draft vocabulary

``out`` (before the final norm) is also the drafter's own feature for the next draft position: at draft
depth >= 1 it replaces ``fc(aux)`` (the target has not seen the drafted tokens, so there is no aux).
Token embeddings are the target's, frozen and shared: the module keeps a reference to the target's
embedding matrix (``embed_weight``, a plain tensor attribute, so it is in neither ``parameters()`` nor
``state_dict()``) and the checkpoint never stores them.

Draft vocabulary: ``lm_head`` covers only ``draft_vocab_size`` target tokens (the most frequent ones). On a
CPU the full 49k-row lm_head dominated the cost of a drafter step (4.1 ms of it), so a small draft
vocabulary is what makes drafting cheap. ``d2t[i]`` is the offset from draft id ``i`` to its target id
(``target = i + d2t[i]``, EAGLE-3's convention) and ``t2d`` marks the target ids that have a draft id.

Positions (used identically by training and inference, so the two agree exactly): drafter position ``p``
(``p >= 1``) pairs the target's aux state of token ``p - 1`` with the embedding of token ``p``, sits at
rotary position ``p`` and predicts token ``p + 1``. Position 0 (no preceding aux state) is never used.
This is EAGLE's "feature of the previous token + the next token" input, indexed by the token.

Aux layer ids follow vLLM (``eagle_aux_hidden_state_layer_ids``; id ``i`` = the residual stream entering
target layer ``i``, which is also onspec's ``CausalLM`` convention). SGLang reads the same key as "output
of layer ``i``" and adds 1; ``save_eagle3(..., layer_id_convention="sglang")`` writes ids SGLang maps back
to ours.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError
from ..engine.runner import bucket_tokens
from ..models.bf16_linear import adopt_bf16_kernel, kernel_handles
from ..models.fused import apply_rope
from ..models.llama import ArchConfig, RMSNorm, rope_inv_freq

EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
ACCEPTED_ARCHITECTURES = (EAGLE3_ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaForCausalLM")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class DrafterLoadError(ValueError):
    """A drafter checkpoint cannot be used with this target; the message names the file and the problem."""


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's low/mid/high choice ``(2, n // 2, n - 3)``; for shallow targets, where that is not strictly
    increasing, the first, middle and last layer inputs (index ``n`` = the last layer's output)."""
    n = num_layers
    if 2 < n // 2 < n - 3:
        return (2, n // 2, n - 3)
    if n >= 3:
        return (0 if n < 4 else 1, n // 2, n - 1)
    if n == 2:
        return (0, 1, 2)
    raise ConfigError("aux_layers", f"a target with {n} layer(s) has no three distinct aux states")


@dataclass(frozen=True)
class EagleConfig:
    """Shape of an EAGLE-3 drafter for one target (see the module docstring for the maths)."""

    target_hidden_size: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int                       # the target's
    draft_vocab_size: int = 8192
    aux_layers: tuple[int, ...] = (2, 15, 27)
    max_position_embeddings: int = 8192
    rope_scaling: tuple[tuple[str, object], ...] | None = None
    target_num_layers: int = 0            # 0: unknown (aux_layers are then only checked for shape)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(name, msg)

        for name in ("target_hidden_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "draft_vocab_size", "max_position_embeddings"):
            v = getattr(self, name)
            check(isinstance(v, int) and v >= 1, name, f"must be a positive integer, got {v!r}")
        check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads")
        check(self.draft_vocab_size <= self.vocab_size, "draft_vocab_size",
              f"{self.draft_vocab_size} exceeds the target vocabulary ({self.vocab_size})")
        check(self.rms_norm_eps > 0 and self.rope_theta > 0, "rms_norm_eps", "eps and rope_theta must be > 0")
        aux = tuple(int(a) for a in self.aux_layers)
        object.__setattr__(self, "aux_layers", aux)
        check(len(aux) == 3, "aux_layers", f"needs exactly 3 target layer ids (low, mid, high), got {aux}")
        # The runner concatenates aux states in layer order, so the ids must be strictly increasing.
        check(all(0 <= a for a in aux) and aux[0] < aux[1] < aux[2], "aux_layers",
              f"must be strictly increasing non-negative layer ids, got {aux}")
        check(not self.target_num_layers or aux[2] <= self.target_num_layers, "aux_layers",
              f"{aux} exceeds the target's {self.target_num_layers} layers")

    @classmethod
    def for_target(cls, arch: ArchConfig, draft_vocab_size: int = 8192,
                   aux_layers: tuple[int, ...] | None = None) -> "EagleConfig":
        """A drafter as wide as the target's layers (EAGLE-3's usual choice); the draft vocabulary is capped
        at the target's."""
        return cls(
            target_hidden_size=arch.hidden_size, hidden_size=arch.hidden_size, num_heads=arch.num_heads,
            num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, intermediate_size=arch.intermediate_size,
            rms_norm_eps=arch.rms_norm_eps, rope_theta=arch.rope_theta, vocab_size=arch.vocab_size,
            draft_vocab_size=min(draft_vocab_size, arch.vocab_size),
            aux_layers=tuple(aux_layers) if aux_layers is not None else default_aux_layers(arch.num_layers),
            max_position_embeddings=arch.max_position_embeddings, rope_scaling=arch.rope_scaling,
            target_num_layers=arch.num_layers)


# ------------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)


class _MidLayer(nn.Module):
    def __init__(self, c: EagleConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)   # on the token embedding
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)       # on the feature
        self.self_attn = _Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = _MLP(c)


class EagleDrafter(nn.Module):
    """EAGLE-3 drafter. Parameter names are the EAGLE-3 checkpoint names (``fc.weight``, ``midlayer.*``,
    ``norm.weight``, ``lm_head.weight``) and the buffers ``d2t``/``t2d`` too, so ``state_dict()`` is exactly
    what SGLang/vLLM load."""

    def __init__(self, cfg: EagleConfig, embed: torch.Tensor | nn.Embedding | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[: cfg.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        # Rotary frequencies stay float32 whatever the weights' dtype (a plain attribute: .to() skips it).
        rope_src = SimpleNamespace(head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling)
        self.inv_freq = rope_inv_freq(rope_src)  # type: ignore[arg-type]
        self.embed_weight: torch.Tensor | None = None
        # Pad the rows of every matrix product to ``bucket_tokens`` sizes on a CPU (see ``_rows``).
        self.bucket_rows = True
        adopt_bf16_kernel(self)     # bf16 inference on CPUs without a native bf16 product (models/bf16_linear.py)
        if embed is not None:
            self.set_embeddings(embed)

    # ---- wiring ------------------------------------------------------------------------------
    def set_embeddings(self, embed: torch.Tensor | nn.Embedding) -> None:
        """Share the target's token embeddings (frozen; kept out of parameters and state_dict)."""
        w = embed.weight if isinstance(embed, nn.Embedding) else embed
        if w.dim() != 2 or tuple(w.shape) != (self.cfg.vocab_size, self.cfg.hidden_size):
            raise ValueError(f"embeddings: expected shape ({self.cfg.vocab_size}, {self.cfg.hidden_size}), "
                             f"got {tuple(w.shape)} (the drafter's hidden size must equal the target's)")
        # .detach(): a plain tensor sharing the target's storage, so nn.Module does not register it.
        self.embed_weight = w.detach()

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target token id of each draft id, [draft_vocab] int64."""
        return torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device) + self.d2t

    def blank(self) -> "EagleDrafter":
        """A new drafter of the same shape and kind (weights uninitialised, no embeddings)."""
        return EagleDrafter(self.cfg)

    def unroll_steps(self, ttt_steps: int) -> int:
        """Unroll steps it is trained and judged with (the objective, the trainer's held-out figure, the
        promotion gate): the sequential head the configured training-time-test depth ``ttt_steps``."""
        return ttt_steps

    def to_dtype(self, dtype: torch.dtype) -> "EagleDrafter":
        """A copy in ``dtype`` sharing the embeddings (``deepcopy`` would copy the target's embedding too)."""
        out = self.blank()
        out.load_state_dict(self.state_dict())
        out = out.to(dtype)
        out.embed_weight = self.embed_weight
        return out.eval().requires_grad_(False)

    # ---- building blocks -----------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_weight is None:
            raise RuntimeError("the drafter has no token embeddings: call set_embeddings(target embedding)")
        return F.embedding(token_ids, self.embed_weight).to(self.dtype)

    def project(self, aux: torch.Tensor) -> torch.Tensor:
        """Target aux states [..., 3 Ht] -> drafter features [..., H]."""
        return self._linear(self.fc, aux.to(self.dtype))

    def logits(self, prenorm: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of prenorm outputs [..., H] -> [..., draft_vocab]."""
        return self._linear(self.lm_head, self.norm(prenorm))

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``x`` [..., C] as rows [N', C] with zero rows appended up to ``bucket_tokens(N)``; and ``N``.

        Why: on a CPU a bf16 matrix product runs on oneDNN, which compiles and caches a primitive per
        (rows, weight) shape, ~0.7 MB each (onspec/server/memory.py). The drafter's row counts vary with
        everything: catch-up forwards (sequences x pending positions), tree depths (expanded nodes), and
        the trainer's batches (samples x longest sample), so unpadded they kept creating primitives and
        both the server and the trainer grew. Padded to the engine's buckets (engine/runner.py) the row
        counts fall into a few dozen sizes. Rows of a linear layer are independent, so the padding changes
        no real row (the extra zero rows are dropped, and get no gradient). Where the bf16 kernel does the
        products (models/bf16_linear.py) no oneDNN primitive is made, and padding would only cost time."""
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if self.bucket_rows and rows.device.type == "cpu" and not kernel_handles(rows, self.fc.weight):
            extra = bucket_tokens(n) - n
            if extra:
                rows = F.pad(rows, (0, 0, 0, extra))
        return rows, n

    def _linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` over bucket-padded rows (see ``_rows``)."""
        rows, n = self._rows(x)
        return layer(rows)[:n].view(*x.shape[:-1], -1)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] -> cos, sin [..., 1, D] (rotate-half convention, as the target)."""
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _mid(self, emb: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, attend,
             queries: torch.Tensor | None = None) -> torch.Tensor:
        """One midlayer pass over [B, T, H] inputs; returns the prenorm output [B, T, H].

        ``attend(q [B, Q, h, D], k [B, T, kvh, D], v [B, T, kvh, D]) -> [B, Q, h * D]`` (q, k rotated):
        inference and training differ only in what the new rows attend to. ``queries`` [B, Q]: the rows whose
        output is wanted (default: all, Q = T); every row still gives its key and value, but only these run the
        query, attention, o_proj and MLP, which is most of a row's cost (the parallel drafter's context rows
        are only cached)."""
        c, m = self.cfg, self.midlayer
        B, T = emb.shape[:2]
        x = torch.cat((m.input_layernorm(emb), m.hidden_norm(hidden)), dim=-1)
        a = m.self_attn
        cos, sin = self.rope(positions)
        rows, n = self._rows(x)    # padded once for q, k and v (see ``_rows``)
        k = apply_rope(a.k_proj(rows)[:n].view(B, T, c.num_kv_heads, c.head_dim), cos, sin)
        v = a.v_proj(rows)[:n].view(B, T, c.num_kv_heads, c.head_dim)
        if queries is not None:
            g = torch.arange(B, device=x.device)[:, None]
            x, hidden, cos, sin = x[g, queries], hidden[g, queries], cos[g, queries], sin[g, queries]
            rows, n = self._rows(x)
        Q = x.shape[1]
        q = apply_rope(a.q_proj(rows)[:n].view(B, Q, c.num_heads, c.head_dim), cos, sin)
        r = hidden + self._linear(a.o_proj, attend(q, k, v))
        h, n = self._rows(m.post_attention_layernorm(r))
        return r + m.mlp.down_proj(F.silu(m.mlp.gate_proj(h)) * m.mlp.up_proj(h))[:n].view(B, Q, -1)

    # ---- inference -------------------------------------------------------------------------------
    def draft_step(self, token_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                   past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, queries: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One drafter forward over ``T`` new positions of ``B`` sequences, against a KV cache.

        token_ids [B, T]; hidden [B, T, H] features (``project(aux)`` for positions the target has
        processed, the parent's prenorm output for drafted ones); positions [B, T] rotary positions;
        past_k/past_v [B, kvh, P, D] cached rows (None: P = 0); mask bool [B, T, P + T] (True = may attend;
        None = every past row plus a causal mask over the new ones). Every row must allow at least one key.
        ``queries`` [B, Q]: only these rows' outputs are computed (see ``_mid``); ``mask`` is then [B, Q, P + T].

        Returns (prenorm [B, T, H], or [B, Q, H] with ``queries``, k [B, kvh, T, D], v [B, kvh, T, D]); the caller stores k/v where it keeps
        this sequence's cache (the drafter owns no state, so batching and trees are the caller's choice).
        """
        c = self.cfg
        new_kv: list[torch.Tensor] = []

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, heads, T, D]
            new_kv.extend((k, v))
            if past_k is not None and past_k.shape[2] > 0:
                k = torch.cat((past_k.to(k.dtype), k), dim=2)
                v = torch.cat((past_v.to(v.dtype), v), dim=2)
            T, S = q.shape[2], k.shape[2]
            m = mask[:, None] if mask is not None else None
            if m is None and T > 1:
                m = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m,
                                                 enable_gqa=c.num_kv_heads != c.num_heads)
            return out.transpose(1, 2).reshape(q.shape[0], T, c.num_heads * c.head_dim)

        prenorm = self._mid(self.embed(token_ids), hidden.to(self.dtype), positions, attend, queries)
        return prenorm, new_kv[0], new_kv[1]

    # ---- training ------------------------------------------------------------------------------
    def forward_train(self, aux: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      lengths: torch.Tensor | None = None, ttt_steps: int = 1) -> list[torch.Tensor]:
        """EAGLE-3 training-time test: ``ttt_steps`` unrolled draft steps over whole sequences at once.

        Inputs: ``aux`` [B, L, 3 Ht], the target's aux states of ``input_ids`` [B, L] (row t: the state of
        token t); right padding given by ``attention_mask`` [B, L] (1 = real) or ``lengths`` [B].

        Alignment (what the trainer's KL must use): ``logits[i][:, t]`` (draft vocabulary) predicts token
        ``t + 1 + i``, so it is compared with the target's next-token distribution at position ``t + i``
        (the softmax of the target logits of row ``t + i``). Valid where ``1 <= t`` and ``t + i < length``
        (``ttt_valid_mask``); position 0 has no preceding aux state and is never valid.

        Unroll (step i, position t = "the drafter has drafted i tokens after real position t"):
          * step 0: feature ``fc(aux[t - 1])``, token ``input_ids[t]``, rotary position ``t``; causal
            attention over the step-0 rows ``1..t``. This is the real-context pass.
          * step i > 0: feature = the drafter's OWN prenorm output of step ``i - 1`` at position t (not the
            target's), token ``input_ids[t + i]``, rotary position ``t + i``; the query attends to the
            step-0 rows ``1..t`` plus its own chain's rows of steps ``1..i`` at position t (the keys
            ``k_j[t]``). That is exactly what inference computes when it drafts a chain of i tokens after
            real position t (``draft_step`` with those tokens), so training sees the drafter's own errors
            the way drafting does (EAGLE-3's TTT). Simplification against the paper's code: the drafted
            tokens fed at steps i > 0 are the data's tokens (teacher forcing), not the drafter's samples.

        Memory: attention scores are materialised, ``B * heads * L * L`` floats per step kept for the
        backward pass; split long sequences into windows (each window's first row then has no context).
        """
        c = self.cfg
        B, L = input_ids.shape
        if aux.shape[:2] != (B, L) or aux.shape[-1] != 3 * c.target_hidden_size:
            raise ValueError(f"aux: expected shape ({B}, {L}, {3 * c.target_hidden_size}), got {tuple(aux.shape)}")
        if ttt_steps < 1:
            raise ValueError("ttt_steps: must be >= 1")
        dev = input_ids.device
        lengths = _lengths(attention_mask, lengths, B, L, dev)
        pos = torch.arange(L, device=dev)
        key_ok = (pos >= 1)[None, :] & (pos[None, :] < lengths[:, None])                  # [B, L]
        eye = torch.eye(L, dtype=torch.bool, device=dev)
        # Step-0 keys a query may see: causal, real (t >= 1, inside the length); a query always sees itself
        # so no softmax row is empty (rows that are not valid are masked out of the loss anyway).
        mask0 = (pos[None, :] <= pos[:, None])[None] & (key_ok[:, None, :] | eye[None])  # [B, Lq, Lk]
        feat = self.project(aux[:, :-1])
        hidden = torch.cat((feat.new_zeros(B, 1, c.hidden_size), feat), dim=1)
        scale = 1.0 / math.sqrt(c.head_dim)
        groups = c.num_heads // c.num_kv_heads
        ks: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # [B, L, heads, D] -> [B, heads, L, D], kv heads repeated to the query heads (GQA)
            q = q.transpose(1, 2)
            ks.append(k.transpose(1, 2).repeat_interleave(groups, dim=1))
            vs.append(v.transpose(1, 2).repeat_interleave(groups, dim=1))
            s0 = (q @ ks[0].transpose(-1, -2)).float() * scale                       # [B, h, L, L]
            s0 = s0.masked_fill(~mask0[:, None], float("-inf"))
            # Chain terms: query t of step i against its own rows of steps 1..i (same position t).
            diag = [((q * kj).sum(-1).float() * scale)[..., None] for kj in ks[1:]]  # [B, h, L, 1] each
            p = torch.softmax(torch.cat([s0, *diag], dim=-1), dim=-1).to(q.dtype)
            out = p[..., :L] @ vs[0]
            for j, vj in enumerate(vs[1:]):
                out = out + p[..., L + j, None] * vj
            return out.transpose(1, 2).reshape(B, L, c.num_heads * c.head_dim)

        outs: list[torch.Tensor] = []
        emb = self.embed(input_ids)
        for i in range(ttt_steps):
            prenorm = self._mid(emb, hidden, (pos + i)[None].expand(B, L), attend)
            outs.append(self.logits(prenorm))
            if i + 1 < ttt_steps:
                emb, hidden = self._unroll_inputs(i + 1, input_ids, prenorm)
        return outs

    def _unroll_inputs(self, step: int, input_ids: torch.Tensor, prenorm: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings and features [B, L, H] of unroll step ``step >= 1`` (``prenorm``: step
        ``step - 1``'s output). EAGLE-3's TTT: the data's token ``t + step`` and the drafter's own previous
        output. The parallel drafter (speculation/parallel_drafter.py) feeds its placeholders here instead."""
        B, L = input_ids.shape
        ids = torch.cat((input_ids[:, step:], input_ids.new_zeros(B, min(step, L))), dim=1)[:, :L]
        return self.embed(ids), prenorm

    def forward(self, aux: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, ttt_steps: int = 1) -> list[torch.Tensor]:
        return self.forward_train(aux, input_ids, attention_mask, lengths, ttt_steps)

    def target_to_draft_probs(self, target_probs: torch.Tensor, renormalize: bool = True) -> torch.Tensor:
        """A target distribution [..., vocab] restricted to the draft vocabulary [..., draft_vocab].

        With ``renormalize`` the mass of tokens outside the draft vocabulary is dropped and the rest rescaled
        (as EAGLE-3's training code does by re-softmaxing the gathered target logits), so the KL target is a
        distribution; rows with no mass at all on the draft vocabulary stay zero (mask them out)."""
        if target_probs.shape[-1] != self.cfg.vocab_size:
            raise ValueError(f"target_probs: last dim must be the target vocabulary ({self.cfg.vocab_size}), "
                             f"got {target_probs.shape[-1]}")
        p = target_probs.index_select(-1, self.draft_ids.to(target_probs.device))
        if renormalize:
            p = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        return p


def _lengths(attention_mask: torch.Tensor | None, lengths: torch.Tensor | None, B: int, L: int,
             dev: torch.device) -> torch.Tensor:
    if lengths is None and attention_mask is None:
        return torch.full((B,), L, dtype=torch.long, device=dev)
    if lengths is None:
        if attention_mask.shape != (B, L):
            raise ValueError(f"attention_mask: expected shape ({B}, {L}), got {tuple(attention_mask.shape)}")
        return attention_mask.to(torch.long).sum(-1).to(dev)
    lengths = torch.as_tensor(lengths, device=dev).long()
    if lengths.shape != (B,) or bool((lengths < 0).any()) or bool((lengths > L).any()):
        raise ValueError(f"lengths: expected {B} values in [0, {L}]")
    return lengths


def ttt_valid_mask(lengths: torch.Tensor, L: int, step: int) -> torch.Tensor:
    """bool [B, L]: positions t whose ``logits[step][:, t]`` has a target (``1 <= t``, ``t + step < length``)."""
    t = torch.arange(L, device=lengths.device)
    return (t[None, :] >= 1) & (t[None, :] + step < lengths[:, None])


def ttt_loss(logits: list[torch.Tensor], target_probs: torch.Tensor, lengths: torch.Tensor,
             decay: float = 0.8) -> torch.Tensor:
    """Forward KL(target || drafter) summed over unroll steps with weights ``decay ** i`` (Aurora/EAGLE-3),
    each step averaged over its valid positions.

    ``target_probs`` [B, L, draft_vocab]: the target's next-token distribution of every row, already on the
    draft vocabulary (``EagleDrafter.target_to_draft_probs``). Step i compares ``logits[i][:, t]`` with
    ``target_probs[:, t + i]`` (see ``forward_train``)."""
    B, L, _ = target_probs.shape
    total = target_probs.new_zeros((), dtype=torch.float32)
    for i, lg in enumerate(logits):
        if i >= L:
            break
        valid = ttt_valid_mask(lengths.to(lg.device), L, i)[:, : L - i]
        if not bool(valid.any()):
            continue
        logq = torch.log_softmax(lg[:, : L - i].float(), dim=-1)[valid]
        p = target_probs[:, i:].float()[valid]
        kl = (torch.xlogy(p, p) - p * logq).sum(-1)
        total = total + (decay ** i) * kl.mean()
    return total


def chain_acceptance(drafter: EagleDrafter, logits: list[torch.Tensor], target_next: torch.Tensor,
                     lengths: torch.Tensor) -> float:
    """Held-out estimate of greedy chain acceptance length from a ``forward_train`` unroll.

    ``target_next`` [B, L]: the target's greedy next token at each row (for greedy traffic, the data's
    own next token). Step i at position t drafts token t + 1 + i after real position t; a chain drafted
    there is accepted up to its first mismatch, so the tokens committed per verification are
    ``1 + leading matches`` (the bonus token included). Averaged over positions where every step has a
    target; with ``len(logits)`` steps the estimate is capped at ``1 + len(logits)``."""
    n = len(logits)
    B, L = target_next.shape
    valid = ttt_valid_mask(lengths.to(target_next.device), L, n - 1)
    if not bool(valid.any()):
        return 0.0
    ids = drafter.draft_ids.to(target_next.device)
    alive = torch.ones(B, L, dtype=torch.bool, device=target_next.device)
    total = torch.ones(B, L, device=target_next.device)
    for i, lg in enumerate(logits):
        guess = ids[lg.argmax(-1)]                                          # [B, L] target ids
        truth = torch.cat((target_next[:, i:], target_next.new_full((B, i), -1)), dim=1)
        alive = alive & (guess == truth)
        total = total + alive.float()
    return float(total[valid].mean())


# ------------------------------------------------------------------------------------------------
# draft vocabulary
# ------------------------------------------------------------------------------------------------


def build_vocab_maps(token_counts: torch.Tensor, draft_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``draft_vocab_size`` most frequent tokens (ties: lower id first) -> (d2t int64 [draft], t2d bool
    [vocab]). Draft ids are in increasing target-id order, as EAGLE-3's tooling writes them."""
    counts = torch.as_tensor(token_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError("token_counts: must be a non-empty 1-D tensor over the target vocabulary")
    counts = counts.double()
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("token_counts: must be finite and >= 0")
    V = counts.numel()
    if not 1 <= draft_vocab_size <= V:
        raise ValueError(f"draft_vocab_size: must be in [1, {V}], got {draft_vocab_size}")
    order = torch.sort(-counts, stable=True).indices[:draft_vocab_size]
    ids = order.sort().values
    d2t = ids - torch.arange(draft_vocab_size)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    return d2t.long(), t2d


def day0_token_counts(vocab_size: int, seen_token_ids: list[int] | torch.Tensor = (),
                      always_include: tuple[int, ...] = ()) -> torch.Tensor:
    """Token counts for a drafter that has seen no traffic yet.

    Prior: BPE vocabularies (GPT-2 style, as SmolLM2's, Llama's and Qwen's) number tokens in merge order,
    and a merge's rank tracks how frequent the pair was in the tokenizer's training corpus, so a smaller
    id is, roughly, a more frequent token: prior count ``1 / (1 + id)`` (all below 1, so it only orders the
    tokens never seen). Each token in ``seen_token_ids`` (e.g. the prompts seen so far) adds 1, so any seen
    token outranks every unseen one; ``always_include`` (EOS and other stop tokens) are forced in.
    """
    counts = 1.0 / (1.0 + torch.arange(vocab_size, dtype=torch.float64))
    seen = torch.as_tensor(list(seen_token_ids) if not isinstance(seen_token_ids, torch.Tensor)
                           else seen_token_ids, dtype=torch.long).flatten()
    seen = seen[(seen >= 0) & (seen < vocab_size)]
    counts += torch.bincount(seen, minlength=vocab_size).double()
    for t in always_include:
        if 0 <= t < vocab_size:
            counts[t] = 1e18
    return counts


def init_drafter(loaded_target, cfg: EagleConfig | None = None, seed: int = 0,
                 token_counts: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> EagleDrafter:
    """A day-0 drafter for ``loaded_target`` (a ``LoadedModel``): random fc and midlayer (normal, std 0.02,
    from ``seed``), and a free warm start for the rest: ``lm_head`` rows copied from the target's lm_head
    rows of the draft tokens and ``norm`` from the target's final norm, so from the first step the drafter
    reads its features in the target's own output space (nothing to train there, no cost).

    Draft vocabulary: from ``token_counts`` when given (e.g. counts of the traffic seen so far), else
    ``day0_token_counts`` (BPE merge-rank prior, the target's EOS tokens always in)."""
    arch: ArchConfig = loaded_target.arch
    cfg = cfg or EagleConfig.for_target(arch)
    if cfg.vocab_size != arch.vocab_size or cfg.target_hidden_size != arch.hidden_size:
        raise ValueError(f"cfg: built for vocab {cfg.vocab_size} / hidden {cfg.target_hidden_size}, the target "
                         f"has {arch.vocab_size} / {arch.hidden_size}")
    if cfg.aux_layers[2] > arch.num_layers:
        raise ValueError(f"aux_layers: {cfg.aux_layers} exceeds the target's {arch.num_layers} layers")
    if token_counts is None:
        token_counts = day0_token_counts(arch.vocab_size, always_include=tuple(loaded_target.eos_token_ids))
    d2t, t2d = build_vocab_maps(token_counts, cfg.draft_vocab_size)
    target = loaded_target.model
    drafter = EagleDrafter(cfg, target.embed_tokens)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in drafter.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        drafter.d2t.copy_(d2t)
        drafter.t2d.copy_(t2d)
        drafter.lm_head.weight.copy_(target.lm_head.weight.float()[drafter.draft_ids])
        drafter.norm.weight.copy_(target.norm.weight.float())
    return drafter.to(dtype)


# ------------------------------------------------------------------------------------------------
# EAGLE-3 checkpoints
# ------------------------------------------------------------------------------------------------


def expected_shapes(cfg: EagleConfig) -> dict[str, tuple[int, ...]]:
    H, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "fc.weight": (H, 3 * cfg.target_hidden_size),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (q, 2 * H),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * H),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, q),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (cfg.intermediate_size, H),
        "midlayer.mlp.up_proj.weight": (cfg.intermediate_size, H),
        "midlayer.mlp.down_proj.weight": (H, cfg.intermediate_size),
        "norm.weight": (H,),
        "lm_head.weight": (cfg.draft_vocab_size, H),
        "d2t": (cfg.draft_vocab_size,),
        "t2d": (cfg.vocab_size,),
    }


def eagle3_config_dict(cfg: EagleConfig, dtype: torch.dtype = torch.bfloat16,
                       layer_id_convention: str = "vllm") -> dict:
    """config.json of an EAGLE-3 drafter as SGLang/vLLM read it (plus ``onspec_aux_layers``, the exact ids
    in onspec's convention, which ``load_eagle3`` prefers)."""
    if layer_id_convention not in ("vllm", "sglang"):
        raise ValueError("layer_id_convention: must be 'vllm' or 'sglang'")
    # vLLM: id i = residual entering layer i (ours). SGLang: id i = output of layer i, captured at i + 1.
    ids = list(cfg.aux_layers) if layer_id_convention == "vllm" else [a - 1 for a in cfg.aux_layers]
    return {
        "architectures": [EAGLE3_ARCHITECTURE],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": cfg.hidden_size,
        "target_hidden_size": cfg.target_hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": _DTYPE_NAMES.get(dtype, "float32"),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
        "onspec_aux_layers": list(cfg.aux_layers),
    }


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_eagle3(directory: str | Path, drafter: EagleDrafter, layer_id_convention: str = "vllm") -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the EAGLE-3 layout (each file replaced atomically).
    Embeddings are not written: SGLang/vLLM share the target's, as onspec does."""
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    missing = set(expected_shapes(drafter.cfg)) ^ set(state)
    if missing:  # a guard against the module and the format drifting apart
        raise RuntimeError(f"drafter state does not match the EAGLE-3 layout: {sorted(missing)}")
    return write_checkpoint(directory, state, eagle3_config_dict(drafter.cfg, drafter.dtype, layer_id_convention))


def write_checkpoint(directory: str | Path, state: dict[str, torch.Tensor], cfg_json: dict) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each file replaced atomically)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(d / WEIGHTS_FILE, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(cfg_json, indent=2)))
    return d


def _config_from_json(raw: dict, arch: ArchConfig, where: Path) -> EagleConfig:
    archs = raw.get("architectures") or []
    if not any(a in ACCEPTED_ARCHITECTURES for a in archs):
        raise DrafterLoadError(f"{where}: architectures {archs} is not an EAGLE-3 drafter "
                               f"(expected {EAGLE3_ARCHITECTURE!r})")
    if int(raw.get("num_hidden_layers", 1)) != 1:
        raise DrafterLoadError(f"{where}: num_hidden_layers is {raw.get('num_hidden_layers')}; onspec runs "
                               "one-layer EAGLE-3 drafters")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        vocab = int(raw["vocab_size"])
        aux = raw.get("onspec_aux_layers") or (raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") \
            or raw.get("eagle_aux_hidden_state_layer_ids") or default_aux_layers(arch.num_layers)
        scaling = raw.get("rope_scaling")
        cfg = EagleConfig(
            target_hidden_size=int(raw.get("target_hidden_size") or hidden), hidden_size=hidden,
            num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads", heads)),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            intermediate_size=int(raw["intermediate_size"]), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(raw.get("rope_theta", 10000.0)), vocab_size=vocab,
            draft_vocab_size=int(raw.get("draft_vocab_size") or vocab), aux_layers=tuple(int(a) for a in aux),
            max_position_embeddings=int(raw.get("max_position_embeddings", arch.max_position_embeddings)),
            rope_scaling=tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
            if isinstance(scaling, dict) else None,
            target_num_layers=arch.num_layers)
    except KeyError as exc:
        raise DrafterLoadError(f"{where}: config.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:  # ConfigError is a ValueError and names the field
        raise DrafterLoadError(f"{where}: invalid config: {exc}") from None
    if cfg.vocab_size != arch.vocab_size:
        raise DrafterLoadError(f"{where}: vocab_size {cfg.vocab_size} does not match the target's {arch.vocab_size}")
    if cfg.target_hidden_size != arch.hidden_size:
        raise DrafterLoadError(f"{where}: target_hidden_size {cfg.target_hidden_size} does not match the "
                               f"target's hidden size {arch.hidden_size}")
    if cfg.hidden_size != arch.hidden_size:
        raise DrafterLoadError(f"{where}: hidden_size {cfg.hidden_size} differs from the target's "
                               f"{arch.hidden_size}; shared token embeddings need them equal")
    return cfg


@dataclass
class Eagle3Checkpoint:
    """A checkpoint directory read and checked by ``read_eagle3``."""

    cfg: EagleConfig
    raw: dict                         # config.json as written
    state: dict[str, torch.Tensor]    # the EAGLE-3 tensors (``expected_shapes``), checked
    extras: dict[str, torch.Tensor]   # the tensors named in ``read_eagle3(extra=...)`` (the caller checks them)
    config_path: Path
    weights_path: Path


def read_eagle3(directory: str | Path, target, extra: tuple[str, ...] = ()) -> Eagle3Checkpoint:
    """Read and check an EAGLE-3 checkpoint for ``target`` (a ``LoadedModel``): files present and readable,
    config consistent with the target, every tensor present with its shape and a finite value, d2t a
    one-to-one map into the target vocabulary, t2d equal to its image. Tensors named in ``extra`` (e.g. the
    parallel drafter's ``mask_hidden``) are set aside, any other unknown tensor is an error. Raises
    ``DrafterLoadError`` naming the file and the problem.

    Aux layers: ``onspec_aux_layers`` when present (our own exports), else
    ``eagle_config.eagle_aux_hidden_state_layer_ids`` read in vLLM's convention, else EAGLE-3's default
    for the target's depth (which SGLang and vLLM also use when a checkpoint names none)."""
    d = Path(directory)
    if not d.is_dir():
        raise DrafterLoadError(f"drafter directory not found: {d}")
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise DrafterLoadError(f"{d}: missing {CONFIG_FILE}")
    if not w_path.is_file():
        raise DrafterLoadError(f"{d}: missing {WEIGHTS_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DrafterLoadError(f"{cfg_path}: unreadable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DrafterLoadError(f"{cfg_path}: expected a JSON object")
    cfg = _config_from_json(raw, target.arch, cfg_path)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DrafterLoadError(f"{w_path}: corrupt safetensors file: {exc}") from None
    # Some exporters store the (shared) embeddings or rotary tables; we use the target's.
    state = {k: v for k, v in state.items() if not k.endswith(("embed_tokens.weight", "rotary_emb.inv_freq"))}
    shapes = expected_shapes(cfg)
    if "d2t" not in state and "t2d" not in state and cfg.draft_vocab_size == cfg.vocab_size:
        state["d2t"] = torch.zeros(cfg.vocab_size, dtype=torch.long)      # full vocabulary: identity map
        state["t2d"] = torch.ones(cfg.vocab_size, dtype=torch.bool)
    missing = [k for k in shapes if k not in state]
    extras = {k: state.pop(k) for k in list(state) if k in extra}
    unexpected = [k for k in state if k not in shapes]
    if missing or unexpected:
        raise DrafterLoadError(f"{w_path}: tensors do not follow the EAGLE-3 layout: missing {missing}, "
                               f"unexpected {unexpected}")
    for name, shape in shapes.items():
        t = state[name]
        if tuple(t.shape) != shape:
            raise DrafterLoadError(f"{w_path}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if name not in ("d2t", "t2d") and not t.is_floating_point():
            raise DrafterLoadError(f"{w_path}: tensor {name} has dtype {t.dtype}, expected floating point")
        if name not in ("d2t", "t2d") and not bool(torch.isfinite(t).all()):
            raise DrafterLoadError(f"{w_path}: tensor {name} holds NaN or infinite values")
    d2t, t2d = state["d2t"], state["t2d"]
    if d2t.is_floating_point() or d2t.dtype == torch.bool:
        raise DrafterLoadError(f"{w_path}: d2t must be an integer tensor, got {d2t.dtype}")
    tid = torch.arange(cfg.draft_vocab_size) + d2t.long()
    if bool((tid < 0).any()) or bool((tid >= cfg.vocab_size).any()):
        bad = int(((tid < 0) | (tid >= cfg.vocab_size)).nonzero()[0])
        raise DrafterLoadError(f"{w_path}: d2t maps draft id {bad} to target id {int(tid[bad])}, outside "
                               f"[0, {cfg.vocab_size})")
    if tid.unique().numel() != tid.numel():
        raise DrafterLoadError(f"{w_path}: d2t maps two draft ids to the same target token")
    t2d = t2d.bool() if t2d.dtype != torch.bool else t2d
    expect_t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    expect_t2d[tid] = True
    if not torch.equal(t2d, expect_t2d):
        raise DrafterLoadError(f"{w_path}: t2d does not mark exactly the target tokens of d2t")
    state["d2t"], state["t2d"] = d2t.long(), t2d
    return Eagle3Checkpoint(cfg, raw, state, extras, cfg_path, w_path)


def fill_drafter(drafter: EagleDrafter, state: dict[str, torch.Tensor], target,
                 dtype: torch.dtype | None = None) -> EagleDrafter:
    """``drafter`` (freshly built for the checkpoint's config) with ``state`` loaded, in ``dtype`` (default:
    the file's), sharing ``target``'s embeddings, frozen for inference."""
    wdtype = dtype or state["fc.weight"].dtype
    drafter = drafter.to(wdtype)
    drafter.load_state_dict({k: (v.to(wdtype) if v.is_floating_point() else v) for k, v in state.items()})
    drafter.set_embeddings(target.model.embed_tokens)
    return drafter.eval().requires_grad_(False)


def load_eagle3(directory: str | Path, target, dtype: torch.dtype | None = None) -> EagleDrafter:
    """Load an EAGLE-3 drafter for ``target`` (a ``LoadedModel``), checked as ``read_eagle3`` says."""
    ckpt = read_eagle3(directory, target)
    return fill_drafter(EagleDrafter(ckpt.cfg), ckpt.state, target, dtype)


def config_summary(cfg: EagleConfig) -> dict:
    """The config as plain JSON-able values (for manifests and logs)."""
    out = asdict(cfg)
    out["aux_layers"] = list(cfg.aux_layers)
    out["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    return out


__all__ = [
    "ACCEPTED_ARCHITECTURES", "DrafterLoadError", "EagleConfig", "EagleDrafter", "build_vocab_maps", "chain_acceptance",
    "config_summary", "day0_token_counts", "default_aux_layers", "eagle3_config_dict", "expected_shapes",
    "init_drafter", "load_eagle3", "save_eagle3", "ttt_loss", "ttt_valid_mask", "Eagle3Checkpoint", "fill_drafter",
    "read_eagle3", "write_checkpoint",
]
