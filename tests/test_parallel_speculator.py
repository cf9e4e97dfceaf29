"""Serving a parallel drafter checkpoint with ``--speculator`` (train/frozen.py, speculation/checkpoints.py).

A directory written by ``onspec export-speculator --parallel`` is told from an EAGLE-3 head by its config's
parallel-drafting fields and drafts as strategy ``"parallel"``: greedy output equals speculation off
(float32 tiny model; the default bf16 path where it is exact). In auto it is served beside the suffix
drafter and, when the versions directory has a promoted sequential head, beside that one too, each judged
by its own record. Corrupt or mismatched checkpoints are a ValueError naming the problem (CLI: exit 2, one
line).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_eagle import _corrupt, force_all_drafts
from test_exact_bf16 import GREEDY, default_path_is_exact, outputs
from test_exact_bf16 import default_bf16, plain_alone  # noqa: F401  (fixtures)
from test_frozen_drafter import empty_cache, target  # noqa: F401  (fixtures)
from test_speculation import FORCE, FREE

from onspec import LLM, SamplingParams
from onspec.cli import main
from onspec.config import EngineConfig, SpecConfig
from onspec.engine.engine import Engine
from onspec.models.loader import load_model
from onspec.speculation.checkpoints import PARALLEL, checkpoint_kind, load_drafter
from onspec.speculation.eagle import init_drafter, save_eagle3
from onspec.speculation.parallel_checkpoint import save_parallel
from onspec.speculation.parallel_drafter import ParallelConfig, ParallelDrafter, from_eagle
from onspec.train.frozen import attach_for_mode
from onspec.train.publish import Manifest, VersionState, publish_version

PROMPTS = [[5, 9, 14, 9, 5, 9, 14, 9, 5, 9], [17, 3, 3, 8, 120, 7, 7]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def plain(tiny_llama):
    llm = LLM(model=str(tiny_llama), dtype="float32", speculation="off", num_threads=1)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def exported(tiny_llama, tmp_path, depths: int = 3):
    """``onspec export-speculator --parallel DEPTHS`` of a published EAGLE-3 version."""
    root = tmp_path / "exported-from"
    publish_version(root, init_drafter(load_model(str(tiny_llama), "float32"), seed=8),
                    Manifest(version=0, parent=None, kind="initial"))
    out = tmp_path / "peagle"
    assert main(["export-speculator", "--model", str(tiny_llama), "--dtype", "float32", "--speculator-dir",
                 str(root), "--out", str(out), "--parallel", str(depths)]) == 0
    return out


def engine_for(tiny_llama, mode: str, speculator: str, versions_dir: str = "") -> Engine:
    spec_cfg = SpecConfig(mode=mode, profile_at_start=False, objective="throughput")
    engine = Engine(EngineConfig(model=str(tiny_llama), dtype="float32", num_threads=1, spec=spec_cfg))
    spec = attach_for_mode(engine, spec_cfg, speculator=speculator, versions_dir=versions_dir)
    spec.controller.cost = FORCE  # drafting pays whatever this machine's speed: the test checks what is drafted
    return engine


def test_export_round_trip_drafts_as_strategy_parallel_and_greedy_equals_off(tiny_llama, tmp_path, plain,
                                                                             empty_cache) -> None:
    out = exported(tiny_llama, tmp_path)
    assert checkpoint_kind(out) == PARALLEL
    llm = LLM(model=str(tiny_llama), dtype="float32", speculation="parallel", num_threads=1, speculator=str(out))
    spec = llm.engine.spec
    assert set(spec.proposers) == {"suffix", "grammar", "parallel"}
    prop = spec.proposers["parallel"]
    assert isinstance(prop.drafter, ParallelDrafter) and prop.drafter.depths == 3
    assert prop.expected_acceptance is None          # no manifest: explored
    spec.controller.cost = FORCE
    outs = llm.generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == plain
    assert sum(o.outputs[0].by_strategy.get("parallel", [0, 0])[0] for o in outs) > 0   # it drafted
    assert prop.stats.forwards == prop.stats.proposals > 0                               # one forward each


def test_auto_serves_it_beside_suffix_and_a_promoted_sequential_head(tiny_llama, target, tmp_path, plain) -> None:
    out = exported(tiny_llama, tmp_path)
    root = tmp_path / "versions"
    # no sequential version yet: suffix and parallel
    engine = engine_for(tiny_llama, "auto", str(out), str(root))
    assert set(engine.spec.proposers) == {"suffix", "grammar", "parallel"}
    publish_version(root, init_drafter(target, seed=2), Manifest(version=0, parent=None, kind="warmup",
                                                                 heldout_acceptance=1.4))
    VersionState(current=0, promoted=[0]).save(root)
    engine = engine_for(tiny_llama, "auto", str(out), str(root))
    spec = engine.spec
    assert set(spec.proposers) == {"suffix", "grammar", "learned", "hybrid", "parallel"}
    assert spec.proposers["learned"].expected_acceptance == pytest.approx(1.4)
    assert set(spec.strategies()) == {"suffix", "hybrid", "parallel"}    # the hybrid one wraps the learned head
    # priced as a drafter model, judged in its own measured-utility arm (not the learned head's)
    assert spec.proposers["parallel"].wants_aux and spec.arm("parallel") == "parallel"
    assert spec.arm("hybrid") == "learned"
    force_all_drafts(spec)
    outs = LLM(engine=engine).generate(PROMPTS, PARAMS)
    assert [o.outputs[0].token_ids for o in outs] == plain
    asked = spec.policy.rows_asked
    assert asked.get("parallel", 0) > 0 and asked.get("hybrid", 0) > 0, asked      # both were measured
    # the sequential head is optional beside it: a damaged one is left out, serving starts
    weights = root / "v0000" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert set(engine_for(tiny_llama, "auto", str(out), str(root)).spec.proposers) == {"suffix", "grammar", "parallel"}


def test_wrong_kinds_and_bad_checkpoints_are_clear_errors(tiny_llama, target, tmp_path, empty_cache) -> None:
    out = exported(tiny_llama, tmp_path)
    eagle = save_eagle3(tmp_path / "eagle", init_drafter(target, seed=5))
    with pytest.raises(ValueError, match="is a parallel drafter; speculation 'learned'"):
        engine_for(tiny_llama, "learned", str(out))
    with pytest.raises(ValueError, match="is an EAGLE-3 head; speculation 'parallel'"):
        engine_for(tiny_llama, "parallel", str(eagle))
    with pytest.raises(ValueError, match="export-speculator --parallel"):   # nothing to serve 'parallel' with
        LLM(model=str(tiny_llama), dtype="float32", speculation="parallel", num_threads=1)
    cases = [
        (_corrupt(tmp_path, out, "nomask", edit_state=lambda s: s.pop("mask_hidden")), "no mask_hidden"),
        (_corrupt(tmp_path, out, "nan", edit_state=lambda s: s["mask_hidden"].fill_(float("nan"))), "NaN"),
        (_corrupt(tmp_path, out, "bigtoken", edit_cfg=lambda c: c.update(pard_token=10 ** 6)), "mask_token_id"),
        (_corrupt(tmp_path, out, "hidden", edit_cfg=lambda c: c.update(target_hidden_size=7)), "hidden"),
        (_corrupt(tmp_path, out, "trunc", raw_bytes=(out / "model.safetensors").read_bytes()[:100]), "corrupt"),
        # an EAGLE-3 config over parallel weights: the extra tensor is named
        (_corrupt(tmp_path, out, "nofields", edit_cfg=lambda c: [c.pop(k) for k in ("parallel_drafting", "para_depths",
                                                                                     "pard_token", "ptd_token_id",
                                                                                     "mask_token_id")]),
         "mask_hidden"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message):
            engine_for(tiny_llama, "parallel" if "nofields" not in path.name else "auto", str(path))


def test_cli_generate_with_a_parallel_speculator(tiny_llama, tmp_path, empty_cache, capsys) -> None:
    out = exported(tiny_llama, tmp_path)
    common = ["generate", "1 2 1 2", "--raw", "--model", str(tiny_llama), "--dtype", "float32", "--max-tokens", "4"]
    assert main([*common, "--speculation", "parallel", "--speculator", str(out)]) == 0
    capsys.readouterr()
    bad = _corrupt(tmp_path, out, "bad", edit_cfg=lambda c: c.update(para_depths=0))
    for args, message in (([*common, "--speculation", "auto", "--speculator", str(bad)], "depths"),
                          ([*common, "--speculation", "learned", "--speculator", str(out)], "parallel drafter")):
        rc = main(args)
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and message in lines[0], err


@default_path_is_exact
def test_real_model_bf16_parallel_speculator_equals_plain_alone(default_bf16, plain_alone, tmp_path) -> None:
    prompts, ref = plain_alone
    out = save_parallel(tmp_path / "peagle", from_eagle(init_drafter(default_bf16, seed=0), ParallelConfig(depths=4)))
    assert json.loads((out / "config.json").read_text())["parallel_drafting"] is True
    spec_cfg = SpecConfig(mode="parallel", profile_at_start=False, objective="throughput")
    eng = Engine(EngineConfig(model=str(default_bf16.path), dtype="bfloat16", num_threads=1, max_num_seqs=4,
                              max_model_len=1024, spec=spec_cfg), loaded=default_bf16)
    spec = attach_for_mode(eng, spec_cfg, speculator=str(out))
    force_all_drafts(spec)
    spec.controller.cost = FREE
    assert spec.proposers["parallel"].drafter.dtype == torch.bfloat16
    assert outputs(eng, prompts, GREEDY, batched=True) == ref["greedy"]
    assert eng.counters.by_strategy.get("parallel", [0])[0] > 0


def test_load_drafter_reads_either_kind(tmp_path, target) -> None:
    head = init_drafter(target, seed=3)
    assert type(load_drafter(save_eagle3(tmp_path / "e", head), target)) is not ParallelDrafter
    assert isinstance(load_drafter(save_parallel(tmp_path / "p", from_eagle(head)), target), ParallelDrafter)
