"""Give memory the process has freed back to the operating system (glibc ``malloc_trim``).

Tensors of many different sizes are allocated and freed every step; glibc keeps much of the freed memory in
its heaps, so the resident set of a long-running server creeps up although nothing is leaked. The engine
thread trims when it goes idle (at most every ``min_interval`` seconds) and, under continuous load, once
every ``busy_interval`` seconds; a trim costs a few milliseconds. On other C libraries this is a no-op.

``bound_onednn_caches`` bounds the other source of creep, oneDNN's per-shape primitive caches (see there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field


# Entries kept by each of oneDNN's two primitive caches in a server process (and the trainer it spawns).
ONEDNN_CACHE_CAPACITY = 128
_ONEDNN_CACHE_VARS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> dict[str, str]:
    """Cap oneDNN's primitive caches at ``capacity`` entries each unless the environment already sets them.

    Why: bf16 matrix products on a CPU run on oneDNN, which compiles a primitive per distinct input shape
    and keeps it twice, in oneDNN's cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and in ideep's
    (``LRU_CACHE_CAPACITY``), 1024 entries each by default, about 0.7 MB per shape and weight in all.
    The target model's forwards are padded to a few token counts (engine/runner.py), but the learned
    drafter's catch-up forwards and the trainer's batches still come in many shapes. Measured on 1200
    distinct shapes (four weights, 300 row counts, twice over): resident memory grew 228 -> 1171 MiB with
    the defaults, 228 -> 658 with only oneDNN's cache off (ideep's still holds them; ``LRU_CACHE_CAPACITY=0``
    crashes), 228 -> 492 (first pass) -> 670 MiB (second; 402 after a malloc_trim) with both capped at 256,
    and 228 -> ~370 MiB over four passes at 128. MALLOC_ARENA_MAX=2 changed nothing (1204 MiB) and a
    malloc_trim gave back only a quarter (1171 -> 892): the memory is held by the caches. A cache hit costs
    nothing; a miss recompiles (0.5-1 ms per weight shape). Both variables are read when the first primitive
    is created, so this must run before the first bf16 matrix product (``onspec serve`` calls it before it
    loads the model); the trainer process it spawns inherits the environment.
    """
    for name in _ONEDNN_CACHE_VARS:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in _ONEDNN_CACHE_VARS}


@dataclass
class MemoryTrimmer:
    """``malloc_trim`` with rate limits: at most every ``min_interval`` seconds when idle, and every
    ``busy_interval`` seconds under continuous load (a server at concurrency 16 may never go idle, and its
    resident set then stepped up by 64 MiB at a time: glibc's heap high-water marks). A trim costs a few
    milliseconds, so once a minute under load is noise against the steps it runs between."""

    min_interval: float = 10.0
    busy_interval: float = 60.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)   # what the intervals are timed by
    malloc_trim: Callable[[int], object] | None = field(default=None, repr=False)  # None: the C library's
    _last: float = 0.0
    _trim: object = field(default=None, repr=False)
    _loaded: bool = False

    def _fn(self):
        if self.malloc_trim is not None:
            return self.malloc_trim
        if not self._loaded:
            self._loaded = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                self._trim = getattr(libc, "malloc_trim", None)
            except OSError:
                self._trim = None
        return self._trim

    def maybe_trim(self, busy: bool = False) -> bool:
        """Trim if the last trim is old enough (for an idle or a ``busy`` process); True when a trim ran."""
        if self.clock() - self._last < (self.busy_interval if busy else self.min_interval):
            return False
        return self.trim()

    def trim(self) -> bool:
        """Trim now (after large transient work); True when a trim ran."""
        self._last = self.clock()
        fn = self._fn()
        if fn is None:
            return False
        fn(0)
        return True
