"""bf16 outputs are bit-exact on the compute path this machine takes by default, and that path is chosen
and reported per CPU kind (onspec/models/compute_path.py).

* The path per CPU kind, flags injected: onspec's kernels on every AVX2+FMA CPU (AVX2-only, avx512_bf16,
  AMX), exact; PyTorch's ops without AVX2/FMA or with ``ONSPEC_BF16_KERNEL=off``, and for float32 models,
  reported as not exact. The variable is read per call, so each test chooses its path.
* Exactness on the default path, real default model in bf16 (and a tiny model): speculation off / suffix /
  learned / hybrid / auto, alone or batched, prefix reuse on or off, streamed or not, greedy and seeded,
  all equal to plain decoding of each prompt alone. Drafting is forced with injected costs where a test
  needs it, so no assertion depends on this machine's speed.
"""

from __future__ import annotations

import pytest
import torch

from onspec import LLM, SamplingParams
from onspec.config import EngineConfig, SpecConfig
from onspec.engine.engine import Engine
from onspec.models import bf16_linear
from onspec.models.bf16_linear import active_path, compiled_kernel, load_kernel, path_for_dtype
from onspec.cpu import cpu_flags
from onspec.models.compute_path import DP_REQUIRES, choose_path, current_path
from onspec.models.loader import load_model
from onspec.speculation.controller import attach_speculation
from onspec.speculation.eagle import attach_learned
from onspec.speculation.eagle_model import init_drafter
from test_eagle import force_all_drafts
from test_speculation import FREE, real_prompts

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})                    # AMD EPYC Zen 2/3
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}     # AMD EPYC Zen 4
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}                          # Intel Xeon Sapphire Rapids


# ---- the path per CPU kind ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, native, variant", [(AVX2_ONLY, None, "avx2"),
                                                     (AVX512_BF16, "avx512_bf16", "avx512_bf16"),
                                                     (AMX, "amx_bf16", "avx512_bf16")],
                         ids=["avx2-only", "avx512_bf16", "amx"])
@pytest.mark.parametrize("mode", ["auto", "on"])
def test_the_kernels_are_the_exact_default_on_every_avx2_cpu(flags, native, variant, mode) -> None:
    path = choose_path(mode, flags)
    assert path.kernels and path.exact and path.variant == variant and path.name == f"onspec-kernels-{variant}"
    if native:      # the reason names the faster-looking product it passed over, and why
        assert native in path.reason and "not batch-invariant" in path.reason
        assert native in path.flags


def test_a_variant_can_be_asked_for_where_the_cpu_runs_it() -> None:
    assert choose_path("avx2", AMX).variant == "avx2" and choose_path("avx2", AMX).exact
    assert choose_path("avx512_bf16", AVX512_BF16).variant == "avx512_bf16"
    with pytest.raises(ValueError, match="lacks AVX-512 BF16"):
        choose_path("avx512_bf16", AVX2_ONLY)


@pytest.mark.parametrize("mode, flags, why", [("off", AMX, "ONSPEC_BF16_KERNEL=off"),
                                              ("auto", frozenset({"sse4_2", "avx"}), "lacks AVX2/FMA"),
                                              ("on", frozenset({"asimd", "bf16"}), "lacks AVX2/FMA")],
                         ids=["off", "no-avx2", "arm"])
def test_a_path_without_the_kernels_says_it_is_not_exact(mode, flags, why) -> None:
    path = choose_path(mode, flags)
    assert not path.kernels and not path.exact and path.name == "pytorch"
    assert why in path.reason and "not batch-invariant" in path.reason


def test_the_environment_chooses_the_path_on_each_call(monkeypatch) -> None:
    if compiled_kernel() is None:
        pytest.skip("onspec's kernels cannot run on this CPU")
    monkeypatch.setenv("ONSPEC_BF16_KERNEL", "off")
    assert load_kernel() is None and not active_path().exact
    monkeypatch.setenv("ONSPEC_BF16_KERNEL", "on")
    assert load_kernel() is compiled_kernel() and active_path().exact
    monkeypatch.setenv("ONSPEC_BF16_KERNEL", "fast")
    with pytest.raises(ValueError, match="ONSPEC_BF16_KERNEL='fast': use auto, on, off"):
        current_path()


def test_a_kernel_build_failure_is_reported_as_not_exact(monkeypatch) -> None:
    monkeypatch.setenv("ONSPEC_BF16_KERNEL", "on")
    monkeypatch.setattr(bf16_linear, "current_path", lambda: choose_path("on", AVX2_ONLY))
    monkeypatch.setattr(bf16_linear, "compiled_kernel", lambda: None)
    path = bf16_linear.active_path()
    assert not path.exact and "could not be built" in path.reason


def test_float32_models_say_they_are_not_bit_exact() -> None:
    path = path_for_dtype(torch.float32)
    assert not path.exact and "float32" in path.reason
    assert path_for_dtype(torch.bfloat16) == active_path()


def test_onspec_info_prints_the_path_and_why(capsys) -> None:
    from onspec.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    path = active_path()
    assert f"compute path (bfloat16): {path.name}" in out and path.reason in out
    assert main(["info", "--dtype", "float32"]) == 0
    assert "(speculative output == plain output): NO" in capsys.readouterr().out
    assert main(["info", "--threads", "-1"]) == 2


