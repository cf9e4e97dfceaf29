"""Measured utility of speculation by batch size: a last check on the controller's cost model.

The controller (``speculation/controller.py``) decides from a model: a step-cost curve and calibrated
acceptance. A model can be wrong in ways it cannot see from inside: the cost of a verification step
depends on the attention grid, the cache lengths and the Python work per drafted row as much as on the
token count, and an accepted token is worth less when it only finishes one request early while the others
still need every step. At batch 32 on the default model the model-driven controller ran 0.90x of plain
decoding in bench/speculation.py while predicting a gain.

So the controller's choice is also judged by what it achieved, per batch-size bucket, the way the online
trainer's promotions are judged by live utility (``train/swap.py``): committed tokens per second of the
whole step, in steps that drafted against steps that did not, counting only pure decoding steps (a step
that carries a prefill chunk has a different cost), per strategy: a step is credited to the strategy that
drafted most of its nodes, and a strategy asked for drafts that were not used is charged its proposal
time (see ``MeasuredUtility.observe``). Where a strategy measurably loses, it is switched off in that bucket (the
suffix drafter may pay at batch 2 where an untrained learned head costing half a target forward does
not), except for a trial of a few steps after an exponentially growing pause (16, 32, ... 512 of its
decisions), so a strategy that starts paying (a better drafter, more repetitive traffic) is switched back
on. While drafting runs in a bucket, one step in ``probe_every`` (one in ``probe_early`` until
``min_plain`` plain steps were seen) is run without drafts so the baseline stays measured; that costs at
most 1/``probe_every`` of the gain.

Strategies are judged as *arms*, in two tiers. A cheap arm (the model-free suffix drafter: a fraction of
a millisecond per step) is judged against plain decoding as above. An expensive arm runs a drafter model:
the learned and hybrid strategies share one drafter forward per step and so one arm (``arm`` on the
proposer). For it the question is not "does it beat plain decoding?" but "does it beat what the cheap
arms do without it?". A hybrid tree is a superset of the suffix tree, so when both are asked the
controller picks the hybrid one, and a drafter that adds nothing to the suffix tree still wins every
request while its forward slows every step: judged against plain it looked fine (1.05x) while the suffix
drafter alone ran 1.11x (bench/online.py day 1; docs/decisions.md, 'Measured utility'). So:

* a step in which an expensive arm was asked is that arm's, whole (its rate is the rate of the policy
  "ask it": the drafter forward, the suffix proposals a hybrid tree needs, and whatever was chosen);
* a cheap arm is credited only in steps where no expensive arm was asked, so its record is what it does
  alone, not a share of a step another arm's trees carried;
* an expensive arm's baseline is the best of the plain rate and the open cheap arms' rates;
* while an expensive arm drafts, one step in ``cheap_probe_every`` (``cheap_probe_early`` until the cheap
  arms have ``min_plain`` steps) leaves it out so the cheap arms' rate stays measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .backoff import Backoff


def pow2_bucket(n: int) -> int:
    """The power of two at or above ``n``: the buckets step costs and measured rates are kept by."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


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
class Spread:
    """Exponentially weighted mean and standard error of per-step utilities, for the confidence of a
    judgement (the estimate itself is the ratio of summed tokens and seconds: ``RateEMA``)."""

    decay: float = 0.97
    weight: float = 0.0
    weight_sq: float = 0.0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, x: float) -> None:
        d = self.decay
        self.weight, self.weight_sq = d * self.weight + 1.0, d * d * self.weight_sq + 1.0
        self.total, self.total_sq = d * self.total + x, d * self.total_sq + x * x

    @property
    def stderr(self) -> float:
        if self.weight <= 0:
            return math.inf
        mean = self.total / self.weight
        var = max(0.0, self.total_sq / self.weight - mean * mean)
        n_eff = self.weight ** 2 / self.weight_sq  # Kish's effective sample size of the weights
        return math.sqrt(var / max(1.0, n_eff - 1.0))


