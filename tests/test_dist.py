"""Distributed rollout: coordinator + workers (in process and on Ray) give the same greedy rollouts."""

from __future__ import annotations

from dataclasses import replace

import pytest

from onspec.distributed.coordinator import LocalPool, run_distributed_rollout
from onspec.distributed.worker import RolloutWorker
from onspec.rl.config import RLConfig
from onspec.rl.loop import build_engine
from onspec.rl.rollout import ChunkRunner, RolloutConfig, run_rollout

from test_rl_loop import ParityTask, chat_tiny  # noqa: E402,F401  (fixture)

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [20, 21]]


def _cfg(path, chunk: int = 6, spec: str = "suffix", workers: int = 2) -> RLConfig:
    rollout = RolloutConfig(group_size=3, max_tokens=20, temperature=0.0, chunk_tokens=chunk)
    return RLConfig(model=str(path), rollout=rollout, speculation=spec, max_num_seqs=3, max_model_len=128,
                    threads=1, workers=workers)


@pytest.fixture(scope="module")
def single_worker_reference(tiny_llama):
    cfg = _cfg(tiny_llama, chunk=0, spec="off")
    res = run_rollout(ChunkRunner(build_engine(cfg), cfg.rollout), PROMPTS, cfg.rollout)
    return [it.generated for it in res.items]


@pytest.mark.parametrize("chunk", [0, 6])
def test_two_local_workers_match_one(tiny_llama, single_worker_reference, chunk):
    cfg = _cfg(tiny_llama, chunk)
    pool = LocalPool([RolloutWorker(cfg, 0), RolloutWorker(cfg, 1)])
    res = run_distributed_rollout(pool, PROMPTS, cfg.rollout)
    assert [it.generated for it in res.items] == single_worker_reference
    assert res.generated_tokens == sum(len(g) for g in single_worker_reference)
    assert {it.worker for it in res.items} == {0, 1}       # work was spread over both
    if chunk:
        assert res.moves > 0 and res.reprefill_tokens > 0   # chunks rebalanced across workers
    # a group's responses sent to a worker together prefill their prompt once there
    assert res.shared_prompt_tokens > 0
    # every context token was computed, copied from a sibling, or found in a freed slot (prefix reuse)
    assert res.prefill_tokens + res.shared_prompt_tokens + res.reused_prefix_tokens == sum(
        len(PROMPTS[it.group]) for it in res.items) + res.reprefill_tokens


def test_group_text_is_shared_across_workers(tiny_llama):
    cfg = _cfg(tiny_llama, chunk=5)
    workers = [RolloutWorker(cfg, 0), RolloutWorker(cfg, 1)]
    seen: list[tuple] = []
    for w in workers:  # record what each worker is told about remote siblings
        orig = w.runner.share
        w.runner.share = lambda g, k, t, orig=orig, i=w.index: (seen.append((i, g)), orig(g, k, t))[1]
    res = run_distributed_rollout(LocalPool(workers), PROMPTS, cfg.rollout)
    assert seen, "no sibling text crossed workers"
    assert {i for i, _ in seen} == {0, 1}
    assert res.acceptance_length("suffix") > 1.0
    # pins are released after the rollout: no group trees linger
    for w in workers:
        assert w.engine.spec.proposers["suffix"].inner.stats()["groups"] == 0


def test_least_loaded_assignment():
    from onspec.rl.rollout import Coordinator

    coord = Coordinator([[1]] * 4, RolloutConfig(group_size=2), capacities=[2, 4])
    out = coord.assign()
    assert len(out[0]) == 2 and len(out[1]) == 4            # fills both in proportion to capacity
    assert coord.load == [2, 4]


@pytest.mark.slow
def test_ray_two_workers_match_one_and_receive_weights(chat_tiny, tmp_path):  # noqa: F811
    """Ray mode end to end: 2 local actors give the same greedy rollouts as 1 in-process engine, and after
    an RL step both hold exactly the trainer's weights."""
    pytest.importorskip("ray")
    from onspec.rl.grpo import GRPOConfig
    from onspec.rl.loop import RLRunner

    rollout = RolloutConfig(group_size=3, max_tokens=16, temperature=0.0, chunk_tokens=6)
    one = RLConfig(model=str(chat_tiny), rollout=rollout, speculation="suffix", max_num_seqs=3, max_model_len=256,
                   threads=1, prompts_per_step=2, steps=1, grpo=GRPOConfig(lr=1e-2))
    reference = run_rollout(ChunkRunner(build_engine(one), rollout), PROMPTS, rollout)
    runner = RLRunner(replace(one, workers=2), task=ParityTask(one.task))
    try:
        res = runner.backend.rollout(PROMPTS, step=0)
        assert [it.generated for it in res.items] == [it.generated for it in reference.items]
        assert {it.worker for it in res.items} == {0, 1}
        runner.step(0)
        expect = float(sum(p.detach().double().sum() for p in runner.trainer.policy.parameters()))
        assert runner.backend.fingerprints() == pytest.approx([expect, expect], rel=1e-12)
    finally:
        runner.close()


@pytest.mark.slow
def test_ray_workers_that_do_not_come_up_in_time_are_a_clear_error(chat_tiny, monkeypatch):  # noqa: F811
    """Ray waits forever for an actor by default; a worker that is not ready in time ends the run with one line."""
    pytest.importorskip("ray")
    from onspec.distributed import backend

    monkeypatch.setattr(backend, "WORKER_START_TIMEOUT_S", 0.01)   # no engine loads a model in 10 ms
    cfg = RLConfig(model=str(chat_tiny), rollout=RolloutConfig(group_size=2, max_tokens=4), speculation="suffix",
                   max_num_seqs=2, max_model_len=128, threads=1, workers=2)
    with pytest.raises(ValueError, match=r"a rollout worker failed to start: not ready after 0.01 s"):
        backend.RayBackend(cfg)
    import ray
    assert not ray.is_initialized()     # the Ray it started is shut down again
