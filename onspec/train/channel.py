"""How traces cross from the engine to the trainer process without ever blocking the step loop.

The engine thread only appends a chunk to a bounded in-process deque (O(1); when it is full the oldest
chunk is dropped and counted). A sender thread serialises chunks to bytes and puts them on the
inter-process queue, which is itself bounded: when the trainer falls behind, the sender waits, the deque
fills and old traces are dropped -- the drafter learns from the freshest traffic and serving never waits.

``EngineClock`` is a shared double holding the wall time of the engine's last step: the trainer reads it
to tell "engine busy" (throttle to a share of the CPU) from "engine idle" (train at full speed).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque

from .traces import TraceChunk


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
