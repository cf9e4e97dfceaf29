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

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import SpecConfig
from ..engine.events import EngineObserver
from ..engine.step import DraftInput, Prefill, StepResult
from .grammar_drafter import GRAMMAR, GrammarProposer, with_forced_tokens
from .policy import DraftPolicy
from .proposer import Proposer
from .tree import DraftTree
from .utility import MeasuredUtility, pow2_bucket


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
        # forced suffix drafting ran 0.88x of off (docs/decisions.md, 'Step cost curve').
        self.sizes: dict[str, dict[int, float]] = {k: {} for k in self.KINDS}
        # Live observations per bucket. The EMA weight of the n-th is max(1 - decay, 1 / n), a running mean
        # that turns into the EMA after 1 / (1 - decay) steps, so the first live step replaces the start-up
        # profile outright. Why: the profile times bare forwards over scratch rows, while a live step also
        # pays for drafting, verification, cache compaction and real contexts; at batch 8 on an AVX2-only
        # CPU the profile put a 16-token masked step at 45 ms and live steps took 55-65 ms, and at weight
        # 0.1 per step the controller drafted on that optimistic figure for ~20 steps (a 64-step batch ran
        # 0.81x of speculation off; docs/decisions.md, 'Step cost curve').
        self.live: dict[str, dict[int, int]] = {k: {} for k in self.KINDS}
        # Live seconds over profiled seconds, measured where a live step lands in a profiled bucket and
        # applied to the buckets only the profile has measured yet. Why: a live step at batch 32 took
        # 150-175 ms against 89 ms profiled (the step's own work, longer contexts), so the first live plain
        # reading next to unscaled masked priors made verification look cheaper than decoding.
        self.prior_scale = 1.0
        self._scale_samples = 0
        self._points: dict[str, list[tuple[float, float]]] = {}  # cost()'s curve per kind, until the next observe

    @property
    def table(self) -> dict[int, float]:
        """Every measured bucket (the masked curve where both have one): for display and for "any data yet"."""
        return {**self.tables["plain"], **self.tables["masked"]}

    bucket = staticmethod(pow2_bucket)

    def observe(self, tokens: int, seconds: float, kind: str = "masked", prior: bool = False) -> None:
        """Record a forward of ``tokens`` tokens that took ``seconds``. ``prior``: a start-up profile
        reading, kept only until the bucket's first live observation."""
        table, sizes, live = self.tables[kind], self.sizes[kind], self.live[kind]
        self._points.clear()
        b = self.bucket(tokens)
        if b not in table:
            table[b], sizes[b] = seconds, float(tokens)
            live[b] = 0 if prior else 1
            return
        if prior and live.get(b, 0):
            return  # live steps already measured this bucket
        if not prior and not live.get(b, 0):  # the first live step where the profile measured
            self._scale_samples += 1
            w = max(1.0 - self.decay, 1.0 / self._scale_samples)
            self.prior_scale = (1 - w) * self.prior_scale + w * seconds / table[b]
        n = live.get(b, 0) + (0 if prior else 1)
        live[b] = n
        w = max(1.0 - self.decay, 1.0 / n) if n else 0.5
        table[b] = (1 - w) * table[b] + w * seconds
        sizes[b] = (1 - w) * sizes[b] + w * tokens

    def cost(self, tokens: int, kind: str = "masked") -> float:
        if not self.tables[kind]:
            kind = "plain" if kind == "masked" else "masked"
        points = self._points.get(kind)
        if points is None:
            table, sizes, live = self.tables[kind], self.sizes[kind], self.live[kind]
            # (mean size, seconds) per bucket; buckets partition the sizes, so the means strictly increase
            points = [(sizes[b], table[b] * (1.0 if live.get(b, 1) else self.prior_scale)) for b in sorted(table)]
            self._points[kind] = points
        if not points:
            return 1.0
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


