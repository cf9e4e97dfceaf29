"""bfloat16 linear layers through onspec's own kernel, on every x86-64 CPU with AVX2 and FMA.

Why our own kernel and not a library's: exactness and speed. PyTorch's bf16 product is not
batch-invariant (oneDNN/MKL block differently, or use another instruction, for different row counts), so
speculative output could differ from plain output; ``compute_path.py`` says when the kernel is chosen and
why. And on CPUs without a native bf16 product (AVX2 only) PyTorch's costs time in proportion to the rows:
measured on an AVX2-only AMD EPYC, 2 threads, the default model's linear layers took 35 / 63 / 121 / 248 /
455 ms for 2 / 4 / 8 / 16 / 32 rows, so verifying 8 draft tokens cost as much as 8 decoding steps.
The kernel in ``kernels/bf16_linear.cpp`` widens each block of weight rows to float32 in registers and
multiplies it with every input row while it is in cache, so the weights cross the memory bus once per
forward whatever the row count (figures in docs/results.md, "verify cost").

Same numerics as a bf16 GEMM (bf16 products, float32 sums, output rounded to nearest-even bf16), and
batch-invariant: a row's output does not depend on the other rows in the forward.

The extension (this kernel, the fused elementwise ops and attention of ``fused.py``) is compiled on first
use (about a minute on 2 cores, cached under the onspec cache directory); if it cannot be built, a warning
is logged, PyTorch's ops are used and the compute path reports that outputs are no longer bit-exact.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..cpu import cpu_flags
from .compute_path import KERNEL_REQUIRES, NOT_EXACT, ComputePath, current_path, pytorch_path

log = logging.getLogger(__name__)

KERNEL_DIR = Path(__file__).parent / "kernels"
# one extension: the linear kernel, the fused elementwise ops and attention (onspec/models/fused.py), bindings
KERNEL_SOURCES = ("bf16_linear.cpp", "bf16_linear_dp.cpp", "bf16_elementwise.cpp", "bf16_attention.cpp", "module.cpp")
KERNEL_HEADERS = ("bf16.h", "bf16_simd.h")
# -fopenmp: at::parallel_for is an OpenMP pragma in PyTorch's headers; compiled without it
# the kernels ran on one thread whatever torch.get_num_threads() said, half the machine on 2 cores
KERNEL_CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")


# One compiled extension per process: loading it twice is impossible anyway (Python caches the module).
def load_kernel() -> ModuleType | None:
    """The compiled kernel where this process's compute path uses it (``ONSPEC_BF16_KERNEL``, the CPU), else
    None; also None where it cannot be built (logged once)."""
    return compiled_kernel() if current_path().kernels else None


def active_path() -> ComputePath:
    """The compute path this process really takes: ``current_path()``, unless the kernels it wants could not
    be built (then PyTorch's ops, not exact, and the reason says so). Builds the kernels on first call."""
    path = current_path()
    if path.kernels and compiled_kernel() is None:
        return pytorch_path(path.mode, path.flags, "onspec's kernels could not be built (see the warning above)")
    return path


@functools.lru_cache(maxsize=1)
def compiled_kernel() -> ModuleType | None:
    """The extension, built on first call wherever the CPU can run it (None, logged once, where it cannot be
    built)."""
    if not KERNEL_REQUIRES <= cpu_flags():
        return None
    from .loader import default_cache_dir

    digest = hashlib.sha256(" ".join((torch.__version__, *KERNEL_CFLAGS)).encode())
    for name in KERNEL_SOURCES + KERNEL_HEADERS:
        digest.update((KERNEL_DIR / name).read_bytes())
    tag = digest.hexdigest()[:12]
    build = default_cache_dir() / "kernels" / f"bf16_linear_{tag}"
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        build.mkdir(parents=True, exist_ok=True)
        with build_lock(build):
            return load(name=f"onspec_bf16_linear_{tag}", sources=[str(KERNEL_DIR / n) for n in KERNEL_SOURCES],
                        build_directory=str(build), extra_cflags=list(KERNEL_CFLAGS), extra_ldflags=["-fopenmp"],
                        verbose=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache: PyTorch's product still works
        log.warning("onspec's CPU kernels unavailable (%s: %s); using %s", type(exc).__name__, exc, NOT_EXACT)
        return None


def path_for_dtype(dtype: torch.dtype) -> ComputePath:
    """The compute path of a model held in ``dtype``: ``active_path()`` for bf16; PyTorch's ops, which are not
    batch-invariant, for every other dtype (onspec's kernels are bf16 kernels)."""
    path = active_path()
    if dtype is torch.bfloat16:
        return path
    name = str(dtype).removeprefix("torch.")
    return pytorch_path(path.mode, path.flags, f"{name} models (onspec's kernels are bf16 kernels; use bfloat16, "
                        "the default, for bit-exact outputs)")


@contextlib.contextmanager
def build_lock(build: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``build`` for one process's build-and-load, clearing a dead builder's lock.

    PyTorch's extension builder guards a build with a lock *file* (``build/lock``, ``FileBaton``) and
    waits, without a time limit, for it to go away. A builder killed mid-compile (a trainer process or a
    server stopped by a timeout, Ctrl-C twice) leaves the file behind, and every later process then hung
    on its first bf16 model load. An ``flock`` is released by the kernel when its
    holder dies, so holding one around ``load`` means a ``lock`` file found while holding it belongs to
    no live onspec builder and can go.
    """
    with open(build.parent / f"{build.name}.flock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)   # waits while another live process builds (about a minute)
        try:
            stale = build / "lock"
            if stale.exists():
                log.warning("removing %s left by a kernel build that did not finish", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _put_ninja_on_path() -> None:
    """PyTorch's extension builder runs ``ninja`` from PATH; the ``ninja`` wheel puts it beside this
    interpreter, which is not on PATH when the venv is not activated (``.venv/bin/python -m pytest``)."""
    if shutil.which("ninja") is None:
        here = Path(sys.executable).parent
        if (here / "ninja").exists():
            os.environ["PATH"] = f"{here}{os.pathsep}{os.environ.get('PATH', '')}"


PANEL = 16   # output features per packed panel (kNR in the kernel)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 16), K, 16] panels, zero rows padding N: the layout the kernel reads. Each k's 16
    weights are contiguous and interleaved, ``[w0, w8, w1, w9, ..., w7, w15]``, so that one 32-byte load
    holds columns 0..7 in the low halves of its dwords and 8..15 in the high halves (``ONSPEC_WIDEN``)."""
    n, k = weight.shape
    p = -(-n // PANEL)
    padded = weight.new_zeros(p * PANEL, k)
    padded[:n] = weight
    # [p, 2, 8, k] -> [p, k, 8, 2]: position 2 i + h holds column 8 h + i
    return padded.view(p, 2, PANEL // 2, k).permute(0, 3, 2, 1).reshape(p, k, PANEL).contiguous()


GROUP = 64   # output features per group of the avx512_bf16 layout (kNG in kernels/bf16_linear_dp.cpp)


def pack_weight_pairs(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 64), ceil(K / 2), 64, 2] groups, zeros padding N and an odd K: the layout
    ``linear_bf16_dp`` reads. For each pair of k, a group's 64 features hold (w[k], w[k + 1]) side by side,
    the bf16 pairs vdpbf16ps multiplies with a broadcast (x[k], x[k + 1])."""
    n, k = weight.shape
    g, kp = -(-n // GROUP), -(-k // 2)
    padded = weight.new_zeros(g * GROUP, kp * 2)
    padded[:n, :k] = weight
    # [g, 64, kp, 2] -> [g, kp, 64, 2]
    return padded.view(g, GROUP, kp, 2).permute(0, 2, 1, 3).contiguous()


def kernel_handles(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``Bf16Linear`` multiplies ``x`` by ``weight`` with the kernel (and not PyTorch's product)."""
    return (x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 and x.device.type == "cpu"
            and weight.device.type == "cpu" and x.shape[-1] > 0 and not weight.is_inference()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and load_kernel() is not None)


class Bf16Linear(nn.Linear):
    """``nn.Linear`` that multiplies through the kernel where it applies: bf16 on the CPU, no gradient
    wanted, the kernel available. Parameters and state dict are those of ``nn.Linear``.

    The packed copy of the weight (same size as the weight, in the layout of the process's kernel variant)
    is made on the first such forward and made again whenever the weight changes: ``_version`` counts
    in-place writes (``load_state_dict``, an optimizer step, ``copy_``), so a hot-swapped drafter or a
    policy update in place is never multiplied with stale panels. A process uses one variant; a bench or a
    test that alternates variants keeps one packed copy per variant instead of repacking every forward."""

    _packed: dict[str, tuple[int, int, torch.Tensor]] | None = None  # variant -> (data_ptr, _version, panels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_handles(x, self.weight):
            y = self.kernel_product(x.reshape(-1, x.shape[-1]))
            return y.view(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight, self.bias)

    def kernel_product(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [M, K] bf16 times the weight through the kernel variant of this process's compute path
        (+ bias); the caller has checked that the kernel applies (``kernel_handles``)."""
        w = self.weight
        variant = current_path().variant
        if self._packed is None:
            self._packed = {}
        kern = compiled_kernel()          # the caller's check already read the path: no second read here
        pack, product = ((pack_weight_pairs, kern.linear_bf16_dp) if variant == "avx512_bf16"
                         else (pack_weight, kern.linear_bf16))
        packed = self._packed.get(variant)
        if packed is None or packed[:2] != (w.data_ptr(), w._version):
            with torch.no_grad():
                packed = self._packed[variant] = (w.data_ptr(), w._version, pack(w.detach()))
        y = product(x, packed[2], w.shape[0])
        return y if self.bias is None else y + self.bias


def adopt_bf16_kernel(module: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` in ``module`` into a ``Bf16Linear`` in place (same parameters, so
    tied weights stay tied); returns how many. Costs nothing where the kernel does not apply: the forward
    falls back to ``F.linear``."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Bf16Linear
            n += 1
    return n


def build_and_report() -> bool:
    """Build (first time) or load the kernels wherever this CPU can run them and say so on stdout, with the
    compute path the default settings take; ``make test`` runs this before the tests, so a build problem
    shows by name in a log instead of inside the first test that loads a model."""
    import time

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not KERNEL_REQUIRES <= cpu_flags():
        print("onspec CPU kernels: this CPU lacks AVX2/FMA; PyTorch's ops are used and bf16 outputs are not "
              "bit-exact across batches")
        return False
    print("onspec CPU kernels: building or loading (about a minute the first time on 2 cores)", flush=True)
    start = time.monotonic()
    ok = compiled_kernel() is not None
    print(f"onspec CPU kernels: {'ready' if ok else 'unavailable, PyTorch ops used'} ({time.monotonic() - start:.1f} s)")
    path = active_path()
    print(f"onspec compute path: {path.name} (exact: {'yes' if path.exact else 'no'}): {path.reason}")
    return ok
