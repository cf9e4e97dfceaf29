"""What one engine step costs in the rollout simulator: seconds as a function of rows and tokens.

A step of a worker runs ``rows`` sequences through the target model and computes ``tokens`` tokens in all
(one per decoding row, ``1 + draft`` per drafting row, a prompt's share for a prefilling row). Two models:

* ``TableCost``: a measured table read through onspec's own ``StepCostModel`` (``onspec/speculation/controller.py``),
  the curve the speculation controller budgets drafts with, so the simulator prices a step exactly as the
  controller does: a ``plain`` curve (every row one token) and a ``masked`` one (draft trees or prefill).
  It comes from a cost table file (JSON, with a ``source`` line saying where the figures come from, e.g.
  a GPU's measured step times) or from ``measure_cost``, which runs onspec's start-up profile
  (``profile_costs``) on this machine.
* ``LinearCost``: ``fixed + per_row * rows + per_token * tokens``, stated in the command line; for hand
  checks and for "what if" questions (a GPU step is nearly flat in tokens: small ``per_token``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

KINDS = ("plain", "masked")


class StepCost(Protocol):
    """Seconds per engine step; ``source`` says where the figures come from (printed and saved)."""

    source: str

    def seconds(self, rows: int, tokens: int) -> float: ...


@dataclass(frozen=True)
class LinearCost:
    fixed: float = 0.02
    per_row: float = 0.0
    per_token: float = 0.001
    source: str = "linear model given on the command line"

    def __post_init__(self) -> None:
        if min(self.fixed, self.per_row, self.per_token) < 0 or self.fixed + self.per_row + self.per_token <= 0:
            raise ValueError("cost: linear terms must be >= 0 and not all 0")

    def seconds(self, rows: int, tokens: int) -> float:
        return self.fixed + self.per_row * rows + self.per_token * tokens


@dataclass
class TableCost:
    """Measured seconds per forward by tokens in the forward, one curve per kind (see ``StepCostModel``)."""

    tables: dict[str, dict[int, float]]
    source: str
    _model: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from ...speculation.controller import StepCostModel

        if not any(self.tables.get(k) for k in KINDS):
            raise ValueError("cost table: no figures (need a 'plain' or 'masked' table of tokens -> seconds)")
        model = StepCostModel()
        for kind in KINDS:
            for tokens, secs in sorted(self.tables.get(kind, {}).items()):
                model.observe(int(tokens), float(secs), kind, prior=True)
        self._model = model

    def seconds(self, rows: int, tokens: int) -> float:
        return self._model.cost(tokens, "plain" if tokens <= rows else "masked")

    def to_dict(self) -> dict:
        return {"source": self.source, **{k: {str(t): s for t, s in sorted(v.items())} for k, v in self.tables.items()}}


def load_cost_table(path: str | Path) -> TableCost:
    """A cost table file: ``{"source": "...", "plain": {"1": s, "8": s}, "masked": {"16": s}}`` (tokens in
    the forward -> seconds). ``source`` is required: a figure without its origin cannot be judged."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"cost table {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cost table {p}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"cost table {p}: not JSON ({exc})") from None
    if not isinstance(raw, dict) or not str(raw.get("source", "")).strip():
        raise ValueError(f"cost table {p}: needs a JSON object with a non-empty 'source' saying where the "
                         f"figures come from")
    tables: dict[str, dict[int, float]] = {}
    for kind in KINDS:
        entries = raw.get(kind, {})
        if not isinstance(entries, dict):
            raise ValueError(f"cost table {p}: '{kind}' must map tokens to seconds")
        try:
            tables[kind] = {int(t): float(s) for t, s in entries.items()}
        except (TypeError, ValueError):
            raise ValueError(f"cost table {p}: '{kind}' must map whole token counts to seconds") from None
        if any(t < 1 or s <= 0 for t, s in tables[kind].items()):
            raise ValueError(f"cost table {p}: '{kind}' needs tokens >= 1 and seconds > 0")
    return TableCost(tables=tables, source=str(raw["source"]))