class MakespanValue:
    """What expected accepted tokens are worth, in seconds saved, when the batch is closed (nothing waits
    to take a finished row's place), for ``Controller.plan``.

    Per-step throughput counts every accepted token alike. In a closed batch it misleads: the batch is
    done when its last row is, so tokens accepted by rows that are ahead only drop those rows from later
    steps a little sooner. On an AVX2-only CPU (default model, batch 8, 64 tokens each) steps that drafted
    committed 44 tokens in 146 ms against 8 in 37 ms, yet the batch took longer than with speculation off:
    the accepted tokens went to the rows copying from their prompts, which then waited for the others
    (bench/speculation.py (e): 0.81x at batch 8; docs/decisions.md, 'Closed batches').

    Model: a decoding step of B rows costs T(B) = F + c B (F: the part every step pays, weights streamed
    once; c: per row), so the time left is about F * S + c * sum(s_r), where s_r is row r's steps left and
    S = max s_r. Accepting a_r tokens on row r saves c * a_r and shortens S from M = max(rem_r) to
    max(rem_r - a_r): the F part pays only for tokens that shorten the longest rows, and for tied rows only
    when all of them advance. rem_r is max_tokens minus the tokens produced (an end-of-sequence token may
    come sooner: the value then errs high, towards the throughput rule). The rows are every running
    request, prefilling ones included (they are the furthest behind). c and F come from the plain curve:
    c = (T(B) - T(1)) / (B - 1), clipped to [0, T(B) / B]."""

    def __init__(self, remaining: dict[int, int], step_seconds: float, one_row_seconds: float) -> None:
        rows = len(remaining)
        self.longest = max(remaining.values())
        per_row = step_seconds / rows
        self.c = min(per_row, max(0.0, (step_seconds - one_row_seconds) / (rows - 1))) if rows > 1 else 0.0
        self.f = step_seconds - self.c * rows
        self.total = 0.0  # expected accepted tokens over all rows so far
        # tokens each row has left after this step's expected acceptance, and the rows in a max-heap of
        # them with stale entries skipped (``plan`` adds up to 128 nodes over up to 63 rows per step; a
        # scan of every row per node cost 0.2 s per run)
        self.left = {sid: float(rem) for sid, rem in remaining.items()}
        self.heap = [(-rem, sid) for sid, rem in self.left.items()]
        heapq.heapify(self.heap)

    def add(self, seq_id: int, p: float) -> float:
        """Add a node accepted with probability ``p`` on row ``seq_id``; the seconds all nodes so far save."""
        old = self.left[seq_id]
        self.left[seq_id] = max(0.0, old - p)   # a row cannot accept more tokens than it has left
        self.total += old - self.left[seq_id]
        heapq.heappush(self.heap, (-self.left[seq_id], seq_id))
        while -self.heap[0][0] != self.left[self.heap[0][1]]:
            heapq.heappop(self.heap)
        return self.c * self.total + self.f * (self.longest + self.heap[0][0])


