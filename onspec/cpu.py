"""What this CPU can do for bfloat16 maths, read from /proc/cpuinfo (no torch import: config defaults use it).

Why it matters: where the CPU has a native bf16 matrix product (AMX, avx512_bf16; ARM's bf16), bf16
products run at least as fast as float32 ones, so the trainers' autocast pays. On x86 CPUs with AVX2 but
neither, PyTorch's bf16 product takes a slow generic path: one drafter training step under autocast took
35 s on an AVX2-only AMD EPYC (onspec warmup), and the engine's bf16 linears use onspec's own kernel
(onspec/models/bf16_linear.py).
"""

from __future__ import annotations

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})   # x86 flags; "bf16": ARM's Features


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features``); empty where /proc/cpuinfo is unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16_product(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 matrix products are native here (the default for the trainers' autocast)."""
    return bool(NATIVE_BF16_FLAGS & (cpu_flags() if flags is None else flags))
