"""Choose, each step, the speculation strategy and the draft budget from measured cost and acceptance.

Two measured quantities drive every decision (the "TLT" and "Seer" designs, arXiv 2511.16665 and
2511.14617, with the cost model measured rather than assumed):

* ``StepCostModel``: seconds per target forward as a function of the tokens it verifies, profiled at
  start-up and updated online (an exponential moving average per power-of-two bucket, interpolated).
* per-strategy calibration: proposers score each draft node with an estimated acceptance probability;
  the controller tracks, per strategy, how many tokens were actually accepted against how many the
  scores predicted, and scales the scores by that ratio.

Budget (Seer's marginal-benefit rule): every candidate node from every decoding request is ranked by
its calibrated probability of being accepted (the product along its path, so a parent always ranks
above its children). Adding the top ``k`` nodes to a step of ``B`` decoding rows is expected to commit
``B + sum(top-k)`` tokens in ``cost(base + k)`` seconds; the controller picks the ``k`` that maximises
tokens per second, which hands nodes to the requests that accept the most and yields ``k = 0``
(speculation off) where verification costs more than it returns, e.g. at large batches.

Strategy: each request's tree comes from the strategy with the best calibrated expected gain per
drafted node; ``off`` is always a candidate. Forced modes (``suffix``, ``learned``, ``hybrid``) skip the
choice but keep the budget rule unless ``mode`` asks for a fixed budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import SpecConfig
from .tree import DraftTree
from .utility import MeasuredUtility, pow2_bucket


class Proposer(Protocol):
    """What a drafter implements. Proposers never mutate engine state: they return trees and observe."""

    name: str
    wants_aux: bool  # needs the target's auxiliary hidden states (learned drafters)

    def add_request(self, seq) -> None: ...

    def on_commit(self, seq, tokens: list[int]) -> None: ...

    def finish(self, seq) -> None: ...

    def observe_prefill(self, seq, n: int, aux: torch.Tensor | None) -> None: ...

    def observe(self, verdicts: list) -> None: ...

    def propose(self, seqs: list, budgets: dict[int, int]) -> dict[int, DraftTree]: ...


class StepCostModel:
    """Seconds per forward by number of tokens in the forward (power-of-two buckets, EMA, interpolated),
    kept as two curves by the attention path a step takes:

    * ``plain``: every row is one token (plain decoding): the mask-free decode path;
    * ``masked``: some row has several tokens (a draft tree or a prefill chunk): tree masks over a padded
      [rows, longest row] grid.

    Why two: the first draft node of a batch switches the whole step to the masked path. At batch 16 on the
    default model (1 thread, 120 cached tokens) one node on one row made a step 26% slower (47.6 -> 59.8 ms)
    and one node per row 34% slower, a jump that one curve interpolated between power-of-two buckets cannot
    show: the controller then kept drafting at batch sizes where it lost (RL rollouts ran 0.76x of off).
    A curve with no measurement yet borrows the other one.
    """

    KINDS = ("plain", "masked")

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.tables: dict[str, dict[int, float]] = {k: {} for k in self.KINDS}
        # The mean token count behind each bucket's seconds (same EMA), used as its x in ``cost``. Why: a
        # bucket holds every size up to its power of two (bucket 8: 5-8 tokens), so reading its seconds as
        # the cost of 8 tokens made every size inside it look cheaper than it is, and the budget rule
        # overdrafted. Seen on an AVX2-only CPU, where a forward's cost grows steeply with its tokens:
        # forced suffix drafting ran 0.88x of off (bench/results/online_day1_s12.json).
        self.sizes: dict[str, dict[int, float]] = {k: {} for k in self.KINDS}

    @property
    def table(self) -> dict[int, float]:
        """Every measured bucket (the masked curve where both have one): for display and for "any data yet"."""
        return {**self.tables["plain"], **self.tables["masked"]}

    bucket = staticmethod(pow2_bucket)

    def observe(self, tokens: int, seconds: float, kind: str = "masked") -> None:
        table, sizes = self.tables[kind], self.sizes[kind]
        b = self.bucket(tokens)
        old = table.get(b)
        table[b] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        sizes[b] = float(tokens) if old is None else self.decay * sizes[b] + (1 - self.decay) * tokens

    def cost(self, tokens: int, kind: str = "masked") -> float:
        if not self.tables[kind]:
            kind = "plain" if kind == "masked" else "masked"
        table, sizes = self.tables[kind], self.sizes[kind]
        if not table:
            return 1.0
        # (mean size, seconds) per bucket; buckets partition the sizes, so the means strictly increase
        points = [(sizes[b], table[b]) for b in sorted(table)]
        if tokens <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= tokens <= x1:
                w = (tokens - x0) / (x1 - x0)
                return (1 - w) * y0 + w * y1
        x, y = points[-1]  # beyond the largest measured size: linear extrapolation from the origin
        return y * tokens / x


@dataclass
class StrategyStats:
    predicted: float = 1e-6
    accepted: float = 0.0
    drafted: int = 0
    steps: int = 0

    def calibration(self, prior: float = 0.5, prior_weight: float = 8.0) -> float:
        # Shrink towards a prior until enough nodes were verified (a few lucky steps prove little).
        return (self.accepted + prior * prior_weight) / (self.predicted + prior_weight)


@dataclass
class Plan:
    trees: dict[int, DraftTree]
    budget: int
    expected_tokens: float
    expected_seconds: float


@dataclass
class Controller:
    cfg: SpecConfig
    cost: StepCostModel = field(default_factory=StepCostModel)
    stats: dict[str, StrategyStats] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)  # how often each strategy won a request
    explore_steps: int = 20      # verified steps before a strategy's record can switch it off
    explore_every: int = 16      # a switched-off strategy is tried again after this many steps ...
    explore_max: int = 512       # ... and the interval doubles after every retry that still loses, up to this
    cheap_share: float = 0.05    # a drafter whose proposals cost under this share of a plain step is always asked
    # The token count a masked forward of n tokens really runs at (the runner pads multi-token forwards to
    # bucket sizes on a CPU, see engine/runner.py): its cost is that of the padded size, so nodes that fit
    # in the padding are free and the node that opens a new bucket pays for all of it. None: no padding.
    pad: Callable[[int], int] | None = None
    _interval: dict[str, int] = field(default_factory=dict)
    _next_try: dict[str, int] = field(default_factory=dict)

    def calibrated(self, tree: DraftTree) -> list[float]:
        """Path probabilities scaled by the strategy's measured accepted/predicted ratio (capped at 1)."""
        c = min(2.0, self.stats.setdefault(tree.source, StrategyStats()).calibration())
        return [1.0] + [min(1.0, s * c) for s in tree.path_scores()[1:]]

    def choose(self, candidates: dict[int, list[DraftTree]]) -> dict[int, DraftTree]:
        """Per request: the candidate tree with the most calibrated expected accepted tokens."""
        out = {}
        for sid, trees in candidates.items():
            best, best_gain = None, 0.0
            for t in trees:
                if t.num_draft == 0:
                    continue
                gain = sum(self.calibrated(t)[1:])  # expected accepted tokens; plan() trims weak nodes
                if gain > best_gain:
                    best, best_gain = t, gain
            if best is not None:
                out[sid] = best
                self.decisions[best.source] = self.decisions.get(best.source, 0) + 1
            else:
                self.decisions["off"] = self.decisions.get("off", 0) + 1
        return out

    def plan(self, trees: dict[int, DraftTree], base_tokens: int, num_decode: int) -> Plan:
        """Spend the batch budget by marginal benefit; 0 nodes (off) when drafting does not pay."""
        if num_decode >= self.cfg.off_batch_size:
            trees = {}
        nodes: list[tuple[float, int, int]] = []
        for sid, tree in trees.items():
            cal = self.calibrated(tree)
            nodes.extend((cal[i], sid, i) for i in range(1, len(tree)))
        nodes.sort(key=lambda x: -x[0])
        nodes = nodes[: self.cfg.max_batch_draft_tokens]
        best_k, best_rate = 0, num_decode / self.base_cost(base_tokens, num_decode)
        gain = float(num_decode)
        for k, (p, _, _) in enumerate(nodes, start=1):
            gain += p
            rate = gain / self.cost.cost(self.padded(base_tokens + k), "masked")
            if rate > best_rate * 1.0001:
                best_k, best_rate = k, rate
        keep: dict[int, int] = {}
        for _, sid, _ in nodes[:best_k]:
            keep[sid] = keep.get(sid, 1) + 1
        pruned = {sid: trees[sid].prune(n) for sid, n in keep.items()}
        exp_tokens = num_decode + sum(p for p, _, _ in nodes[:best_k])
        kind = "masked" if best_k else self.base_kind(base_tokens, num_decode)
        tokens = self.padded(base_tokens + best_k) if kind == "masked" else base_tokens
        return Plan(pruned, best_k, exp_tokens, self.cost.cost(tokens, kind))

    def padded(self, tokens: int) -> int:
        return self.pad(tokens) if self.pad is not None else tokens

    @staticmethod
    def base_kind(base_tokens: int, num_decode: int) -> str:
        """The attention path of a step without drafts: masked when prefill chunks ride along."""
        return "plain" if base_tokens <= num_decode else "masked"

    def base_cost(self, base_tokens: int, num_decode: int) -> float:
        """Seconds of this step without drafts."""
        return self.cost.cost(base_tokens, self.base_kind(base_tokens, num_decode))

    def worth_drafting(self, strategy: str, num_decode: int, base_tokens: int, draft_seconds: float) -> bool:
        """Is asking this strategy for drafts worth its proposal time at this batch?

        A cheap drafter (proposals under ``cheap_share`` of a plain step, e.g. the suffix drafter's ~0.2 ms
        against ~25 ms) is always asked: asking costs nothing that matters, and ``plan`` then keeps only
        the nodes that pay, from this step's trees and costs (0 nodes: the step runs plain). Pricing it by
        its record here, as below, skipped it where plan() would have drafted: the record averages every
        verified node, so it reads as losing whenever cheap padding nodes dilute it, and each skip doubled
        its back-off (``should_try``); in day-0 serving with the learned drafter attached, the suffix drafter
        was skipped in 771 of 1755 steps of one 40-request run and 162 of another (a one-off profile around
        bench/online.py's day-0 loop, session 7; 22 without the learned drafter).

        An expensive drafter is priced by its record: rate with speculation = B * (1 + accepted per step) /
        (T(base + B * nodes per step) + drafting); rate without = B / T(base). Until it has a record
        (``explore_steps``) it is tried.
        """
        plain = self.base_cost(base_tokens, num_decode)
        if draft_seconds <= self.cheap_share * plain:
            return True
        st = self.stats.get(strategy)
        if st is None or st.steps < self.explore_steps:
            return True
        acc, nodes = st.accepted / st.steps, st.drafted / st.steps
        spec_cost = self.cost.cost(self.padded(base_tokens + max(1, int(num_decode * nodes))), "masked")
        with_spec = num_decode * (1 + acc) / (spec_cost + draft_seconds)
        return with_spec > num_decode / plain

    def should_try(self, strategy: str, step: int, worth: bool) -> bool:
        """Ask a strategy for drafts this step? Always when its record pays; otherwise only on a retry
        step, with exponential back-off: a drafter that keeps losing (an untrained learned head costs
        ~0.7 of a target forward per proposal on a small model) is asked ever more rarely."""
        if worth:
            self._interval.pop(strategy, None)
            self._next_try.pop(strategy, None)
            return True
        interval = self._interval.get(strategy, self.explore_every)
        due = self._next_try.setdefault(strategy, step + interval)
        if step < due:
            return False
        self._interval[strategy] = min(self.explore_max, 2 * interval)
        self._next_try[strategy] = step + self._interval[strategy]
        return True

    def forget(self, strategy: str) -> None:
        """Drop a strategy's record (its drafter changed): it is explored afresh."""
        self.stats.pop(strategy, None)
        self._interval.pop(strategy, None)
        self._next_try.pop(strategy, None)

    def observe(self, tree: DraftTree, accepted: int) -> None:
        if tree.num_draft == 0:
            return
        st = self.stats.setdefault(tree.source, StrategyStats())
        st.predicted += sum(tree.path_scores()[1:])
        st.accepted += accepted
        st.drafted += tree.num_draft
        st.steps += 1


