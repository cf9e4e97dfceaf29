"""One decoder implementation for the llama, qwen2 and qwen3 families.

The three differ only in small switches (qwen2: q/k/v bias; qwen3: RMSNorm on q and k per head), so one
module with flags serves them all. It is our own code rather than transformers' because the engine needs
things a generic framework does not give cheaply: several new tokens per sequence with an arbitrary
(tree) attention mask over them, a preallocated slot KV cache written in place, hidden states of chosen
layers for the learned drafter, and fused q/k/v and gate/up projections (fewer matrix products launch,
which is most of the cost on a CPU).

The model never sees a request: the runner hands it token ids, positions and an ``AttnBatch`` describing
where each sequence's cache lives.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .bf16_linear import Bf16Linear, load_kernel
from .fused import attend_rows, attention_kernel_applies, rms_norm, rope_and_cache, silu_mul

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ArchConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, object], ...] | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg: dict) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type", "")
        family = None
        for a in archs:
            family = SUPPORTED_ARCHITECTURES.get(a, family)
        if family is None and model_type in ("llama", "qwen2", "qwen3", "mistral"):
            family = "llama" if model_type == "mistral" else model_type
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or model_type!r}; onspec runs {sorted(set(SUPPORTED_ARCHITECTURES))}")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise UnsupportedModelError(f"unsupported rope scaling {kind!r} (supported: default, linear, llama3)")
            scaling = tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))
        return cls(
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads", heads),
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            qk_norm=family == "qwen3",
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        )


def rope_inv_freq(arch: ArchConfig) -> torch.Tensor:
    """Inverse frequencies, with linear or llama3 scaling applied (same maths as transformers)."""
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = dict(arch.rope_scaling or ())
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = torch.where(medium, smoothed, scaled)
    return inv.float()


@dataclass
class AttnBatch:
    """Where each sequence's new tokens live, built by the runner.

    Tokens arrive packed: ``N`` tokens of ``B`` sequences back to back (so the matrix products do no
    padding work). Attention unpacks them into a padded ``[B, T]`` grid: ``token_index[i]`` is token i's
    cell ``b * T + t`` (None when the grid is full and the packing is the identity).
    Token i's K/V row is written to ``cache[write_slot[i], :, write_pos[i]]`` *before* attention, so keys
    are read straight from the cache (a view when the slots are a contiguous run: no concatenation).
    ``mask``: bool [B, 1, T, key_len] over absolute cache positions: a row sees its cached prefix and, among
    its new tokens, what the causal (prefill) or ancestor (draft tree) mask allows.
    """

    B: int
    T: int
    token_index: torch.Tensor | None    # [N] long
    slots: torch.Tensor                 # [B] long
    slot_range: tuple[int, int] | None  # (start, stop) when slots are contiguous: a view instead of a gather
    key_len: int                        # cache positions attention reads: max(cache_len + new tokens)
    mask: torch.Tensor | None           # None: attend to everything (one token per row, equal prefixes)
    write_slot: torch.Tensor            # [N] long
    write_pos: torch.Tensor             # [N] long
    # Rows attended in separate grids: (packed positions of a group's tokens [N_g] long, the group's own
    # AttnBatch over those tokens). When set, the fields above other than write_slot/write_pos are unused.
    # Why: one padded [B, T] grid makes every row as long as the longest, so a prefill chunk of 178 tokens
    # in a step with 61 decoding rows padded those rows to 178 queries each (see engine/runner.py).
    groups: list[tuple[torch.Tensor, AttnBatch]] | None = None

    @functools.cached_property
    def packed_rows(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For the row-local attention kernel: each packed token's cache slot [N] and the key positions it
        may see [N, key_len] (None: all of them). Built once per forward and shared by every layer (it was
        rebuilt in each of the default model's 30 layers: four small ops each)."""
        cells = self.token_index if self.token_index is not None else torch.arange(self.B * self.T)
        allowed = None if self.mask is None else self.mask.view(self.B * self.T, -1)[cells].contiguous()
        return self.slots[cells // self.T].contiguous(), allowed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, a: ArchConfig) -> None:
        super().__init__()
        self.a = a
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.qkv_proj = nn.Linear(a.hidden_size, q + 2 * kv, bias=a.attention_bias)
        self.o_proj = nn.Linear(q, a.hidden_size, bias=False)
        if a.qk_norm:
            self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
            self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        a = self.a
        N = x.shape[0]
        h = self.input_layernorm(x)
        q, k, v = self.qkv_proj(h).split([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim,
                                          a.num_kv_heads * a.head_dim], dim=-1)
        q = q.view(N, a.num_heads, a.head_dim)
        k = k.view(N, a.num_kv_heads, a.head_dim)
        v = v.view(N, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope_and_cache(q, k, v, cos, sin, k_cache, v_cache, batch.write_slot, batch.write_pos)
        x = x + self.o_proj(self._attend(q, k_cache, v_cache, batch))
        return x + self.down_proj(silu_mul(self.gate_up_proj(self.post_attention_layernorm(x))))

    def forward_kernels(self, kern: ModuleType, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        k_cache: torch.Tensor, v_cache: torch.Tensor, batch: AttnBatch) -> torch.Tensor:
        """``forward`` as direct calls into onspec's CPU kernels (``kern``), for when ``CausalLM.forward`` has
        checked once that every one of them applies: the same kernels on the same tensors in the same order,
        so the same bits, without the module dispatch and the per-call checks of ``forward`` (30 layers x 8
        module calls and 9 checks): a decoding step of the default model on 2 threads went from 18.3 to
        14.7 ms (1.25x; 1.15x verifying 8 tokens, 1.12x for 8 rows x 1; bench/verify_cost.py measures
        steps). Attention goes through ``_attend`` as in ``forward``. ``cos``, ``sin``: [N, D]."""
        a = self.a
        N, D = x.shape[0], a.head_dim
        h = kern.rms_norm_bf16(x, self.input_layernorm.weight, a.rms_norm_eps)
        q, k, v = self.qkv_proj.kernel_product(h).split([a.num_heads * D, a.num_kv_heads * D, a.num_kv_heads * D],
                                                         dim=-1)
        if a.qk_norm:
            q = kern.rms_norm_bf16(q.reshape(-1, D), self.q_norm.weight, a.rms_norm_eps)
            k = kern.rms_norm_bf16(k.reshape(-1, D), self.k_norm.weight, a.rms_norm_eps)
        q = kern.rope_cache_bf16(q.view(N, a.num_heads, D), k.view(N, a.num_kv_heads, D),
                                 v.view(N, a.num_kv_heads, D), cos, sin, k_cache, v_cache,
                                 batch.write_slot, batch.write_pos)
        x = x + self.o_proj.kernel_product(self._attend(q, k_cache, v_cache, batch))
        h = kern.rms_norm_bf16(x, self.post_attention_layernorm.weight, a.rms_norm_eps)
        return x + self.down_proj.kernel_product(kern.silu_mul_bf16(self.gate_up_proj.kernel_product(h)))

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                batch: AttnBatch) -> torch.Tensor:
        """Packed queries [N, h, D] against the cache -> packed attention output [N, heads * D]."""
        if batch.groups is not None:
            out = q.new_empty(q.shape[0], self.a.num_heads * self.a.head_dim)
            for sel, sub in batch.groups:
                out[sel] = self._attend(q[sel], k_cache, v_cache, sub)
            return out
        a, B, T = self.a, batch.B, batch.T
        if attention_kernel_applies(q, k_cache, v_cache):
            # row-local attention (fused.py): a token's result does not depend on the grid around it
            slot, allowed = batch.packed_rows
            return attend_rows(q, k_cache, v_cache, slot, allowed, batch.key_len)
        if batch.token_index is not None:  # unpack into the padded [B, T] grid
            full = q.new_zeros(B * T, *q.shape[1:])
            full[batch.token_index] = q
            q = full
        q = q.view(B, T, a.num_heads, a.head_dim).transpose(1, 2)
        L = batch.key_len
        if batch.slot_range is not None:
            s0, s1 = batch.slot_range
            k, v = k_cache[s0:s1, :, :L], v_cache[s0:s1, :, :L]
        else:
            k, v = k_cache[batch.slots, :, :L], v_cache[batch.slots, :, :L]
        n_rep = a.num_heads // a.num_kv_heads
        if n_rep > 1:
            # Grouped-query attention: fold the n_rep query heads that share a K/V head into the
            # query-length axis ([B, H, T, D] -> [B, KVH, n_rep * T, D]; heads j*n_rep..(j+1)*n_rep-1 use
            # K/V head j, as in HF's repeat_kv; the mask is repeated the same way). Same maths, but one
            # matrix product per K/V head instead of ``enable_gqa``'s per-head path, which on CPU in bfloat16
            # is 2-6x slower: per layer, 1.35 vs 0.24 ms at batch 8 decode, 0.72 vs 0.35 ms verifying
            # batch 8 x 3 tree nodes, 2.4 vs 1.2 ms for batch 32 x 2 (300 cached tokens, 2 threads).
            mask = batch.mask
            if mask is not None:
                mask = mask.unsqueeze(2).expand(B, 1, n_rep, T, mask.shape[-1]).reshape(B, 1, n_rep * T, -1)
            out = F.scaled_dot_product_attention(q.reshape(B, a.num_kv_heads, n_rep * T, a.head_dim), k, v,
                                                 attn_mask=mask)
            out = out.reshape(B, a.num_heads, T, a.head_dim)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask)
        out = out.transpose(1, 2).reshape(B * T, a.num_heads * a.head_dim)
        return out[batch.token_index] if batch.token_index is not None else out


