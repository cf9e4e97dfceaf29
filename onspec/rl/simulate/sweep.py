"""Run rollout policies over cluster sizes: the grid ``onspec simulate-rollout`` reports.

Policies are named by what they add to a baseline, e.g. ``fifo``, ``seer``, ``seer+divided``,
``seer+divided+grouped``: ``fifo`` / ``seer`` pick the real scheduler's order (``RolloutConfig.schedule``:
first in first out, or Seer's probe-first / longest-estimate-first, arXiv 2511.14617), ``divided`` sets
the divided rollout's chunk size, ``suffix`` turns drafting on with each response drafting alone and
``grouped`` with siblings sharing a suffix tree (Seer's grouped drafting). Every policy at a given N
runs the same sampled lengths (the same seed), so the differences are the policies'.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..rollout import RolloutConfig
from .cost import StepCost
from .events import Cluster, Policy, SimResult, simulate
from .workload import Acceptance, Workload

DEFAULT_POLICIES = ("fifo", "seer", "seer+divided", "seer+divided+suffix", "seer+divided+grouped")
MODIFIERS = ("divided", "suffix", "grouped")


def make_policy(name: str, base: RolloutConfig, chunk_tokens: int) -> Policy:
    """``fifo`` | ``seer``, then any of ``+divided``, ``+suffix``, ``+grouped``."""
    schedule, *mods = name.split("+")
    if schedule not in ("fifo", "seer") or any(m not in MODIFIERS for m in mods) or len(set(mods)) < len(mods):
        raise ValueError(f"policy {name!r}: expected fifo|seer followed by any of +{', +'.join(MODIFIERS)}")
    if "suffix" in mods and "grouped" in mods:
        raise ValueError(f"policy {name!r}: suffix and grouped are alternatives")
    if "divided" in mods and chunk_tokens < 1:
        raise ValueError(f"policy {name!r}: divided rollout needs chunk_tokens >= 1")
    cfg = replace(base, schedule=schedule, chunk_tokens=chunk_tokens if "divided" in mods else 0,
                  grouped_drafting="grouped" in mods)
    return Policy(name=name, rollout=cfg, speculation="suffix" in mods or "grouped" in mods)


@dataclass(frozen=True)
class SweepConfig:
    workers: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    policies: tuple[str, ...] = DEFAULT_POLICIES
    prompts_per_worker: int = 4       # groups per worker (weak scaling); 0: ``prompts`` in all
    prompts: int = 0
    group_size: int = 8
    max_tokens: int = 4096
    chunk_tokens: int = 256
    capacity: int = 16
    prompt_tokens: int = 128
    prefill_budget: int = 512
    slots: int = 64
    prefix_reuse: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.workers or min(self.workers) < 1:
            raise ValueError(f"workers: every count must be >= 1 (got {list(self.workers)})")
        if (self.prompts_per_worker < 1) == (self.prompts < 1):
            raise ValueError("give exactly one of prompts_per_worker >= 1 or prompts >= 1")
        if not self.policies:
            raise ValueError("policies: need at least one")
        if self.chunk_tokens < 0:
            raise ValueError("chunk_tokens: must be >= 0")

    def base_rollout(self) -> RolloutConfig:
        return RolloutConfig(group_size=self.group_size, max_tokens=self.max_tokens, seed=self.seed)

    def groups(self, workers: int) -> int:
        return self.prompts or self.prompts_per_worker * workers


@dataclass
class Sweep:
    config: SweepConfig
    results: list[SimResult] = field(default_factory=list)
    lengths: dict[int, list[list[int]]] = field(default_factory=dict)   # workers -> the lengths it ran

    def result(self, policy: str, workers: int) -> SimResult:
        return next(r for r in self.results if r.policy == policy and r.workers == workers)

    def versus(self, policy: str, workers: int, baseline: str) -> dict[str, float]:
        """Throughput ratio (baseline makespan over this one's) and tail reduction against ``baseline``."""
        r, b = self.result(policy, workers), self.result(baseline, workers)
        return {"speedup": b.makespan / r.makespan if r.makespan else 0.0,
                "tail_reduction": 1.0 - r.tail / b.tail if b.tail else 0.0}


def run_sweep(cfg: SweepConfig, workload: Workload, cost: StepCost, acceptance: Acceptance,
              progress: Callable[[str, int], None] | None = None) -> Sweep:
    base = cfg.base_rollout()
    policies = [make_policy(name, base, cfg.chunk_tokens) for name in cfg.policies]
    sweep = Sweep(cfg)
    for n in cfg.workers:
        lengths = workload.sample(cfg.groups(n), cfg.group_size, cfg.max_tokens, cfg.seed + n)
        sweep.lengths[n] = lengths
        cluster = Cluster(workers=n, capacity=cfg.capacity, prompt_tokens=cfg.prompt_tokens,
                          prefill_budget=cfg.prefill_budget, slots=max(cfg.slots, cfg.capacity),
                          prefix_reuse=cfg.prefix_reuse)
        for policy in policies:
            sweep.results.append(simulate(policy, cluster, lengths, cost, acceptance))
            if progress is not None:
                progress(policy.name, n)
    return sweep


def length_stats(lengths: list[list[int]], max_tokens: int) -> dict[str, float]:
    """p50, p90, p99, max and the share cut at ``max_tokens`` (a cap flattens the tail)."""
    flat = sorted(n for g in lengths for n in g)
    if not flat:
        return {}

    def pct(q: float) -> float:
        return float(flat[min(len(flat) - 1, int(q * len(flat)))])

    p50 = pct(0.5)
    return {"responses": len(flat), "mean": sum(flat) / len(flat), "p50": p50, "p90": pct(0.9),
            "p99": pct(0.99), "max": float(flat[-1]), "p99_over_p50": pct(0.99) / p50 if p50 else 0.0,
            "cut_share": sum(n >= max_tokens for n in flat) / len(flat)}