class Speculation:
    """Glue between the engine and the proposers: lifecycle hooks, drafting, verdict feedback."""

    def __init__(self, engine, cfg: SpecConfig, proposers: dict[str, Proposer]) -> None:
        self.engine = engine
        self.cfg = cfg
        self.proposers = proposers
        self.controller = Controller(cfg)
        # auto mode: the controller's model-driven choice is also judged by what it achieved (spec/utility.py)
        self.utility = MeasuredUtility()
        self._pure_decode = False                  # the current step carries no prefill chunk
        self._asked: dict[str, float] = {}         # strategies asked for drafts this step -> seconds taken
        self.draft_seconds = 0.0
        self.draft_cost: dict[str, float] = {}   # EMA seconds per propose() call, by strategy
        self.skipped: dict[str, int] = {}        # steps a strategy was not even asked (did not pay)
        self.rows_asked: dict[str, int] = {}     # decoding rows each strategy was asked to draft for
        self.steps = 0
        self._versions: dict[str, int | None] = {}  # drafter swaps seen per strategy
        self._step_started: float | None = None      # when the current step's drafting began
        self.listeners: list = []  # callables(verdicts) e.g. the trace recorder of the online trainer

    @property
    def wants_aux(self) -> bool:
        return any(p.wants_aux for p in self.proposers.values())

    def strategies(self) -> list[str]:
        """The proposers asked this step. In auto mode a learned proposer that a hybrid one wraps is left
        out: the hybrid tree holds the learned tree's best nodes (and the suffix tree's), so asking the
        learned one too could only draft for rows the hybrid proposer deliberately leaves to the suffix
        drafter."""
        mode = self.cfg.mode
        if mode == "auto":
            wrapped = {id(p.learned) for p in self.proposers.values() if hasattr(p, "learned")}
            return [name for name, p in self.proposers.items() if id(p) not in wrapped]
        return [mode] if mode in self.proposers else []

    def arm(self, name: str) -> str:
        """The measured-utility record a strategy is judged in: its proposer's ``arm`` (the hybrid strategy
        shares the learned drafter's forward and so its record), else its name."""
        return getattr(self.proposers.get(name), "arm", name)

    # ---- lifecycle -------------------------------------------------------------------------
    def add_request(self, seq) -> None:
        for p in self.proposers.values():
            p.add_request(seq)

    def on_commit(self, seq, tokens: list[int]) -> None:
        for p in self.proposers.values():
            p.on_commit(seq, tokens)

    def finish(self, seq) -> None:
        for p in self.proposers.values():
            p.finish(seq)

    def observe_prefill(self, seq, n: int, aux) -> None:
        for p in self.proposers.values():
            p.observe_prefill(seq, n, aux)

    # ---- per step ----------------------------------------------------------------------------
    def draft(self, decode_seqs: list, step_tokens: int) -> dict[int, DraftTree]:
        self._step_started = time.perf_counter()
        names = self.strategies()
        if not names or len(decode_seqs) >= self.cfg.off_batch_size or self.cfg.max_draft_tokens == 0:
            return {}
        self.steps += 1
        self._pure_decode = step_tokens == len(decode_seqs)
        self._asked = {}
        auto = self.cfg.mode == "auto"
        allowed: set[str] | None = set()
        if auto:
            arms: dict[str, bool] = {}
            for name in names:
                arm = self.arm(name)
                arms[arm] = arms.get(arm, False) or self.proposers[name].wants_aux
            allowed = self.utility.step_arms(len(decode_seqs), arms)
            if allowed is None:
                self.skipped["probe"] = self.skipped.get("probe", 0) + 1  # a plain step keeps the baseline measured
                return {}
        budgets = {s.seq_id: self.cfg.max_draft_tokens for s in decode_seqs}
        candidates: dict[int, list[DraftTree]] = {s.seq_id: [] for s in decode_seqs}
        for name in names:
            version = _drafter_version(self.proposers[name])
            if self._versions.setdefault(name, version) != version:  # a new drafter: its old record is moot
                self._versions[name] = version
                self.controller.forget(name)
                self.utility.forget(self.arm(name))
            if auto and not self._estimate_allows(name, len(decode_seqs), step_tokens):
                self.skipped[name] = self.skipped.get(name, 0) + 1
                continue
            cost = self.draft_cost.get(name, 0.0)
            worth = self.controller.worth_drafting(name, len(decode_seqs), step_tokens, cost)
            if not self.controller.should_try(name, self.steps, worth) or (auto and self.arm(name) not in allowed):
                self.skipped[name] = self.skipped.get(name, 0) + 1
                continue
            self._price_depth(name, len(decode_seqs), step_tokens)
            t0 = time.perf_counter()
            for sid, tree in self.proposers[name].propose(decode_seqs, budgets).items():
                candidates[sid].append(tree)
            dt = time.perf_counter() - t0
            self._asked[name] = dt
            self.rows_asked[name] = self.rows_asked.get(name, 0) + len(decode_seqs)
            self.draft_cost[name] = dt if name not in self.draft_cost else 0.9 * self.draft_cost[name] + 0.1 * dt
            self.draft_seconds += dt
        chosen = self.controller.choose(candidates)
        return self.controller.plan(chosen, step_tokens, len(decode_seqs)).trees

    def _price_depth(self, name: str, num_decode: int, step_tokens: int) -> None:
        """Tell a drafter model what a token is worth this step, so it stops growing a tree where one more
        sequential forward would cost more than it can add (``EagleProposer._depth_pays``): the step's
        committed tokens per second without it, B (1 + g) / T (g: the free drafters' accepted drafts per
        row), and its strategy's calibration of probabilities to measured acceptance."""
        learned = _learned_part(self.proposers[name])
        if not hasattr(learned, "tokens_per_second"):
            return
        base = self.controller.base_cost(step_tokens, num_decode)
        learned.tokens_per_second = num_decode * (1.0 + self.free_gain()) / base if base > 0 else 0.0
        learned.calibration = min(2.0, self.controller.stats.get(name, StrategyStats()).calibration())

    def _estimate_allows(self, name: str, num_decode: int, step_tokens: int) -> bool:
        """Hold a drafter model back while its held-out estimate cannot pay for its own proposals.

        A step of B rows with drafts commits B * L tokens in T + d seconds (L: acceptance length, d: the
        proposal time), against B tokens in T without; even if verifying the nodes were free, drafting pays
        only when L > 1 + d / T. Where a free drafter (the suffix trees: no model forward) already commits
        L_s = 1 + g tokens per row, the drafter model competes with that, not with plain decoding. At best
        its accepted drafts add to the free drafter's (a hybrid tree holding both, L <= L_s + L - 1), so it
        pays only when (L_s + L - 1) / (T + d) > L_s / T, i.e. L > 1 + (d / T) * L_s; with no free drafter
        (g = 0) that is the first rule. g is the free drafters' accepted drafts per decoding row they were
        asked for (where a learned tree was chosen over theirs they are not credited, so g errs low and the
        rule towards asking).
        A drafter whose measured held-out acceptance length (``expected_acceptance``: the gate's figure for
        its version, or a resumed version's manifest figure) fails that is not asked at all: exploring it
        live costs d every time and cannot win. Day-0 heads on this CPU measure 1.00-1.06 and a warm start
        on 4 answers per warm-up prompt 1.47-1.50 (bench/online.py day1, session 9), while the suffix
        drafter commits ~1.6 per row at batch 2 and d / T was ~0.4 in a one-off profile: ~1.64 needed.
        Unknown estimate or proposal time (never asked): allowed."""
        expected = _expected_acceptance(self.proposers[name])
        d = self.draft_cost.get(name)
        if expected is None or d is None:
            return True
        return expected > 1.0 + d / self.controller.base_cost(step_tokens, num_decode) * (1.0 + self.free_gain())

    def free_gain(self) -> float:
        """Accepted drafts per decoding row of the best free (model-free) drafter asked so far; 0 if none."""
        gains = [self.controller.stats[n].accepted / self.rows_asked[n] for n, p in self.proposers.items()
                 if not p.wants_aux and self.rows_asked.get(n) and n in self.controller.stats]
        return max(gains, default=0.0)

    def observe_step(self, verdicts: list, batch_rows: int, num_tokens: int, seconds: float) -> None:
        # Charge the whole step, not the forward alone (``seconds``): asking the drafters, verifying every
        # row's tree, compacting its cache rows and committing grow with the batch and the nodes too, and
        # leaving them out let the controller draft at batch 8 where it lost (0.86x of off).
        started, self._step_started = self._step_started, None
        if started is not None:
            seconds = max(seconds, time.perf_counter() - started)
        # ... except a drafter model's forward (the learned drafter: ~20 ms a proposal here): it is priced
        # apart (``draft_cost`` in ``worth_drafting``), and charged to the step cost it inflated the masked
        # curve that every strategy's nodes are priced by (in a one-off profile of day-0 serving, a 4-token
        # masked step read 43.6 ms against 35.0 ms for 8).
        model_seconds = sum(dt for name, dt in self._asked.items() if self.proposers[name].wants_aux)
        step_seconds = max(1e-6, seconds - model_seconds)
        if num_tokens > batch_rows:  # a masked step: it ran at its padded size
            self.controller.cost.observe(self.controller.padded(num_tokens), step_seconds, "masked")
        else:
            self.controller.cost.observe(num_tokens, step_seconds, "plain")
        for seq, tree, accepted, _next, _aux, _hidden in verdicts:
            self.controller.observe(tree, len(accepted) - 1)
        if self._pure_decode and batch_rows == len(verdicts) and verdicts:
            committed = sum(len(accepted) for _, _, accepted, *_ in verdicts)
            nodes: dict[str, int] = {}
            for _, tree, *_ in verdicts:
                if tree.num_draft:
                    nodes[tree.source] = nodes.get(tree.source, 0) + tree.num_draft
            chosen = self.arm(max(nodes, key=nodes.get)) if nodes else None
            asked: dict[str, float] = {}
            for name, dt in self._asked.items():
                arm = self.arm(name)
                asked[arm] = asked.get(arm, 0.0) + dt
            self.utility.observe(batch_rows, committed, seconds, chosen, asked)
        self._pure_decode, self._asked = False, {}
        for p in self.proposers.values():
            p.observe(verdicts)
        for listener in self.listeners:
            listener(verdicts)


