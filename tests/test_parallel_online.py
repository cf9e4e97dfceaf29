"""Online learning of the parallel drafter (``TrainerConfig.drafter = "parallel"``, train/heads.py): the same
machinery as the EAGLE-3 head's (tests/test_train_online.py) on the parallel lineage ``<versions>/parallel``.

Hot swaps under load keep greedy outputs equal to speculation off; a corrupt version is rejected while
serving goes on; a live regression is rolled back; the trainer's step lowers every depth's loss on a fixed
batch of recorded traces and publishes parallel versions; day-0 (random), day-1 (an EAGLE-3 checkpoint made
parallel, or ``onspec warmup --drafter parallel``) and resume from a promoted version; in auto a promoted
sequential head serves beside it and outlives its trainer.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import make_tiny_model
from helpers import FakeClock
from test_eagle import force_all_drafts
from test_train_online import (cfg_for, make_engine, prompts, reference, serve, serve_until_gated,
                               serve_until_rolled_back)

from onspec.cli import main
from onspec.config import SpecConfig
from onspec.models.loader import load_model
from onspec.speculation.checkpoints import load_drafter
from onspec.speculation.eagle import init_drafter, save_eagle3
from onspec.speculation.parallel_drafter import ParallelConfig, ParallelDrafter, init_parallel
from onspec.server.settings import ServerConfig
from onspec.train.frozen import attach_for_mode
from onspec.train.online import build_online_learning, start_online_learning, trainer_config_from
from onspec.train.publish import Manifest, VersionState, latest_promoted, list_versions, publish_version
from onspec.train.trainer import Trainer, load_version_for_training

DEPTHS = 3


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), "float32")


def pcfg(root, **kw):
    return cfg_for(root, drafter="parallel", parallel_depths=DEPTHS, **kw)


def parallel(target, seed: int, depths: int = DEPTHS) -> ParallelDrafter:
    return init_parallel(target, parallel=ParallelConfig(depths=depths), seed=seed)


def learner(target, root, mode: str = "parallel", **kw):
    """Online learning of the parallel drafter on a fresh engine, drafting every proposed node."""
    engine = make_engine(target, mode, max_num_seqs=kw.pop("max_num_seqs", 16))
    ol = build_online_learning(engine, pcfg(root, **kw), start_trainer=False)
    force_all_drafts(ol.spec)
    return engine, ol


def test_day0_publishes_a_random_parallel_drafter_in_its_own_lineage(tmp_path, target) -> None:
    engine, ol = learner(target, tmp_path / "v")
    try:
        assert ol.root == tmp_path / "v" / "parallel" and list_versions(ol.root) == [0]
        assert list_versions(tmp_path / "v") == []                      # the sequential lineage is untouched
        assert isinstance(ol.proposer.drafter, ParallelDrafter) and ol.proposer.drafter.depths == DEPTHS
        assert ol.proposer is engine.spec.proposers["parallel"] and "learned" not in engine.spec.proposers
        assert ol.proposer.expected_acceptance == 1.0                   # random: nothing to expect yet
        assert ol.status()["drafter"] == "parallel"
        assert isinstance(load_drafter(ol.root / "v0000", target), ParallelDrafter)
    finally:
        ol.stop()
    with pytest.raises(ValueError, match="does not draft with the parallel drafter"):
        build_online_learning(make_engine(target, "learned"), pcfg(tmp_path / "w"), start_trainer=False)
    # onspec serve --train online --train-drafter parallel: the learner's config, and the same refusal up front
    assert trainer_config_from(ServerConfig(train="online", train_drafter="parallel")).drafter == "parallel"
    with pytest.raises(ValueError, match="train_drafter: speculation 'hybrid'"):
        ServerConfig(train="online", train_drafter="parallel", speculation="hybrid")


def test_hot_swap_under_load_keeps_greedy_outputs(tmp_path, target) -> None:
    ps = prompts(12)
    ref = reference(target, ps, 24)
    engine, ol = learner(target, tmp_path / "v", gate_margin=-1e9, chunk_positions=8, chunk_context=2)
    try:
        approved: list[int] = []

        def on_step(step: int) -> None:
            if step == 3:   # an operator promotes version 1, of other depths (swapped at once)
                publish_version(ol.root, parallel(target, 11, depths=5), Manifest(version=1, parent=0, kind="trained"))
                ol.promote(1)
                assert ol.manager.current == 1 and ol.proposer.drafter.depths == 5
            if step == 6:   # version 2 arrives from "the trainer" and passes the gate
                publish_version(ol.root, parallel(target, 12), Manifest(version=2, parent=1, kind="trained"))
            if step >= 6:
                before = ol.manager.current
                ol.poll_now()
                if ol.manager.pending is not None:
                    assert ol.manager.current == before     # the swap waits for the step boundary
                    approved.append(ol.manager.pending.version)

        assert serve(engine, ps, 24, on_step) == ref
        assert approved == [2] and VersionState.load(ol.root).current == 2
        st = ol.status()
        assert st["version"] == 2 and st["swaps"] == 2 and ol.proposer.stats.swaps == 2
        assert ol.proposer.drafter.depths == DEPTHS
        assert engine.counters.by_strategy.get("parallel", [0])[0] > 0    # it drafted through the swaps
        assert ol.proposer.stats.forwards == ol.proposer.stats.proposals  # one forward per proposal
    finally:
        ol.stop()


def test_corrupt_or_foreign_versions_are_rejected_while_serving_goes_on(tmp_path, target) -> None:
    ref = reference(target, prompts(6, seed=1), 20)
    engine, ol = learner(target, tmp_path / "v", gate_margin=-1e9)
    try:
        def on_step(step: int) -> None:
            if step == 2:
                d = publish_version(ol.root, parallel(target, 3), Manifest(version=1, parent=0, kind="trained"))
                w = d / "model.safetensors"
                w.write_bytes(w.read_bytes()[:1000])          # truncated after publication
                # a sequential head published into the parallel lineage
                publish_version(ol.root, init_drafter(target, seed=4), Manifest(version=2, parent=0, kind="trained"))
                ol.poll_now()

        assert serve(engine, prompts(6, seed=1), 20, on_step) == ref
        st = ol.status()
        assert st["version"] == 0 and st["invalid"] == 2 and st["swaps"] == 0
        details = [g["detail"] for g in st["gates"] if g["kind"] == "invalid"]
        assert any("model.safetensors" in d for d in details)
        assert any("an EAGLE-3 head, the serving drafter is a parallel drafter" in d for d in details), details
        with pytest.raises(ValueError):
            ol.promote(1)
    finally:
        ol.stop()


def test_injected_live_regression_is_rolled_back(tmp_path, target) -> None:
    engine, ol = learner(target, tmp_path / "v", max_num_seqs=4, live_window_steps=12, rollback_threshold=0.3)
    engine.clock = engine.spec.clock = clock = FakeClock(tick=0.01)
    try:
        serve(engine, prompts(4, seed=2), 30)
        publish_version(ol.root, parallel(target, 5), Manifest(version=1, parent=0, kind="trained"))
        ol.promote(1)
        serve_until_rolled_back(engine, ol, clock)
        st = ol.status()
        assert st["rollbacks"] == 1 and st["version"] == 0
        assert VersionState.load(ol.root).current == 0
        assert torch.equal(ol.proposer.drafter.mask_hidden.float(),
                           load_drafter(ol.root / "v0000", target).mask_hidden)   # version 0's weights again
        while engine.has_unfinished():
            engine.step()
    finally:
        ol.stop()


def test_trainer_lowers_every_depths_loss_and_publishes_parallel_versions(tmp_path, target) -> None:
    """The trainer process's core (``Trainer``) on traces the engine recorded while the parallel drafter
    served: its step trains all depths (the parallel objective), its evaluation unrolls them, and what it
    publishes the trainer process resumes as a parallel drafter with its optimizer state."""
    engine, ol = learner(target, tmp_path / "v", chunk_positions=16, chunk_context=2)
    try:
        serve(engine, prompts(8, seed=5), 24)
        chunks = ol.manager.window.snapshot()          # the held-out chunks (every second one)
    finally:
        ol.stop()
    assert chunks
    cfg = pcfg(tmp_path / "v", aux_noise=0.0, lr=3e-3, weight_decay=0.0)
    drafter, _, _ = load_version_for_training(ol.root, 0, target)
    trainer = Trainer(drafter, target, cfg)
    samples = [trainer.add(c) for c in chunks]
    before, _ = trainer.evaluate(samples)
    first = trainer.step(samples)
    for _ in range(15):
        last = trainer.step(samples)
    assert len(first["kl_steps"]) == DEPTHS                     # every depth, not ttt_steps
    assert last["loss"] < 0.7 * first["loss"], (first["loss"], last["loss"])
    assert all(b < a for a, b in zip(first["kl_steps"], last["kl_steps"]))
    after, roots = trainer.evaluate(samples)
    assert roots > 0 and after >= before
    publish_version(ol.root, trainer.drafter, Manifest(version=1, parent=0, kind="trained", step=trainer.steps),
                    trainer.opt.state_dict())
    resumed, opt_state, manifest = load_version_for_training(ol.root, 1, target)
    assert isinstance(resumed, ParallelDrafter) and opt_state is not None and manifest.step == trainer.steps
    assert torch.equal(resumed.mask_hidden, trainer.drafter.mask_hidden.detach())


def test_day1_from_an_eagle_checkpoint_and_resume_from_a_promoted_version(tmp_path, target) -> None:
    head = init_drafter(target, seed=7)
    ckpt = save_eagle3(tmp_path / "eagle", head)
    root = tmp_path / "v"
    engine, ol = learner(target, root, speculator=str(ckpt))
    try:
        d = ol.proposer.drafter
        assert isinstance(d, ParallelDrafter) and d.depths == DEPTHS          # made parallel at import
        assert torch.equal(d.fc.weight.float(), head.fc.weight)
        assert ol.status()["versions"][0]["kind"] == "imported"
        publish_version(ol.root, parallel(target, 9), Manifest(version=1, parent=0, kind="trained",
                                                               heldout_acceptance=1.6))
        ol.promote(1)
    finally:
        ol.stop()
    assert latest_promoted(root / "parallel") == 1
    engine2, ol2 = learner(target, root)     # a restart resumes the promoted parallel version
    try:
        assert ol2.manager.current == 1 and ol2.proposer.expected_acceptance == 1.6
        assert torch.equal(ol2.proposer.drafter.mask_hidden.float(), parallel(target, 9).mask_hidden)
    finally:
        ol2.stop()
    # the sequential head cannot start from a parallel drafter
    with pytest.raises(ValueError, match="cannot start from it"):
        build_online_learning(make_engine(target), cfg_for(tmp_path / "w", speculator=str(root / "parallel" / "v0001")),
                              start_trainer=False)


@pytest.mark.slow
def test_trainer_process_learns_the_parallel_drafter_and_its_versions_are_gated(tmp_path, target) -> None:
    engine = make_engine(target, "parallel", max_num_seqs=4)
    ol = start_online_learning(engine, pcfg(tmp_path / "v", min_positions=32, batch_positions=128,
                                            publish_every_steps=5, poll_seconds=0.2, idle_after=0.2, busy_share=1.0))
    try:
        st = serve_until_gated(engine, ol)
        assert st["trainer_steps"] > 0 and len(st["versions"]) >= 2 and st["trainer"]["error"] is None
        assert any(g["kind"] in ("promote", "reject") for g in st["gates"])
        assert all(isinstance(load_drafter(ol.root / f"v{v['version']:04d}", target), ParallelDrafter)
                   for v in st["versions"])
    finally:
        ol.stop()


def test_warmup_of_the_parallel_drafter_is_what_serving_and_learning_read(tmp_path, capsys) -> None:
    """``onspec warmup --drafter parallel`` publishes a promoted day-1 version in the parallel lineage:
    ``--speculation parallel`` serves it frozen (priced by its held-out figure) and the online learner of the
    parallel drafter resumes it."""
    model_dir = make_tiny_model(tmp_path / "m", "llama", vocab_size=49152)   # the prompts are text
    root = tmp_path / "v"
    assert main(["warmup", "--model", str(model_dir), "--dtype", "float32", "--speculator-dir", str(root),
                 "--prompts", "4", "--max-tokens", "12", "--concurrency", "4", "--epochs", "1", "--threads", "1",
                 "--drafter", "parallel", "--depths", str(DEPTHS)]) == 0
    assert "answered 4 prompts" in capsys.readouterr().out
    v = latest_promoted(root / "parallel")
    assert v is not None and list_versions(root) == []
    big = load_model(str(model_dir), "float32")
    warm = load_drafter(root / "parallel" / f"v{v:04d}", big)
    assert isinstance(warm, ParallelDrafter) and warm.depths == DEPTHS
    engine = make_engine(big, "parallel")
    spec = attach_for_mode(engine, SpecConfig(mode="parallel", profile_at_start=False), versions_dir=str(root))
    assert set(spec.proposers) == {"suffix", "grammar", "parallel"}
    assert spec.proposers["parallel"].expected_acceptance is not None                # its warm-up figure
    engine2, ol = learner(big, root)
    try:
        assert ol.manager.current == v and torch.equal(ol.proposer.drafter.mask_hidden.float(), warm.mask_hidden)
    finally:
        ol.stop()


def test_in_auto_a_promoted_sequential_head_serves_beside_it_and_outlives_its_trainer(tmp_path, target) -> None:
    """Learning the parallel drafter in auto with a promoted sequential head: both are attached (the draft
    policy measures both); when the trainer process dies only the parallel strategy goes, the frozen head
    keeps drafting, and greedy output stays the plain output."""
    root = tmp_path / "v"
    publish_version(root, init_drafter(target, seed=6), Manifest(version=0, parent=None, kind="warmup",
                                                                 heldout_acceptance=1.2))
    VersionState(current=0, promoted=[0]).save(root)
    engine = make_engine(target)
    ol = start_online_learning(engine, pcfg(root))
    try:
        spec = engine.spec
        assert set(spec.proposers) == {"suffix", "grammar", "learned", "hybrid", "parallel"}
        assert ol.proposer is spec.proposers["parallel"] and ol.root == root / "parallel"
        assert spec.proposers["learned"].expected_acceptance == 1.2
        assert any(e["kind"] == "companion" for e in ol.status()["events"])
        os.kill(ol.trainer.pid, signal.SIGKILL)                          # the process this test started
        ol.trainer.process.join(30)
        ol.poll_now()
        ps = prompts(6, seed=4)
        force_all_drafts(spec)
        assert serve(engine, ps, 20) == reference(target, ps, 20)
        assert "parallel" not in spec.proposers and {"learned", "hybrid"} <= set(spec.proposers)
        assert ol.status()["fallback"]
    finally:
        ol.stop(save=False)
    assert list_versions(root) == [0]                                     # the sequential lineage untouched


def test_export_speculator_copies_a_learned_parallel_version(tmp_path, tiny_llama, target) -> None:
    root = tmp_path / "v"
    publish_version(root / "parallel", parallel(target, 4), Manifest(version=0, parent=None, kind="trained"))
    common = ["export-speculator", "--model", str(tiny_llama), "--dtype", "float32", "--speculator-dir", str(root)]
    assert main([*common, "--drafter", "parallel", "--out", str(tmp_path / "o")]) == 0
    out = load_drafter(tmp_path / "o", target)
    assert isinstance(out, ParallelDrafter) and torch.equal(out.mask_hidden, parallel(target, 4).mask_hidden)
    assert main([*common, "--drafter", "parallel", "--parallel", "3", "--out", str(tmp_path / "o2")]) == 2
    assert main([*common, "--speculator-dir", str(tmp_path / "none"), "--drafter", "parallel",
                 "--out", str(tmp_path / "o3")]) == 2
