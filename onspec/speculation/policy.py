"""Whether a decoding step drafts, and which drafters it asks: the draft policy's gates, in order, in one place.

Step gates (the first that closes ends the step's drafting: it runs as plain decoding):

1. ``no_strategy``: the mode names no attached proposer, or ``max_draft_tokens`` is 0;
2. ``batch_size``: ``off_batch_size`` decoding rows or more;
3. ``unpaid``: the back-off after steps at this batch size (power-of-two class) whose drafts the plan kept
   none of: asking again costs the proposals and the plan's work for the same answer, so the next 1, 2,
   4 ... ``unpaid_backoff_max`` steps are not asked (docs/decisions.md, 'Unpaid back-off');
4. ``probe`` (auto): the measured utility (speculation/utility.py) runs this step plain to keep its baseline
   measured.

Strategy gates (per strategy, in order; a strategy a gate closes is not asked this step):

5. ``estimate`` (auto): a drafter model whose held-out acceptance length cannot pay for its own proposals
   beside what the free drafters already commit (``estimate_allows``);
6. ``record``: its record does not pay at this batch (``Controller.worth_drafting``; a cheap drafter
   always passes) and its retry is not due: back-off from ``record_backoff_first`` to ``record_backoff_max``;
7. ``utility`` (auto): the measured utility switched its arm off at this batch size.

Then the plan (``Controller.plan``, the marginal-benefit budget) decides the nodes; a step ends as
``strategies`` (every strategy closed), ``no_drafts`` (the drafters asked proposed nothing), ``plan`` (no
node pays: this feeds gate 3) or ``drafted``.

Every decoding step is counted under the reason it ended with (``counts.steps``) and every strategy left out
under the gate that closed it (``counts.strategies``); the server exports both (Prometheus and
``/v1/speculator``). All back-offs are one ``Backoff`` (speculation/backoff.py); their constants are in ``SpecConfig``.

Two rules inside the drafters shape a tree rather than gate a step, and stay there: the hybrid proposer's
``hybrid_suffix_confident`` (rows whose suffix tree is already confident skip the drafter model,
speculation/eagle.py) and the learned proposer's ``_depth_pays`` (a tree stops growing where one more depth
costs more than it can add, priced here by ``price``).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..config import SpecConfig
from ..engine.step import DraftInput
from .backoff import Backoff
from .proposer import Proposer
from .utility import MeasuredUtility

if TYPE_CHECKING:
    from .controller import Controller

# step gates, in order
NO_STRATEGY, BATCH_SIZE, UNPAID, PROBE = "no_strategy", "batch_size", "unpaid", "probe"
# strategy gates, in order
ESTIMATE, RECORD, UTILITY = "estimate", "record", "utility"
# how a step that passed the step gates ended
STRATEGIES, NO_DRAFTS, PLAN, DRAFTED = "strategies", "no_drafts", "plan", "drafted"
COST_WINDOW = 9  # proposal times a strategy's cost is the lower median of
STEP_REASONS = (NO_STRATEGY, BATCH_SIZE, UNPAID, PROBE, STRATEGIES, NO_DRAFTS, PLAN, DRAFTED)
STRATEGY_GATES = (ESTIMATE, RECORD, UTILITY)


@dataclass
class DraftCounts:
    """Decoding steps by the reason they ended with, and strategies left out by the gate that closed them."""

    steps: dict[str, int] = field(default_factory=dict)
    strategies: dict[str, dict[str, int]] = field(default_factory=dict)

    def step(self, reason: str) -> None:
        self.steps[reason] = self.steps.get(reason, 0) + 1

    def closed(self, strategy: str, gate: str) -> None:
        per = self.strategies.setdefault(strategy, {})
        per[gate] = per.get(gate, 0) + 1

    def skipped(self, strategy: str) -> int:
        """Steps ``strategy`` was not asked in, whichever strategy gate closed it."""
        return sum(self.strategies.get(strategy, {}).values())

    def summary(self) -> dict:
        """Both counts as plain dicts, reasons and gates in the policy's order (the dashboard lists them so)."""
        return {"steps": _in_order(self.steps, STEP_REASONS),
                "strategies": {k: _in_order(v, STRATEGY_GATES) for k, v in self.strategies.items()}}


def _in_order(counts: dict[str, int], order: tuple[str, ...]) -> dict[str, int]:
    """``counts`` with the keys of ``order`` first, in that order, then any others."""
    return {**{k: counts[k] for k in order if k in counts}, **counts}


