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
from onspec.rl.interference import InterferenceConfig, InterferenceGuard
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

    def __init__(self, rule: IdleRule, wait: bool = True, **kw) -> None:
        ticks = itertools.count()
        super().__init__(TRAINER, rule=rule, clock=lambda: next(ticks), **kw)
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


def test_interference_guard_halves_the_duty_when_training_slows_steps_and_grows_it_when_not():
    """Loaded steps (training overlapped them) against clean ones at the same row count: 20% slower halves
    the duty, 2% slower (under the 5% tolerance) grows it; other row counts are never compared; the duty
    stays in [min, max] and sets the pause after each unit of work."""
    g = InterferenceGuard(InterferenceConfig(samples=3, tolerance=0.05, start_duty=0.5, min_duty=0.1,
                                             max_duty=0.8, grow=1.25))
    for _ in range(3):
        assert g.record(1, 0.100, loaded=False) is None
    assert g.record(1, 0.120, loaded=True) is None and g.record(1, 0.120, loaded=True) is None
    v = g.record(1, 0.120, loaded=True)
    assert v is not None and v.active == 1 and v.ratio == pytest.approx(1.2) and g.duty == 0.25
    for _ in range(3):
        g.record(2, 0.200, loaded=False)
        g.record(1, 0.300, loaded=True)                  # no clean steps at 1 row left since the verdict
    assert len(g.verdicts) == 1
    for _ in range(3):
        g.record(1, 0.295, loaded=False)
    assert g.verdicts[-1].ratio == pytest.approx(0.300 / 0.295) and g.duty == pytest.approx(0.3125)
    assert g.pause_after(1.0) == pytest.approx(1.0 * (1 - 0.3125) / 0.3125)
    for _ in range(10):                                  # a slowdown every time: down to the floor
        for loaded, t in ((False, 0.1), (True, 0.2)) * 3:
            g.record(4, t, loaded)
    assert g.duty == 0.1 and g.pause_after(1.0) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="duty"):
        InterferenceConfig(start_duty=0.9, max_duty=0.8)


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


def test_a_warm_start_is_measured_first_and_keep_up_scores_the_frozen_copy_beside_it(chat_tiny, tmp_path):  # noqa: F811
    """--cotrain-from starts from a saved head (unmeasured: explored until the first held-out figure);
    --cotrain-keep-up scores that head, frozen, beside the co-trained one on the same held-out traces."""
    from onspec.models.loader import load_model
    from onspec.speculation.eagle_model import init_drafter, load_eagle3, save_eagle3
    from onspec.train.objective import simulated_acceptance

    warm_dir = tmp_path / "warm"
    save_eagle3(warm_dir, init_drafter(load_model(str(chat_tiny), "float32"), seed=11))
    cfg = _cfg(chat_tiny, speculation="auto", steps=2, cotrain_from=str(warm_dir), cotrain_keep_up=True)
    ct = SpyCoTrainer(IdleRule(share=1.0, **FREE_CORE), keep_up=True, start_from=str(warm_dir))
    runner = RLRunner(cfg, cotrainer=ct, task=ParityTask(cfg.task))
    warm = load_eagle3(warm_dir, runner.backend.engine.loaded, dtype=torch.float32)
    learned = runner.backend.engine.spec.proposers["learned"]
    assert learned.estimate() is None                         # unmeasured: not gated out as a day-0 head is
    assert all(torch.equal(a, b) for a, b in zip(warm.parameters(), ct.trainer.drafter.parameters()))
    history = runner.run(progress_bar=False)
    assert ct.error is None
    first = history[0].drafter
    assert first["heldout_acceptance"] is not None and learned.estimate() is not None
    for step in history:
        assert step.drafter["keep_up"]["roots"] > 0
    assert all(torch.equal(a, b) for a, b in zip(warm.parameters(), ct.frozen.parameters()))
    last = history[-1].drafter["keep_up"]
    samples = ct.trainer.heldout_window()
    depth = warm.unroll_steps(TRAINER.ttt_steps)
    assert last["frozen"] == simulated_acceptance(warm, samples, depth)[0]
    assert last["cotrained"] == simulated_acceptance(ct.trainer.drafter, samples, depth)[0]
    assert ct.total_steps >= 1                                 # it trained: the two drafters differ
    assert not all(torch.equal(a, b) for a, b in zip(warm.parameters(), ct.trainer.drafter.parameters()))
    with pytest.raises(ValueError, match="cotrain_keep_up"):
        _cfg(chat_tiny, cotrain=False, cotrain_keep_up=True)
    with pytest.raises(ValueError, match="cotrain_from"):
        _cfg(chat_tiny, cotrain=False, cotrain_from=str(warm_dir))


def test_no_free_core_means_no_cotraining(chat_tiny):  # noqa: F811
    cfg = _cfg(chat_tiny, speculation="auto")
    ct = SpyCoTrainer(IdleRule(share=1.0, engine_threads=1, trainer_threads=1, cpus=1), wait=False)
    history = RLRunner(cfg, cotrainer=ct, task=ParityTask(cfg.task)).run(progress_bar=False)
    assert ct.total_steps == 0 and ct.version == 0 and ct.rollout.idle_seconds == 0
    assert history[-1].drafter["core_free"] is False


def test_heldout_figures_follow_the_newest_rollout_even_with_no_idle_time(chat_tiny):  # noqa: F811
    """No core free: nothing is trained or ingested during the rollouts, yet every step's keep-up figures
    are taken on that step's held-out traces (taken in between steps, when the rollout is not running)."""
    cfg = _cfg(chat_tiny, speculation="auto", steps=2)
    ct = SpyCoTrainer(IdleRule(share=1.0, engine_threads=1, trainer_threads=1, cpus=1), wait=False, keep_up=True)
    history = RLRunner(cfg, cotrainer=ct, task=ParityTask(cfg.task)).run(progress_bar=False)
    assert ct.total_steps == 0 and ct.rollout.idle_seconds == 0
    roots = [step.drafter["keep_up"]["roots"] for step in history]
    assert roots[0] > 0 and roots[1] > roots[0]          # the second rollout's traces joined the window
    assert all(step.drafter["keep_up"]["cotrained"] == step.drafter["keep_up"]["frozen"] for step in history)


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
