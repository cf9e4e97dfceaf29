"""What the rollout simulator generates: response lengths per group, and acceptance by drafting strategy.

Lengths come from a recorded run or from a named heavy-tailed distribution. Seer (arXiv 2511.14617) rests
on two facts about RL rollouts: lengths are heavy-tailed (a few responses run far longer than the median,
and they set the step's makespan), and responses to the same prompt have similar lengths (which is why a
group's finished probe predicts its siblings). The distributions here have both: a Gaussian copula with a
per-group term, ``z = sqrt(group) * z_group + sqrt(1 - group) * z_response``, mapped through the named
distribution's quantile function, so ``group`` is the share of (normal-score) variance siblings share.

Acceptance is tokens committed per drafting step per row, by strategy: ``suffix`` (each response drafts
from its own text and the global store) and ``grouped`` (siblings share a suffix tree, Seer's grouped
drafting) at ``draft`` tokens drafted per row per step (what verification costs). Recorded
values come from an ``onspec rl`` run's ``metrics.jsonl`` (``acceptance_by_strategy``).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from .cost import parse_params

DISTRIBUTIONS = ("lognormal", "pareto", "fixed")


def distribution_defaults(name: str) -> dict[str, float]:
    """Each distribution's parameters and their defaults (a fresh dict: callers may extend it)."""
    if name == "lognormal":
        return {"median": 256.0, "sigma": 0.8, "group": 0.5}
    if name == "pareto":
        return {"min": 64.0, "alpha": 1.5, "group": 0.5}
    if name == "fixed":
        return {"tokens": 128.0}
    raise ValueError(f"lengths: unknown distribution {name!r} (one of {DISTRIBUTIONS}, or recorded:PATH)")


@dataclass(frozen=True)
class LengthDistribution:
    """A named distribution of response lengths (tokens) with a within-group correlation."""

    name: str
    params: dict[str, float]

    def __post_init__(self) -> None:
        extra = set(self.params) - set(distribution_defaults(self.name))
        if extra:
            raise ValueError(f"lengths {self.name}: unknown parameter(s) {sorted(extra)}")
        p = self.full
        if not 0 <= p.get("group", 0) <= 1:
            raise ValueError(f"lengths {self.name}: group must be in [0, 1]")
        if min(v for k, v in p.items() if k != "group") <= 0:
            raise ValueError(f"lengths {self.name}: parameters must be > 0 ({p})")

    @property
    def full(self) -> dict[str, float]:
        return {**distribution_defaults(self.name), **self.params}

    def quantile(self, u: float) -> float:
        p = self.full
        if self.name == "lognormal":
            return p["median"] * math.exp(p["sigma"] * _normal_quantile(u))
        if self.name == "pareto":
            return p["min"] * (1.0 - u) ** (-1.0 / p["alpha"])
        return p["tokens"]

    def describe(self) -> str:
        return f"{self.name}:" + ",".join(f"{k}={v:g}" for k, v in self.full.items())


def _normal_quantile(u: float) -> float:
    """Inverse standard normal CDF by bisection on erf (accurate to ~1e-12; called once per response)."""
    lo, hi = -12.0, 12.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < u:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Workload:
    """Where lengths come from: ``groups`` (recorded, one list per prompt) or ``distribution``."""

    distribution: LengthDistribution | None = None
    groups: tuple[tuple[int, ...], ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        if (self.distribution is None) == (not self.groups):
            raise ValueError("workload: give either a distribution or recorded groups")
        if any(not g or min(g) < 1 for g in self.groups):
            raise ValueError("workload: recorded groups must be non-empty with lengths >= 1")

    def sample(self, num_groups: int, group_size: int, max_tokens: int, seed: int) -> list[list[int]]:
        """``num_groups`` lists of ``group_size`` lengths, each in [1, max_tokens]. Recorded groups are used
        in order when exactly that many were recorded with that size, else whole groups are drawn with
        replacement (keeping siblings together)."""
        rng = random.Random(seed)
        if self.groups:
            sized = [list(g) for g in self.groups if len(g) == group_size]
            if not sized:
                raise ValueError(f"workload: no recorded group has {group_size} responses (sizes: "
                                 f"{sorted({len(g) for g in self.groups})})")
            picked = sized if len(sized) == num_groups else [rng.choice(sized) for _ in range(num_groups)]
            return [[min(max_tokens, n) for n in g] for g in picked]
        dist = self.distribution
        share = dist.full.get("group", 0.0)
        out = []
        for _ in range(num_groups):
            zg = rng.gauss(0.0, 1.0)
            row = []
            for _ in range(group_size):
                z = math.sqrt(share) * zg + math.sqrt(1.0 - share) * rng.gauss(0.0, 1.0)
                u = min(1.0 - 1e-12, max(1e-12, 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))))
                row.append(max(1, min(max_tokens, round(dist.quantile(u)))))
            out.append(row)
        return out

    def describe(self) -> str:
        return self.source or (self.distribution.describe() if self.distribution else "recorded")


