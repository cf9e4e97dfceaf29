"""The engine lends threads to work beside it (trainer process, gate evaluations) between two steps."""

import multiprocessing

import pytest
import torch

from helpers import FakeClock
from onspec.train.channel import CpuLease, ThreadLender


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _lease(clock: FakeClock | None = None, sleep=None) -> CpuLease:
    """A lease; with ``clock`` and ``sleep`` its borrower waits on them instead of the wall clock."""
    ctx = multiprocessing.get_context("spawn")
    return CpuLease(ctx) if clock is None else CpuLease(ctx, clock=clock, sleep=sleep)


def test_the_engine_lends_a_thread_only_while_someone_wants_it(two_threads):
    lender = ThreadLender(lend=1)
    a = lender.add(_lease())
    lender.between_steps()
    assert torch.get_num_threads() == 2 and not a.granted.value and not lender.lent
    a.want.value = 1
    lender.between_steps()
    assert torch.get_num_threads() == 1 and a.granted.value == 1
    a.want.value = 0
    lender.between_steps()
    assert torch.get_num_threads() == 2 and a.granted.value == 0 and not lender.lent


def test_threads_come_back_only_when_the_last_borrower_is_done(two_threads):
    lender = ThreadLender(lend=1)
    a, b = lender.add(_lease()), lender.add(_lease())
    a.want.value = 1
    lender.between_steps()
    b.want.value = 1
    lender.between_steps()
    assert a.granted.value == b.granted.value == 1 and torch.get_num_threads() == 1
    a.want.value = 0
    lender.between_steps()
    assert a.granted.value == 0 and b.granted.value == 1 and torch.get_num_threads() == 1
    b.want.value = 0
    lender.between_steps()
    assert torch.get_num_threads() == 2 and lender.grants == 1


def test_release_takes_threads_back_from_a_borrower_that_died_holding_them(two_threads):
    lender = ThreadLender(lend=1)
    a = lender.add(_lease())
    a.want.value = 1
    lender.between_steps()
    lender.release()
    assert torch.get_num_threads() == 2 and a.granted.value == 0 and a.want.value == 0


def test_borrow_waits_for_the_grant_of_a_stepping_engine(two_threads):
    """The borrower waits until the engine's next step boundary grants it; here the engine steps once
    every 20 ms of the borrower's (injected) wait, and lends between two steps."""
    lender = ThreadLender(lend=1)
    clock = FakeClock()
    waited: list[float] = []

    def wait(seconds: float) -> None:
        waited.append(seconds)
        clock.advance(seconds)
        if len(waited) % 10 == 0:                 # 20 ms waited: a step ended, the engine lends
            lender.between_steps()

    lease = lender.add(_lease(clock, wait))
    with lease.borrow(lambda: False) as granted:
        assert granted and lender.lent and torch.get_num_threads() == 1
    assert len(waited) == 10 and lease.want.value == 0
    lender.between_steps()
    assert not lender.lent and torch.get_num_threads() == 2


def test_borrow_does_not_wait_for_an_engine_that_is_not_stepping():
    waited: list[float] = []
    lease = _lease(FakeClock(), waited.append)
    with lease.borrow(lambda: True) as granted:
        assert granted is False and lease.want.value == 1
    assert lease.want.value == 0 and waited == []


def test_borrow_gives_up_after_its_timeout_when_no_step_ends():
    """One long step (a long prefill) grants nothing: the borrower computes ungranted after ``timeout``."""
    clock = FakeClock()
    lease = _lease(clock, clock.advance)
    with lease.borrow(lambda: False, timeout=1.0) as granted:
        assert granted is False and 1.0 < clock.now < 1.01
    assert lease.want.value == 0


def test_steps_run_with_lent_threads_are_not_cost_samples() -> None:
    """A step slowed by threads lent to the trainer says nothing about drafting: it stays out of the step-cost
    curves and the measured utility, or a burst of them prices drafts out for good (a masked bucket is
    measured only by steps that draft)."""
    from onspec.config import SpecConfig
    from onspec.engine.step import StepResult
    from onspec.speculation.controller import Speculation

    spec = Speculation(None, SpecConfig(mode="auto"), {})
    spec._pure_decode = True
    spec.set_threads_lent(True)
    spec.on_step(StepResult(rows=2, tokens=6, seconds=0.05))
    spec.on_step(StepResult(rows=2, tokens=2, seconds=0.05))
    assert spec.controller.cost.table == {}
    spec.set_threads_lent(False)
    spec.on_step(StepResult(rows=2, tokens=6, seconds=0.02))
    spec.on_step(StepResult(rows=2, tokens=2, seconds=0.01))
    assert spec.controller.cost.tables["masked"] == {8: 0.02} and spec.controller.cost.tables["plain"] == {2: 0.01}


def test_online_learning_tells_speculation_when_the_next_step_runs_lent(two_threads, tiny_llama, tmp_path) -> None:
    from onspec.config import EngineConfig, SpecConfig, TrainerConfig
    from onspec.engine.engine import Engine
    from onspec.train.online import build_online_learning

    engine = Engine(EngineConfig(model=str(tiny_llama), dtype="float32", num_threads=2, max_model_len=128,
                                 spec=SpecConfig(mode="auto", profile_at_start=False)))
    ol = build_online_learning(engine, TrainerConfig(versions_dir=str(tmp_path / "v")), start_trainer=False)
    try:
        from onspec.engine.step import StepResult

        info = StepResult(rows=1, tokens=1, seconds=0.01, num_prefill=1)
        engine.events.step(info)
        assert not engine.spec.threads_lent
        ol.poll_lease.want.value = 1                 # someone computes beside the engine
        engine.events.step(info)
        assert engine.spec.threads_lent and torch.get_num_threads() == 1
        ol.poll_lease.want.value = 0
        engine.events.step(info)
        assert not engine.spec.threads_lent and torch.get_num_threads() == 2
    finally:
        ol.stop(save=False)
    assert not engine.spec.threads_lent
