"""Drafter co-training (TLT): it trains only while the rollout is idle (few rows left, a core free), its
drafter is swapped in with a held-out figure for the controller to judge, and rollouts are unchanged."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from onspec.config import TrainerConfig
from onspec.rl.config import RLConfig
from onspec.rl.cotrain import DAY0_ACCEPTANCE, DrafterCoTrainer, IdleRule, make_cotrainer
from onspec.rl.grpo import GRPOConfig
from onspec.rl.loop import RLRunner
from onspec.rl.rollout import RolloutConfig, RolloutLoad
from test_rl_loop import ParityTask, chat_tiny  # noqa: F401  (fixture)

TRAINER = TrainerConfig(min_positions=16, batch_positions=128, autocast=False, heldout_every=2)
FREE_CORE = dict(engine_threads=1, trainer_threads=1, cpus=2)


def _cfg(path, temperature: float = 1.0, **kw) -> RLConfig:
    # 2 groups x 4 responses on 4 slots: the rollout runs 4 rows, then its tail drains them
    return RLConfig(model=str(path), steps=kw.pop("steps", 1), prompts_per_step=2,
                    rollout=RolloutConfig(group_size=4, max_tokens=24, temperature=temperature),
                    grpo=GRPOConfig(lr=1e-3), max_num_seqs=4, max_model_len=256, threads=1,
                    cotrain=kw.pop("cotrain", True), **kw)


class SpyCoTrainer(DrafterCoTrainer):
    """Logs every load the rollout reports by the shared (logical) clock, and the first time in a rollout that
    the gate is open with traces to train on, holds the engine thread there until the worker has made an
    optimiser step, so that the test does not depend on how fast this machine trains."""

    def __init__(self, rule: IdleRule, wait: bool = True) -> None:
        ticks = itertools.count()
        super().__init__(TRAINER, rule=rule, clock=lambda: next(ticks))
        self.loads: list[tuple[float, RolloutLoad]] = []
        self.wait = wait
        self.initial: list[torch.Tensor] = []

    def attach(self, engine) -> None:
        super().attach(engine)
        self.initial = [p.detach().clone() for p in self.trainer.drafter.parameters()]

    def observe(self, load: RolloutLoad) -> None:
        self.loads.append((self.clock(), load))
        super().observe(load)
        if self.wait and self.training_allowed and self.rollout.steps == 0 and (self.backlog or self.trainer.ready()):
            deadline = time.monotonic() + 120
            while self.rollout.steps == 0 and self.error is None and time.monotonic() < deadline:
                time.sleep(0.005)


def test_idle_rule_needs_few_rows_and_a_free_core():
    rule = IdleRule(share=0.25, **FREE_CORE)
    assert rule.core_free and rule.max_active(8) == 2
    assert rule.idle(RolloutLoad(active=2, peak=8)) and rule.idle(RolloutLoad(active=0, peak=8))
    assert not rule.idle(RolloutLoad(active=3, peak=8))
    assert not rule.idle(RolloutLoad(active=1, peak=3))  # 1/3 of the rows is more than a quarter
    busy = IdleRule(share=0.25, engine_threads=2, trainer_threads=2, cpus=2)  # --threads 2 on 2 cores
    assert not busy.core_free and not busy.idle(RolloutLoad(active=0, peak=8))
    assert IdleRule.measure(0.5).trainer_threads == torch.get_num_threads()
    with pytest.raises(ValueError, match="share"):
        IdleRule(share=1.5)


def test_cotraining_never_runs_while_more_than_the_share_of_rows_is_active(chat_tiny):  # noqa: F811
    cfg = _cfg(chat_tiny, speculation="auto")
    rule = IdleRule(share=0.5, **FREE_CORE)       # at most 2 of the 4 rows
    ct = SpyCoTrainer(rule)
    RLRunner(cfg, cotrainer=ct, task=ParityTask(cfg.task)).run(progress_bar=False)
    assert ct.error is None
    limit = rule.max_active(4)
    assert any(load.active > limit for _, load in ct.loads), "the rollout never had a busy phase"
    assert ct.rollout.steps >= 1
    for s in ct.rollout.slices:
        before = [load for t, load in ct.loads if t < s.start]
        during = [load for t, load in ct.loads if s.start <= t <= s.end]
        assert before and before[-1].active <= limit, "a step started while the rollout was busy"
        assert all(load.active <= limit for load in during), "a step ran while the rollout was busy"
    assert ct.rollout.idle_seconds > 0


def test_an_idle_rollout_trains_the_drafter_and_it_is_swapped_in_with_its_heldout_figure(chat_tiny):  # noqa: F811
    cfg = _cfg(chat_tiny, speculation="auto", steps=2)
    ct = SpyCoTrainer(IdleRule(share=1.0, **FREE_CORE))
    runner = RLRunner(cfg, cotrainer=ct, task=ParityTask(cfg.task))
    learned = runner.backend.engine.spec.proposers["learned"]
    assert learned.estimate() == DAY0_ACCEPTANCE  # a random head: the estimate gate keeps it out in auto
    history = runner.run(progress_bar=False)
    assert ct.error is None and ct.total_steps >= 2 and ct.version >= 1
    trained = ct.trainer.drafter
    assert not all(torch.equal(a, b) for a, b in zip(ct.initial, trained.parameters())), "weights unchanged"
    info = history[-1].drafter
    assert info["version"] == ct.version and info["estimate"] == ct.estimate is not None
    assert learned.estimate() == ct.estimate       # judged by the controller with its held-out figure
    serving = learned.drafter
    assert serving is not trained  # a copy: training never touches the drafter the engine is using
    for (n, a), (_, b) in zip(serving.named_parameters(), trained.named_parameters()):
        assert torch.equal(a, b.to(a.dtype)), n


def test_no_free_core_means_no_cotraining(chat_tiny):  # noqa: F811
    cfg = _cfg(chat_tiny, speculation="auto")
    ct = SpyCoTrainer(IdleRule(share=1.0, engine_threads=1, trainer_threads=1, cpus=1), wait=False)
    history = RLRunner(cfg, cotrainer=ct, task=ParityTask(cfg.task)).run(progress_bar=False)
    assert ct.total_steps == 0 and ct.version == 0 and ct.rollout.idle_seconds == 0
    assert history[-1].drafter["core_free"] is False


class RecordingTask(ParityTask):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.completions: list[str] = []

    def reward(self, problem, completion: str):
        self.completions.append(completion)
        return super().reward(problem, completion)


def test_cotraining_leaves_greedy_rollouts_unchanged(chat_tiny):  # noqa: F811
    outputs = {}
    for name, spec, ct in (("off", "off", None),
                           ("hybrid, co-trained", "hybrid", SpyCoTrainer(IdleRule(share=1.0, **FREE_CORE)))):
        cfg = _cfg(chat_tiny, temperature=0.0, speculation=spec, steps=2, cotrain=ct is not None)
        task = RecordingTask(cfg.task)
        history = RLRunner(cfg, cotrainer=ct, task=task).run(progress_bar=False)
        outputs[name] = task.completions
        if ct is not None:  # the second rollout drafted with the drafter trained in the first one's idle time
            assert ct.error is None and ct.version >= 1 and "hybrid" in history[-1].acceptance_by_strategy
    assert outputs["off"] == outputs["hybrid, co-trained"]


def test_cotrain_needs_a_speculation_mode_that_lets_it_draft(chat_tiny):  # noqa: F811
    cfg = _cfg(chat_tiny, speculation="suffix")
    with pytest.raises(ValueError, match="cotrain"):
        RLRunner(cfg, cotrainer=make_cotrainer(cfg), task=ParityTask(cfg.task))
    with pytest.raises(ValueError, match="cotrain"):
        make_cotrainer(_cfg(chat_tiny, speculation="auto", workers=2))
    with pytest.raises(ValueError, match="cotrain_share"):
        _cfg(chat_tiny, speculation="auto", cotrain_share=2.0)
