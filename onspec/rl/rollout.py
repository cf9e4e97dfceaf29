"""Group rollouts through the engine: Seer's context-aware scheduling, divided rollout, grouped drafting.

Ideas from Seer (arXiv 2511.14617), written for this engine:

* Global buffer + divided rollout. Every response of every group is a ``RolloutItem`` in one buffer. A
  worker (an engine) is handed an item as a *chunk*: a request whose prompt is the original prompt plus
  everything generated so far and whose ``max_tokens`` is ``min(chunk_tokens, remaining)``. When the chunk
  ends at its budget the item goes back to the buffer, so the next chunk can run wherever there is room
  (``chunk_tokens = 0``: undivided, one request per response). A continuation chunk that returns to the
  engine that ran its previous chunk reuses the rows its freed slot still holds (prefix reuse, see
  engine/scheduler.py); elsewhere it re-prefills its context. ``reprefill_tokens`` counts what was
  recomputed and ``moves`` counts chunks that changed worker.
* Context-aware scheduling. Response 0 of each group is its *probe*: probes run first, shortest generated
  first, so every group soon has a finished response. A group's length estimate is its longest finished
  response (``max_tokens`` until one finishes), and the other responses run longest-estimate first, which
  starts the long tail early instead of last. Anti-starvation: every ``starvation_every``-th dispatch
  serves the item passed over most often, whatever its rank. ``schedule="fifo"`` is the baseline: first in,
  first out.
* Grouped suffix drafting. Every chunk of a group is added with the same engine ``group`` id, so the
  suffix drafter's group tree holds all siblings' text and drafts for each from the others. The drafter
  drops a group's tree when its last member finishes, which between chunks would lose it; ``ChunkRunner``
  therefore *pins* each group with a placeholder member (a negative id the engine never uses) for the
  whole rollout. With several workers, each finished chunk's tokens are also copied into the other
  workers' trees of that group (``share``), so siblings on different engines still draft from each other.
* Group prefill sharing (``share_prefill``). The engine shares an ``n > 1`` request's prompt prefill between
  its samples; RL responses are separate requests (each its own seed and lifetime), so ``ChunkRunner``
  adds the chunks of one group with the same context together through ``Engine.add_siblings``, and a chunk
  submitted later joins a sibling still running with that context. The prompt is prefilled once per group
  instead of ``group_size`` times; ``shared_prompt_tokens`` counts the cache rows copied instead. (Seer and
  veRL get the same from vLLM's prefix cache; onspec's prefix reuse serves a freed slot's rows to one later
  sequence, not to several running at once, hence siblings.)
  Only first chunks share: continuation chunks of a divided rollout have per-response contexts.

Exactness: speculation is lossless, so a rollout's tokens have exactly the policy's distribution. Sampling
uses a per-chunk seed derived from (seed, step, group, response, tokens so far): the same item gets the same
randomness whichever worker runs it. Greedy decoding is deterministic, so divided == undivided.

``Coordinator`` holds the buffer and decides who runs what; ``ChunkRunner`` wraps one engine. The
single-process driver is ``run_rollout``; ``onspec/dist`` drives the same two classes over Ray actors.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from ..engine.sampler import SamplingParams

SCHEDULES = ("fifo", "seer")


@dataclass(frozen=True)
class RolloutConfig:
    group_size: int = 8
    max_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    schedule: str = "seer"               # "fifo" | "seer"
    chunk_tokens: int = 0                # divided rollout chunk size; 0 = undivided
    starvation_every: int = 8            # every k-th dispatch serves the longest-waiting item
    grouped_drafting: bool = True        # siblings share a suffix tree (engine group ids + pins)
    share_prefill: bool = True           # siblings with the same context prefill it once (add_siblings)
    max_running: int = 0                 # per-worker concurrent requests; 0 = the engine's max_num_seqs
    tail_fraction: float = 0.1           # tail = time to finish the last this fraction of responses
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.group_size >= 1, "group_size", "must be >= 1"),
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}"),
            (self.chunk_tokens >= 0, "chunk_tokens", "must be >= 0 (0: undivided)"),
            (self.starvation_every >= 2, "starvation_every", "must be >= 2"),
            (self.max_running >= 0, "max_running", "must be >= 0"),
            (0 < self.tail_fraction < 1, "tail_fraction", "must be in (0, 1)"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"{name}: {msg}")


# ---- the global buffer's unit ------------------------------------------------------------------------
@dataclass
class RolloutItem:
    """One response of one group, across all of its chunks."""

    group: int                          # group index within the step
    index: int                          # response index within the group (0 = the probe)
    prompt_ids: list[int]
    group_id: str                       # engine group id (stable across chunks)
    generated: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    chunks: int = 0
    waited: int = 0                     # dispatch rounds passed over (anti-starvation)
    enqueued: int = 0                   # FIFO order (re-enqueued chunks go to the back)
    worker: int = -1                    # where its last chunk ran
    finished_at: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return (self.group, self.index)

    @property
    def is_probe(self) -> bool:
        return self.index == 0


@dataclass
class WorkItem:
    """A chunk to generate: what travels to a worker."""

    key: tuple[int, int]
    group_id: str | None
    prompt_ids: list[int]
    max_tokens: int
    seed: int | None
    priority: int
    chunk: int                          # chunk number of this item (0 = first)


@dataclass
class ChunkResult:
    key: tuple[int, int]
    tokens: list[int]
    finish_reason: str | None
    max_tokens: int


@dataclass
class RolloutResult:
    items: list[RolloutItem]
    seconds: float
    tail_seconds: float
    generated_tokens: int
    prefill_tokens: int                 # context tokens the engines computed (first chunks + re-prefills)
    reprefill_tokens: int               # of which continuation chunks re-computed
    chunks: int
    moves: int                          # continuation chunks that ran on a different worker
    by_strategy: dict[str, list[int]]   # strategy -> [sequence-steps, committed tokens]
    finish_order: list[tuple[int, int]]
    shared_prompt_tokens: int = 0       # context cache rows copied from a sibling (not in prefill_tokens)
    reused_prefix_tokens: int = 0       # context cache rows found in the slot (prefix reuse; not in prefill_tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def acceptance_length(self, strategy: str | None = None) -> float:
        """Tokens committed per target forward per sequence (all strategies, or one)."""
        rows = [v for k, v in self.by_strategy.items() if strategy is None or k == strategy]
        steps = sum(r[0] for r in rows)
        return sum(r[1] for r in rows) / steps if steps else 0.0


@dataclass(frozen=True)
class RolloutLoad:
    """How busy a single-engine rollout is, after an engine step: what the co-trainer's idle rule reads.

    ``active`` counts the responses running *or waiting* (capped at the engine's capacity): the rows the
    next step will run once the buffer has refilled the slots this step freed. Counting only the running
    chunks would read a step that finished several responses as a tail although waiting ones take their
    slots at once. With one engine ``active`` never rises within a rollout: unfinished responses only
    decrease. ``peak`` is the most rows the rollout can run at once, min(capacity, responses).
    ``step_seconds``: the wall time of the engine step just run (the co-trainer measures what its training
    costs the rollout from it, rl/interference.py)."""

    active: int
    peak: int
    step_seconds: float = 0.0

    @property
    def share(self) -> float:
        """Active rows as a fraction of the peak (0 when the rollout is empty)."""
        return self.active / self.peak if self.peak else 0.0


def chunk_seed(seed: int, step: int, group: int, index: int, offset: int) -> int:
    """A deterministic 31-bit seed per (run, step, group, response, position): splitmix64 on the tuple."""
    x = 0
    for v in (seed, step, group, index, offset):
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFF


# ---- scheduling policy (pure) --------------------------------------------------------------------
def group_estimates(items: list[RolloutItem], max_tokens: int) -> dict[int, int]:
    """Seer's length estimate per group: its longest finished response, else ``max_tokens``."""
    est: dict[int, int] = {}
    for it in items:
        if it.finished:
            est[it.group] = max(est.get(it.group, 0), len(it.generated))
    return {g: est.get(g, max_tokens) for g in {it.group for it in items}}


def order_buffer(buffer: list[RolloutItem], items: list[RolloutItem], cfg: RolloutConfig) -> list[RolloutItem]:
    """The waiting items in policy order (before anti-starvation)."""
    if cfg.schedule == "fifo":
        return sorted(buffer, key=lambda it: it.enqueued)
    est = group_estimates(items, cfg.max_tokens)

    def rank(it: RolloutItem) -> tuple:
        if it.is_probe:                                  # probes first, shortest generated first
            return (0, len(it.generated), it.enqueued)
        return (1, -est[it.group], it.enqueued)          # the rest: longest group estimate first

    return sorted(buffer, key=rank)


def dispatch_order(buffer: list[RolloutItem], items: list[RolloutItem], cfg: RolloutConfig, slots: int,
                   served: int) -> list[RolloutItem]:
    """The next ``slots`` items to run. ``served`` counts dispatches so far in this rollout.

    Anti-starvation (Seer's "occasional service"): under ``seer``, every ``starvation_every``-th dispatch
    goes to the item passed over in the most rounds, whatever its rank, so a short group behind a stream
    of long ones still makes progress."""
    order = order_buffer(buffer, items, cfg)
    if cfg.schedule == "fifo":
        return order[:slots]
    out: list[RolloutItem] = []
    for k in range(slots):
        if not order:
            break
        pick = order[0]
        if (served + k + 1) % cfg.starvation_every == 0:
            pick = max(order, key=lambda it: (it.waited, -it.enqueued))
        order.remove(pick)
        out.append(pick)
    return out


# ---- coordinator: the global buffer ----------------------------------------------------------------
class Coordinator:
    """Holds every item, hands chunks to the least-loaded worker, takes finished chunks back."""

    def __init__(self, prompts: list[list[int]], cfg: RolloutConfig, step: int = 0,
                 capacities: list[int] | None = None, group_prefix: str = "") -> None:
        if not prompts:
            raise ValueError("prompts: need at least one group")
        self.cfg = cfg
        self.step = step
        self.capacities = capacities or [1 << 30]
        self._fifo = itertools.count()
        prefix = group_prefix or f"rl{step}"
        self.items = [RolloutItem(group=g, index=i, prompt_ids=list(p), group_id=f"{prefix}-g{g}",
                                  enqueued=next(self._fifo))
                      for g, p in enumerate(prompts) for i in range(cfg.group_size)]
        self._by_key = {it.key: it for it in self.items}
        self.buffer: list[RolloutItem] = list(self.items)
        self.load = [0] * len(self.capacities)          # chunks running on each worker
        self.t0 = time.perf_counter()
        self.finish_order: list[tuple[int, int]] = []
        self.chunks = 0
        self.moves = 0
        self.reprefill_tokens = 0
        self.prefill_tokens = 0

    @property
    def done(self) -> bool:
        return all(it.finished for it in self.items)

    def item(self, key: tuple[int, int]) -> RolloutItem:
        return self._by_key[key]

    @property
    def num_finished(self) -> int:
        return len(self.finish_order)

    def assign(self) -> dict[int, list[WorkItem]]:
        """Pop waiting items in policy order onto the least-loaded workers with room."""
        out: dict[int, list[WorkItem]] = {}
        free = sum(max(0, c - l) for c, l in zip(self.capacities, self.load))
        if not self.buffer or free == 0:
            return out
        taken = dispatch_order(self.buffer, self.items, self.cfg, free, self.chunks)
        for rank, it in enumerate(taken):
            room = [w for w in range(len(self.capacities)) if self.load[w] < self.capacities[w]]
            w = min(room, key=lambda k: (self.load[k] / self.capacities[k], k))
            out.setdefault(w, []).append(self._work(it, w, priority=rank))
            self.load[w] += 1
        if taken:
            gone = {id(it) for it in taken}
            self.buffer = [it for it in self.buffer if id(it) not in gone]
            for it in self.buffer:  # passed over in a round where others ran
                it.waited += 1
        return out

    def _work(self, it: RolloutItem, worker: int, priority: int) -> WorkItem:
        cfg = self.cfg
        remaining = cfg.max_tokens - len(it.generated)
        budget = min(cfg.chunk_tokens, remaining) if cfg.chunk_tokens else remaining
        context = it.prompt_ids + it.generated
        if it.chunks:
            self.reprefill_tokens += len(context)
            if it.worker != worker:
                self.moves += 1
        self.prefill_tokens += len(context)
        seed = None if cfg.temperature == 0 else chunk_seed(cfg.seed, self.step, it.group, it.index,
                                                            len(it.generated))
        it.waited = 0
        it.worker = worker
        it.chunks += 1
        self.chunks += 1
        return WorkItem(key=it.key, group_id=it.group_id if cfg.grouped_drafting else None,
                        prompt_ids=context, max_tokens=budget, seed=seed, priority=priority, chunk=it.chunks - 1)

    def complete(self, worker: int, result: ChunkResult) -> bool:
        """A chunk came back; True when its item is now finished (else it re-enters the buffer)."""
        it = self._by_key[result.key]
        self.load[worker] -= 1
        it.generated.extend(result.tokens)
        continues = (result.finish_reason == "length" and len(result.tokens) >= result.max_tokens
                     and len(it.generated) < self.cfg.max_tokens)
        if continues:
            it.enqueued = next(self._fifo)
            self.buffer.append(it)
            return False
        it.finished = True
        it.finish_reason = result.finish_reason
        it.finished_at = time.perf_counter() - self.t0
        self.finish_order.append(it.key)
        return True

    def tail_seconds(self, total: float) -> float:
        """Time from the moment all but ``tail_fraction`` of the responses had finished to the end."""
        times = sorted(it.finished_at for it in self.items)
        if not times:
            return 0.0
        k = max(0, math.ceil(len(times) * (1 - self.cfg.tail_fraction)) - 1)
        return max(0.0, total - times[k])


# ---- worker side: one engine ---------------------------------------------------------------------
class ChunkRunner:
    """Runs chunks on one engine: submit, step, collect finished chunks; pins and shares group trees."""

    def __init__(self, engine, cfg: RolloutConfig) -> None:
        self.engine = engine
        self.cfg = cfg
        self._rids = itertools.count()
        self._live: dict[str, WorkItem] = {}
        self._pins: dict[str, int] = {}
        self._pin_ids = itertools.count(1)
        # (group, context) -> the engine's sibling list of the chunks submitted with it (share_prefill), so a
        # later chunk with the same context joins them; dropped once none of them is running
        self._families: dict[tuple, list] = {}

    @property
    def capacity(self) -> int:
        return self.cfg.max_running or self.engine.cfg.max_num_seqs

    @property
    def load(self) -> int:
        return len(self._live)

    def _suffix(self):
        spec = self.engine.spec
        return spec.suffix_drafter() if spec is not None else None

    def pin(self, group_id: str) -> None:
        """Keep ``group_id``'s suffix tree alive between chunks (a placeholder member; see docstring)."""
        inner = self._suffix()
        if inner is None or group_id in self._pins:
            return
        pin_id = -next(self._pin_ids)
        inner.add_request(pin_id, [0], group_id)
        self._pins[group_id] = pin_id

    def unpin_all(self) -> None:
        inner = self._suffix()
        for pin_id in self._pins.values():
            if inner is not None:
                inner.finish(pin_id, keep_output=False)
        self._pins.clear()

    def share(self, group_id: str, key: object, tokens: list[int]) -> None:
        """Add a sibling's tokens generated on another worker to this engine's group tree."""
        if not tokens:
            return
        self.pin(group_id)
        inner = self._suffix()
        tree = inner.group_tree(group_id) if inner is not None else None
        if tree is not None:
            tree.extend(("remote", key), tokens)

    def submit(self, work: list[WorkItem]) -> list[ChunkResult]:
        """Add chunks to the engine; chunks that cannot run (context too long) come back finished.

        With ``share_prefill`` the chunks of one group with the same context go in as siblings (one prefill,
        see the module docstring), the most urgent (lowest priority value) first: it is the one that
        prefills, unless a sibling added earlier is still running with the context's cache rows."""
        families: dict[tuple, list[WorkItem]] = {}
        for w in work:
            fkey = (w.key[0], tuple(w.prompt_ids)) if self.cfg.share_prefill else (w.key,)
            families.setdefault(fkey, []).append(w)
        refused = []
        for fkey, ws in families.items():
            ws.sort(key=lambda w: w.priority)
            for w in ws:
                if w.group_id is not None:
                    self.pin(w.group_id)
            rids = [f"rl-{next(self._rids)}" for _ in ws]
            params = [SamplingParams(temperature=self.cfg.temperature, top_p=self.cfg.top_p,
                                     max_tokens=w.max_tokens, seed=w.seed) for w in ws]
            try:
                if self.cfg.share_prefill:
                    join = next((s for s in self._families.get(fkey, ()) if not s.finished), None)
                    seqs = self.engine.add_siblings(rids, ws[0].prompt_ids, params, [w.priority for w in ws],
                                                    group=ws[0].group_id, join=join)
                    self._families[fkey] = seqs[0].siblings
                else:
                    self.engine.add_request(rids[0], ws[0].prompt_ids, params[0], priority=ws[0].priority,
                                            group=ws[0].group_id)
            except ValueError:  # the context outgrew the engine: the response ends here
                refused.extend(ChunkResult(w.key, [], "length", w.max_tokens) for w in ws)
                continue
            self._live.update(zip(rids, ws))
        return refused

    def step(self) -> list[ChunkResult]:
        """One engine step; the chunks that finished in it."""
        self.engine.step()
        done = []
        for rid, w in list(self._live.items()):
            seqs = self.engine.requests.get(rid)
            if seqs and seqs[0].finished:
                seq = seqs[0]
                done.append(ChunkResult(w.key, list(seq.output_ids), seq.finish_reason, w.max_tokens))
                self.engine.release_request(rid)
                del self._live[rid]
        if done:
            self._families = {k: v for k, v in self._families.items() if any(not s.finished for s in v)}
        return done

    def counters(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.engine.counters.by_strategy.items()}


def strategy_delta(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[int]]:
    out = {}
    for k, v in after.items():
        b = before.get(k, [0, 0])
        d = [v[0] - b[0], v[1] - b[1]]
        if d[0]:
            out[k] = d
    return out


def run_rollout(runner: ChunkRunner, prompts: list[list[int]], cfg: RolloutConfig, step: int = 0,
                progress: Callable[[int, int], None] | None = None,
                load_hook: Callable[[RolloutLoad], None] | None = None) -> RolloutResult:
    """Generate ``group_size`` responses per prompt on one engine (single-process driver).

    ``load_hook`` is called after every engine step with the rows the next step will run
    (``RolloutLoad``; the drafter co-trainer trains only while few are left, rl/cotrain.py)."""
    coord = Coordinator(prompts, cfg, step, [runner.capacity])
    peak = min(runner.capacity, len(coord.items))
    before = runner.counters()
    tokens0 = runner.engine.counters.generated_tokens
    shared0 = runner.engine.counters.shared_prompt_tokens
    reused0 = runner.engine.counters.reused_prefix_tokens
    try:
        while not coord.done:
            for w, work in coord.assign().items():
                for res in runner.submit(work):
                    coord.complete(w, res)
            if runner.load == 0:
                if not coord.buffer and not coord.done:
                    raise RuntimeError("rollout stalled: nothing running, nothing waiting, responses unfinished")
                continue
            finished_before = coord.num_finished
            t_step = time.perf_counter()
            for res in runner.step():
                coord.complete(0, res)
            step_seconds = time.perf_counter() - t_step
            if progress is not None and coord.num_finished != finished_before:
                progress(coord.num_finished, len(coord.items))
            if load_hook is not None:
                load_hook(RolloutLoad(active=min(runner.capacity, runner.load + len(coord.buffer)), peak=peak,
                                      step_seconds=step_seconds))
    finally:
        runner.unpin_all()
    seconds = time.perf_counter() - coord.t0
    shared = runner.engine.counters.shared_prompt_tokens - shared0
    reused = runner.engine.counters.reused_prefix_tokens - reused0
    return RolloutResult(items=coord.items, seconds=seconds, tail_seconds=coord.tail_seconds(seconds),
                         generated_tokens=runner.engine.counters.generated_tokens - tokens0,
                         prefill_tokens=coord.prefill_tokens - shared - reused,
                         reprefill_tokens=coord.reprefill_tokens, chunks=coord.chunks, moves=coord.moves,
                         by_strategy=strategy_delta(before, runner.counters()),
                         finish_order=list(coord.finish_order), shared_prompt_tokens=shared,
                         reused_prefix_tokens=reused)
