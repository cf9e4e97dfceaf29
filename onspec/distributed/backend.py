"""Ray rollout backend: N actors, each owning an engine; the driver holds the buffer and the trainer.

``ray.init`` starts a local Ray (kept light: no dashboard, CPUs as given) unless ``ray_address`` names a
cluster to join. Actors reserve no CPU slot (``num_cpus=0``) so any number of them can share a small
machine; each sets its own torch thread count. After every GRPO update the trainer's weights are put in
the object store once and every worker copies them into its engine in place.
"""

from __future__ import annotations

import os

from ..rl.grpo import state_for_broadcast
from ..rl.rollout import RolloutResult
from .coordinator import run_distributed_rollout
from .worker import RolloutStats, RolloutWorker, TickResult

# How long the workers may take to build their engines (load the model, profile costs). Ray waits forever
# by default; a worker process that never comes up (out of memory, a node lost) should be an error.
WORKER_START_TIMEOUT_S = 600.0


def init_ray(address: str = "", num_cpus: int | None = None) -> bool:
    """Start or join Ray; True when this call started it (so the caller should shut it down)."""
    try:
        import ray
    except ImportError as exc:
        raise ValueError(f"workers: Ray is not installed ({exc}); pip install ray") from None
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if address:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # unreachable cluster, version mismatch: one clear line
            raise ValueError(f"ray_address: could not connect to {address!r}: {exc}") from None
        return True
    ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
             log_to_driver=False, object_store_memory=256 * 1024 * 1024,
             _system_config={"metrics_report_interval_ms": 60_000})
    return True


class RayPool:
    """``WorkerPool`` over Ray actors: ticks run concurrently, the driver reacts to the first to return."""

    def __init__(self, actors: list, capacities: list[int], max_steps: int = 4) -> None:
        self.actors = actors
        self.size = len(actors)
        self.capacities = capacities
        self.max_steps = max_steps
        self._pending: dict = {}            # future -> worker

    def begin(self) -> None:
        import ray

        ray.get([a.begin_rollout.remote() for a in self.actors])

    def send(self, worker: int, work: list, shares: list) -> None:
        fut = self.actors[worker].tick.remote(work, shares, self.max_steps)
        self._pending[fut] = worker

    def busy(self, worker: int) -> bool:
        return worker in self._pending.values()

    def wait_any(self) -> list[TickResult]:
        import ray

        if not self._pending:
            return []
        ready, _ = ray.wait(list(self._pending), num_returns=1)
        out = []
        for fut in ready:
            self._pending.pop(fut)
            out.append(ray.get(fut))
        return out

    def end(self) -> list[RolloutStats]:
        import ray

        return ray.get([a.end_rollout.remote() for a in self.actors])


class RayBackend:
    """``RolloutBackend`` with ``cfg.workers`` Ray actors."""

    def __init__(self, cfg) -> None:
        import ray

        self._started = init_ray(cfg.ray_address, num_cpus=max(2, cfg.workers))
        actor_cls = ray.remote(num_cpus=0)(RolloutWorker)
        self.actors = [actor_cls.remote(cfg, i) for i in range(cfg.workers)]
        try:
            capacities = ray.get([a.ready.remote() for a in self.actors], timeout=WORKER_START_TIMEOUT_S)
        except Exception as exc:  # a worker failed to build its engine, or never came up: surface the cause
            self.close()
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                exc = f"not ready after {WORKER_START_TIMEOUT_S:g} s"
            raise ValueError(f"workers: a rollout worker failed to start: {exc}") from None
        self.cfg = cfg
        self.pool = RayPool(self.actors, capacities)

    def rollout(self, prompts: list[list[int]], step: int, progress=None) -> RolloutResult:
        return run_distributed_rollout(self.pool, prompts, self.cfg.rollout, step, progress)

    def sync_weights(self, policy) -> None:
        import ray

        ref = ray.put(state_for_broadcast(policy))
        ray.get([a.load_weights.remote(ref) for a in self.actors])

    def fingerprints(self) -> list[float]:
        import ray

        return ray.get([a.fingerprint.remote() for a in self.actors])

    def close(self) -> None:
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if getattr(self, "_started", False):
            ray.shutdown()
            self._started = False