def _learned_part(proposer):
    """The learned proposer behind ``proposer``: itself, or the learned half of a hybrid one."""
    return getattr(proposer, "learned", proposer)


def _drafter_version(proposer) -> int | None:
    """How many times a learned proposer (or the learned half of a hybrid one) swapped drafters; None for
    model-free proposers."""
    return getattr(getattr(_learned_part(proposer), "stats", None), "swaps", None)


def _expected_acceptance(proposer) -> float | None:
    """The held-out acceptance estimate of a learned proposer (or of a hybrid one's learned half); None
    for model-free proposers and drafters not measured yet."""
    return getattr(_learned_part(proposer), "expected_acceptance", None)


class SuffixAdapter:
    """Adapts ``SuffixProposer`` (keyed by ids, pure token bookkeeping) to the ``Proposer`` protocol."""

    name = "suffix"
    wants_aux = False

    def __init__(self, cfg: SpecConfig) -> None:
        from .suffix import SuffixProposer

        self.inner = SuffixProposer(cfg)

    def add_request(self, seq) -> None:
        self.inner.add_request(seq.seq_id, list(seq.tokens), seq.group)

    def on_commit(self, seq, tokens: list[int]) -> None:
        self.inner.on_commit(seq.seq_id, tokens)

    def finish(self, seq) -> None:
        # Aborted outputs are partial and unwanted: keep them out of the global store.
        self.inner.finish(seq.seq_id, keep_output=seq.finish_reason != "abort")

    def observe_prefill(self, seq, n: int, aux) -> None:
        pass

    def observe(self, verdicts: list) -> None:
        pass

    def propose(self, seqs: list, budgets: dict[int, int]) -> dict[int, DraftTree]:
        return {s.seq_id: self.inner.propose(s.seq_id, budgets[s.seq_id]) for s in seqs}


def profile_costs(engine, controller: Controller, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                  repeats: int = 2) -> None:
    """Time target forwards of a few sizes on a scratch slot so the first decisions are informed."""
    from ..engine.runner import RowSpec

    if engine.kv.num_free == 0:
        return
    slot = engine.kv.allocate()
    try:
        for n in sizes:
            if n > engine.kv.max_len:
                break
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                engine.runner.run([RowSpec(slot, 0, [0] * n, logits_from=0)])
                controller.cost.observe(n, time.perf_counter() - t0, "plain" if n == 1 else "masked")
    finally:
        engine.kv.free(slot)


def attach_speculation(engine, cfg: SpecConfig, extra: dict[str, Proposer] | None = None) -> Speculation:
    """Give an engine speculative decoding: the suffix drafter always, plus any extra proposers."""
    proposers: dict[str, Proposer] = {"suffix": SuffixAdapter(cfg)}
    proposers.update(extra or {})
    spec = Speculation(engine, cfg, proposers)
    if getattr(engine.runner, "bucket_shapes", False):
        from ..engine.runner import bucket_tokens

        spec.controller.pad = bucket_tokens
    if cfg.profile_at_start:
        profile_costs(engine, spec.controller)
    engine.spec = spec
    return spec