def parse_lengths(spec: str) -> Workload:
    """``lognormal:median=256,sigma=0.8,group=0.5`` | ``pareto:min=64,alpha=1.5`` | ``fixed:tokens=128`` |
    ``recorded:PATH`` (a JSON ``{"groups": [[...], ...]}`` or an ``onspec rl`` metrics.jsonl whose rows have
    ``response_lengths`` and ``group_size``)."""
    name, _, rest = spec.partition(":")
    if name == "recorded":
        return load_recorded(rest)
    allowed = set(distribution_defaults(name))
    return Workload(distribution=LengthDistribution(name, parse_params(rest, allowed, f"lengths {name}")))


def load_recorded(path: str) -> Workload:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"recorded lengths {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"recorded lengths {p}: cannot read it ({exc})") from None
    groups: list[tuple[int, ...]] = []
    try:
        if p.suffix == ".jsonl":
            for line in filter(None, (s.strip() for s in text.splitlines())):
                row = json.loads(line)
                lengths, size = row.get("response_lengths"), int(row.get("group_size", 0))
                if not lengths or size < 1:
                    continue
                groups.extend(tuple(int(n) for n in lengths[i:i + size]) for i in range(0, len(lengths), size))
        else:
            groups = [tuple(int(n) for n in g) for g in json.loads(text)["groups"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"recorded lengths {p}: expected {{\"groups\": [[...]]}} or JSONL rows with "
                         f"response_lengths and group_size ({exc})") from None
    if not groups:
        raise ValueError(f"recorded lengths {p}: no per-response lengths in it")
    return Workload(groups=tuple(groups), source=f"recorded: {p}")


@dataclass(frozen=True)
class Acceptance:
    """Tokens committed per drafting step per row, by strategy, when ``draft`` tokens are drafted per row.

    Each is turned into a per-token acceptance probability ``p`` (a chain draft commits
    ``1 + p + ... + p^d`` tokens in expectation), so a step can price other budgets: with ``max_draft >
    draft`` the step picks its budget among 0, ``draft`` and the powers of two up to ``max_draft``, the
    one with the most tokens per second at its cost, as Seer's adaptive grouped speculative decoding
    drafts longer when few rows are left (arXiv 2511.14617); ``max_draft = 0`` keeps it at ``draft``."""

    # grouped: about what onspec's grouped suffix drafter commits per drafting step in its RL bench
    # (bench/results/rl.json, config c: 1.57; rl_long.json: 1.48); suffix alone: assumed lower
    suffix: float = 1.2
    grouped: float = 1.5
    draft: int = 4
    max_draft: int = 0
    source: str = "defaults"

    def __post_init__(self) -> None:
        if self.suffix < 1 or self.grouped < 1:
            raise ValueError("acceptance: tokens per step must be >= 1")
        if self.draft < 1 or max(self.suffix, self.grouped) > self.draft + 1:
            raise ValueError("acceptance: draft must be >= 1 and a step commits at most draft + 1 tokens")
        if self.max_draft and self.max_draft < self.draft:
            raise ValueError("acceptance: max_draft must be 0 (fixed budget) or >= draft")

    def per_token(self, speculation: bool, grouped: bool) -> float:
        """The per-token acceptance probability of a row's strategy (0: no speculation)."""
        if not speculation:
            return 0.0
        target = self.grouped if grouped else self.suffix
        if target >= self.draft + 1:
            return 1.0
        lo, hi = 0.0, 1.0
        for _ in range(60):  # expected_tokens is increasing in p
            mid = 0.5 * (lo + hi)
            if expected_tokens(mid, self.draft) < target:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def budgets(self, speculation: bool) -> list[int]:
        """Draft budgets a step may choose from."""
        if not speculation:
            return [0]
        top = self.max_draft
        return sorted({0, self.draft} | {1 << k for k in range(top.bit_length()) if 1 << k <= top})


def expected_tokens(p: float, draft: int) -> float:
    """Tokens a step commits for a row drafting a chain of ``draft`` tokens, each accepted with ``p``."""
    if p >= 1.0:
        return draft + 1.0
    return (1.0 - p ** (draft + 1)) / (1.0 - p)


def parse_acceptance(spec: str, recorded: str = "") -> Acceptance:
    """``suffix=1.3,grouped=1.8,draft=4``; ``recorded`` (a metrics.jsonl) replaces the strategy its run used."""
    values = parse_params(spec, {"suffix", "grouped", "draft", "max_draft"}, "acceptance")
    source = f"given: {spec}" if spec else "defaults"
    if recorded:
        p = Path(recorded)
        try:
            rows = [json.loads(s) for s in p.read_text().splitlines() if s.strip()]
        except FileNotFoundError:
            raise FileNotFoundError(f"acceptance {p}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"acceptance {p}: cannot read it as JSONL ({exc})") from None
        seen = [r["acceptance_by_strategy"]["suffix"] for r in rows
                if isinstance(r, dict) and "suffix" in r.get("acceptance_by_strategy", {})]
        if not seen:
            raise ValueError(f"acceptance {p}: no step recorded suffix acceptance")
        grouped = True
        config = p.parent / "config.json"
        if config.is_file():
            grouped = bool(json.loads(config.read_text()).get("rollout", {}).get("grouped_drafting", True))
        values["grouped" if grouped else "suffix"] = sum(seen) / len(seen)
        source = f"recorded: {p} ({'grouped' if grouped else 'suffix'}, mean of {len(seen)} steps)"
    draft, max_draft = int(values.pop("draft", 4)), int(values.pop("max_draft", 0))
    return Acceptance(**values, draft=draft, max_draft=max_draft, source=source)
