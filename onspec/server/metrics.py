"""What the server measures: Prometheus metrics, a live speedup estimate, and the dashboard's time series.

* ``SpeedupMeter`` (an engine event subscriber, runs on the engine thread) estimates, step by step, what plain
  decoding would have spent to commit the same tokens, from that step's own measured time and the
  controller's measured cost model (TLT's adaptive-speculation accounting, arXiv 2511.16665):
  a step of ``t`` tokens with ``d`` draft nodes and ``B`` decoding rows that accepted ``a`` draft tokens
  took ``s`` seconds (+ drafting). Plain decoding runs the same step without the ``d`` nodes
  (``s * cost(t-d)/cost(t)``) and then needs ``a/B`` more steps of ``B`` rows (``s * cost(B)/cost(t)``
  each) to commit the ``a`` extra tokens. Speedup over a window = plain seconds / spent seconds.
  Scaling the measured ``s`` by cost ratios, not using ``cost()`` alone, cancels the model's bias.
* ``ServerMetrics``: a private Prometheus registry (no global state) with request/latency metrics the app
  updates and a collector that reads the engine snapshot and the online learner's status at scrape time.
* ``SeriesRecorder``: one point per second in a ring buffer (rates from counter differences) plus drafter
  events, served as JSON to the dashboard.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.events import EngineObserver
from ..engine.step import StepResult
from .bridge import EngineSnapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class SpeedupMeter(EngineObserver):
    """Engine event subscriber: accumulates spent and plain-equivalent seconds, records the step size."""

    def __init__(self, step_histogram: Histogram | None = None, engine=None) -> None:
        self.engine = engine  # whose counters and cost model a step's figures are read from
        self.step_histogram = step_histogram
        self.plain_seconds = 0.0
        self.spec_seconds = 0.0
        self.last_batch = 0
        self.last_tokens = 0
        self._prev = (0, 0, 0.0)   # counters.drafted, counters.accepted, spec.draft_seconds

    def on_step(self, result: StepResult) -> None:
        self.observe(self.engine, result)

    def observe(self, engine, result: StepResult) -> None:
        seconds = result.seconds
        self.last_batch, self.last_tokens = result.rows, result.tokens
        if self.step_histogram is not None:
            self.step_histogram.observe(seconds)
        c = engine.counters
        spec = engine.spec
        draft_s = spec.draft_seconds if spec is not None else 0.0
        drafted = c.drafted - self._prev[0]
        accepted = c.accepted - self._prev[1]
        draft_dt = draft_s - self._prev[2]
        self._prev = (c.drafted, c.accepted, draft_s)
        spent = seconds + draft_dt
        decode = result.num_decode
        if spec is None or drafted <= 0 or decode <= 0:
            plain = seconds
        else:
            cost = spec.controller.cost.cost
            tokens = self.last_tokens
            full = max(cost(tokens), 1e-9)
            # A forward over fewer tokens is never slower, so both ratios are capped at 1: the estimate can
            # never exceed the step's acceptance length, whatever noise the cost model holds.
            plain = seconds * min(1.0, cost(max(1, tokens - drafted), "plain" if tokens - drafted <= decode
                                             else "masked") / full)
            plain += (accepted / decode) * seconds * min(1.0, cost(decode, "plain") / full)
        self.plain_seconds += plain
        self.spec_seconds += spent


@dataclass
class SeriesPoint:
    t: float                      # unix time (seconds)
    tokens_per_s: float           # committed (generated) tokens per second
    prompt_tokens_per_s: float
    acceptance: float             # tokens per target forward while decoding (0: no decoding this second)
    acceptance_by_strategy: dict[str, float]
    speedup: float                # estimated against plain decoding (SpeedupMeter); 0: no decoding
    queue: int                    # sequences waiting
    running: int                  # sequences decoding
    batch: float                  # mean rows per step this second
    steps_per_s: float
    requests_per_s: float
    drafter_version: Any = None
    trainer_speedup: float | None = None   # the online learner's own measured figure, if it reports one


@dataclass
class _Prev:
    snap: EngineSnapshot
    requests: int


@dataclass
class SeriesRecorder:
    """Per-second points in a bounded ring buffer, drafter events (swap, promote, rollback), and the draft
    policy's counts as of the latest sample (``DraftCounts.summary``: steps by reason, strategies by gate)."""

    maxlen: int = 900
    points: collections.deque = field(default_factory=collections.deque)
    events: collections.deque = field(default_factory=lambda: collections.deque(maxlen=500))
    draft_policy: dict = field(default_factory=lambda: {"steps": {}, "strategies": {}})
    _prev: _Prev | None = None
    _seen_events: set = field(default_factory=set)

    def sample(self, snap: EngineSnapshot, requests_total: int, status: dict | None, now: float | None = None
               ) -> SeriesPoint | None:
        now = time.time() if now is None else now
        prev, self._prev = self._prev, _Prev(snap, requests_total)
        self._ingest_events(status)
        self.draft_policy = snap.draft_policy
        if prev is None:
            return None
        dt = max(1e-3, snap.time - prev.snap.time) if snap.time > prev.snap.time else max(1e-3, now - prev.snap.time)
        p = prev.snap
        steps = snap.decode_steps_seq - p.decode_steps_seq
        acc = (snap.accepted - p.accepted + steps) / steps if steps > 0 else 0.0
        by = {}
        for name, (st, com) in snap.by_strategy.items():
            st0, com0 = p.by_strategy.get(name, (0, 0))
            if st - st0 > 0:
                by[name] = (com - com0) / (st - st0)
        spent = snap.spec_seconds - p.spec_seconds
        speedup = (snap.plain_seconds_est - p.plain_seconds_est) / spent if spent > 1e-6 and steps > 0 else 0.0
        nsteps = snap.steps - p.steps
        # mean batch over the window: decode rows + prefill rows ~ seq-steps / steps (decode rows dominate)
        batch = steps / nsteps if nsteps > 0 else 0.0
        live = (status or {}).get("live") or {}
        point = SeriesPoint(
            t=round(now, 3), tokens_per_s=(snap.generated_tokens - p.generated_tokens) / dt,
            prompt_tokens_per_s=(snap.prompt_tokens - p.prompt_tokens) / dt, acceptance=acc,
            acceptance_by_strategy=by, speedup=speedup, queue=snap.waiting, running=snap.running, batch=batch,
            steps_per_s=nsteps / dt, requests_per_s=(requests_total - prev.requests) / dt,
            drafter_version=(status or {}).get("version"),
            trainer_speedup=_num(live.get("speedup")))
        self.points.append(point)
        while len(self.points) > self.maxlen:
            self.points.popleft()
        return point

    def add_event(self, kind: str, version: Any = None, detail: str = "", t: float | None = None) -> None:
        self.events.append({"t": round(time.time() if t is None else t, 3), "kind": kind, "version": version,
                            "detail": detail})

    def _ingest_events(self, status: dict | None) -> None:
        """Events reported by the online learner (swap, reject, rollback ...), each recorded once."""
        for ev in (status or {}).get("events") or []:
            if not isinstance(ev, dict):
                continue
            key = (ev.get("t") or ev.get("time"), ev.get("kind"), str(ev.get("version")))
            if key in self._seen_events:
                continue
            self._seen_events.add(key)
            t = _num(ev.get("t") or ev.get("time"))
            kind, version = str(ev.get("kind", "event")), ev.get("version")
            if t is not None and any(e["kind"] == kind and str(e["version"]) == str(version)
                                     and abs(e["t"] - t) < 10 for e in self.events):
                continue  # the same promote/rollback the server already recorded for an admin request
            self.add_event(kind, version, str(ev.get("detail", "")), t)

    def to_json(self, since: float = 0.0) -> dict:
        pts = [asdict(p) for p in self.points if p.t > since]
        evs = [e for e in self.events if e["t"] > since]
        return {"points": pts, "events": evs, "draft_policy": self.draft_policy}


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