@dataclass
class Controller:
    cfg: SpecConfig
    cost: StepCostModel = field(default_factory=StepCostModel)
    stats: dict[str, StrategyStats] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)  # how often each strategy won a request
    # The token count a masked forward of n tokens really runs at (the runner pads multi-token forwards to
    # bucket sizes on a CPU, see engine/runner.py): its cost is that of the padded size, so nodes that fit
    # in the padding are free and the node that opens a new bucket pays for all of it. None: no padding.
    pad: Callable[[int], int] | None = None

    def calibration(self, strategy: str) -> float:
        """The strategy's measured accepted/predicted ratio (capped at 2), the prior until it has a record."""
        return min(2.0, self.stats.get(strategy, StrategyStats()).calibration())

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

    def plan(self, trees: dict[int, DraftTree], base_tokens: int, num_decode: int,
             remaining: dict[int, int] | None = None) -> Plan:
        """Spend the batch budget by marginal benefit; 0 nodes (off) when drafting does not pay.

        ``remaining``: tokens each decoding row may still produce, given when the batch is closed (no
        request waits and the caller wants them all): accepted tokens are then valued by how much they
        shorten the batch (``MakespanValue``), not one decoding token each."""
        nodes: list[tuple[float, int, int]] = []
        for sid, tree in trees.items():
            cal = self.calibrated(tree)
            nodes.extend((cal[i], sid, i) for i in range(1, len(tree)))
        nodes.sort(key=lambda x: -x[0])
        nodes = nodes[: self.cfg.max_batch_draft_tokens]
        # Rates are those of the decoding rows alone: B tokens per plain step of B rows, and with k nodes
        # B + (expected accepted) tokens per that step plus the time the nodes add to this one. Why not
        # the whole step's time: a step that carries a prefill chunk is slow for reasons drafting does not
        # change, so B / T(step) made the decoding rows look slow and every node a bargain (at batch 32
        # prefill steps drafted 60-128 nodes; 128 nodes added 540 ms to a 930 ms step for 42 tokens that
        # plain steps decode at ~4 ms each).
        base = self.base_cost(base_tokens, num_decode)
        decode = base if base_tokens <= num_decode else self.cost.cost(num_decode, "plain")
        best_k, best_rate = 0, num_decode / decode
        worth = None
        if remaining:
            worth = MakespanValue(remaining, self.cost.cost(len(remaining), "plain"), self.cost.cost(1, "plain"))
        gain = float(num_decode)
        for k, (p, sid, _) in enumerate(nodes, start=1):
            gain = num_decode + worth.add(sid, p) * num_decode / decode if worth is not None else gain + p
            rate = gain / (decode + self.cost.cost(self.padded(base_tokens + k), "masked") - base)
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
        its back-off (the draft policy's gate ``record``); in day-0 serving with the learned drafter attached,
        the suffix drafter was skipped in 771 of 1755 steps of one 40-request run and 162 of another (a
        one-off profile around bench/online.py's day-0 loop; 22 without the learned drafter;
        docs/decisions.md, 'Cheap drafters').

        An expensive drafter is priced by its record: rate with speculation = B * (1 + accepted per step) /
        (T(base + B * nodes per step) + drafting); rate without = B / T(base). Until it has a record
        (``SpecConfig.record_explore_steps``) it is tried.
        """
        plain = self.base_cost(base_tokens, num_decode)
        if draft_seconds <= self.cfg.cheap_share * plain:
            return True
        st = self.stats.get(strategy)
        if st is None or st.steps < self.cfg.record_explore_steps:
            return True
        acc, nodes = st.accepted / st.steps, st.drafted / st.steps
        spec_cost = self.cost.cost(self.padded(base_tokens + max(1, int(num_decode * nodes))), "masked")
        with_spec = num_decode * (1 + acc) / (spec_cost + draft_seconds)
        return with_spec > num_decode / plain

    def forget(self, strategy: str) -> None:
        """Drop a strategy's record (its drafter changed): it is explored afresh."""
        self.stats.pop(strategy, None)

    def observe(self, tree: DraftTree, accepted: int) -> None:
        if tree.num_draft == 0:
            return
        st = self.stats.setdefault(tree.source, StrategyStats())
        st.predicted += sum(tree.path_scores()[1:])
        st.accepted += accepted
        st.drafted += tree.num_draft
        st.steps += 1


class Speculation(EngineObserver):
    """Glue between the engine and the proposers: lifecycle hooks, drafting, verdict feedback. The engine's
    first event subscriber; it hands every event on to its proposers. Whether a step drafts, and which
    drafters it asks, is the draft policy's (speculation/policy.py); what it drafts, the controller's plan."""

    def __init__(self, engine, cfg: SpecConfig, proposers: dict[str, Proposer]) -> None:
        self.engine = engine
        self.cfg = cfg
        self.proposers = proposers
        self.controller = Controller(cfg)
        # auto mode: the controller's model-driven choice is also judged by what it achieved (speculation/utility.py)
        self.utility = MeasuredUtility()
        self.policy = DraftPolicy(cfg, self.controller, self.utility, proposers)
        self._pure_decode = False                  # the current step carries no prefill chunk
        self._asked: dict[str, float] = {}         # strategies asked for drafts this step -> seconds taken
        self.draft_seconds = 0.0
        self._step_started: float | None = None      # when the current step's drafting began
        self.clock: Callable[[], float] = time.perf_counter  # what proposals and steps are timed by (tests inject one)
        self._threads_lent = False

    @property
    def threads_lent(self) -> bool:
        """Whether the next step runs with threads lent to the trainer (train/channel.py ``ThreadLender``)."""
        return self._threads_lent

    def set_threads_lent(self, lent: bool) -> None:
        """Online learning (train/online.py) says whether the engine has lent threads to the trainer: such
        steps run slower for a reason drafting does not change, so they are not cost samples."""
        self._threads_lent = lent

    @property
    def wants_aux(self) -> bool:
        return any(p.wants_aux for p in self.proposers.values())

    def strategies(self, decode: list | None = None) -> list[str]:
        """The proposers asked this step. In auto mode a learned proposer that a hybrid one wraps is left
        out: the hybrid tree holds the learned tree's best nodes (and the suffix tree's), so asking the
        learned one too could only draft for rows the hybrid proposer deliberately leaves to the suffix
        drafter. The grammar drafter is asked, in every mode, only in steps where some of the ``decode``
        sequences have a grammar: it drafts for nothing else, and unconstrained traffic never sees it."""
        mode = self.cfg.mode
        constrained = decode is not None and GRAMMAR in self.proposers and any(s.grammar is not None for s in decode)
        grammar = [GRAMMAR] if constrained else []
        if mode == "auto":
            wrapped = {id(p.wraps) for p in self.proposers.values() if p.wraps is not None}
            return [name for name, p in self.proposers.items() if id(p) not in wrapped and name != GRAMMAR] + grammar
        return ([mode] if mode in self.proposers and mode != GRAMMAR else []) + grammar

    def arm(self, name: str) -> str:
        """The measured-utility record a strategy is judged in: its proposer's ``arm`` (the hybrid strategy
        shares the learned drafter's forward and so its record), else its name."""
        return self.policy.arm(name)

    def aux_layers(self) -> tuple[int, ...]:
        """The target layers whose inputs the proposers read (the runner returns those when asked)."""
        for p in self.proposers.values():
            if p.wants_aux and p.aux_layers():
                return p.aux_layers()
        return ()

    # ---- lifecycle -------------------------------------------------------------------------
    def add_request(self, seq) -> None:
        for p in self.proposers.values():
            p.add_request(seq)

    def on_commit(self, seq, tokens: list[int]) -> None:
        for p in self.proposers.values():
            p.on_commit(seq, tokens)

    def suffix_drafter(self):
        """The suffix drafter behind strategy ``suffix`` (RL rollouts pin a group's tree in it); None without one."""
        p = self.proposers.get("suffix")
        return p.inner if isinstance(p, SuffixAdapter) else None

    def remove_strategies(self, *names: str) -> None:
        """Stop drafting with ``names`` (the online learner falls back to suffix drafting when its trainer
        is gone); once no proposer reads aux states, the engine stops asking the runner for them."""
        for name in names:
            self.proposers.pop(name, None)

    # ---- engine events, handed on to the proposers ----------------------------------------------
    def on_finish(self, seq) -> None:
        for p in self.proposers.values():
            p.on_finish(seq)

    def on_prefill(self, prefill: Prefill) -> None:
        for p in self.proposers.values():
            p.on_prefill(prefill)

    def on_weights_changed(self) -> None:
        for p in self.proposers.values():
            p.on_weights_changed()

    def on_drafter_swapped(self, name: str) -> None:
        """A new drafter behind ``name``: its record, and the records of the strategies that wrap it, are moot."""
        for strategy, p in self.proposers.items():
            if strategy == name or (p.wraps is not None and p.wraps is self.proposers.get(name)):
                self.controller.forget(strategy)
                self.policy.forget(strategy)
                self.utility.forget(self.arm(strategy))

    # ---- aux rows of cache rows a sequence did not compute (``Proposer.keeps_aux``) ------------------
    @property
    def recalls_aux(self) -> bool:
        """Prefix reuse can serve every drafter: none reads aux states, or one keeps them with the rows."""
        return not self.wants_aux or any(p.keeps_aux for p in self.proposers.values())

    def recall_aux(self, prefill: Prefill) -> torch.Tensor | None:
        for p in self.proposers.values():
            if p.keeps_aux:
                return p.recall_aux(prefill)
        return None

    # ---- per step ----------------------------------------------------------------------------
    def draft(self, inp: DraftInput) -> dict[int, DraftTree]:
        """This step's draft trees: the strategies the draft policy lets through are asked, the controller
        picks each row's best tree and spends the batch budget where it pays."""
        self._step_started = self.clock()
        names = self.strategies(inp.decode)
        gate = self.policy.step_gate(inp, names)
        if self.policy.in_play(gate):
            self._pure_decode = inp.pure_decode
            self._asked = {}
        if gate is not None:
            return {}
        budgets = {s.seq_id: self.cfg.max_draft_tokens for s in inp.decode}
        candidates: dict[int, list[DraftTree]] = {s.seq_id: [] for s in inp.decode}
        for name in names:
            if not self.policy.ask(name, inp):
                continue
            self.policy.price(name, inp)
            t0 = self.clock()
            for sid, tree in self.proposers[name].propose(inp.decode, budgets).items():
                candidates[sid].append(tree)
            dt = self.clock() - t0
            self._asked[name] = dt
            self.policy.asked(name, len(inp.decode), dt)
            self.draft_seconds += dt
        chosen = with_forced_tokens(self.controller.choose(candidates), candidates, self.cfg.max_draft_tokens)
        remaining = self._closed_remaining(inp.decode)
        plan = self.controller.plan(chosen, inp.step_tokens, len(inp.decode), remaining)
        proposed = any(t.num_draft for trees in candidates.values() for t in trees)
        self.policy.planned(inp, bool(self._asked), proposed, plan.budget)
        return plan.trees

    def _closed_remaining(self, decode_seqs: list) -> dict[int, int] | None:
        """Tokens each decoding row may still produce when the batch is closed and its makespan is the
        objective (``SpecConfig.objective``, ``MakespanValue``); None where every token counts alike."""
        objective = self.cfg.objective
        if objective == "auto":
            objective = "makespan" if self.engine.closed_batch else "throughput"
        scheduler = self.engine.scheduler
        if objective != "makespan" or scheduler.num_waiting:
            return None
        max_len = self.engine.max_model_len
        rows = {s.seq_id: s for s in scheduler.running} | {s.seq_id: s for s in decode_seqs}
        return {sid: max(1, min(s.params.max_tokens - s.num_output, max_len - len(s.tokens)))
                for sid, s in rows.items()}

    def on_step(self, result: StepResult) -> None:
        verdicts, batch_rows, num_tokens, seconds = result.verdicts, result.rows, result.tokens, result.seconds
        # Charge the whole step, not the forward alone (``seconds``): asking the drafters, verifying every
        # row's tree, compacting its cache rows and committing grow with the batch and the nodes too, and
        # leaving them out let the controller draft at batch 8 where it lost (0.86x of off).
        started, self._step_started = self._step_started, None
        if started is not None:
            seconds = max(seconds, self.clock() - started)
        # ... except a drafter model's forward (the learned drafter: ~20 ms a proposal here): it is priced
        # apart (``draft_cost`` in ``worth_drafting``), and charged to the step cost it inflated the masked
        # curve that every strategy's nodes are priced by (in a one-off profile of day-0 serving, a 4-token
        # masked step read 43.6 ms against 35.0 ms for 8).
        model_seconds = sum(dt for name, dt in self._asked.items() if self.proposers[name].wants_aux)
        step_seconds = max(1e-6, seconds - model_seconds)
        # A step run with threads lent to the trainer is left out of the step-cost curves and the measured
        # utility. Why: a masked bucket is measured only by steps that draft, so a burst of slow lent steps
        # priced drafts out, and with nothing drafted the bucket was never measured again: in one day-0 run
        # the auto arm drafted on 552 steps against suffix-only's 2607 (docs/decisions.md, 'Lent steps').
        timed = not self.threads_lent
        if timed and num_tokens > batch_rows:  # a masked step: it ran at its padded size
            self.controller.cost.observe(self.controller.padded(num_tokens), step_seconds, "masked")
        elif timed:
            self.controller.cost.observe(num_tokens, step_seconds, "plain")
        for v in verdicts:
            self.controller.observe(v.tree, v.num_accepted)
        if timed and self._pure_decode and batch_rows == len(verdicts) and verdicts:
            committed = sum(len(v.accepted) for v in verdicts)
            nodes: dict[str, int] = {}
            for v in verdicts:
                if v.tree.num_draft:
                    nodes[v.tree.source] = nodes.get(v.tree.source, 0) + v.tree.num_draft
            chosen = self.arm(max(nodes, key=nodes.get)) if nodes else None
            asked: dict[str, float] = {}
            for name, dt in self._asked.items():
                arm = self.arm(name)
                asked[arm] = asked.get(arm, 0.0) + dt
            self.utility.observe(batch_rows, committed, seconds, chosen, asked)
        self._pure_decode, self._asked = False, {}
        for p in self.proposers.values():
            p.on_step(result)


class SuffixAdapter(Proposer):
    """Adapts ``SuffixProposer`` (keyed by ids, pure token bookkeeping) to the ``Proposer`` base."""

    name = "suffix"

    def __init__(self, cfg: SpecConfig) -> None:
        from .suffix import SuffixProposer

        self.inner = SuffixProposer(cfg)

    def add_request(self, seq) -> None:
        self.inner.add_request(seq.seq_id, list(seq.tokens), seq.group)

    def on_commit(self, seq, tokens: list[int]) -> None:
        self.inner.on_commit(seq.seq_id, tokens)

    def on_finish(self, seq) -> None:
        # Aborted outputs are partial and unwanted: keep them out of the global store.
        self.inner.finish(seq.seq_id, keep_output=seq.finish_reason != "abort")

    def on_step(self, result: StepResult) -> None:
        for v in result.verdicts:
            if v.tree.source == "suffix":
                self.inner.observe(v.tree, v.accepted)

    def propose(self, seqs: list, budgets: dict[int, int]) -> dict[int, DraftTree]:
        return {s.seq_id: self.inner.propose(s.seq_id, budgets[s.seq_id]) for s in seqs}


def profile_costs(engine, controller: Controller, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
                  context: int = 128, repeats: int = 2) -> None:
    """Time target forwards at start-up so the first decisions are informed: for B rows over ``context``
    cached tokens each, a decoding step (B x 1 token: the plain curve) and a verification step with one
    node per row (B x 2 tokens: the masked curve). Batched shapes, not one row of n tokens: a 16-token
    verification step of 8 rows took 50 ms against 45 ms for one 16-token row (default model, AVX2-only
    CPU; the attention grids differ), and reading the cheaper one the controller drafted at batch 8 where
    it lost. Rows beyond the free slots are not profiled (their sizes are learnt live). The readings are
    priors: the first live step of a size replaces them (``StepCostModel.observe``)."""
    from ..engine.runner import RowSpec

    free = engine.kv.num_free
    if free == 0:
        return
    context = max(0, min(context, engine.kv.max_len - 2))
    slots = [engine.kv.allocate() for _ in range(min(free, max(rows)))]
    try:
        for b in rows:
            if b > len(slots):
                break
            for k, kind in ((1, "plain"), (2, "masked")):
                spec = [RowSpec(slot, context, [0] * k, logits_from=0) for slot in slots[:b]]
                for i in range(repeats + 1):  # the first run warms up this shape
                    t0 = time.perf_counter()
                    engine.runner.run(spec)
                    if i:
                        controller.cost.observe(b * k, time.perf_counter() - t0, kind, prior=True)
    finally:
        for slot in slots:
            engine.kv.free(slot)
        engine.scheduler.forget_retained()  # the scratch rows overwrote whatever freed slots held


def attach_speculation(engine, cfg: SpecConfig, extra: dict[str, Proposer] | None = None) -> Speculation:
    """Give an engine speculative decoding: the suffix drafter always, plus any extra proposers."""
    proposers: dict[str, Proposer] = {"suffix": SuffixAdapter(cfg)}
    if cfg.grammar_drafts:
        proposers[GRAMMAR] = GrammarProposer()
    proposers.update(extra or {})
    spec = Speculation(engine, cfg, proposers)
    if engine.runner.bucket_shapes:
        from ..engine.runner import bucket_tokens

        spec.controller.pad = bucket_tokens
    if cfg.profile_at_start:
        profile_costs(engine, spec.controller)
    engine.use_speculation(spec)
    return spec