class CausalLM(nn.Module):
    """Token ids + positions + cache placement -> final hidden states (and chosen layers' inputs)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq    # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]      # [N, 1, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_k: list[torch.Tensor],
                kv_v: list[torch.Tensor], batch: AttnBatch, aux_layers: tuple[int, ...] = ()
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Packed tokens [N] -> (final normed hidden [N, H], [residual entering each layer in aux_layers]).

        ``aux_layers`` follow EAGLE-3's convention: index i is the residual stream entering layer i
        (i == num_layers means the last layer's output before the final norm).
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        kern = self.kernels_for(x, kv_k, kv_v)
        if kern is not None:
            cos, sin = cos.view(x.shape[0], -1), sin.view(x.shape[0], -1)
        aux: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            if i in aux_layers:
                aux.append(x)
            if kern is not None:
                x = layer.forward_kernels(kern, x, cos, sin, kv_k[i], kv_v[i], batch)
            else:
                x = layer(x, cos, sin, kv_k[i], kv_v[i], batch)
        if self.arch.num_layers in aux_layers:
            aux.append(x)
        return self.norm(x), aux

    def kernels_for(self, x: torch.Tensor, kv_k: list[torch.Tensor],
                    kv_v: list[torch.Tensor]) -> ModuleType | None:
        """onspec's CPU kernels if every linear and elementwise step of every layer would take its kernel
        path in this forward (bf16 on the CPU, no gradient, kernels built, linear layers adopted, caches
        contiguous), else None: one check per forward for ``DecoderLayer.forward_kernels`` instead of one per
        call. Attention keeps its own check (``_attend``), so PyTorch's can be measured against the kernel's
        on the same path (bench/verify_cost.py's ``sdpa`` mode)."""
        if torch.is_grad_enabled() or x.shape[0] == 0 or not self.layers or load_kernel() is None:
            return None
        for layer in self.layers:       # a bench or a test may hand some layers back to nn.Linear
            for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
                if type(m) is not Bf16Linear or m.weight.is_inference():
                    return None
        # dtypes and cache layout are the same in every layer: the first one speaks for all
        a, first = self.arch, self.layers[0]
        weights = [first.qkv_proj.weight, first.input_layernorm.weight]
        if a.qk_norm:
            weights.append(first.q_norm.weight)
        if not (kv_k[0].is_contiguous() and kv_v[0].is_contiguous()
                and fused.kernel_applies(x, kv_k[0], kv_v[0], *weights)):
            return None
        return load_kernel()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
