"""How traces cross from the engine to the trainer process without ever blocking the step loop.

The engine thread only appends a chunk to a bounded in-process deque (O(1); when it is full the oldest
chunk is dropped and counted). A sender thread serialises chunks to bytes and puts them on the
inter-process queue, which is itself bounded: when the trainer falls behind, the sender waits, the deque
fills and old traces are dropped -- the drafter learns from the freshest traffic and serving never waits.

``EngineClock`` is a shared double holding the wall time of the engine's last step: the trainer reads it
to tell "engine busy" (throttle to a share of the CPU) from "engine idle" (train at full speed).

``ThreadLender`` / ``CpuLease``: how the trainer (and the engine process's own background work) borrows
cores from a busy engine instead of fighting its OpenMP threads for them (see ``ThreadLender`` for the
measurement behind it).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable

import torch

from .traces import TraceChunk

# Seconds without an engine step after which a borrower stops waiting for a grant: the engine is not
# stepping (idle or stopped), so there is nothing to lend and nothing to disturb.
NOT_STEPPING_AFTER = 0.25


class TraceSender:
    """The recorder's sink: bounded drop-oldest deque + a daemon thread feeding ``out_queue``."""

    def __init__(self, out_queue, max_chunks: int, on_sent=None) -> None:
        self.out = out_queue
        self.pending: deque[TraceChunk] = deque(maxlen=max_chunks)
        self.on_sent = on_sent          # optional callable(chunk) after a chunk was handed over
        self.dropped = 0
        self.sent = 0
        self.sent_bytes = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="onspec-trace-sender", daemon=True)
        self._thread.start()

    def __call__(self, chunk: TraceChunk) -> None:
        with self._lock:
            if len(self.pending) == self.pending.maxlen:
                self.dropped += 1       # deque(maxlen) drops the oldest on append
            self.pending.append(chunk)
        self._wake.set()

    def _pop(self) -> TraceChunk | None:
        with self._lock:
            return self.pending.popleft() if self.pending else None

    def _run(self) -> None:
        while not self._stop.is_set():
            chunk = self._pop()
            if chunk is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            data = chunk.to_bytes()
            while not self._stop.is_set():
                try:
                    self.out.put(data, timeout=0.5)
                    break
                except queue.Full:
                    continue
                except (OSError, ValueError, AssertionError):  # the queue was closed: the trainer is gone
                    self._stop.set()
                    return
            else:
                return
            self.sent += 1
            self.sent_bytes += len(data)
            if self.on_sent is not None:
                self.on_sent(chunk)

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)


class EngineClock:
    """Wall time of the engine's last step, shared with the trainer process (a lock-free double)."""

    def __init__(self, ctx) -> None:
        self.value = ctx.Value("d", 0.0, lock=False)

    def tick(self) -> None:
        self.value.value = time.time()

    @staticmethod
    def busy(shared, idle_after: float) -> bool:
        return time.time() - shared.value < idle_after


class CpuLease:
    """A borrower's side of a thread lend (see :class:`ThreadLender`): two shared ints, ``want`` written by
    the borrower and ``granted`` by the engine. Made from a multiprocessing context, so the trainer process
    and threads of the engine process borrow the same way. ``clock`` and ``sleep`` pace the borrower's wait
    (tests inject them: a wait then takes no wall time)."""

    def __init__(self, ctx, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.want = ctx.Value("i", 0, lock=False)
        self.granted = ctx.Value("i", 0, lock=False)
        self.clock = clock
        self.sleep = sleep

    @contextmanager
    def borrow(self, engine_idle: Callable[[], bool], timeout: float = 5.0, stop=None):
        """Compute inside this context. Waits until the engine granted (it has dropped threads between two
        steps) or ``engine_idle()`` says it is not stepping (idle or stopped: nothing to lend); yields
        whether it was granted. ``timeout`` bounds the wait (e.g. one long prefill step)."""
        self.want.value = 1
        try:
            t0 = self.clock()
            while not self.granted.value:
                if engine_idle() or self.clock() - t0 > timeout or (stop is not None and stop.is_set()):
                    break
                self.sleep(0.002)
            yield bool(self.granted.value)
        finally:
            self.want.value = 0


class ThreadLender:
    """The engine lends threads to whoever computes beside it instead of fighting over cores.

    Why: a 2-thread engine decode step took 23 ms on the quiet 2-core machine, 106 ms beside one busy
    1-thread process (OpenMP's workers wait at every barrier for the one whose core was taken), and 31 ms
    when the engine ran 1 thread beside that process (reproduce: time ``Engine.step`` while a matmul loop
    runs in a second process). So a trainer burst that merely overlaps a 2-thread step costs the engine ~4x
    that step, while the same burst beside an engine that first dropped a thread costs it ~1.4x.

    Protocol: a borrower sets ``want`` and waits; the engine, between two steps (:meth:`between_steps`),
    drops ``lend`` threads once anyone wants and sets ``granted`` for those who want; a borrower computes
    and clears ``want``; at the next step boundary its ``granted`` is cleared and, when nobody wants any
    more, the engine takes its threads back. ``torch.set_num_threads`` acts on the whole process, so a
    borrowing thread of the engine process runs with the lowered count too.
    """

    def __init__(self, lend: int = 1) -> None:
        self.lend = lend
        self.leases: list[CpuLease] = []
        self._full = 0              # the engine's thread count before lending; 0 = not lent
        self.grants = 0

    def add(self, lease: CpuLease) -> CpuLease:
        self.leases.append(lease)
        return lease

    def remove(self, lease: CpuLease) -> None:
        """Forget a borrower that is gone (a dead trainer process); threads it held come back now."""
        if lease in self.leases:
            lease.want.value = 0
            self.between_steps()
            self.leases.remove(lease)

    def between_steps(self) -> None:
        """Engine thread, between two steps: lend, grant, take back. Cheap enough for every step."""
        wanted = [lease.want.value for lease in self.leases]
        if any(wanted) and not self._full:
            self._full = torch.get_num_threads()
            if self._full > 1:
                torch.set_num_threads(max(1, self._full - self.lend))
            self.grants += 1
        for lease, w in zip(self.leases, wanted):
            lease.granted.value = int(bool(w) and bool(self._full))
        if not any(wanted) and self._full:
            if self._full > 1:
                torch.set_num_threads(self._full)
            self._full = 0

    def release(self) -> None:
        """Take lent threads back now (learning stops)."""
        for lease in list(self.leases):
            self.remove(lease)

    @property
    def lent(self) -> bool:
        return bool(self._full)
