"""The bf16 linear kernel for CPUs without a native bf16 product (onspec/models/bf16_linear.py): same
numbers as a bf16 GEMM, independent of the batch, never stale after an in-place weight update, and out of
the way wherever it does not apply."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from onspec.cpu import cpu_flags
from onspec.models.bf16_linear import (Bf16Linear, adopt_bf16_kernel, build_lock, compiled_kernel,
                                       pack_weight, pack_weight_pairs)
from onspec.models.compute_path import DP_REQUIRES, choose_path, kernel_mode

# Kernel tests run wherever the kernel can run (every AVX2+FMA CPU), whatever path is the default there, and
# each test of the product runs once per variant this CPU can run.
VARIANTS = [pytest.param("avx2"), pytest.param("avx512_bf16", marks=pytest.mark.skipif(
    not DP_REQUIRES <= cpu_flags(), reason="this CPU lacks AVX-512 BF16"))]
needs_kernel = pytest.mark.skipif(compiled_kernel() is None, reason="onspec's kernels cannot run on this CPU")
each_variant = pytest.mark.parametrize("variant", VARIANTS)


@pytest.fixture(autouse=True)
def kernel_path_on(monkeypatch, request):
    """These tests choose the kernel path explicitly: the test's ``variant`` where it has one, else ``on``."""
    params = getattr(request.node, "callspec", None)
    monkeypatch.setenv("ONSPEC_BF16_KERNEL", params.params.get("variant", "on") if params else "on")


