"""A fixed, preallocated byte arena used as a FIFO ring: the storage of the trainer's replay buffers.

Why: the replay buffer (``traces.TraceBuffer``) is bounded by a byte budget, but when every chunk owns its
own tensors the process's resident memory climbs for the first few hundred requests while the buffer fills
(and glibc's heaps fragment as chunks of many sizes come and go), which looks exactly like a leak in a
long-running server and makes the peak depend on how long it has served. Here the whole budget is
allocated once and every page touched when the trainer starts, like a preallocated KV cache: the
footprint is known at start-up and does not move while serving, and a chunk's tensors are copied into
the arena instead of being heap allocations of their own.

Allocation is a ring: regions are handed out in order after the newest one, wrapping to the start when
the tail is too short. Callers free in the same order (oldest first), which is what a FIFO replay buffer
does anyway, so the arena needs no free list: :meth:`ArenaRing.reserve` reports the region to use and the
caller evicts its oldest entries until :meth:`ArenaRing.overlaps_oldest` is False.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes: a cache line, and a multiple of every element size


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Region:
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


class ArenaRing:
    """``capacity`` bytes (one uint8 tensor, touched on creation) handed out as FIFO regions."""

    def __init__(self, capacity: int, touch: bool = True) -> None:
        self.capacity = aligned(max(ALIGN, int(capacity)))
        # torch.empty of a large size maps fresh pages lazily; fill_ makes them resident now, so the
        # footprint shows at start-up and not piecemeal while the buffer fills.
        self.data = torch.empty(self.capacity, dtype=torch.uint8)
        if touch:
            self.data.fill_(0)
        self.live: deque[Region] = deque()     # oldest first
        self._head = 0                          # where the next region starts (before wrapping)

    @property
    def used(self) -> int:
        return sum(r.size for r in self.live)

    def fits(self, size: int) -> bool:
        return aligned(size) <= self.capacity

    def reserve(self, size: int) -> Region:
        """The region the next ``size`` bytes go to (not yet taken: see :meth:`overlaps_oldest`)."""
        size = aligned(size)
        if size > self.capacity:
            raise ValueError(f"{size} bytes do not fit an arena of {self.capacity}")
        start = self._head if self._head + size <= self.capacity else 0
        return Region(start, size)

    def overlaps_oldest(self, region: Region) -> bool:
        """True while the oldest live region intersects ``region`` (the caller must evict it first)."""
        if not self.live:
            return False
        old = self.live[0]
        return old.start < region.end and region.start < old.end

    def take(self, region: Region) -> None:
        self.live.append(region)
        self._head = region.end

    def release_oldest(self) -> Region:
        old = self.live.popleft()
        if not self.live:
            self._head = 0      # empty: start over at the beginning (no wrap waste)
        return old

    def view(self, region: Region, offset: int, t: torch.Tensor) -> torch.Tensor:
        """A tensor of ``t``'s dtype and shape at ``region.start + offset``, holding a copy of ``t``."""
        n = t.numel() * t.element_size()
        lo = region.start + offset
        out = self.data[lo:lo + n].view(t.dtype).view(t.shape)
        out.copy_(t)
        return out
