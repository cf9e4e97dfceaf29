"""The discrete-event model: N simulated workers fed by onspec's real rollout ``Coordinator``.

Only the engines are simulated. The global buffer, the dispatch order (FIFO, or Seer's probe-first /
longest-estimate-first with anti-starvation), the least-loaded placement, the divided rollout's chunk
budgets and re-enqueueing, and the finish and tail accounting are ``onspec.rl.rollout``'s own code, looked
up at call time, so a change there changes the simulation (no copy of the policies lives here).

A ``SimWorker`` stands where ``ChunkRunner`` stands in a real rollout. It runs engine steps: every running
row advances each step, a newly submitted chunk first prefills its context (the prompt, plus everything
generated so far for a continuation chunk: our engine keeps no KV between chunks) within a per-step
prefill budget (the engine's chunked prefill), and the step's seconds come from the ``StepCost`` of the
step's rows and tokens. Chunks of one group submitted with the prompt as context prefill it once
(``share_prefill``, like ``Engine.add_siblings``: the others copy its cache rows once it has prefilled and
compute only the last prompt token). With prefix reuse (the engine's default) a released chunk's rows stay
in its free slot until the slot is needed, so a continuation chunk that comes back to the same worker, or a
sibling that starts there later, computes only what the slot does not hold; a chunk that moves re-prefills. A drafting row verifies ``1 + d`` tokens and commits what its
strategy's acceptance gives at budget ``d`` (grouped drafting where the chunk carries its group id, as
``ChunkRunner`` gives it to the engine). Each step takes the budget (0: plain decoding) with the most
tokens per second at its cost, the speculation controller's marginal-benefit rule in its simplest form:
no drafting where verification costs more than it returns (large batches on a CPU), longer drafts where
rows are few (Seer's adaptive grouped speculative decoding, arXiv 2511.14617).

Time advances by events, not by steps: between two events a worker's rows and its step cost do not
change, so a block of ``k`` identical steps (up to the first chunk that ends) is one event. A chunk that
arrives mid-block joins at the next step boundary, as it would join a running engine.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from .. import rollout
from .cost import StepCost
from .workload import Acceptance, expected_tokens

EPS = 1e-6  # tolerance on token counts and step counts (expected tokens are floats)


@dataclass(frozen=True)
class Cluster:
    """The simulated hardware and batch: ``workers`` engines of ``capacity`` concurrent chunks each."""

    workers: int
    capacity: int = 32
    prompt_tokens: int = 128
    prefill_budget: int = 512        # prefill tokens per step (EngineConfig.max_num_batched_tokens)
    slots: int = 64                  # engine slots (EngineConfig.max_num_seqs); free ones keep released rows
    prefix_reuse: bool = True        # EngineConfig.prefix_reuse: a chunk starts from rows a free slot holds

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1 (got {self.workers})")
        if self.capacity < 1 or self.prompt_tokens < 1 or self.prefill_budget < 1:
            raise ValueError("capacity, prompt_tokens and prefill_budget must be >= 1")
        if self.slots < self.capacity:
            raise ValueError(f"slots ({self.slots}) must be >= capacity ({self.capacity})")


@dataclass(frozen=True)
class Policy:
    """One rollout configuration: the real ``RolloutConfig`` plus whether the engines draft."""

    name: str
    rollout: rollout.RolloutConfig
    speculation: bool = False


@dataclass
class SimResult:
    policy: str
    workers: int
    responses: int
    makespan: float
    tail: float
    utilisation: float               # share of worker-time with at least one chunk running
    slot_utilisation: float          # share of slot-time with a chunk running
    generated_tokens: int
    prefill_tokens: int              # context tokens the simulated engines computed
    reprefill_tokens: int            # of which continuation chunks re-computed (Coordinator's count)
    chunks: int
    moves: int
    steps: int
    drafting_steps: int

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.makespan if self.makespan > 0 else 0.0


@dataclass
class _Row:
    key: tuple[int, int]
    target: int                      # tokens this chunk produces
    budget: int                      # the chunk's max_tokens
    reason: str                      # finish reason once ``target`` is reached
    accept: float                    # per-token draft acceptance (0: not drafting)
    prefill: int                     # context tokens still to compute (0: decoding)
    family: tuple | None             # share_prefill family (first chunks of one group)
    leader: _Row | None = None       # the sibling that prefills the shared prompt (wait for it)
    context: int = 0                 # the chunk's context tokens (prompt + generated before it)
    produced: float = 0.0


@dataclass(frozen=True)
class _Retained:
    """The rows a released chunk left in its (now free) slot: its group's prompt, then its own tokens."""

    key: tuple[int, int]
    tokens: int