# ---- exactness on the default path -------------------------------------------------------------------

default_path_is_exact = pytest.mark.skipif(not path_for_dtype(torch.bfloat16).exact,
                                           reason="this CPU's default bf16 path is not bit-exact (it says so)")
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=32, ignore_eos=True)


def bf16_engine(lm, mode: str, prefix_reuse: bool = True, forced: bool = True) -> Engine:
    """An engine on ``lm`` (bf16) in speculation ``mode``; ``forced``: drafting costs nothing (injected), so
    the controller drafts whatever this machine's speed; otherwise it measures live costs."""
    spec = SpecConfig(mode=mode, profile_at_start=not forced, objective="throughput")
    eng = Engine(EngineConfig(model=str(lm.path), dtype="bfloat16", num_threads=1, max_num_seqs=4,
                              max_model_len=1024, prefix_reuse=prefix_reuse, spec=spec), loaded=lm)
    if mode in ("learned", "hybrid"):
        drafter = init_drafter(lm, seed=0).to_dtype(torch.bfloat16)
        force_all_drafts(attach_learned(eng, spec, drafter))
    elif mode != "off":
        attach_speculation(eng, spec)
    if forced and eng.spec is not None:
        eng.spec.controller.cost = FREE
    return eng


def outputs(eng: Engine, prompts: list[str], params: SamplingParams, batched: bool) -> list[list[int]]:
    llm = LLM(engine=eng)
    if batched:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    return [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]


@pytest.fixture(scope="module")
def default_bf16():
    return load_model("default", dtype="bfloat16")


@pytest.fixture(scope="module")
def plain_alone(default_bf16):
    """Plain decoding of each prompt alone, greedy and seeded: the reference every case must equal."""
    prompts = real_prompts(default_bf16)[:3]
    eng = bf16_engine(default_bf16, "off", prefix_reuse=False)
    return prompts, {name: outputs(eng, prompts, params, batched=False)
                     for name, params in (("greedy", GREEDY), ("seeded", SEEDED))}


CASES = [("off", True, True), ("suffix", False, True), ("suffix", True, False), ("learned", True, True),
         ("hybrid", False, False)]


@default_path_is_exact
@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
@pytest.mark.parametrize("mode, batched, reuse", CASES,
                         ids=[f"{m}-{'batched' if b else 'alone'}-reuse-{'on' if r else 'off'}" for m, b, r in CASES])
def test_real_model_bf16_equals_plain_alone(default_bf16, plain_alone, mode, batched, reuse, sampling) -> None:
    prompts, ref = plain_alone
    eng = bf16_engine(default_bf16, mode, prefix_reuse=reuse)
    params = GREEDY if sampling == "greedy" else SEEDED
    first = outputs(eng, prompts, params, batched)
    again = outputs(eng, prompts, params, batched)         # prefix reuse (when on) serves the second pass
    assert first == ref[sampling] and again == ref[sampling]
    if mode != "off":
        assert eng.counters.drafted > 0                     # speculation ran, so equality says something
    if reuse:
        assert eng.counters.reused_prefix_tokens > 0


@default_path_is_exact
def test_real_model_bf16_auto_with_measured_costs_and_streaming(default_bf16, plain_alone) -> None:
    """auto on live costs (whatever it decides to draft) and a streamed request equal plain decoding."""
    prompts, ref = plain_alone
    eng = bf16_engine(default_bf16, "auto", forced=False)
    assert outputs(eng, prompts, GREEDY, batched=True) == ref["greedy"]
    streamed = bf16_engine(default_bf16, "suffix")
    tokens: list[int] = []
    for delta in LLM(engine=streamed).stream(prompts[0], GREEDY):
        tokens += delta.new_token_ids
    assert tokens == ref["greedy"][0] and streamed.counters.drafted > 0


@pytest.mark.parametrize("variant", [pytest.param("avx2"), pytest.param("avx512_bf16", marks=pytest.mark.skipif(
    not DP_REQUIRES <= cpu_flags(), reason="this CPU lacks AVX-512 BF16"))])
@pytest.mark.parametrize("mode", ["suffix", "learned"])
def test_tiny_model_bf16_batched_speculation_equals_plain_alone(tiny_llama, mode, variant, monkeypatch) -> None:
    """Every kernel variant this CPU can run (each test chooses it), not only the default one."""
    if compiled_kernel() is None:
        pytest.skip("onspec's kernels cannot run on this CPU")
    monkeypatch.setenv("ONSPEC_BF16_KERNEL", variant)
    lm = load_model(str(tiny_llama), "bfloat16")
    prompts = [[5, 9, 14, 9, 5, 9, 14, 9, 5, 9], [17, 3, 3, 8, 120, 7, 7], list(range(3, 40))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = outputs(bf16_engine(lm, "off", prefix_reuse=False), prompts, params, batched=False)
    eng = bf16_engine(lm, mode)
    assert outputs(eng, prompts, params, batched=True) == plain and eng.counters.drafted > 0
    assert set(lm.model.lm_head._packed) == {variant}         # the variant asked for did the products