def _bf16_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What a bf16 GEMM with float32 sums returns (the products of bf16 numbers are exact in float32)."""
    return (x.double() @ w.double().T).to(torch.bfloat16)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (same-sign values; zero-crossings count as large)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max())


def _linear(n: int, k: int, seed: int = 0, bias: bool = False) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias).to(torch.bfloat16).requires_grad_(False)
    assert adopt_bf16_kernel(lin) == 1 and type(lin) is Bf16Linear
    return lin


@needs_kernel
@each_variant
@pytest.mark.parametrize("n,k", [(49, 40), (16, 8), (100, 300), (7, 13)])
def test_kernel_computes_a_bf16_gemm_for_every_row_count(n: int, k: int, variant: str) -> None:
    lin = _linear(n, k)
    for m in (1, 2, 5, 6, 7, 13, 40):
        x = torch.randn(m, k).to(torch.bfloat16)
        with torch.inference_mode():
            got = lin(x)
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        # float32 sums in a different order than float64's: at most one rounding step apart
        assert _ulps(got, _bf16_reference(x, lin.weight)) <= 1
        # and PyTorch's own bf16 product agrees to bf16 precision
        torch.testing.assert_close(got.float(), F.linear(x, lin.weight).float(), rtol=2e-2, atol=2e-2)


@needs_kernel
@each_variant
def test_a_rows_output_does_not_depend_on_the_other_rows_in_the_batch(variant: str) -> None:
    lin = _linear(200, 576)
    x = torch.randn(23, 3, 576).to(torch.bfloat16)      # leading dims are flattened and restored
    with torch.inference_mode():
        whole = lin(x)
        one_by_one = torch.stack([lin(x[i:i + 1])[0] for i in range(x.shape[0])])
        a_slice = lin(x[5:9])
    assert whole.shape == (23, 3, 200)
    assert torch.equal(whole, one_by_one)
    assert torch.equal(whole[5:9], a_slice)


@needs_kernel
@each_variant
def test_an_in_place_weight_update_is_never_multiplied_with_stale_panels(variant: str) -> None:
    lin = _linear(64, 96)
    x = torch.randn(4, 96).to(torch.bfloat16)
    with torch.no_grad():
        before = lin(x)
        lin.weight.mul_(-1.0)                           # e.g. an optimizer step or load_state_dict
        after = lin(x)
        lin.load_state_dict({"weight": torch.randn(64, 96).to(torch.bfloat16)})
        reloaded = lin(x)
    assert torch.equal(after, -before)
    assert _ulps(reloaded, _bf16_reference(x, lin.weight)) <= 1


@needs_kernel
@each_variant
def test_bias_is_added(variant: str) -> None:
    lin = _linear(32, 48, bias=True)
    x = torch.randn(3, 48).to(torch.bfloat16)
    with torch.inference_mode():
        got = lin(x)
    want = (x.double() @ lin.weight.double().T).to(torch.bfloat16) + lin.bias
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_where_the_kernel_does_not_apply_the_layer_is_plain_linear() -> None:
    torch.manual_seed(1)
    lin = nn.Linear(24, 10)
    ref = nn.Linear(24, 10)
    ref.load_state_dict(lin.state_dict())
    adopt_bf16_kernel(lin)
    x = torch.randn(5, 24)
    assert torch.equal(lin(x), ref(x))                      # float32
    x16 = x.to(torch.bfloat16).requires_grad_(True)         # a gradient is wanted: autograd's path
    lin16, ref16 = lin.to(torch.bfloat16), ref.to(torch.bfloat16)
    out = lin16(x16)
    out.sum().backward()
    assert torch.equal(out, ref16(x16.detach()))
    assert x16.grad is not None and lin16.weight.grad is not None
    assert lin16._packed is None                             # never packed on the gradient path


def test_pack_weight_lays_out_interleaved_panels_of_16_output_features() -> None:
    w = (torch.arange(20 * 3, dtype=torch.float32).view(20, 3) + 1).to(torch.bfloat16)
    p = pack_weight(w)
    assert p.shape == (2, 3, 16)
    for n in range(20):
        j = n % 16                                          # column j of a panel sits at 2 (j % 8) + j // 8
        for k in range(3):
            assert p[n // 16, k, 2 * (j % 8) + j // 8] == w[n, k]
    assert torch.count_nonzero(p[1]) == 4 * 3               # the 12 padding columns of panel 1 are zero


def test_pack_weight_pairs_lays_out_k_pairs_of_64_output_features() -> None:
    w = (torch.arange(70 * 5, dtype=torch.float32).view(70, 5) + 1).to(torch.bfloat16)
    p = pack_weight_pairs(w)
    assert p.shape == (2, 3, 64, 2)                         # 70 features -> 2 groups; K = 5 -> 3 pairs
    for n in range(70):
        for k in range(5):
            assert p[n // 64, k // 2, n % 64, k % 2] == w[n, k]
    assert torch.count_nonzero(p[:, 2, :, 1]) == 0          # the odd K's padding is zero
    assert torch.count_nonzero(p[1]) == 6 * 5               # the 58 padding features of group 1 are zero


@needs_kernel
def test_switching_variant_repacks_the_weight(monkeypatch) -> None:
    if not DP_REQUIRES <= cpu_flags():
        pytest.skip("this CPU lacks AVX-512 BF16")
    lin = _linear(70, 40)
    x = torch.randn(3, 40).to(torch.bfloat16)
    with torch.inference_mode():
        monkeypatch.setenv("ONSPEC_BF16_KERNEL", "avx2")
        a = lin(x)
        assert set(lin._packed) == {"avx2"} and lin._packed["avx2"][2].shape == (5, 40, 16)
        monkeypatch.setenv("ONSPEC_BF16_KERNEL", "avx512_bf16")
        b = lin(x)
        assert lin._packed["avx512_bf16"][2].shape == (2, 20, 64, 2)
        panels = lin._packed["avx2"][2]
        monkeypatch.setenv("ONSPEC_BF16_KERNEL", "avx2")
        assert torch.equal(lin(x), a) and lin._packed["avx2"][2] is panels   # kept, not repacked
    assert _ulps(a, b) <= 1                                  # two orders of the same fp32 sums


def kernel_wanted(mode: str, flags: frozenset[str]) -> bool:
    return choose_path(kernel_mode(mode), flags).kernels


def test_kernel_is_wanted_wherever_it_can_run() -> None:
    avx2 = frozenset({"avx", "avx2", "fma"})
    assert kernel_wanted("auto", avx2)
    assert kernel_wanted("auto", avx2 | {"avx512_bf16"})        # exact where PyTorch's native product is not
    assert kernel_wanted("auto", avx2 | {"amx_bf16"})
    assert kernel_wanted("on", avx2 | {"amx_bf16"})
    assert not kernel_wanted("on", frozenset({"sse4_2"}))        # no AVX2: it cannot run
    assert not kernel_wanted("off", avx2)
    with pytest.raises(ValueError, match="use auto, on, off, avx2 or avx512_bf16"):
        kernel_wanted("fast", avx2)


@needs_kernel
def test_the_loaded_target_and_drafter_use_the_kernel_and_agree_with_pytorch(tiny_llama) -> None:
    from onspec.models.loader import load_model
    from onspec.speculation.eagle_model import init_drafter

    loaded = load_model(str(tiny_llama), dtype="bfloat16")
    model = loaded.model
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is Bf16Linear for m in linears)
    drafter = init_drafter(loaded).to_dtype(torch.bfloat16)
    assert all(type(m) is Bf16Linear for m in drafter.modules() if isinstance(m, nn.Linear))

    ids = torch.randint(0, loaded.arch.vocab_size, (1, 12))
    with torch.inference_mode():
        hidden = model.embed_tokens(ids)
        fast = model.lm_head(hidden)
        assert model.lm_head._packed is not None                         # the kernel ran
        plain = F.linear(hidden, model.lm_head.weight)
    torch.testing.assert_close(fast.float(), plain.float(), rtol=2e-2, atol=2e-2)


def test_trainers_autocast_to_bf16_only_where_the_cpu_multiplies_bf16_natively() -> None:
    from onspec.config import TrainerConfig
    from onspec.cpu import native_bf16_product
    from onspec.rl.grpo import GRPOConfig

    assert native_bf16_product(frozenset({"avx2", "fma", "amx_bf16"}))
    assert native_bf16_product(frozenset({"avx512f", "avx512_bf16"}))
    assert native_bf16_product(frozenset({"asimd", "bf16"}))                 # ARM's Features line
    assert not native_bf16_product(frozenset({"avx", "avx2", "fma"}))       # slow generic bf16 GEMM there
    here = native_bf16_product()
    assert TrainerConfig().autocast is here and GRPOConfig().autocast is here
    assert TrainerConfig(autocast=True).autocast                            # still the user's to choose


def _hold_build_lock_then_die(build: str, ready) -> None:
    """A builder that takes the lock, leaves PyTorch's lock file as a compile in progress does, and is killed."""
    with build_lock(Path(build)):
        (Path(build) / "lock").touch()
        ready.set()
        time.sleep(600)


def test_a_killed_builders_lock_neither_hangs_nor_outlives_it(tmp_path) -> None:
    """PyTorch's builder waits forever on a lock file a killed build left; ``build_lock`` waits only for a
    live builder and then clears the file (a CI run once hung for 90 minutes; this is one way it can)."""
    build = tmp_path / "kernels" / "bf16_linear_x"
    build.mkdir(parents=True)
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    builder = ctx.Process(target=_hold_build_lock_then_die, args=(str(build), ready), daemon=True)
    builder.start()
    assert ready.wait(30)
    took: list[bool] = []   # whether PyTorch's lock file was still there when the lock was taken

    def take() -> None:
        with build_lock(build):
            took.append((build / "lock").exists())

    waiter = threading.Thread(target=take)
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not took    # a live builder holds it: the next one waits
    os.kill(builder.pid, signal.SIGKILL)
    builder.join(10)
    waiter.join(10)
    assert took == [False]                   # taken once it died, its lock file cleared
