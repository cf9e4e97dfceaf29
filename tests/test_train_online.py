"""Online drafter learning inside a running engine: hot swaps under load, corrupt versions, rollbacks,
the trainer process dying, restarts, and the day-1 warm start.

Engine-level (the server's engine thread is this test's thread: steps run round-robin over all requests);
every run's greedy outputs are compared with the same engine with speculation off, so a swap that broke
anything in flight would show.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from helpers import FakeClock
from onspec.config import EngineConfig, SpecConfig, TrainerConfig
from onspec.engine.engine import Engine
from onspec.engine.sampler import SamplingParams
from onspec.models.loader import load_model
from onspec.speculation.eagle import init_drafter
from onspec.train.online import build_online_learning, start_online_learning, trainer_config_from
from onspec.train.publish import Manifest, VersionState, latest_promoted, list_versions, publish_version, version_dir


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), "float32")


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        motif = [r.randrange(3, 500) for _ in range(3)]
        out.append([r.randrange(3, 500) for _ in range(r.randrange(2, 10))] + motif * 3)
    return out


def make_engine(target, mode: str = "auto", max_num_seqs: int = 16) -> Engine:
    return Engine(EngineConfig(model=str(target.path), dtype="float32", max_num_seqs=max_num_seqs,
                               spec=SpecConfig(mode=mode, profile_at_start=False)), loaded=target)


def reference(target, ps: list[list[int]], max_tokens: int) -> list[list[int]]:
    eng = make_engine(target, "off")
    for i, p in enumerate(ps):
        eng.add_request(f"q{i}", p, SamplingParams(temperature=0, max_tokens=max_tokens))
    while eng.has_unfinished():
        eng.step()
    return [eng.requests[f"q{i}"][0].output_ids for i in range(len(ps))]


def cfg_for(root, **kw) -> TrainerConfig:
    base = dict(versions_dir=str(root), chunk_positions=32, chunk_context=4, heldout_every=2, gate_min_positions=1,
                autocast=False, poll_seconds=60.0, live_window_steps=10_000)
    base.update(kw)
    return TrainerConfig(**base)


def serve(engine, ps, max_tokens, on_step=None) -> list[list[int]]:
    for i, p in enumerate(ps):
        engine.add_request(f"q{i}", p, SamplingParams(temperature=0, max_tokens=max_tokens))
    step = 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        if on_step is not None:
            on_step(step)
    for i in range(len(ps)):
        seq = engine.requests[f"q{i}"][0]
        assert seq.finish_reason in ("length", "stop")      # zero failed requests
    return [engine.requests[f"q{i}"][0].output_ids for i in range(len(ps))]


def test_hot_swap_under_load_keeps_greedy_outputs(tmp_path, target) -> None:
    ps = prompts(16)
    ref = reference(target, ps, 24)
    engine = make_engine(target)
    # short chunks: held-out evidence for the gate exists after the first steps
    ol = build_online_learning(engine, cfg_for(tmp_path / "v", gate_margin=-1e9, chunk_positions=8, chunk_context=2),
                              start_trainer=False)
    try:
        assert ol.manager.current == 0 and list_versions(ol.root) == [0]

        approved: list[tuple[int, int]] = []

        def on_step(step: int) -> None:
            if approved and approved[-1][0] == step - 1:   # approved last step -> swapped at that boundary
                assert ol.manager.current == approved[-1][1]
            if step == 3:   # an operator promotes version 1 (swapped at once, between two steps)
                publish_version(ol.root, init_drafter(target, seed=11), Manifest(version=1, parent=0, kind="trained"))
                ol.promote(1)
                assert ol.manager.current == 1
            for v, at in ((2, 6), (3, 12)):  # versions 2 and 3 arrive from "the trainer" and pass the gate
                if step == at:
                    publish_version(ol.root, init_drafter(target, seed=10 + v),
                                    Manifest(version=v, parent=v - 1, kind="trained"))
            if step >= 6:
                before = ol.manager.current
                ol.poll_now()   # the poller's pass: validate, gate, approve (once held-out evidence exists)
                if ol.manager.pending is not None:
                    assert ol.manager.current == before         # the swap waits for the step boundary
                    approved.append((step, ol.manager.pending.version))

        out = serve(engine, ps, 24, on_step)
        assert out == ref
        assert [v for _, v in approved] == [2, 3]
        st = ol.status()
        assert st["version"] == 3 and st["swaps"] == 3 and st["promotions"] == 2
        assert ol.proposer.stats.swaps == 3
        assert VersionState.load(ol.root).current == 3
    finally:
        ol.stop()


def test_corrupt_version_is_rejected_while_serving_goes_on(tmp_path, target) -> None:
    ps = prompts(6, seed=1)
    ref = reference(target, ps, 20)
    engine = make_engine(target)
    ol = build_online_learning(engine, cfg_for(tmp_path / "v", gate_margin=-1e9), start_trainer=False)
    try:
        def on_step(step: int) -> None:
            if step == 2:
                d = publish_version(ol.root, init_drafter(target, seed=3), Manifest(version=1, parent=0, kind="trained"))
                w = d / "model.safetensors"
                w.write_bytes(w.read_bytes()[:1000])          # truncated after publication
                ol.poll_now()

        assert serve(engine, ps, 20, on_step) == ref
        st = ol.status()
        assert st["version"] == 0 and st["invalid"] == 1 and st["swaps"] == 0
        bad = next(v for v in st["versions"] if v["version"] == 1)
        assert bad["status"] == "invalid"
        assert any(g["kind"] == "invalid" and "model.safetensors" in g["detail"] for g in st["gates"])
        with pytest.raises(ValueError):
            ol.promote(1)                                    # an operator cannot force it in either
    finally:
        ol.stop()


def serve_until_rolled_back(engine, ol, clock: FakeClock) -> None:
    """Every step 4x slower from now on (the injected regression); serve 4 requests until a rollback."""
    clock.tick = 0.04
    for i, p in enumerate(prompts(4, seed=3)):
        engine.add_request(f"z{i}", p, SamplingParams(temperature=0, max_tokens=30))
    while engine.has_unfinished() and ol.manager.counts["rollbacks"] == 0:
        engine.step()


def test_injected_live_regression_is_rolled_back(tmp_path, target) -> None:
    ps = prompts(4, seed=2)
    engine = make_engine(target, max_num_seqs=4)
    ol = build_online_learning(engine, cfg_for(tmp_path / "v", live_window_steps=12, rollback_threshold=0.3),
                              start_trainer=False)
    # forwards and proposals are timed on an injected clock: 10 ms each, then (the regression) 40 ms
    engine.clock = engine.spec.clock = clock = FakeClock(tick=0.01)
    try:
        serve(engine, ps, 30)                                 # version 0's live record
        publish_version(ol.root, init_drafter(target, seed=5), Manifest(version=1, parent=0, kind="trained"))
        ol.promote(1)
        serve_until_rolled_back(engine, ol, clock)
        st = ol.status()
        assert st["rollbacks"] == 1 and st["version"] == 0
        rb = next(g for g in st["gates"] if g["kind"] == "rollback")
        assert rb["version"] == 1 and rb["to"] == 0 and rb["ratio_previous"] < 0.7
        assert VersionState.load(ol.root).current == 0
        while engine.has_unfinished():
            engine.step()
    finally:
        ol.stop()


def test_trainer_death_falls_back_to_suffix_and_restart_resumes(tmp_path, target) -> None:
    ps = prompts(6, seed=4)
    ref = reference(target, ps, 20)
    root = tmp_path / "v"
    engine = make_engine(target)
    ol = start_online_learning(engine, cfg_for(root))
    try:
        publish_version(root, init_drafter(target, seed=9), Manifest(version=1, parent=0, kind="trained"))
        ol.promote(1)
        pid = ol.trainer.pid
        os.kill(pid, signal.SIGKILL)                          # the process this test started
        ol.trainer.process.join(30)
        ol.poll_now()
        assert ol.status()["fallback"]
        out = serve(engine, ps, 20)
        assert out == ref
        assert not ol.lender.lent and ol.trainer.lease not in ol.lender.leases  # nothing stays lent to the dead
        assert "learned" not in engine.spec.proposers and "suffix" in engine.spec.proposers
        assert any(e["kind"] == "fallback" for e in ol.status()["events"])
    finally:
        ol.stop(save=False)
    assert latest_promoted(root) == 1
    # A restart (new engine, same versions directory) resumes the latest promoted version.
    engine2 = make_engine(target)
    ol2 = build_online_learning(engine2, cfg_for(root), start_trainer=False)
    try:
        assert ol2.manager.current == 1
        assert torch.equal(ol2.proposer.drafter.fc.weight.float(),
                           init_drafter(target, seed=9).fc.weight.float())
        assert serve(engine2, ps, 20) == ref
    finally:
        ol2.stop()


def test_resumed_version_brings_its_heldout_estimate_and_the_gate_refreshes_it(tmp_path, target) -> None:
    """A warm start's held-out acceptance (its manifest) is the serving drafter's estimate, which auto mode
    prices it by (Speculation._estimate_allows); once a gate measures the serving version on live traces,
    that figure replaces it. A day-0 random drafter starts at 1.0."""
    from onspec.train.swap import GateResult

    root = tmp_path / "v"
    publish_version(root, init_drafter(target, seed=9),
                    Manifest(version=0, parent=None, kind="warmup", heldout_acceptance=1.3))
    VersionState(current=0, promoted=[0]).save(root)
    engine = make_engine(target)
    ol = build_online_learning(engine, cfg_for(root), start_trainer=False)
    try:
        assert ol.manager.current == 0
        assert ol.proposer.expected_acceptance == 1.3

        class LiveGate:   # what the held-out live window measured: the serving version reaches 1.7
            def judge(self, candidate, current, chunks):
                return GateResult(promote=False, candidate=1.1, current=1.7, roots=99, reason="worse")

        ol.manager.gate = LiveGate()
        publish_version(root, init_drafter(target, seed=10), Manifest(version=1, parent=0, kind="trained"))
        decision = ol.manager.consider(1)
        assert decision is not None and decision.kind == "reject"
        assert ol.proposer.expected_acceptance == 1.7 and ol.manager.expected[0] == 1.7
    finally:
        ol.stop()
    fresh = build_online_learning(make_engine(target), cfg_for(tmp_path / "day0"), start_trainer=False)
    try:
        assert fresh.proposer.expected_acceptance == 1.0
    finally:
        fresh.stop()


def test_trainer_config_from_server_like_objects(tmp_path) -> None:
    class ServerCfg:
        speculator_dir = str(tmp_path)
        model = "default"
        train = "online"

    cfg = trainer_config_from(ServerCfg())
    assert cfg.versions_dir == str(tmp_path)
    cfg = trainer_config_from({"speculator": "/x", "train_lr": "0.01", "resume": "false"})
    assert cfg.speculator == "/x" and cfg.lr == 0.01 and cfg.resume is False


def test_warmup_requests_add_sampled_answers_to_training_prompts_only() -> None:
    from onspec.train.warmup import is_heldout_prompt, warmup_key_parts, warmup_requests

    reqs = warmup_requests([f"p{i}" for i in range(16)], samples=3, temperature=0.7, max_tokens=9, heldout_every=8)
    first = reqs[:16]    # every prompt's greedy answer comes first
    assert [r[1] for r in first] == [f"p{i}" for i in range(16)]
    assert all(p.temperature == 0.0 and p.max_tokens == 9 for _, _, p in first)
    extra = reqs[16:]
    assert len(extra) == 2 * 14   # prompts 7 and 15 are held out: greedy only
    assert all(p.temperature == 0.7 for _, _, p in extra)
    assert not any(is_heldout_prompt(warmup_key_parts(rid + "/3")[0], 8) for rid, _, _ in extra)
    assert [is_heldout_prompt(i, 8) for i in (6, 7, 15)] == [False, True, True]
    assert len({p.seed for _, _, p in extra}) == len(extra)     # distinct sampled answers
    assert len({rid for rid, _, _ in reqs}) == len(reqs)


def test_warmup_chunk_keys_give_back_prompt_and_answer() -> None:
    """bench/warmup.py picks each data size's chunks by the answer number in the recorder's chunk keys."""
    import importlib.util
    from pathlib import Path

    from onspec.train.warmup import warmup_key_parts, warmup_requests

    reqs = warmup_requests(["a", "b", "c"], samples=3, temperature=1.0, max_tokens=4, heldout_every=8)
    keys = [f"{rid}/{n}" for n, (rid, _, _) in enumerate(reqs)]   # as the recorder names chunks
    assert [warmup_key_parts(k) for k in keys] == [(i, s) for s in range(3) for i in range(3)]
    path = Path(__file__).resolve().parent.parent / "bench" / "warmup.py"
    spec = importlib.util.spec_from_file_location("warmup_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_args(["--samples", "4,1,2"]).counts == [1, 2, 4]
    with pytest.raises(SystemExit):
        bench.parse_args(["--samples", "0"])


def test_warmup_publishes_a_version_serve_resumes(tmp_path, capsys) -> None:
    from conftest import make_tiny_model
    from onspec.cli import main

    # the warm-up prompts are text: the tiny model needs the tokenizer's whole vocabulary
    model_dir = make_tiny_model(tmp_path / "m", "llama", vocab_size=49152)
    root = tmp_path / "v"
    rc = main(["warmup", "--model", str(model_dir), "--dtype", "float32", "--speculator-dir", str(root),
               "--prompts", "4", "--max-tokens", "12", "--concurrency", "4", "--epochs", "1", "--threads", "1",
               "--samples", "2", "--corpus", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "answered 4 prompts (8 answers," in out and "read 3 reference answers" in out
    v = latest_promoted(root)
    assert v is not None and (version_dir(root, v) / "optimizer.pt").is_file()
    target = load_model(str(model_dir), "float32")
    engine = make_engine(target)
    ol = build_online_learning(engine, cfg_for(root), start_trainer=False)
    try:
        assert ol.manager.current == v
    finally:
        ol.stop()


def serve_until_gated(engine, ol, seconds: float = 240.0) -> dict:
    """Keep 4 repetitive requests running until the gate promoted or rejected a version the trainer process
    published (or ``seconds`` passed); the learner's status."""
    deadline = time.time() + seconds
    i = 0
    r = random.Random(0)
    while time.time() < deadline and not any(g["kind"] in ("promote", "reject") for g in ol.status()["gates"]):
        if sum(not s.finished for s in engine.seqs.values()) < 4:
            motif = [r.randrange(3, 500) for _ in range(3)]
            engine.add_request(f"w{i}", motif * 4, SamplingParams(temperature=0, max_tokens=24))
            i += 1
        engine.step()
    return ol.status()