class DraftPolicy:
    """The gates of the module docstring, their back-offs and counters, and what they are priced by: each
    strategy's proposal time (``draft_cost``) and the rows it was asked for (``rows_asked``)."""

    def __init__(self, cfg: SpecConfig, controller: Controller, utility: MeasuredUtility,
                 proposers: dict[str, Proposer]) -> None:
        self.cfg = cfg
        self.controller = controller
        self.utility = utility
        self.proposers = proposers          # the Speculation's, shared: strategies come and go there
        self.counts = DraftCounts()
        self.steps = 0                      # decoding steps past gates 1-2 (the back-offs count in these)
        self.draft_cost: dict[str, float] = {}   # seconds per propose() call, by strategy (``asked``)
        self._recent: dict[str, deque[float]] = {}  # the last COST_WINDOW proposal times, by strategy
        self.rows_asked: dict[str, int] = {}     # decoding rows each strategy was asked to draft for
        self._unpaid: dict[int, Backoff] = {}    # by the batch size's bit length
        self._record: dict[str, Backoff] = {}    # by strategy
        self._allowed: set[str] = set()          # arms the measured utility lets draft this step (auto)

    @property
    def auto(self) -> bool:
        return self.cfg.mode == "auto"

    def arm(self, name: str) -> str:
        """The measured-utility record a strategy is judged in: its proposer's ``arm`` (the hybrid strategy
        shares the learned drafter's forward and so its record), else its name."""
        p = self.proposers.get(name)
        return p.arm if p is not None and p.arm else name

    # ---- step gates ------------------------------------------------------------------------------
    def step_gate(self, inp: DraftInput, names: list[str]) -> str | None:
        """Gates 1-4: the gate that keeps this step from asking drafters (counted), or None."""
        gate = self._step_gate(inp, names)
        if gate is not None:
            self.counts.step(gate)
        return gate

    def open_step(self, inp: DraftInput, names: list[str]) -> bool:
        return self.step_gate(inp, names) is None

    @staticmethod
    def in_play(gate: str | None) -> bool:
        """The step passed gates 1-2: the policy's step count and back-offs count it, and the measured
        utility reads it (a step gate 3 or 4 keeps plain is a plain-rate sample)."""
        return gate not in (NO_STRATEGY, BATCH_SIZE)

    def _step_gate(self, inp: DraftInput, names: list[str]) -> str | None:
        if not names or self.cfg.max_draft_tokens == 0:
            return NO_STRATEGY
        if len(inp.decode) >= self.cfg.off_batch_size:
            return BATCH_SIZE
        self.steps += 1
        if not self._unpaid_backoff(inp).allows(self.steps):
            return UNPAID
        if self.auto:
            arms: dict[str, bool] = {}
            for name in names:
                arm = self.arm(name)
                arms[arm] = arms.get(arm, False) or self.proposers[name].wants_aux
            allowed = self.utility.step_arms(len(inp.decode), arms)
            if allowed is None:
                return PROBE
            self._allowed = allowed
        return None

    def _unpaid_backoff(self, inp: DraftInput) -> Backoff:
        return self._unpaid.setdefault(len(inp.decode).bit_length(), Backoff(1, self.cfg.unpaid_backoff_max))

    # ---- strategy gates ------------------------------------------------------------------------------
    def ask(self, name: str, inp: DraftInput) -> bool:
        """Gates 5-7 for one strategy (after the strategies before it were asked); counts a closed gate."""
        gate = self._strategy_gate(name, inp)
        if gate is not None:
            self.counts.closed(name, gate)
        return gate is None

    def _strategy_gate(self, name: str, inp: DraftInput) -> str | None:
        num_decode, step_tokens = len(inp.decode), inp.step_tokens
        if self.auto and not self.estimate_allows(name, num_decode, step_tokens):
            return ESTIMATE
        worth = self.controller.worth_drafting(name, num_decode, step_tokens, self.draft_cost.get(name, 0.0))
        if not self._retry_allows(name, worth):
            return RECORD
        if self.auto and self.arm(name) not in self._allowed:
            return UTILITY
        return None

    def _retry_allows(self, name: str, worth: bool) -> bool:
        """Always when the record pays; otherwise only on a retry step, each further retry that still loses
        waiting twice as long (an untrained learned head costs most of a target forward per proposal)."""
        if worth:
            self._record.pop(name, None)
            return True
        b = self._record.get(name)
        if b is None:
            b = self._record[name] = Backoff(self.cfg.record_backoff_first, self.cfg.record_backoff_max)
            b.failed(self.steps)
            return False
        if not b.allows(self.steps):
            return False
        b.failed(self.steps)
        return True

    def estimate_allows(self, name: str, num_decode: int, step_tokens: int) -> bool:
        """Gate 5: hold a drafter model back while its held-out estimate cannot pay for its own proposals.

        A step of B rows with drafts commits B * L tokens in T + d seconds (L: acceptance length, d: the
        proposal time), against B tokens in T without; even if verifying the nodes were free, drafting pays
        only when L > 1 + d / T. Where a free drafter (the suffix trees: no model forward) already commits
        L_s = 1 + g tokens per row, the drafter model competes with that, not with plain decoding. At best
        its accepted drafts add to the free drafter's (a hybrid tree holding both, L <= L_s + L - 1), so it
        pays only when (L_s + L - 1) / (T + d) > L_s / T, i.e. L > 1 + (d / T) * L_s; with no free drafter
        (g = 0) that is the first rule. g is the free drafters' accepted drafts per decoding row they were
        asked for (where a learned tree was chosen over theirs they are not credited, so g errs low and the
        rule towards asking).
        A drafter whose measured held-out acceptance length (``Proposer.estimate``: the gate's figure for
        its version, or a resumed version's manifest figure) fails that is not asked at all: exploring it
        live costs d every time and cannot win (docs/decisions.md, 'Drafter acceptance gate').
        Unknown estimate or proposal time (never asked): allowed."""
        expected = self.proposers[name].estimate()
        d = self.draft_cost.get(name)
        if expected is None or d is None:
            return True
        return expected > 1.0 + d / self.controller.base_cost(step_tokens, num_decode) * (1.0 + self.free_gain())

    def free_gain(self) -> float:
        """Accepted drafts per decoding row of the best free (model-free) drafter asked so far; 0 if none."""
        gains = [self.controller.stats[n].accepted / self.rows_asked[n] for n, p in self.proposers.items()
                 if not p.wants_aux and self.rows_asked.get(n) and n in self.controller.stats]
        return max(gains, default=0.0)

    def price(self, name: str, inp: DraftInput) -> None:
        """Tell a drafter model what a token is worth this step, so it stops growing a tree where one more
        sequential forward would cost more than it can add (``EagleProposer._depth_pays``): the step's
        committed tokens per second without it, B (1 + g) / T (g: the free drafters' accepted drafts per
        row), and its strategy's calibration of probabilities to measured acceptance."""
        proposer = self.proposers[name]
        if not proposer.wants_aux:
            return
        num_decode = len(inp.decode)
        base = self.controller.base_cost(inp.step_tokens, num_decode)
        proposer.price_depth(num_decode * (1.0 + self.free_gain()) / base if base > 0 else 0.0,
                             self.controller.calibration(name))

    def asked(self, name: str, rows: int, seconds: float) -> None:
        """``name`` proposed for ``rows`` decoding rows in ``seconds``. Its proposal time is the lower median
        of its last ``COST_WINDOW`` calls: one slow call (a garbage-collection pause, a lazy build) must not
        make a cheap drafter look expensive, or gate 6 shuts it out and, asked only on retries, its figure
        would take hundreds of steps to come back down (docs/decisions.md, 'Cheap drafters')."""
        self.rows_asked[name] = self.rows_asked.get(name, 0) + rows
        recent = self._recent.setdefault(name, deque(maxlen=COST_WINDOW))
        recent.append(seconds)
        self.draft_cost[name] = statistics.median_low(recent)

    # ---- the plan's verdict ----------------------------------------------------------------------
    def planned(self, inp: DraftInput, asked: bool, proposed: bool, budget: int) -> None:
        """The step's drafting ended: ``asked`` some strategy, which ``proposed`` nodes, of which the plan
        kept ``budget``. Nodes that did not pay start (or lengthen) gate 3's back-off; kept ones end it."""
        backoff = self._unpaid_backoff(inp)
        if budget:
            backoff.succeeded()
        elif proposed:
            backoff.failed(self.steps + 1)
        self.counts.step(DRAFTED if budget else PLAN if proposed else NO_DRAFTS if asked else STRATEGIES)

    def forget(self, strategy: str) -> None:
        """A new drafter behind ``strategy``: its record's back-off ends (it is explored afresh)."""
        self._record.pop(strategy, None)