class _EngineCollector:
    """Reads the latest engine snapshot and learner status when Prometheus scrapes."""

    def __init__(self, metrics: "ServerMetrics") -> None:
        self.m = metrics

    def collect(self):
        snap: EngineSnapshot = self.m.snapshot_fn()
        status = self.m.status_fn() or {}

        def gauge(name, doc, value, labels=None, label_values=None):
            g = GaugeMetricFamily(name, doc, labels=labels)
            if labels:
                for lv, v in value:
                    g.add_metric(lv, v)
            else:
                g.add_metric([], value)
            return g

        def counter(name, doc, value, labels=None):
            c = CounterMetricFamily(name, doc, labels=labels)
            if labels:
                for lv, v in value:
                    c.add_metric(lv, v)
            else:
                c.add_metric([], value)
            return c

        yield counter("onspec_prompt_tokens", "Prompt tokens prefilled", snap.prompt_tokens)
        yield counter("onspec_reused_prefix_tokens", "Prompt tokens whose cache rows a freed slot still held "
                      "(prefix reuse: not prefilled)", snap.reused_prefix_tokens)
        yield counter("onspec_generation_tokens", "Tokens generated (committed)", snap.generated_tokens)
        yield counter("onspec_engine_steps", "Target forwards", snap.steps)
        yield counter("onspec_engine_forward_seconds", "Seconds spent in target forwards", snap.forward_seconds)
        yield counter("onspec_engine_prefill_seconds", "Seconds of target forwards that prefilled prompt rows",
                      snap.prefill_seconds)
        yield counter("onspec_draft_tokens", "Draft tokens sent to verification", snap.drafted)
        yield counter("onspec_accepted_draft_tokens", "Draft tokens accepted", snap.accepted)
        yield counter("onspec_preemptions", "Sequences preempted (recomputed later)", snap.preemptions)
        yield gauge("onspec_queue_depth", "Sequences waiting for a cache slot", snap.waiting)
        yield gauge("onspec_running_sequences", "Sequences holding a cache slot", snap.running)
        yield gauge("onspec_cache_slots_free", "Free KV cache slots", snap.free_slots)
        yield gauge("onspec_batch_size", "Rows in the latest engine step", snap.last_batch)
        yield gauge("onspec_inflight_sequences", "Sequences admitted by the server (running + queued)",
                    self.m.outstanding_fn())
        steps = snap.decode_steps_seq
        yield gauge("onspec_acceptance_length", "Tokens committed per target forward while decoding (all)",
                    (snap.accepted + steps) / steps if steps else 0.0)
        yield gauge("onspec_acceptance_length_by_strategy",
                    "Tokens committed per target forward, by the strategy that drafted the step",
                    [([k], com / st if st else 0.0) for k, (st, com) in snap.by_strategy.items()], ["strategy"])
        yield counter("onspec_strategy_steps", "Sequence-steps decoded, by strategy",
                      [([k], st) for k, (st, _) in snap.by_strategy.items()], ["strategy"])
        yield counter("onspec_strategy_committed_tokens", "Tokens committed, by strategy",
                      [([k], com) for k, (_, com) in snap.by_strategy.items()], ["strategy"])
        yield counter("onspec_draft_policy_steps", "Decoding steps by how the draft policy ended them: drafted, "
                      "or the gate that kept them plain (speculation/policy.py)",
                      [([reason], n) for reason, n in snap.draft_policy["steps"].items()], ["reason"])
        yield counter("onspec_draft_policy_strategy_skips", "Decoding steps a strategy was not asked in, by the "
                      "draft policy's gate that closed it",
                      [([name, gate], n) for name, gates in snap.draft_policy["strategies"].items()
                       for gate, n in gates.items()], ["strategy", "gate"])
        spent = snap.spec_seconds
        yield gauge("onspec_estimated_speedup", "Plain-decoding seconds / spent seconds since start (estimate)",
                    snap.plain_seconds_est / spent if spent > 0 else 1.0)
        version = _num(status.get("version"))
        yield gauge("onspec_drafter_version", "Live learned-drafter version (0: none)", version or 0.0)
        yield counter("onspec_drafter_promotions", "Drafter versions promoted", _num(status.get("promotions")) or 0)
        yield counter("onspec_drafter_rollbacks", "Drafter rollbacks", _num(status.get("rollbacks")) or 0)
        yield counter("onspec_trainer_steps", "Drafter trainer optimisation steps",
                      _num(status.get("trainer_steps")) or 0)
        yield gauge("onspec_online_learning", "1 when the online drafter learner is running",
                    1.0 if self.m.learning_fn() else 0.0)


class ServerMetrics:
    """The server's own Prometheus registry and the instruments the app updates."""

    def __init__(self, snapshot_fn, status_fn, outstanding_fn, learning_fn) -> None:
        self.snapshot_fn = snapshot_fn
        self.status_fn = status_fn
        self.outstanding_fn = outstanding_fn
        self.learning_fn = learning_fn
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("onspec_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.rejected = Counter("onspec_requests_rejected", "Requests refused because the server was full",
                                registry=r)
        self.disconnects = Counter("onspec_client_disconnects", "Requests aborted because the client left",
                                   registry=r)
        self.request_seconds = Histogram("onspec_request_seconds", "End-to-end generation request time",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("onspec_time_to_first_token_seconds", "Time to the first generated token",
                              ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.step_seconds = Histogram("onspec_step_seconds", "Engine step (target forward) time",
                                      buckets=STEP_BUCKETS, registry=r)
        r.register(_EngineCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)