@dataclass
class _Block:
    """``steps`` identical engine steps from ``start``; what each row gains per step."""

    start: float
    seconds: float                   # per step
    steps: int
    advance: dict[int, float]        # id(row) -> tokens per step
    prefill: dict[int, int]          # id(row) -> prefill tokens this (single) step
    rows: int
    drafting: bool

    @property
    def end(self) -> float:
        return self.start + self.steps * self.seconds


@dataclass
class _Usage:
    busy: float = 0.0
    slot_seconds: float = 0.0
    steps: int = 0
    drafting_steps: int = 0
    prefill_tokens: int = 0
    generated: int = 0


class SimWorker:
    """A simulated engine: takes ``WorkItem``s, returns ``ChunkResult``s at simulated times."""

    def __init__(self, cluster: Cluster, policy: Policy, cost: StepCost, acceptance: Acceptance,
                 lengths: dict[tuple[int, int], int]) -> None:
        self.cluster = cluster
        self.policy = policy
        self.cost = cost
        self.acceptance = acceptance
        self.lengths = lengths
        self.rows: list[_Row] = []
        self.retained: list[_Retained] = []   # least recently released first
        self.block: _Block | None = None
        self.version = 0
        self.usage = _Usage()

    @property
    def capacity(self) -> int:
        return self.cluster.capacity

    def submit(self, work: list[rollout.WorkItem], now: float) -> bool:
        """Add chunks; True when the worker's next event time changed (push a new event)."""
        cfg = self.policy.rollout
        leaders = {r.family: r for r in self.rows if r.family is not None}
        for w in work:
            generated = len(w.prompt_ids) - self.cluster.prompt_tokens
            left = self.lengths[w.key] - generated
            target = min(w.max_tokens, left)
            ends = target == left
            reason = "stop" if ends and self.lengths[w.key] < cfg.max_tokens else "length"
            family = (w.key[0],) if cfg.share_prefill and w.chunk == 0 else None
            leader = leaders.get(family) if family is not None else None
            reused = self._take_slot(w.key if leader is None else None, len(w.prompt_ids))
            # a sibling copies the leader's first P - 1 cache rows and computes the last prompt token itself
            prefill = 1 if leader is not None else len(w.prompt_ids) - reused
            accept = self.acceptance.per_token(self.policy.speculation, w.group_id is not None)
            row = _Row(w.key, target, w.max_tokens, reason, accept, prefill, family, leader, len(w.prompt_ids))
            if family is not None and leader is None:
                leaders[family] = row
            self.rows.append(row)
        if self.block is None:
            self._plan(now)
            return self.block is not None
        b = self.block
        done = math.floor((now - b.start) / b.seconds + EPS)
        if done + 1 < b.steps:  # the new rows join after the step under way
            b.steps = done + 1
            self.version += 1
            return True
        return False

    def _take_slot(self, key: tuple[int, int] | None, context: int) -> int:
        """Allocate a slot for a chunk of ``context`` tokens; the cache rows it finds there (prefix reuse,
        as the engine's scheduler picks: the free slot sharing the longest prefix, at most ``context - 1``
        rows; else a blank slot; else the least recently released one, whose rows are lost)."""
        if not self.cluster.prefix_reuse:
            return 0
        best, best_len = None, 0
        for entry in self.retained if key is not None else ():
            if entry.key[0] != key[0]:
                continue  # another prompt (a shared chat-template head is not modelled)
            n = min(entry.tokens, context) if entry.key == key else self.cluster.prompt_tokens
            n = min(n, context - 1)
            if n > best_len:
                best, best_len = entry, n
        if best is not None:
            self.retained.remove(best)
            return best_len
        if len(self.rows) + len(self.retained) >= self.cluster.slots and self.retained:
            self.retained.pop(0)
        return 0

    def next_event(self) -> float | None:
        return self.block.end if self.block is not None else None

    def _plan(self, now: float) -> None:
        """The next block of identical steps over the current rows (none when idle)."""
        if not self.rows:
            self.block = None
            return
        decoding = [r for r in self.rows if r.prefill == 0]
        waiting = [r for r in self.rows if r.prefill > 0 and (r.leader is None or r.leader.prefill == 0)]
        prefill: dict[int, int] = {}
        room = max(1, self.cluster.prefill_budget - len(decoding))
        for r in waiting:
            if room <= 0:
                break
            take = min(room, r.prefill)
            prefill[id(r)] = take
            room -= take
        pre = sum(prefill.values())
        rows = len(decoding) + len(prefill)
        best = (-1.0, 0, 0.0)  # (tokens per second, budget, seconds)
        for d in self.acceptance.budgets(self.policy.speculation and bool(decoding)):
            secs = self.cost.seconds(rows, len(decoding) * (1 + d) + pre)
            rate = sum(expected_tokens(r.accept, d) for r in decoding) / secs
            if rate > best[0] * (1 + EPS):  # a larger budget must pay strictly
                best = (rate, d, secs)
        _, draft, seconds = best
        drafting = draft > 0
        advance = {id(r): expected_tokens(r.accept, draft) for r in decoding}
        steps = 1
        if not prefill:  # a pure decoding block: up to the step where the first chunk ends
            steps = max(1, min(math.ceil((r.target - r.produced) / advance[id(r)] - EPS) for r in decoding))
        self.block = _Block(now, seconds, steps, advance, prefill, rows, drafting)
        self.version += 1

    def finish_block(self) -> list[rollout.ChunkResult]:
        """Apply the block that ends now; the chunks that ended in it. Plans the next block."""
        b = self.block
        u = self.usage
        u.busy += b.steps * b.seconds
        u.slot_seconds += b.rows * b.steps * b.seconds
        u.steps += b.steps
        u.drafting_steps += b.steps if b.drafting else 0
        u.prefill_tokens += sum(b.prefill.values())
        done, keep = [], []
        for r in self.rows:
            if id(r) in b.prefill:
                r.prefill -= b.prefill[id(r)]
                if r.prefill == 0:  # the step that completes a prefill samples the first token
                    r.produced += 1
            elif id(r) in b.advance:
                r.produced += b.steps * b.advance[id(r)]
            if r.prefill == 0 and r.produced >= r.target - EPS:
                done.append(rollout.ChunkResult(r.key, [0] * r.target, r.reason, r.budget))
                u.generated += r.target
                if self.cluster.prefix_reuse:
                    self.retained.append(_Retained(r.key, r.context + r.target))
            else:
                keep.append(r)
        self.rows = keep
        self._plan(b.end)
        return done


