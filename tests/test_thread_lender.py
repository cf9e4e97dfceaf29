"""The engine lends threads to work beside it (trainer process, gate evaluations) between two steps."""

import multiprocessing
import threading
import time

import pytest
import torch

from onspec.train.channel import CpuLease, ThreadLender


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _lease() -> CpuLease:
    return CpuLease(multiprocessing.get_context("spawn"))


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
    lender = ThreadLender(lend=1)
    lease = lender.add(_lease())
    seen: list = []
    stop = threading.Event()

    def engine():  # steps every 20 ms; lends between them
        while not stop.is_set():
            time.sleep(0.02)
            lender.between_steps()

    t = threading.Thread(target=engine)
    t.start()
    try:
        with lease.borrow(lambda: False) as granted:
            seen.append((granted, lender.lent))
    finally:
        stop.set()
        t.join()
    assert seen == [(True, True)]
    lender.between_steps()
    assert not lender.lent and torch.get_num_threads() == 2


def test_borrow_does_not_wait_for_an_engine_that_is_not_stepping():
    lease = _lease()
    t0 = time.monotonic()
    with lease.borrow(lambda: True) as granted:
        assert granted is False and lease.want.value == 1
    assert lease.want.value == 0 and time.monotonic() - t0 < 0.5


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
