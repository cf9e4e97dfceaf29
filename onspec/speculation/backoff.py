"""The one exponential back-off of speculation: after a failure, the next chances are skipped for a while,
twice as long after every further failure, up to a cap; a success ends it.

The draft policy backs off asking drafters at a batch size where their nodes keep not paying (gate
``unpaid``) and asking a strategy whose record does not pay (gate ``record``); the measured utility backs
off re-trying an arm it switched off. One class, so the three read and behave alike; their constants are in
``SpecConfig`` (and ``MeasuredUtility``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    """``failed(at)``: the next chance allowed is ``at + interval``, with ``interval`` ``first`` after the
    first failure and doubling (up to ``cap``) after each further one; ``succeeded()`` ends the back-off."""

    first: int
    cap: int
    interval: int = 0   # 0: not backing off
    due: int = 0        # the first chance allowed again

    @property
    def active(self) -> bool:
        return self.interval > 0

    def allows(self, now: int) -> bool:
        return now >= self.due

    def failed(self, at: int) -> None:
        self.interval = min(self.cap, 2 * self.interval) if self.interval else self.first
        self.due = at + self.interval

    def succeeded(self) -> None:
        self.interval = self.due = 0
