"""Preallocated slot KV cache: one slot per running sequence, rows written in place.

Layout per layer: ``[num_slots, kv_heads, max_len, head_dim]`` so a contiguous run of slots is a view and
a sequence's prefix is a slice. The tensors are zero-filled lazily (see ``lazy_zeros``): the operating system only
backs the pages a sequence actually touches, so a generous slot count costs address space, not memory.

Sequences do not own their slot's length: the engine keeps ``cache_len`` per sequence and this class only
moves rows. Truncation (dropping rejected draft rows) is therefore free: the engine moves the length back
and later writes overwrite the stale rows. ``compact`` moves the accepted rows of a verified draft tree
into the contiguous prefix.
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.llama import ArchConfig


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """Zeros whose pages are committed only when written.

    Why not ``torch.zeros``: it memsets (and so commits) the whole cache up front. Why not ``torch.empty``:
    never-written rows may hold NaN bit patterns, and attention computes q.k over masked rows too
    (NaN * 0 is NaN). numpy's zeros uses calloc, which maps fresh zero pages for large blocks.
    """
    if not device.startswith("cpu"):
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.finfo(dtype).bits // 8
    raw = np.zeros(shape, dtype={2: np.int16, 4: np.int32}[itemsize])
    return torch.from_numpy(raw).view(dtype)


class KVCacheFull(RuntimeError):
    pass


class KVCache:
    def __init__(self, arch: ArchConfig, num_slots: int, max_len: int, dtype: torch.dtype,
                 device: str = "cpu") -> None:
        shape = (num_slots, arch.num_kv_heads, max_len, arch.head_dim)
        self.k = [lazy_zeros(shape, dtype, device) for _ in range(arch.num_layers)]
        self.v = [lazy_zeros(shape, dtype, device) for _ in range(arch.num_layers)]
        self.num_slots = num_slots
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))

    @staticmethod
    def bytes_per_token(arch: ArchConfig, dtype: torch.dtype) -> int:
        return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * torch.finfo(dtype).bits // 8

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def free_slots(self) -> list[int]:
        return list(self._free)

    def allocate(self, slot: int | None = None) -> int:
        """A free slot: ``slot`` if given (the scheduler's choice, e.g. one whose rows a prompt reuses), else
        the lowest, so a batch's slots tend to be a contiguous run (a view, not a gather)."""
        if not self._free:
            raise KVCacheFull("no free KV cache slot")
        if slot is not None:
            if slot not in self._free:
                raise ValueError(f"slot {slot} is not free")
            self._free.remove(slot)
            return slot
        self._free.sort(reverse=True)
        return self._free.pop()

    def free(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    def compact(self, slot: int, base: int, rows: list[int]) -> None:
        """Move rows ``base + rows[i]`` to ``base + i`` in every layer (rows ascending, rows[i] >= i)."""
        if all(r == i for i, r in enumerate(rows)):
            return
        src = torch.tensor([base + r for r in rows])
        dst = torch.arange(base, base + len(rows))
        for k, v in zip(self.k, self.v):
            k[slot, :, dst] = k[slot, :, src]
            v[slot, :, dst] = v[slot, :, src]

    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Share a prompt's cached prefix with a sibling (n > 1 requests prefill once)."""
        for k, v in zip(self.k, self.v):
            k[dst_slot, :, :length] = k[src_slot, :, :length]
            v[dst_slot, :, :length] = v[src_slot, :, :length]
