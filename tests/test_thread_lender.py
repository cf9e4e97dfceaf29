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
