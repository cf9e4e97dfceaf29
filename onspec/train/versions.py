"""Which drafter version serves, and every decision about versions: ``VersionManager``.

One thread owns the manager's state: the engine thread, between two steps (the online learner's step
subscriber, and the admin routes, which the server runs there too). The background poller only *judges*:
``judge(version)`` loads, validates and gates a candidate (CPU work off the step loop) and returns a
``Judgement``, which it ``post`` s. The owner takes posted judgements (``take_results``) and records them:
statuses, the decision log, counters, and an approved swap, which it applies at once (``apply_pending``),
so requests in flight continue with the new drafter at their next step (the proposer rebuilds its
per-sequence caches lazily). The lock guards only what crosses threads: the posted judgements and the
serving version the poller judges against.

Decisions are kept in memory and written to ``state.json`` by ``persist`` (publish.py's ``VersionState``),
apart from the decision itself: the owner persists once per batch of decisions.

The evidence (``load_candidate``, ``Gate``, ``HeldoutWindow``, ``LiveMonitor``) is in swap.py.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import TrainerConfig
from .publish import Manifest, VersionError, VersionState, list_versions, prune_versions, read_manifest, version_dir
from .swap import CandidateError, Gate, HeldoutWindow, LiveMonitor, load_candidate

log = logging.getLogger("onspec.train")


class VersionStatus(str, enum.Enum):
    """Where a version stands (``versions()`` reports the value)."""

    SERVING = "serving"
    PROMOTED = "promoted"          # served before, in the promotion history
    CANDIDATE = "candidate"        # published, not judged yet
    WAITING = "waiting"            # judged, but the held-out window holds too little evidence
    APPROVED = "approved"          # passed the gate; swapped at the next step boundary
    SUPERSEDED = "superseded"      # a newer candidate was judged (or approved) first
    REJECTED = "rejected"
    INVALID = "invalid"
    ROLLED_BACK = "rolled back"


class DecisionKind(str, enum.Enum):
    PROMOTE = "promote"
    REJECT = "reject"
    INVALID = "invalid"
    ROLLBACK = "rollback"
    SWAP = "swap"
    MANUAL_PROMOTE = "manual-promote"
    LIVE_OK = "live-ok"


@dataclass
class Decision:
    t: float
    kind: str                       # a DecisionKind's value
    version: int | None
    detail: str
    figures: dict = field(default_factory=dict)


@dataclass
class Judgement:
    """What the poller found about one candidate. ``kind``: invalid, wait (too little held-out evidence),
    reject or promote."""

    version: int
    kind: str
    reason: str = ""
    drafter: object | None = None           # fp32, when it loaded
    manifest: Manifest | None = None
    figures: dict = field(default_factory=dict)
    serving: int | None = None              # the version it was judged against ...
    serving_acceptance: float | None = None  # ... and that version's figure on the same window


@dataclass
class PendingSwap:
    """An approved version waiting for the step boundary."""

    version: int
    fp32: object
    serve: object                   # the copy in the serving dtype
    kind: str                       # promote | manual-promote | rollback
    figures: dict = field(default_factory=dict)


class VersionManager:
    """Versions known to this engine, the serving one, decisions; see the module docstring."""

    def __init__(self, root: Path, cfg: TrainerConfig, target, proposer, current: int, drafter,
                 serve_dtype: torch.dtype | None = None) -> None:
        self.root = Path(root)
        self.cfg = cfg
        self.target = target
        self.proposer = proposer
        self.serve_dtype = serve_dtype
        self.state = VersionState.load(self.root)
        self.gate = Gate(cfg, target)
        self.window = HeldoutWindow(cfg.heldout_positions)
        self.monitor = LiveMonitor(cfg)
        self.current = current
        self.previous: int | None = None
        self.drafters: dict[int, object] = {current: drafter}     # fp32 copies of current and previous
        self.expected: dict[int, float] = {}                       # held-out acceptance length by version
        if proposer.expected_acceptance is not None:
            self.expected[current] = proposer.expected_acceptance
        self.manifests: dict[int, Manifest] = {}
        self.status_of: dict[int, VersionStatus] = {}
        self.decisions: list[Decision] = []
        self.counts = {"promotions": 0, "rejections": 0, "invalid": 0, "rollbacks": 0, "swaps": 0}
        self.pending: PendingSwap | None = None
        self.waiting: list[int] = []                               # candidates waiting for held-out evidence
        self._judged_revision = -1                                 # the window's revision at the last judgement
        self._posted: list[Judgement] = []
        self._dirty = False
        self._lock = threading.Lock()                              # _posted, and current/drafters for judge()
        if current not in self.state.promoted:
            self.state.promoted.append(current)
        self.state.current = current
        self.status_of[current] = VersionStatus.SERVING
        self._dirty = True
        self.persist()
        self._manifest(current)

    # ---- the poller: judge and post (no state of the owner is written) ------------------------------
    def judge(self, version: int) -> Judgement:
        """Validate and gate a version against the serving one (any thread; CPU work)."""
        with self._lock:
            current, cur_drafter = self.current, self.drafters[self.current]
        try:
            drafter, manifest = load_candidate(self.root, version, self.target, cur_drafter)
        except CandidateError as exc:
            return Judgement(version, DecisionKind.INVALID.value, str(exc))
        self._judged_revision = self.window.revision
        result = self.gate.judge(drafter, cur_drafter, self.window.snapshot())
        if result is None:
            return Judgement(version, "wait", drafter=drafter, manifest=manifest, serving=current)
        figures = {"candidate_acceptance": round(result.candidate, 4), "serving_acceptance": round(result.current, 4),
                   "serving_version": current, "roots": result.roots,
                   "manifest_acceptance": manifest.heldout_acceptance, "step": manifest.step,
                   "samples": manifest.samples}
        kind = DecisionKind.PROMOTE if result.promote else DecisionKind.REJECT
        return Judgement(version, kind.value, result.reason, drafter, manifest, figures, current, result.current)

    def post(self, judgement: Judgement) -> None:
        with self._lock:
            self._posted.append(judgement)

    def has_retry(self) -> bool:
        """A candidate waits for held-out evidence and the window has grown since it was last judged."""
        with self._lock:
            waiting = bool(self.waiting)
        return waiting and self.window.revision != self._judged_revision

    def is_decided(self, version: int) -> bool:
        """Known and not waiting for evidence: nothing left to judge."""
        return version in self.status_of and version not in self.waiting

    def newest_waiting(self) -> int | None:
        with self._lock:
            return self.waiting[-1] if self.waiting else None

    # ---- the owner: record what was posted, swap, watch, roll back ----------------------------------------
    def take_results(self) -> list[Decision | None]:
        """Record every posted judgement (owner thread); returns their decisions (None: still waiting)."""
        with self._lock:
            posted, self._posted = self._posted, []
        out = [self.record(j) for j in posted]
        self.persist()
        return out

    def consider(self, version: int) -> Decision | None:
        """Judge and record a version on the owner thread (admin tools, tests). None: waiting for evidence."""
        if version in self.status_of and version not in self.waiting:
            return None
        decision = self.record(self.judge(version))
        self.persist()
        return decision

    def record(self, j: Judgement) -> Decision | None:
        if j.version in self.status_of and j.version not in self.waiting:
            return None  # decided already (judged twice, e.g. posted while an operator promoted it)
        if j.kind == DecisionKind.INVALID.value:
            return self._decide(DecisionKind.INVALID, j.version, j.reason)
        self.manifests[j.version] = j.manifest
        if j.kind == "wait":
            with self._lock:
                for old in self.waiting:                   # only the newest waiting candidate is retried
                    if old != j.version:
                        self.status_of[old] = VersionStatus.SUPERSEDED
                self.waiting = [j.version]
            self.status_of[j.version] = VersionStatus.WAITING
            return None
        with self._lock:
            if j.version in self.waiting:
                self.waiting.remove(j.version)
        if j.serving is not None and j.serving_acceptance is not None:
            self._refresh_estimate(j.serving, j.serving_acceptance)
        if j.kind == DecisionKind.REJECT.value:
            return self._decide(DecisionKind.REJECT, j.version, j.reason, j.figures)
        with self._lock:  # newer waiting candidates supersede older ones: only the newest goes live
            self.waiting = [v for v in self.waiting if v > j.version]
        self._queue_swap(j.version, j.drafter, DecisionKind.PROMOTE, j.figures, j.reason)
        return self.decisions[-1]

    def _refresh_estimate(self, version: int, acceptance: float) -> None:
        """The gate just measured the serving ``version`` on held-out live traces: that figure replaces its
        estimate (a warm start's came from other traffic; this one is what serving will see)."""
        self.expected[version] = acceptance
        if self.current == version:
            self.proposer.set_expected_acceptance(acceptance)

    def _queue_swap(self, version: int, drafter, kind: DecisionKind, figures: dict, reason: str) -> None:
        serve = drafter.to_dtype(self.serve_dtype) if self.serve_dtype is not None else drafter
        if self.pending is not None and self.pending.version != version:
            self.status_of[self.pending.version] = VersionStatus.SUPERSEDED  # approved, but a newer one came first
        self.pending = PendingSwap(version, drafter, serve, kind.value, figures)
        self.status_of[version] = VersionStatus.APPROVED
        self._decide(kind, version, reason + " (swap at the next step boundary)", figures,
                     count=kind == DecisionKind.PROMOTE)

    def apply_pending(self) -> bool:
        """Swap in an approved version (owner thread, between two steps)."""
        pending, self.pending = self.pending, None
        if pending is None:
            return False
        version, kind = pending.version, pending.kind
        previous = self.current
        if pending.figures.get("candidate_acceptance") is not None:
            self.expected[version] = pending.figures["candidate_acceptance"]
        self.proposer.swap(pending.serve, expected_acceptance=self.expected.get(version))
        with self._lock:
            self.previous, self.current = previous, version
            self.drafters = {v: d for v, d in self.drafters.items() if v == previous}
            self.drafters[version] = pending.fp32
        rollback = kind == DecisionKind.ROLLBACK.value
        self.status_of[previous] = VersionStatus.ROLLED_BACK if rollback else VersionStatus.PROMOTED
        self.status_of[version] = VersionStatus.SERVING
        if rollback:
            if self.state.promoted and self.state.promoted[-1] == previous:
                self.state.promoted.pop()
        elif version not in self.state.promoted or self.state.promoted[-1] != version:
            self.state.promoted.append(version)
        self.state.current = version
        self.counts["swaps"] += 1
        self._decide(DecisionKind.SWAP, version, f"serving version {version} (was {previous})",
                     {"previous": previous}, count=False)
        self.persist()
        if not rollback:
            self.monitor.start_watch(version, previous)
        self._prune()
        return True

    def observe_step(self, batch: int, tokens: int, seconds: float, off_seconds: float | None) -> None:
        """Live figures of one decode step; rolls back when a post-promotion window regressed."""
        self.monitor.observe(self.current, batch, tokens, seconds, off_seconds)
        verdict = self.monitor.verdict()
        if verdict is None:
            return
        figures = {k: v for k, v in asdict(verdict).items() if k not in ("rollback", "reason")}
        if verdict.rollback and verdict.previous is not None and verdict.version == self.current:
            self.rollback(reason=verdict.reason, figures=figures, automatic=True)
        else:
            self._decide(DecisionKind.LIVE_OK, verdict.version, verdict.reason, figures, count=False)
            self.persist()

    def promote(self, version: int) -> dict:
        """Manual promotion (admin, owner thread): validated, not gated, swapped at once."""
        if version not in list_versions(self.root):
            raise KeyError(f"version {version} not found in {self.root}")
        if version == self.current:
            return {"version": version, "status": "already serving"}
        try:
            drafter, manifest = load_candidate(self.root, version, self.target, self.drafters[self.current])
        except CandidateError as exc:
            raise ValueError(f"version {version} cannot be served: {exc}") from None
        self.manifests[version] = manifest
        self._queue_swap(version, drafter, DecisionKind.MANUAL_PROMOTE, {"step": manifest.step},
                         "promoted by an operator")
        self.apply_pending()
        return {"version": version, "status": "serving", "previous": self.previous}

    def rollback(self, reason: str = "rolled back by an operator", figures: dict | None = None,
                 automatic: bool = False) -> dict:
        """Go back to the version served before the current one (owner thread)."""
        target = self.previous
        if target is None:
            promoted = [v for v in self.state.promoted if v != self.current]
            target = promoted[-1] if promoted else None
        if target is None:
            raise ValueError("there is no previous version to roll back to")  # no "field:" head: no request field is wrong
        drafter = self.drafters.get(target)
        if drafter is None:
            try:
                drafter, _ = load_candidate(self.root, target, self.target, self.drafters[self.current])
            except CandidateError as exc:
                raise ValueError(f"cannot roll back: version {target} cannot be served: {exc}") from None
        bad = self.current
        serve = drafter.to_dtype(self.serve_dtype) if self.serve_dtype is not None else drafter
        self.pending = PendingSwap(target, drafter, serve, DecisionKind.ROLLBACK.value, figures or {})
        self.counts["rollbacks"] += 1
        self._decide(DecisionKind.ROLLBACK, bad, f"{reason}; back to version {target}",
                     {**(figures or {}), "to": target}, count=False)
        self.apply_pending()
        self.status_of[bad] = VersionStatus.ROLLED_BACK
        with self._lock:
            self.previous = None
        return {"version": target, "rolled_back": bad, "automatic": automatic}

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _decide(self, kind: DecisionKind, version: int | None, detail: str, figures: dict | None = None,
                count: bool = True) -> Decision:
        d = Decision(time.time(), kind.value, version, detail, figures or {})
        self.decisions.append(d)
        self.decisions = self.decisions[-500:]
        if count:
            key = {DecisionKind.PROMOTE: "promotions", DecisionKind.REJECT: "rejections",
                   DecisionKind.INVALID: "invalid"}.get(kind)
            if key:
                self.counts[key] += 1
        if kind in (DecisionKind.REJECT, DecisionKind.INVALID) and version is not None:
            self.status_of[version] = VersionStatus.REJECTED if kind == DecisionKind.REJECT else VersionStatus.INVALID
        self.state.decisions.append({"t": d.t, "kind": d.kind, "version": version, "detail": detail, **d.figures})
        self._dirty = True
        level = logging.WARNING if kind in (DecisionKind.INVALID, DecisionKind.ROLLBACK) else logging.INFO
        log.log(level, "drafter %s v%s: %s %s", d.kind, version, detail, d.figures or "")
        return d

    def persist(self) -> None:
        """Write ``state.json`` if a decision changed it since the last write."""
        if self._dirty:
            self._dirty = False
            self.state.save(self.root)

    def _manifest(self, version: int) -> Manifest | None:
        m = self.manifests.get(version)
        if m is None:
            try:
                m = self.manifests[version] = read_manifest(version_dir(self.root, version))
            except VersionError:
                return None
        return m

    def _prune(self) -> None:
        protect = {self.current} | ({self.previous} if self.previous is not None else set())
        protect |= set(self.state.promoted[-3:]) | set(self.waiting)
        prune_versions(self.root, self.cfg.keep_versions, protect)

    def versions(self) -> list[dict]:
        out = []
        for v in list_versions(self.root):
            m = self._manifest(v)
            if m is None:
                continue
            default = VersionStatus.PROMOTED if v in self.state.promoted else VersionStatus.CANDIDATE
            out.append({"version": v, "parent": m.parent, "kind": m.kind, "step": m.step, "samples": m.samples,
                        "heldout_acceptance": m.heldout_acceptance, "created": m.created,
                        "status": self.status_of.get(v, default).value})
        return out
