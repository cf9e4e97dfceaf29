"""Measured utility of speculation by batch size: a last check on the controller's cost model.

The controller (``spec/controller.py``) decides from a model: a step-cost curve and calibrated
acceptance. A model can be wrong in ways it cannot see from inside: the cost of a verification step
depends on the attention grid, the cache lengths and the Python work per drafted row as much as on the
token count, and an accepted token is worth less when it only finishes one request early while the others
still need every step. At batch 32 on the default model the model-driven controller ran 0.90x of plain
decoding in bench/speculation.py while predicting a gain.

So the controller's choice is also judged by what it achieved, per batch-size bucket, the way the online
trainer's promotions are judged by live utility (``train/swap.py``): committed tokens per second of the
whole step, in steps that drafted against steps that did not, counting only pure decoding steps (a step
that carries a prefill chunk has a different cost). Where drafting measurably loses, the bucket is closed:
no drafting there, except a trial of a few steps after an exponentially growing pause (16, 32, ... 512
steps), so a bucket that starts paying (a better drafter, more repetitive traffic) is reopened. While a
bucket is open and drafting nearly every step, one step in ``probe_every`` (one in ``probe_early`` until
``min_plain`` plain steps were seen) is run without drafts so the baseline stays measured; that costs at
most 1/``probe_every`` of the gain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class RateEMA:
    """Exponentially weighted committed tokens and seconds: their ratio is a rate that weights recent
    steps most, and summing before dividing keeps one slow outlier step from dominating."""

    decay: float = 0.9
    tokens: float = 0.0
    seconds: float = 0.0
    count: int = 0

    def add(self, tokens: float, seconds: float) -> None:
        self.tokens = self.decay * self.tokens + tokens
        self.seconds = self.decay * self.seconds + seconds
        self.count += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class BucketRecord:
    plain: RateEMA = field(default_factory=RateEMA)
    drafted: RateEMA = field(default_factory=RateEMA)
    closed: bool = False
    in_trial: bool = False   # closed, but drafting again to see whether it pays now
    trial_drafted: int = 0   # drafting steps observed in the current trial
    pause: int = 0           # steps of this bucket denied drafting before the next trial
    reopen_at: int = 0       # the bucket's step count at which the next trial starts
    steps: int = 0           # decoding steps taken in this bucket


@dataclass
class MeasuredUtility:
    """Per batch-size bucket: is drafting measurably paying? See the module docstring."""

    min_steps: int = 8         # drafting steps measured before a bucket can be closed ...
    min_plain: int = 4         # ... and plain steps
    margin: float = 0.02       # close when drafting's rate is below (1 - margin) x the plain rate
    trial_steps: int = 8       # drafting steps a closed bucket's trial is judged on
    pause_min: int = 16
    pause_max: int = 512
    probe_every: int = 32      # an open bucket runs one plain step in this many to keep the baseline fresh,
    probe_early: int = 4       # ... or in this many while it has fewer than min_plain plain steps
    buckets: dict[int, BucketRecord] = field(default_factory=dict)

    @staticmethod
    def bucket(batch: int) -> int:
        return 1 << max(0, math.ceil(math.log2(max(1, batch))))

    def record(self, batch: int) -> BucketRecord:
        return self.buckets.setdefault(self.bucket(batch), BucketRecord())

    def allow(self, batch: int) -> bool:
        """May this step draft at all? Called once per decoding step, before the drafters are asked."""
        rec = self.record(batch)
        rec.steps += 1
        if rec.closed:
            if not rec.in_trial and rec.steps >= rec.reopen_at:
                rec.in_trial, rec.trial_drafted = True, 0
                rec.drafted = RateEMA(rec.drafted.decay)  # the trial is judged on its own steps
            return rec.in_trial
        # open: keep the plain baseline measured while drafting runs nearly every step
        every = self.probe_every if rec.plain.count >= self.min_plain else self.probe_early
        return rec.steps % every != 0

    def observe(self, batch: int, committed: int, seconds: float, drafted: bool) -> None:
        """A pure decoding step finished: ``committed`` tokens over ``batch`` rows in ``seconds``."""
        if seconds <= 0:
            return
        rec = self.record(batch)
        (rec.drafted if drafted else rec.plain).add(committed, seconds)
        if rec.closed:
            if rec.in_trial and drafted:
                rec.trial_drafted += 1
                if rec.trial_drafted >= self.trial_steps:  # the trial is over: reopen, or pause twice as long
                    rec.in_trial = False
                    if self._losing(rec):
                        rec.pause = min(self.pause_max, 2 * rec.pause)
                        rec.reopen_at = rec.steps + rec.pause + 1
                    else:
                        rec.closed, rec.pause = False, 0
        elif rec.plain.count >= self.min_plain and rec.drafted.count >= self.min_steps and self._losing(rec):
            rec.closed, rec.pause = True, self.pause_min
            rec.reopen_at = rec.steps + rec.pause + 1

    def _losing(self, rec: BucketRecord) -> bool:
        return rec.drafted.rate < (1 - self.margin) * rec.plain.rate

    def forget(self) -> None:
        """The drafters changed (a new learned version): every bucket is judged afresh."""
        self.buckets.clear()

    def summary(self) -> dict[int, dict]:
        return {b: {"closed": r.closed, "plain_rate": round(r.plain.rate, 2), "drafted_rate": round(r.drafted.rate, 2),
                    "plain_steps": r.plain.count, "drafted_steps": r.drafted.count}
                for b, r in sorted(self.buckets.items())}