def simulate(policy: Policy, cluster: Cluster, lengths: list[list[int]], cost: StepCost,
             acceptance: Acceptance) -> SimResult:
    """One rollout of ``len(lengths)`` groups on ``cluster``: the real Coordinator against ``SimWorker``s."""
    cfg = policy.rollout
    if any(len(g) != cfg.group_size for g in lengths):
        raise ValueError(f"lengths: every group needs group_size={cfg.group_size} responses")
    prompts = [[0] * cluster.prompt_tokens for _ in lengths]
    coord = rollout.Coordinator(prompts, cfg, step=0, capacities=[cluster.capacity] * cluster.workers)
    by_key = {(g, i): n for g, group in enumerate(lengths) for i, n in enumerate(group)}
    workers = [SimWorker(cluster, policy, cost, acceptance, by_key) for _ in range(cluster.workers)]
    events: list[tuple[float, int, int, int]] = []   # (time, order, worker, version)
    order = 0
    now = 0.0
    total = len(coord.items)
    while coord.num_finished < total:
        for w, work in coord.assign().items():
            if workers[w].submit(work, now):
                heapq.heappush(events, (workers[w].next_event(), order, w, workers[w].version))
                order += 1
        if not events:
            raise RuntimeError("simulated rollout stalled: nothing running, responses unfinished")
        t, _, w, version = heapq.heappop(events)
        worker = workers[w]
        if version != worker.version or worker.block is None:
            continue  # superseded by a re-plan
        now = t
        for res in worker.finish_block():
            if coord.complete(w, res):
                coord.item(res.key).finished_at = now  # simulated time, not the Coordinator's wall clock
        if worker.block is not None:
            heapq.heappush(events, (worker.next_event(), order, w, worker.version))
            order += 1
    usage = [wk.usage for wk in workers]
    n = cluster.workers
    return SimResult(
        policy=policy.name, workers=n, responses=total, makespan=now, tail=coord.tail_seconds(now),
        utilisation=sum(u.busy for u in usage) / (n * now) if now else 0.0,
        slot_utilisation=sum(u.slot_seconds for u in usage) / (n * cluster.capacity * now) if now else 0.0,
        generated_tokens=sum(u.generated for u in usage), prefill_tokens=sum(u.prefill_tokens for u in usage),
        reprefill_tokens=coord.reprefill_tokens, chunks=coord.chunks, moves=coord.moves,
        steps=sum(u.steps for u in usage), drafting_steps=sum(u.drafting_steps for u in usage))
