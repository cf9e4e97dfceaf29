"""Serving a learned drafter without training it (onspec/train/frozen.py): "learned" and "hybrid" get a
drafter or a clear error, never silent plain decoding."""

from __future__ import annotations

import pytest
import torch

from onspec import LLM, SamplingParams
from onspec.cli import main
from onspec.config import SpecConfig
from onspec.models.loader import load_model
from onspec.rl.config import RLConfig
from onspec.server.settings import ServerConfig
from onspec.speculation.eagle import init_drafter, save_eagle3
from onspec.train.frozen import attach_for_mode
from onspec.train.publish import Manifest, VersionState, publish_version
from test_speculation import FORCE

PROMPTS = [[5, 9, 14, 9, 5, 9, 14, 9, 5, 9], [17, 3, 3, 8, 120, 7, 7]]


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), "float32")


def greedy(llm: LLM):
    return llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24))


@pytest.mark.parametrize("mode", ["learned", "hybrid"])
def test_learned_modes_without_a_drafter_are_refused_not_silently_plain(tiny_llama, empty_cache, mode) -> None:
    with pytest.raises(ValueError, match="onspec warmup"):
        LLM(model=str(tiny_llama), dtype="float32", speculation=mode, num_threads=1)


def test_the_latest_promoted_version_drafts_and_greedy_output_is_unchanged(tiny_llama, target, tmp_path) -> None:
    root = tmp_path / "versions"
    publish_version(root, init_drafter(target, seed=1), Manifest(version=0, parent=None, kind="initial",
                                                                   heldout_acceptance=1.0))
    publish_version(root, init_drafter(target, seed=2), Manifest(version=1, parent=0, kind="warmup",
                                                                   heldout_acceptance=1.37))
    VersionState(current=1, promoted=[0, 1]).save(root)
    plain = greedy(LLM(model=str(tiny_llama), dtype="float32", speculation="off", num_threads=1))
    from onspec.engine.engine import Engine
    from onspec.config import EngineConfig

    # Injected costs (drafting pays whatever this machine's speed or load): under live costs a loaded
    # machine made the controller draft nothing, and the test would then check nothing.
    spec_cfg = SpecConfig(mode="learned", profile_at_start=False, objective="throughput")
    engine = Engine(EngineConfig(model=str(tiny_llama), dtype="float32", num_threads=1, spec=spec_cfg))
    spec = attach_for_mode(engine, spec_cfg, versions_dir=str(root))
    spec.controller.cost = FORCE
    assert spec.proposers["learned"].expected_acceptance == pytest.approx(1.37)  # version 1, the promoted one
    outs = greedy(LLM(engine=engine))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert sum(o.outputs[0].by_strategy.get("learned", [0, 0])[0] for o in outs) > 0  # it drafted


def test_a_checkpoint_directory_is_served_in_any_mode_and_refused_with_off(tiny_llama, target, tmp_path,
                                                                          empty_cache) -> None:
    ckpt = save_eagle3(tmp_path / "ckpt", init_drafter(target, seed=5))
    llm = LLM(model=str(tiny_llama), dtype="float32", speculation="hybrid", num_threads=1, speculator=str(ckpt))
    assert set(llm.engine.spec.proposers) == {"suffix", "grammar", "learned", "hybrid"}
    assert llm.engine.spec.proposers["learned"].expected_acceptance is None  # no manifest: explored
    assert torch.equal(llm.engine.spec.proposers["learned"].drafter.fc.weight.float(),
                       init_drafter(target, seed=5).fc.weight)
    with pytest.raises(ValueError, match="speculation is 'off'"):
        LLM(model=str(tiny_llama), dtype="float32", speculation="off", num_threads=1, speculator=str(ckpt))
    with pytest.raises(ValueError, match="not a directory"):
        LLM(model=str(tiny_llama), dtype="float32", speculation="learned", num_threads=1,
            speculator=str(tmp_path / "missing"))
    # auto without a speculator stays model-free (suffix, and grammar for constrained requests), whatever the
    # cache holds
    assert set(LLM(model=str(tiny_llama), dtype="float32", num_threads=1).engine.spec.proposers) == {"suffix",
                                                                                                     "grammar"}


def test_cli_learned_without_a_drafter_is_one_line_exit_2(tiny_llama, empty_cache, capsys) -> None:
    rc = main(["generate", "hi", "--model", str(tiny_llama), "--speculation", "learned", "--max-tokens", "4"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "onspec warmup" in lines[0], err


def test_configs_refuse_combinations_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="needs speculation on"):
        ServerConfig(train="online", speculation="off")
    with pytest.raises(ValueError, match="needs --cotrain"):
        RLConfig(speculation="learned")
    RLConfig(speculation="learned", cotrain=True)  # fine: the co-trainer attaches its drafter
