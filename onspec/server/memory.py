"""Give memory the process has freed back to the operating system (glibc ``malloc_trim``).

Tensors of many different sizes are allocated and freed every step; glibc keeps much of the freed memory in
its heaps, so the resident set of a long-running server creeps up although nothing is leaked. The engine
thread calls ``release_free_memory`` when it goes idle (at most every ``min_interval`` seconds), which costs
a few milliseconds and nothing while busy. On other C libraries this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass, field


@dataclass
class MemoryTrimmer:
    min_interval: float = 10.0
    _last: float = 0.0
    _trim: object = field(default=None, repr=False)
    _loaded: bool = False

    def _fn(self):
        if not self._loaded:
            self._loaded = True
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                self._trim = getattr(libc, "malloc_trim", None)
            except OSError:
                self._trim = None
        return self._trim

    def maybe_trim(self) -> bool:
        """Trim if the last trim is old enough; True when a trim ran."""
        now = time.monotonic()
        if now - self._last < self.min_interval:
            return False
        self._last = now
        fn = self._fn()
        if fn is None:
            return False
        fn(0)
        return True
