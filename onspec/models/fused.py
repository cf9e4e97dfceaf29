"""The decoder layer's elementwise steps (RMSNorm, rotary embedding with the K/V cache write, SiLU * up)
and its attention, each as one call to onspec's CPU kernel where it applies and as PyTorch everywhere else.

Why: on CPUs where onspec's bf16 linear kernel runs (AVX2 without a native bf16 product, see
``bf16_linear.py``) the matrix products of a decoding step got fast enough that the ~40 small PyTorch ops
per layer between them cost as much again: about 16 ms of a 32 ms step of the default model on 2 cores.
The kernel versions (``kernels/bf16_elementwise.cpp``) do each step in one call and round to bf16 where
PyTorch's bf16 ops round, so they compute what the PyTorch versions below compute (up to the last bit of
an ``exp`` or a sum's order, which moves a value by at most one bf16 step; the tests bound it). Like the
linear kernel they are row-local, so a row's output never depends on the rest of the batch.

Attention (``kernels/bf16_attention.cpp``) is row-local too, which PyTorch's is not: each token attends
over the keys it may see in position order, so a draft-tree node gets bit for bit what the same token
gets when decoded plainly, and bf16 speculative greedy output equals plain greedy output.

The kernel path is taken for bf16 CPU tensors when no gradient is wanted and the kernel is loaded;
float32, training and every other machine use the PyTorch versions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .bf16_linear import load_kernel


def kernel_applies(*tensors: torch.Tensor) -> bool:
    """Whether these tensors go through the kernel: bf16 on the CPU, no gradient, kernel available."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype is torch.bfloat16 and t.device.type == "cpu" for t in tensors) and load_kernel() is not None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (computed in float32, as HF llama)."""
    if weight.dtype is x.dtype and x.numel() > 0 and kernel_applies(x, weight):
        shape = x.shape
        y = load_kernel().rms_norm_bf16(x.reshape(-1, shape[-1]), weight, eps)
        return y.view(shape)
    return rms_norm_reference(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, h, D]; cos/sin [N, 1, D] (rotate-half convention, as HF llama)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor, pos: torch.Tensor
                   ) -> torch.Tensor:
    """Rotate q and k [N, h, D]; write k and v to ``cache[slot[i], :, pos[i]]``; return the rotated q."""
    if (q.shape[0] > 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and kernel_applies(q, k, v, cos, sin, k_cache, v_cache)):
        n = q.shape[0]
        return load_kernel().rope_cache_bf16(q, k, v, cos.view(n, -1), sin.view(n, -1), k_cache, v_cache,
                                            slot, pos)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache[slot, :, pos] = k
    v_cache[slot, :, pos] = v
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dimension."""
    if gate_up.numel() > 0 and kernel_applies(gate_up):
        shape = gate_up.shape
        out = load_kernel().silu_mul_bf16(gate_up.reshape(-1, shape[-1]))
        return out.view(*shape[:-1], shape[-1] // 2)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention_kernel_applies(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether ``attend_rows`` can serve this layer (bf16 CPU, contiguous caches, head_dim a multiple of 8)."""
    return (q.shape[-1] % 8 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and kernel_applies(q, k_cache, v_cache))


def attend_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: torch.Tensor,
                allowed: torch.Tensor | None, key_len: int) -> torch.Tensor:
    """Packed queries [N, h, D] against ``cache[slot[i], :, :key_len]`` -> [N, h * D], token i seeing the
    positions where ``allowed[i]`` [N, key_len] is True (None: all of them). Softmax scale 1/sqrt(D)."""
    none = torch.empty(0, 0, dtype=torch.bool)
    return load_kernel().attend_bf16(q.contiguous(), k_cache, v_cache, slot.contiguous(),
                                     none if allowed is None else allowed.contiguous(), key_len,
                                     q.shape[-1] ** -0.5)