def measure_cost(model: str = "default", dtype: str = "float32", threads: int = 0, max_num_seqs: int = 64,
                 context: int = 128, repeats: int = 2, live_steps: int = 4,
                 rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> TableCost:
    """onspec's cost profile on this machine, as the speculation controller builds it: ``profile_costs``
    times bare decoding and verification forwards of ``rows`` rows over ``context`` cached tokens each;
    then ``live_steps`` whole engine steps per row count (requests decoding, sampling and bookkeeping
    included) are observed as live steps, which replace the profile where both measured and scale the
    rest (``StepCostModel.prior_scale``). Bare forwards alone under-price a step: a live step also pays
    for scheduling, sampling and cache work around the forward."""
    import os
    import platform

    import torch

    from ...config import EngineConfig, SpecConfig
    from ...engine.engine import Engine
    from ...speculation.controller import Controller, profile_costs

    if threads:
        torch.set_num_threads(threads)
    cfg = EngineConfig(model=model, dtype=dtype, max_num_seqs=max_num_seqs, num_threads=threads,
                       spec=SpecConfig(mode="auto", profile_at_start=False))
    # A controller of its own, not attached: the engine decodes plain steps, and only the steps timed here
    # reach the cost model (an attached controller would draft and time every step itself).
    engine = Engine(cfg)
    controller = Controller(cfg.spec)
    profile_costs(engine, controller, rows=rows, context=context, repeats=repeats)
    cost = controller.cost
    if live_steps:
        _observe_live_steps(engine, cost, rows, context, live_steps)
    # the curve the controller reads (live where measured, scaled profile elsewhere), at each bucket's size
    tables = {k: {round(cost.sizes[k][b]): cost.cost(round(cost.sizes[k][b]), k) for b in sorted(cost.tables[k])}
              for k in KINDS}
    source = (f"onspec profile_costs on this machine: model {model}, {dtype}, {torch.get_num_threads()} threads, "
              f"{context} cached tokens per row, {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores")
    return TableCost(tables=tables, source=source)


def _observe_live_steps(engine, cost, rows: tuple[int, ...], context: int, steps: int) -> None:
    """Time ``steps`` plain decoding engine steps at each row count (``ignore_eos`` keeps every row)."""
    import time

    from ...engine.sampler import SamplingParams

    prompt = [100 + i % 1000 for i in range(context)]
    for b in rows:
        if b > engine.cfg.max_num_seqs:
            break
        rids = [f"cost-probe-{b}-{i}" for i in range(b)]
        params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
        for rid in rids:
            engine.add_request(rid, prompt, params)
        seqs = [engine.requests[rid][0] for rid in rids]
        while any(not s.output_ids for s in seqs):  # prefill (and the first token)
            engine.step()
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            cost.observe(b, time.perf_counter() - t0, "plain")
        for rid in rids:
            engine.abort(rid)


def parse_cost(spec: str, model: str = "default", dtype: str = "float32", threads: int = 0) -> StepCost:
    """``measure`` | ``linear:fixed=F,per_row=R,per_token=T`` | a cost table file path."""
    if spec == "measure":
        return measure_cost(model, dtype, threads)
    if spec.startswith("linear"):
        name, _, params = spec.partition(":")
        if name != "linear":
            raise ValueError(f"cost: unknown model {name!r} (use 'measure', 'linear:...' or a file)")
        values = parse_params(params, {"fixed", "per_row", "per_token"}, "cost linear")
        return LinearCost(**values, source=f"linear model: {spec}")
    return load_cost_table(spec)


def parse_params(text: str, allowed: set[str], what: str) -> dict[str, float]:
    """``a=1,b=2`` -> {"a": 1.0, "b": 2.0}, only keys in ``allowed``."""
    out: dict[str, float] = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise ValueError(f"{what}: bad parameter {part!r} (expected KEY=VALUE with KEY in {sorted(allowed)})")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"{what}: {key}={value!r} is not a number") from None
    return out
