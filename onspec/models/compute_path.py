"""Which compute path this process's bf16 products take, and whether its outputs are bit-exact across batches.

Exactness is a property of onspec on every CPU it supports, not only where its kernels happen to be fastest:
greedy speculative output equals plain greedy output, and a seeded request repeats exactly whatever else
is in its batch, only when every product a row goes through is computed the same way whatever the rows
beside it. onspec's kernels (``kernels/*.cpp``) are batch-invariant by construction: each output element
is one sum over k in a fixed order, whatever the row count, blocking or threading. PyTorch's bf16 and
float32 products are not: oneDNN/MKL pick a different blocking (and on avx512_bf16 / AMX CPUs a different
instruction) for different row counts, so a draft-tree row and a plain decoding row of the same token can
differ in their last bits, and greedy ties then break differently (see docs/decisions.md, "exact on every
CPU").

So the rule: onspec's kernels on every x86-64 CPU that has AVX2 and FMA, whatever else it has, in bf16;
``ONSPEC_BF16_KERNEL=off`` (or a CPU without AVX2/FMA, or a failed build) takes PyTorch's ops and says
that outputs are no longer bit-exact. float32 models always take PyTorch's ops and say so too.

Two variants of the linear kernel, both batch-invariant: ``avx2`` (bf16 widened to fp32, 8-lane FMAs;
every AVX2+FMA CPU) and ``avx512_bf16`` (vdpbf16ps dot products, 2-4x the multiply-adds per instruction;
CPUs with AVX-512 BF16), the default where the CPU has it because it is faster on forwards of many rows
(docs/decisions.md, "bf16 kernels"). Their sums run in different orders, so one process uses one variant.

``ONSPEC_BF16_KERNEL`` chooses: ``auto`` (default) and ``on``: the kernels wherever AVX2 + FMA exist, the
fastest variant the CPU has; ``avx2`` / ``avx512_bf16``: that variant (where the CPU can run it); ``off``:
PyTorch's ops. The choice is read on every call (a dictionary lookup), so a test can switch paths with
``monkeypatch.setenv`` and every path is tested on every machine that can run it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

from ..cpu import cpu_flags

KERNEL_ENV = "ONSPEC_BF16_KERNEL"
KERNEL_MODES = ("auto", "on", "off", "avx2", "avx512_bf16")
KERNEL_REQUIRES = frozenset({"avx2", "fma"})
DP_REQUIRES = KERNEL_REQUIRES | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}   # kernels/bf16_linear_dp.cpp
# flags worth reporting: what the kernels need, and the native bf16 products PyTorch would use instead
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class ComputePath:
    """The bf16 compute path of this process and why it was chosen (``onspec info``, start-up log,
    ``/v1/speculator``)."""

    mode: str                  # ONSPEC_BF16_KERNEL as asked: auto / on / off / avx2 / avx512_bf16
    kernels: bool              # onspec's kernels wanted (whether they built is ``load_kernel``'s answer)
    variant: str               # the linear kernel's variant: "avx2", "avx512_bf16", or "" (PyTorch's ops)
    exact: bool                # bf16 outputs are batch-invariant, so speculation is bit-exact
    reason: str
    flags: tuple[str, ...]     # the REPORTED_FLAGS this CPU has

    @property
    def name(self) -> str:
        return f"onspec-kernels-{self.variant}" if self.kernels else "pytorch"

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self), "flags": list(self.flags)}


def kernel_mode(mode: str | None = None) -> str:
    """``mode`` or ``ONSPEC_BF16_KERNEL`` normalised; a ValueError naming the variable for anything else."""
    value = (mode if mode is not None else os.environ.get(KERNEL_ENV, "auto")).strip().lower()
    if value not in KERNEL_MODES:
        raise ValueError(f"{KERNEL_ENV}={value!r}: use auto, on, off, avx2 or avx512_bf16")
    return value


NOT_EXACT = ("PyTorch's ops, which are not batch-invariant, so speculative and batched outputs may differ "
             "from plain ones in their last bits")


def pytorch_path(mode: str, flags: tuple[str, ...], why: str) -> ComputePath:
    """PyTorch's ops for the reason ``why``: reported as not exact, and why not."""
    return ComputePath(mode, False, "", False, f"{why}: {NOT_EXACT}", flags)


@functools.lru_cache(maxsize=16)
def choose_path(mode: str, flags: frozenset[str]) -> ComputePath:
    """The path for a kernel ``mode`` on a CPU with ``flags`` (pure: tests inject both)."""
    reported = tuple(f for f in REPORTED_FLAGS if f in flags)
    if mode == "off":
        return pytorch_path(mode, reported, f"{KERNEL_ENV}=off")
    if not KERNEL_REQUIRES <= flags:
        return pytorch_path(mode, reported, "this CPU lacks AVX2/FMA, which onspec's kernels need")
    has_dp = DP_REQUIRES <= flags
    if mode == "avx512_bf16" and not has_dp:
        raise ValueError(f"{KERNEL_ENV}=avx512_bf16: this CPU lacks AVX-512 BF16; use auto, on or avx2")
    variant = "avx2" if mode == "avx2" or not has_dp else "avx512_bf16"
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    if native:
        why = (f"batch-invariant, so exact; chosen over PyTorch's native {'/'.join(native)} product, which is "
               "not batch-invariant")
    else:
        why = ("batch-invariant, so exact; PyTorch's bf16 product has no native instruction here and costs "
               "time in proportion to the rows")
    what = "AVX-512 BF16 dot-product kernels" if variant == "avx512_bf16" else "AVX2+FMA kernels"
    if mode == "avx2" and has_dp:
        what += f" ({KERNEL_ENV}=avx2; the CPU also has AVX-512 BF16)"
    return ComputePath(mode, True, variant, True, f"{what}: {why}", reported)


def current_path() -> ComputePath:
    """The path this process takes now (``ONSPEC_BF16_KERNEL`` read on each call, the CPU's flags once)."""
    return choose_path(kernel_mode(), _this_cpu())


@functools.lru_cache(maxsize=1)
def _this_cpu() -> frozenset[str]:
    return cpu_flags()
