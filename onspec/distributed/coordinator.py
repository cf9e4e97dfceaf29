"""The multi-worker rollout driver: a global buffer (``rl.rollout.Coordinator``) feeding N workers.

Each worker runs ticks (see ``distributed/worker.py``). Whenever a tick returns, its finished chunks go back to
the coordinator (finished responses are done; continuing ones re-enter the buffer), the buffer is handed
out again in Seer order to the least-loaded workers with room, and that worker's next tick is sent with
its new chunks. A continuation chunk may land on another worker (Seer's divided rollout); without a
shared KV pool it is re-prefilled there, which ``RolloutResult.moves`` and ``reprefill_tokens`` count.

Group suffix trees are shared through the coordinator: the tokens of every finished chunk are queued for
every *other* worker and delivered with its next tick, so a worker drafting for sibling B sees what
sibling A produced elsewhere (at chunk granularity; within a worker, siblings share at every commit).

``WorkerPool`` abstracts how ticks run: ``LocalPool`` calls in-process workers synchronously (tests,
debugging); ``dist.backend.RayPool`` sends them to Ray actors and waits for whichever returns first.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

from ..rl.rollout import Coordinator, RolloutConfig, RolloutResult
from .worker import RolloutStats, RolloutWorker, TickResult


class WorkerPool(Protocol):
    size: int
    capacities: list[int]

    def begin(self) -> None: ...

    def send(self, worker: int, work: list, shares: list) -> None: ...

    def wait_any(self) -> list[TickResult]: ...

    def busy(self, worker: int) -> bool: ...

    def end(self) -> list[RolloutStats]: ...


class LocalPool:
    """In-process workers, ticked synchronously (deterministic; for tests and single-machine debugging)."""

    def __init__(self, workers: list[RolloutWorker], max_steps: int = 4) -> None:
        self.workers = workers
        self.size = len(workers)
        self.capacities = [w.ready() for w in workers]
        self.max_steps = max_steps
        self._pending: dict[int, TickResult] = {}

    def begin(self) -> None:
        for w in self.workers:
            w.begin_rollout()

    def send(self, worker: int, work: list, shares: list) -> None:
        self._pending[worker] = self.workers[worker].tick(work, shares, self.max_steps)

    def busy(self, worker: int) -> bool:
        return worker in self._pending

    def wait_any(self) -> list[TickResult]:
        out = list(self._pending.values())
        self._pending.clear()
        return out

    def end(self) -> list[RolloutStats]:
        return [w.end_rollout() for w in self.workers]


def run_distributed_rollout(pool: WorkerPool, prompts: list[list[int]], cfg: RolloutConfig, step: int = 0,
                            progress: Callable[[int, int], None] | None = None) -> RolloutResult:
    coord = Coordinator(prompts, cfg, step, list(pool.capacities))
    pool.begin()
    queued: dict[int, list] = {w: [] for w in range(pool.size)}
    shares: dict[int, list] = {w: [] for w in range(pool.size)}
    running = [0] * pool.size                      # chunks live on each worker (as last reported)
    while not coord.done:
        for w, work in coord.assign().items():
            queued[w].extend(work)
        sent = False
        for w in range(pool.size):
            if pool.busy(w) or not (queued[w] or running[w]):
                continue
            pool.send(w, queued[w], shares[w])
            running[w] += len(queued[w])
            queued[w], shares[w] = [], []
            sent = True
        if not sent and not any(pool.busy(w) for w in range(pool.size)):
            raise RuntimeError("rollout stalled: no worker has work but responses are unfinished")
        for tick in pool.wait_any():
            running[tick.worker] = tick.load
            before = coord.num_finished
            for res in tick.results:
                coord.complete(tick.worker, res)
                if cfg.grouped_drafting and res.tokens:
                    it = coord.item(res.key)
                    for o in range(pool.size):
                        if o != tick.worker:
                            shares[o].append((it.group_id, (res.key, it.chunks), list(res.tokens)))
            if progress is not None and coord.num_finished != before:
                progress(coord.num_finished, len(coord.items))
    stats = pool.end()
    seconds = time.perf_counter() - coord.t0
    by_strategy: dict[str, list[int]] = {}
    for st in stats:
        for k, v in st.by_strategy.items():
            acc = by_strategy.setdefault(k, [0, 0])
            acc[0] += v[0]
            acc[1] += v[1]
    shared = sum(s.shared_prompt_tokens for s in stats)  # counted in coord.prefill_tokens, not computed
    reused = sum(s.reused_prefix_tokens for s in stats)  # the same
    return RolloutResult(items=coord.items, seconds=seconds, tail_seconds=coord.tail_seconds(seconds),
                         generated_tokens=sum(s.generated_tokens for s in stats),
                         prefill_tokens=coord.prefill_tokens - shared - reused,
                         reprefill_tokens=coord.reprefill_tokens, chunks=coord.chunks, moves=coord.moves,
                         by_strategy=by_strategy, finish_order=list(coord.finish_order),
                         shared_prompt_tokens=shared, reused_prefix_tokens=reused)
