"""Measured interference: co-training runs in a duty cycle sized so that it does not slow the rollout.

Why: on a CPU "a core is free" does not make the rollout's tail idle time. The co-trainer thread shares the
engine's process and memory bus, and in the tail of a chain_sum rollout (one row left, float32, one engine
thread on a 2-core CPU) training on the other core at full duty lengthened the tail by 10-13%, while the
same run with the trainer attached but never training matched the run without it (docs/decisions.md,
'Co-training only in idle time'). TLT's idle GPU has no such cost; a CPU has to measure it.

How: after each unit of work (an optimiser step, or ingesting a chunk, which computes the policy's soft
labels for it) the trainer pauses, so that it runs ``duty`` of the time. Engine steps in
the idle tail are sorted by whether training overlapped them ("loaded") or not ("clean"), per number of
active rows (a step's cost depends on its rows). Once both kinds have ``samples`` steps at the same row
count, their medians are compared: a loaded median more than ``tolerance`` above the clean one means
training slows the rollout, and the duty halves; otherwise it grows by ``grow`` (multiplicative decrease,
gentler increase, as the trainer's serving share in train/share.py). The duty stays in
``[min_duty, max_duty]``: the floor keeps measuring at a bounded cost (at most ``min_duty`` times the
slowdown), the ceiling keeps clean steps coming to compare with.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InterferenceConfig:
    tolerance: float = 0.05     # a loaded median this much above the clean one counts as a slowdown
    samples: int = 6            # steps of each kind, at one row count, per comparison
    start_duty: float = 0.5
    min_duty: float = 0.1
    max_duty: float = 0.8
    grow: float = 1.25

    def __post_init__(self) -> None:
        if not 0 < self.min_duty <= self.start_duty <= self.max_duty <= 1:
            raise ValueError("duty: needs 0 < min_duty <= start_duty <= max_duty <= 1")
        if self.tolerance < 0 or self.samples < 1 or self.grow < 1:
            raise ValueError("tolerance >= 0, samples >= 1 and grow >= 1 are required")


@dataclass(frozen=True)
class Verdict:
    """One comparison: loaded against clean step seconds at ``active`` rows."""

    active: int
    ratio: float                # loaded median / clean median
    duty: float                 # the duty it set


@dataclass
class InterferenceGuard:
    """See the module docstring. ``record`` runs on the engine thread, ``pause_after`` on the trainer's."""

    cfg: InterferenceConfig = field(default_factory=InterferenceConfig)
    duty: float = field(init=False)
    verdicts: list[Verdict] = field(init=False, default_factory=list)
    _clean: dict[int, list[float]] = field(init=False, repr=False, default_factory=dict)   # step seconds by rows
    _loaded: dict[int, list[float]] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.duty = self.cfg.start_duty

    def record(self, active: int, seconds: float, loaded: bool) -> Verdict | None:
        """One engine step of the idle tail: its rows, its seconds, whether training overlapped it."""
        (self._loaded if loaded else self._clean).setdefault(active, []).append(seconds)
        clean, busy = self._clean.get(active, []), self._loaded.get(active, [])
        n = self.cfg.samples
        if len(clean) < n or len(busy) < n:
            return None
        ratio = statistics.median(busy[-n:]) / max(statistics.median(clean[-n:]), 1e-12)
        c = self.cfg
        self.duty = max(c.min_duty, self.duty / 2) if ratio > 1 + c.tolerance else min(c.max_duty, self.duty * c.grow)
        clean.clear()
        busy.clear()
        verdict = Verdict(active, ratio, self.duty)
        self.verdicts.append(verdict)
        return verdict

    def pause_after(self, unit_seconds: float) -> float:
        """Seconds to stay paused after a unit of work that took ``unit_seconds``, so that the trainer runs
        ``duty`` of the time."""
        return unit_seconds * (1 - self.duty) / self.duty

    @property
    def last_ratio(self) -> float | None:
        return self.verdicts[-1].ratio if self.verdicts else None


__all__ = ["InterferenceConfig", "InterferenceGuard", "Verdict"]
