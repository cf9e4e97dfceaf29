"""A rollout worker: one engine that runs the chunks the coordinator hands it.

A plain class, so it can be unit-tested in process; ``distributed/backend.py`` wraps it as a Ray actor. The
protocol is a *tick*: the coordinator sends new chunks and sibling text to share, the worker runs engine
steps until at least one chunk finishes (or ``max_steps`` pass) and returns what finished plus its load.
Ticks keep every worker busy without a thread per worker and let the coordinator rebalance between them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..rl.rollout import ChunkResult, ChunkRunner, WorkItem, strategy_delta


@dataclass
class TickResult:
    worker: int
    results: list[ChunkResult]
    load: int                                   # chunks still running here
    steps: int                                  # engine steps taken in this tick


@dataclass
class RolloutStats:
    generated_tokens: int = 0
    by_strategy: dict[str, list[int]] = field(default_factory=dict)
    steps: int = 0
    shared_prompt_tokens: int = 0    # prompt cache rows copied from a sibling instead of prefilled
    reused_prefix_tokens: int = 0    # context cache rows a chunk found in its slot instead of prefilling


class RolloutWorker:
    def __init__(self, cfg, index: int = 0) -> None:
        import torch

        from ..rl.loop import build_engine

        torch.set_num_threads(cfg.threads or 1)
        self.index = index
        self.cfg = cfg
        self.engine = build_engine(cfg)
        self.runner = ChunkRunner(self.engine, cfg.rollout)
        self._before: dict[str, list[int]] = {}
        self._tokens0 = 0
        self._steps0 = 0

    def ready(self) -> int:
        return self.runner.capacity

    def begin_rollout(self) -> None:
        self._before = self.runner.counters()
        self._tokens0 = self.engine.counters.generated_tokens
        self._steps0 = self.engine.counters.steps
        self._shared0 = self.engine.counters.shared_prompt_tokens
        self._reused0 = self.engine.counters.reused_prefix_tokens

    def tick(self, work: list[WorkItem], shares: list[tuple[str, object, list[int]]],
             max_steps: int = 8) -> TickResult:
        for group_id, key, tokens in shares:
            self.runner.share(group_id, key, tokens)
        results = self.runner.submit(work)
        steps = 0
        while self.runner.load and steps < max_steps and not results:
            results.extend(self.runner.step())
            steps += 1
        return TickResult(self.index, results, self.runner.load, steps)

    def end_rollout(self) -> RolloutStats:
        self.runner.unpin_all()
        return RolloutStats(generated_tokens=self.engine.counters.generated_tokens - self._tokens0,
                            by_strategy=strategy_delta(self._before, self.runner.counters()),
                            steps=self.engine.counters.steps - self._steps0,
                            shared_prompt_tokens=self.engine.counters.shared_prompt_tokens - self._shared0,
                            reused_prefix_tokens=self.engine.counters.reused_prefix_tokens - self._reused0)

    def load_weights(self, state: dict) -> int:
        from ..rl.grpo import load_broadcast

        load_broadcast(self.engine.loaded.model, state)
        return self.index

    def fingerprint(self) -> float:
        """A cheap checksum of the engine's weights (tests compare workers with the trainer)."""
        return float(sum(p.double().sum() for p in self.engine.loaded.model.parameters()))
