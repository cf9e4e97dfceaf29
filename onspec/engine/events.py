"""What an engine tells the rooms that watch it: prefill, step (its verdicts), finish, weights changed,
drafter swapped.

Subscribers derive from ``EngineObserver`` and override the events they need; the engine (and a proposer
that swaps its drafter) emit through ``EngineEvents``. Nothing that watches the engine patches its methods
or reaches into its objects: the speculation glue, the trace recorder, the server's speedup meter and the
online learner are all subscribers. Delivery is in subscription order, on the engine thread, between the
phases of a step; the engine's own ``Speculation`` is always first (its proposers must see a step's
verdicts before anything reads what they learnt from them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence
    from .step import Prefill, StepResult


class EngineObserver:
    """Base of every subscriber: each event is a no-op unless overridden."""

    def on_prefill(self, prefill: Prefill) -> None:
        """Rows of a sequence just entered the cache (a prefill chunk, or rows copied from a sibling or kept
        by a freed slot)."""

    def on_step(self, result: StepResult) -> None:
        """A step finished: its verdicts are committed."""

    def on_finish(self, seq: Sequence) -> None:
        """``seq`` finished (a stop condition, its length, or an abort)."""

    def on_weights_changed(self) -> None:
        """The target's weights changed in place: rows computed before are not what it computes now."""

    def on_drafter_swapped(self, name: str) -> None:
        """The drafter behind strategy ``name`` was replaced: its record says nothing about the new one."""


class EngineEvents:
    """The engine's subscriber list and the emitters."""

    def __init__(self) -> None:
        self._subscribers: list[EngineObserver] = []

    def subscribe(self, observer: EngineObserver, first: bool = False) -> None:
        if observer not in self._subscribers:
            self._subscribers.insert(0, observer) if first else self._subscribers.append(observer)

    def unsubscribe(self, observer: EngineObserver) -> None:
        if observer in self._subscribers:
            self._subscribers.remove(observer)

    def __contains__(self, observer: object) -> bool:
        return observer in self._subscribers

    @property
    def subscribers(self) -> tuple[EngineObserver, ...]:
        return tuple(self._subscribers)

    def prefill(self, prefill: Prefill) -> None:
        for s in list(self._subscribers):
            s.on_prefill(prefill)

    def step(self, result: StepResult) -> None:
        for s in list(self._subscribers):
            s.on_step(result)

    def finish(self, seq: Sequence) -> None:
        for s in list(self._subscribers):
            s.on_finish(seq)

    def weights_changed(self) -> None:
        for s in list(self._subscribers):
            s.on_weights_changed()

    def drafter_swapped(self, name: str) -> None:
        for s in list(self._subscribers):
            s.on_drafter_swapped(name)