@dataclass
class StrategyRecord:
    """One arm's measured utility in one batch bucket, and whether it is switched off there.

    ``asked`` sums (exponentially weighted) the tokens and seconds of the steps credited to the arm (see
    ``MeasuredUtility.observe``); its rate over the baseline rate is the utility: below 1 asking the arm
    costs more than it returns. Sums, not an average of per-step ratios: most steps where a suffix drafter
    finds no match cost it a fraction of a millisecond and return nothing (a ratio of 0.99 each), and an
    average of those with the few steps that commit 8 tokens would switch off a drafter that doubles the
    rate."""

    asked: RateEMA = field(default_factory=lambda: RateEMA(decay=0.97))
    spread: Spread = field(default_factory=Spread)  # of the credited steps' utilities
    expensive: bool = False  # runs a drafter model (judged against the cheap arms, see the module docstring)
    closed: bool = False
    in_trial: bool = False   # switched off, but drafting again (``asked`` restarts) to see whether it pays now
    # when the next trial starts, in the arm's decisions in this bucket (``MeasuredUtility._arm`` sets the
    # pauses: pause_min, doubling after every trial that still loses, up to pause_max)
    retry: Backoff = field(default_factory=lambda: Backoff(16, 512))
    decisions: int = 0

    def utility(self, base_rate: float) -> float:
        return self.asked.rate / base_rate if base_rate > 0 else 1.0

    @property
    def drafting(self) -> bool:
        return not self.closed or self.in_trial


@dataclass
class BucketRecord:
    plain: RateEMA = field(default_factory=lambda: RateEMA(decay=0.95))
    steps: int = 0
    strategies: dict[str, StrategyRecord] = field(default_factory=dict)