@pytest.mark.slow
def test_trainer_process_learns_publishes_and_is_gated(tmp_path, target) -> None:
    root = tmp_path / "v"
    engine = make_engine(target, max_num_seqs=4)
    threads = torch.get_num_threads()
    ol = start_online_learning(engine, cfg_for(root, min_positions=32, batch_positions=128, publish_every_steps=5,
                                               poll_seconds=0.2, idle_after=0.2, busy_share=1.0))
    try:
        st = serve_until_gated(engine, ol)
        assert st["trainer_steps"] > 0 and len(st["versions"]) >= 2
        assert any(g["kind"] in ("promote", "reject") for g in st["gates"])
        assert ol.lender.grants > 0  # the trainer computed on threads the stepping engine lent it
    finally:
        ol.stop()
    assert torch.get_num_threads() == threads  # and the engine has them back


def test_operator_no_ops_are_not_logged_and_a_refused_rollback_names_no_field(tmp_path, target) -> None:
    from onspec.server.errors import bad_request

    engine = make_engine(target)
    ol = build_online_learning(engine, cfg_for(tmp_path / "v"), start_trainer=False)
    try:
        serving = ol.status()["version"]
        assert ol.promote(serving)["status"] == "already serving"
        assert not any(e["kind"] == "manual-promote" for e in ol.status()["events"])
        with pytest.raises(ValueError) as info:
            ol.rollback()                                     # nothing was served before
        err = bad_request(info.value)
        assert err.status == 400 and err.param is None and "roll back" in str(info.value)
    finally:
        ol.stop()


def test_corpus_recording_keeps_every_position_of_each_reference_answer(tmp_path) -> None:
    from conftest import make_tiny_model
    from onspec.speculation.eagle import EagleConfig, attach_learned
    from onspec.train.trainer import Trainer, offline_config
    from onspec.train.warmup import WarmupSettings, corpus_token_ids, record_corpus

    target = load_model(str(make_tiny_model(tmp_path / "m", "llama", vocab_size=49152)), "float32")
    settings = WarmupSettings(corpus=3, corpus_tokens=48, progress=False)
    texts = corpus_token_ids(target.tokenizer, settings)
    assert len(texts) == 3 and all(len(t) == 48 for t in texts)      # reference answers are long: all cut
    engine = make_engine(target)
    attach_learned(engine, SpecConfig(mode="suffix"), init_drafter(target, EagleConfig.for_target(target.arch)))
    cfg = cfg_for(tmp_path / "v")
    rec = record_corpus(engine, cfg, settings)
    assert rec.prompts == 3 and len(rec.chunks) == 3                  # one chunk per text, from position 0
    for chunk, ids in zip(sorted(rec.chunks, key=lambda c: int(c.key.split("/")[0].split("-")[1])), texts):
        assert chunk.start == 0 and not chunk.heldout
        assert chunk.tokens[:48].tolist() == ids and not chunk.generated[:48].any()
    assert engine.events.subscribers == (engine.spec,) and engine.has_unfinished() is False   # recorder detached, nothing left
    trainer = Trainer(init_drafter(target), target, offline_config(cfg, rec.chunks))
    for c in list(rec.chunks):
        trainer.add(c)
    assert all(bool(c.has_hidden[:48].all()) for c in rec.chunks)     # soft targets at every prompt position


def test_learning_with_speculation_off_is_refused_before_anything_is_published(tmp_path, target) -> None:
    root = tmp_path / "v"
    with pytest.raises(ValueError, match="needs speculation on"):
        build_online_learning(make_engine(target, "off"), cfg_for(root), start_trainer=False)
    assert list_versions(root) == []