@dataclass
class MeasuredUtility:
    """Per batch-size bucket and arm: is drafting measurably paying? See the module docstring."""

    min_steps: int = 32        # steps an arm was credited before it can be switched off (wins are
                               # sparse: a suffix drafter may commit 8 tokens in one step of ten) ...
    min_plain: int = 4         # ... and plain steps before a drafting step can be judged
    margin: float = 0.03       # off when the measured utility is below 1 - margin
    clear_loss: float = 0.8    # ... or, after only clear_steps steps, below this: a drafter costing half a
    clear_steps: int = 8       # forward per proposal need not be watched for 32 steps (after every swap)
    trial_steps: int = 16      # steps a switched-off arm's trial is judged on
    pause_min: int = 16
    pause_max: int = 512
    probe_every: int = 32      # a bucket where drafting runs runs one plain step in this many to keep the
    probe_early: int = 4       # baseline fresh, or one in this many while it has fewer than min_plain
    cheap_probe_every: int = 8  # while an expensive arm drafts, one step in this many asks only the cheap
    cheap_probe_early: int = 4  # arms (one in this many until they have min_plain steps)
    arm_decay: float = 0.97    # per credited step, of an arm's summed tokens and seconds
    confidence: float = 2.0    # standard errors above the estimate the utility must still lose at
    buckets: dict[int, BucketRecord] = field(default_factory=dict)

    def record(self, batch: int) -> BucketRecord:
        return self.buckets.setdefault(pow2_bucket(batch), BucketRecord())

    def step_arms(self, batch: int, arms: dict[str, bool]) -> set[str] | None:
        """Which of ``arms`` (name -> expensive) may draft in this decoding step; None: run it plain, to
        measure the baseline. Called once per decoding step."""
        rec = self.record(batch)
        rec.steps += 1
        records = {}
        for name, expensive in arms.items():
            st = records[name] = self._arm(rec, name)
            st.expensive = expensive
        if any(st.drafting for st in records.values()):
            every = self.probe_every if rec.plain.count >= self.min_plain else self.probe_early
            if rec.steps % every == 0:
                return None
        allowed = {name for name, st in records.items() if self._allow(st)}
        cheap = [name for name in allowed if not records[name].expensive]
        if cheap and len(cheap) < len(allowed):
            seen = min(records[name].asked.count for name in cheap)
            every = self.cheap_probe_every if seen >= self.min_plain else self.cheap_probe_early
            if (rec.steps + 1) % every == 0:  # offset by one: never the same step as a plain probe
                return set(cheap)
        return allowed

    def _arm(self, rec: BucketRecord, name: str) -> StrategyRecord:
        if name not in rec.strategies:
            rec.strategies[name] = StrategyRecord(asked=RateEMA(self.arm_decay), spread=Spread(self.arm_decay),
                                                  retry=Backoff(self.pause_min, self.pause_max))
        return rec.strategies[name]

    @staticmethod
    def _allow(st: StrategyRecord) -> bool:
        st.decisions += 1
        if st.closed and not st.in_trial and st.retry.allows(st.decisions):
            st.in_trial = True
            st.asked = RateEMA(st.asked.decay)  # the trial is judged on its own steps
            st.spread = Spread(st.spread.decay)
        return st.drafting

    def observe(self, batch: int, committed: int, seconds: float, chosen: str | None,
                asked: dict[str, float]) -> None:
        """A pure decoding step finished: ``committed`` tokens over ``batch`` rows in ``seconds``;
        ``asked`` maps each arm asked for drafts to the seconds its proposals took, ``chosen`` is the arm
        whose trees carried most of the step's draft nodes (None: no drafts).

        A step with an expensive arm asked is credited, whole, to that arm. Otherwise, per cheap arm (its
        tokens and seconds): the chosen one gets the step with the other proposals' time taken out; one
        asked whose drafts were not used gets what a plain step would have done plus its proposal time:
        ``batch`` tokens in ``batch / plain rate + its seconds``."""
        if seconds <= 0:
            return
        if chosen is not None and chosen not in asked:
            return  # drafts credited to a name that was not asked: nothing to judge
        rec = self.record(batch)
        total = sum(asked.values())
        if chosen is None:
            rec.plain.add(committed, max(1e-9, seconds - total))
        if rec.plain.count < self.min_plain:
            return
        plain_rate = rec.plain.rate
        records = {name: self._arm(rec, name) for name in asked}
        expensive = [name for name, st in records.items() if st.expensive]
        if expensive:
            base = self.cheap_rate(rec)
            for name in expensive:
                self._credit(records[name], committed, seconds, base)
            return
        for name, t in asked.items():
            if name == chosen:
                self._credit(records[name], committed, max(1e-9, seconds - (total - t)), plain_rate)
            else:
                self._credit(records[name], batch, batch / plain_rate + t, plain_rate)

    def _credit(self, st: StrategyRecord, tokens: float, seconds: float, base_rate: float) -> None:
        st.asked.add(tokens, seconds)
        if base_rate > 0:
            st.spread.add(tokens / (seconds * base_rate))
        self._judge(st, base_rate)

    def cheap_rate(self, rec: BucketRecord) -> float:
        """What the bucket does without its expensive arms: the best of plain decoding and the open cheap
        arms with a record."""
        rate = rec.plain.rate
        for st in rec.strategies.values():
            if not st.expensive and not st.closed and st.asked.count >= self.min_plain:
                rate = max(rate, st.asked.rate)
        return rate

    def _judge(self, st: StrategyRecord, base_rate: float) -> None:
        # Judged on an upper confidence bound of the utility, not the estimate: at batch 2 a suffix drafter's
        # steps range from 0.8x (drafts rejected) to 4x (a long copy), and 32 steps of chat that happen to
        # match badly put the estimate below 1 while the drafter pays overall. Switched off on such
        # stretches it was skipped in 110-330 of ~1000 steps of 24 chat requests, and each failed trial
        # doubled its pause. A batch of 32 rows averages its rows' luck within every step, so its spread is
        # small and a real 10% loss is still caught after min_steps.
        upper = st.utility(base_rate) + self.confidence * st.spread.stderr
        losing = upper < 1 - self.margin
        if st.closed:
            if st.in_trial:
                if st.asked.count >= self.trial_steps:  # the trial is over: reopen, or pause twice as long
                    st.in_trial = False
                    if losing:
                        st.retry.failed(st.decisions + 1)
                    else:
                        st.closed = False
                        st.retry.succeeded()
        elif losing and (st.asked.count >= self.min_steps or (
                st.asked.count >= self.clear_steps and upper < self.clear_loss)):
            st.closed = True
            st.retry.failed(st.decisions + 1)

    def forget(self, arm: str) -> None:
        """An arm's drafter changed (a new learned version): it is judged afresh in every bucket."""
        for rec in self.buckets.values():
            rec.strategies.pop(arm, None)

    def summary(self) -> dict[int, dict]:
        out = {}
        for b, r in sorted(self.buckets.items()):
            cheap = self.cheap_rate(r)
            out[b] = {"plain_rate": round(r.plain.rate, 2), "plain_steps": r.plain.count,
                      "strategies": {n: {"off": s.closed and not s.in_trial, "expensive": s.expensive,
                                         "utility": round(s.utility(cheap if s.expensive else r.plain.rate), 3),
                                         "stderr": round(s.spread.stderr, 3) if s.spread.weight else None,
                                         "samples": s.asked.count}
                                     for n, s in r.strategies.items()}}
        return out
