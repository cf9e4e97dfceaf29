"""Bringing a new drafter version into a running engine: validate, gate, swap, watch, roll back.

* ``load_candidate``: off the step loop, a published version is checked before it can serve: sha256 of
  every weight file against its manifest, the EAGLE-3 tensors' names, shapes and finiteness, and vocabulary
  maps and aux layers equal to the serving drafter's (``load_eagle3`` checks d2t/t2d themselves). Any
  failure is a ``CandidateError`` naming the file and the problem; serving is untouched.
* ``Gate``: a candidate is promoted only if its simulated acceptance length on a held-out window of recent
  traces (chunks the trainer never trained on) is at least the serving version's on the same window.
  Both are measured here, by the engine side, not read from the manifest: a candidate is judged on
  evidence, not on its own claim.
* ``LiveMonitor``: acceptance is not speed (drafting costs time, and the real speedup depends on batch
  sizes), so after a promotion the committed tokens per second of decode steps are watched per batch-size
  bucket for ``live_window_steps`` steps and compared, bucket by bucket, with the previous version's
  (and, for the record, with speculation off as the controller's measured cost model predicts it). A
  regression beyond ``rollback_threshold`` rolls back automatically. (Aurora, arXiv 2602.06932, logs
  speedup but uses neither a gate nor a rollback; this is the "utility feedback" of DESIGN.md.)
* ``VersionManager`` ties these together: candidates are judged in a background thread; the swap itself
  happens on the engine thread between two steps (``apply_pending``), so requests in flight continue with
  the new drafter at their next step (the proposer rebuilds its per-sequence caches lazily). Every
  promotion, rejection and rollback is logged with its figures, counted, and persisted in ``state.json``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import TrainerConfig
from .objective import SoftTargets, simulated_acceptance
from .publish import (Manifest, VersionError, VersionState, list_versions, prune_versions, read_manifest,
                      verify_checksums, version_dir)
from .traces import TraceChunk

log = logging.getLogger("onspec.train")


class CandidateError(ValueError):
    """A version cannot be served (corrupt, wrong shapes, foreign vocabulary); the message says why."""


def load_candidate(root: Path, version: int, target, reference=None):
    """(fp32 drafter, manifest) of a version, validated against the target and the serving drafter."""
    from ..spec.eagle import DrafterLoadError, load_eagle3

    d = version_dir(root, version)
    try:
        manifest = verify_checksums(d, read_manifest(d))
        drafter = load_eagle3(d, target, dtype=torch.float32)
    except (VersionError, DrafterLoadError) as exc:
        raise CandidateError(str(exc)) from None
    if reference is not None:
        a, b = drafter.cfg, reference.cfg
        if tuple(a.aux_layers) != tuple(b.aux_layers):
            raise CandidateError(f"{d}: aux layers {a.aux_layers} differ from the serving drafter's {b.aux_layers}")
        if a.draft_vocab_size != b.draft_vocab_size or not torch.equal(drafter.d2t, reference.d2t.to(drafter.d2t.device)):
            raise CandidateError(f"{d}: its draft vocabulary (d2t) differs from the serving drafter's")
    return drafter, manifest


# ---- the gate ---------------------------------------------------------------------------------------
class HeldoutWindow:
    """The newest held-out chunks (engine side), up to about ``positions`` positions."""

    def __init__(self, positions: int) -> None:
        self.positions = positions
        self.chunks: list[TraceChunk] = []
        self.revision = 0           # counts additions: a waiting candidate is judged again only after one
        self._lock = threading.Lock()

    def add(self, chunk: TraceChunk) -> None:
        with self._lock:
            self.revision += 1
            self.chunks.append(chunk)
            total = sum(len(c) for c in self.chunks)
            while len(self.chunks) > 1 and total - len(self.chunks[0]) >= self.positions:
                total -= len(self.chunks.pop(0))

    def snapshot(self) -> list[TraceChunk]:
        with self._lock:
            return list(self.chunks)


@dataclass
class GateResult:
    promote: bool
    candidate: float
    current: float
    roots: int
    reason: str


class Gate:
    def __init__(self, cfg: TrainerConfig, target) -> None:
        self.cfg = cfg
        self.lm_head = target.model.lm_head.weight
        self._cache: tuple[object, tuple, float] | None = None  # (serving drafter, window, its figure)

    def judge(self, candidate, current, chunks: list[TraceChunk]) -> GateResult | None:
        """None while the window holds too little evidence to decide."""
        soft = SoftTargets(self.lm_head, candidate.draft_ids, 1)
        samples = [soft.prepare(c, 1.0, labels=False) for c in chunks]
        cand, roots = simulated_acceptance(candidate, samples, self.cfg.ttt_steps, autocast=self.cfg.autocast)
        if roots < self.cfg.gate_min_positions:
            return None
        # The serving drafter's figure only changes with the window (or a swap): computed once per window.
        key = tuple((c.key, c.start, len(c)) for c in chunks)
        if self._cache is not None and self._cache[0] is current and self._cache[1] == key:
            cur = self._cache[2]
        else:
            cur, _ = simulated_acceptance(current, samples, self.cfg.ttt_steps, autocast=self.cfg.autocast)
            self._cache = (current, key, cur)
        ok = cand >= cur + self.cfg.gate_margin
        reason = (f"held-out acceptance {cand:.3f} {'>=' if ok else '<'} serving {cur:.3f}"
                  + (f" + margin {self.cfg.gate_margin}" if self.cfg.gate_margin else "") + f" over {roots} roots")
        return GateResult(ok, cand, cur, roots, reason)


# ---- live utility -------------------------------------------------------------------------------------
def _bucket(batch: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, batch))))


@dataclass
class _Rate:
    tokens: float = 0.0
    seconds: float = 0.0
    steps: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class LiveVerdict:
    rollback: bool
    version: int
    previous: int | None
    ratio_previous: float | None    # new / previous committed tokens per second (same batch buckets)
    ratio_off: float | None         # new / speculation off (controller's cost model)
    steps: int
    reason: str


class LiveMonitor:
    """Committed tokens per second of decode steps, per (version, batch bucket); windows after promotions."""

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        self.rates: dict[tuple[int, int], _Rate] = {}
        self.watch: dict | None = None
        self._lock = threading.Lock()

    def observe(self, version: int, batch: int, tokens: int, seconds: float, off_seconds: float | None) -> None:
        if batch <= 0 or seconds <= 0:
            return
        b = _bucket(batch)
        with self._lock:
            r = self.rates.setdefault((version, b), _Rate())
            r.tokens += tokens
            r.seconds += seconds
            r.steps += 1
            w = self.watch
            if w is not None and w["version"] == version:
                wr = w["rates"].setdefault(b, _Rate())
                wr.tokens += tokens
                wr.seconds += seconds
                wr.steps += 1
                if off_seconds:
                    # speculation off commits one token per row per step, at the profiled cost
                    w["off_tokens"] += batch
                    w["off_seconds"] += off_seconds
                    w["on_tokens"] += tokens
                    w["on_seconds"] += seconds
                w["steps"] += 1

    def start_watch(self, version: int, previous: int | None) -> None:
        with self._lock:
            self.watch = {"version": version, "previous": previous, "rates": {}, "steps": 0,
                          "off_tokens": 0.0, "off_seconds": 0.0, "on_tokens": 0.0, "on_seconds": 0.0,
                          "since": time.time()}

    def verdict(self) -> LiveVerdict | None:
        """Once the window is full: compare and close it (None before that, or when nothing is watched)."""
        with self._lock:
            w = self.watch
            if w is None or w["steps"] < self.cfg.live_window_steps:
                return None
            self.watch = None
        new: dict[int, _Rate] = w["rates"]
        weights = {b: r.steps for b, r in new.items()}
        ratio_prev = None
        prev = w["previous"]
        if prev is not None:
            num = den = 0.0
            for b, n in weights.items():
                old = self.rates.get((prev, b))
                if old is None or old.steps < 5 or old.rate <= 0:
                    continue
                num += n * new[b].rate
                den += n * old.rate
            ratio_prev = num / den if den > 0 else None
        ratio_off = None
        if w["off_seconds"] > 0 and w["on_seconds"] > 0 and w["off_tokens"] > 0:
            ratio_off = (w["on_tokens"] / w["on_seconds"]) / (w["off_tokens"] / w["off_seconds"])
        rollback = ratio_prev is not None and ratio_prev < 1.0 - self.cfg.rollback_threshold
        reason = (f"live committed tok/s {'%.3f' % ratio_prev if ratio_prev is not None else 'n/a'}x the previous "
                  f"version's at comparable batch sizes over {w['steps']} steps"
                  + (f" (threshold {1 - self.cfg.rollback_threshold:.2f})" if ratio_prev is not None else ""))
        return LiveVerdict(rollback, w["version"], prev, ratio_prev, ratio_off, w["steps"], reason)

    def summary(self) -> dict:
        with self._lock:
            out: dict = {}
            for (v, b), r in sorted(self.rates.items()):
                out.setdefault(str(v), {})[str(b)] = {"tok_per_s": round(r.rate, 2), "steps": r.steps}
            w = self.watch
            watching = None if w is None else {"version": w["version"], "previous": w["previous"],
                                               "steps": w["steps"], "of": self.cfg.live_window_steps}
        return {"by_version": out, "watching": watching}


# ---- the manager --------------------------------------------------------------------------------------
@dataclass
class Decision:
    t: float
    kind: str                       # promote | reject | invalid | rollback | swap | manual-promote | manual-rollback
    version: int | None
    detail: str
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
        if getattr(proposer, "expected_acceptance", None) is not None:
            self.expected[current] = proposer.expected_acceptance
        self.manifests: dict[int, Manifest] = {}
        self.status_of: dict[int, str] = {}                        # candidate | promoted | rejected | invalid | ...
        self.decisions: list[Decision] = []
        self.counts = {"promotions": 0, "rejections": 0, "invalid": 0, "rollbacks": 0, "swaps": 0}
        self.pending: tuple[int, object, object, str, dict] | None = None  # (version, fp32, serve copy, kind, fig)
        self.waiting: list[int] = []                               # candidates waiting for held-out evidence
        self._judged_revision = -1                                 # the window's revision at the last judgement
        self._lock = threading.RLock()
        if current not in self.state.promoted:
            self.state.promoted.append(current)
        self.state.current = current
        self.state.save(self.root)
        self.status_of[current] = "serving"
        self._manifest(current)

    # ---- background thread ---------------------------------------------------------------------
    def consider(self, version: int) -> Decision | None:
        """Validate and gate a new version (background thread). None: waiting for held-out evidence."""
        if version in self.status_of and version not in self.waiting:
            return None
        try:
            drafter, manifest = load_candidate(self.root, version, self.target, self.drafters[self.current])
        except CandidateError as exc:
            return self._decide("invalid", version, str(exc))
        self.manifests[version] = manifest
        with self._lock:
            current, cur_drafter = self.current, self.drafters[self.current]
        self._judged_revision = self.window.revision
        result = self.gate.judge(drafter, cur_drafter, self.window.snapshot())
        if result is None:
            if version not in self.waiting:
                self.waiting.append(version)
                self.status_of[version] = "waiting"
            return None
        if version in self.waiting:
            self.waiting.remove(version)
        self._refresh_estimate(current, result.current)
        figures = {"candidate_acceptance": round(result.candidate, 4), "serving_acceptance": round(result.current, 4),
                   "serving_version": current, "roots": result.roots,
                   "manifest_acceptance": manifest.heldout_acceptance, "step": manifest.step,
                   "samples": manifest.samples}
        if not result.promote:
            return self._decide("reject", version, result.reason, figures)
        # Newer waiting candidates supersede older ones: only the best-evidenced newest goes live.
        self.waiting = [v for v in self.waiting if v > version]
        self._queue_swap(version, drafter, "promote", figures, result.reason)
        return self.decisions[-1]

    def _refresh_estimate(self, version: int, acceptance: float) -> None:
        """The gate just measured the serving ``version`` on held-out live traces: that figure replaces its
        estimate (a warm start's came from other traffic; this one is what serving will see)."""
        with self._lock:
            self.expected[version] = acceptance
            if self.current == version:
                self.proposer.expected_acceptance = acceptance

    def has_retry(self) -> bool:
        """A candidate waits for held-out evidence and the window has grown since it was last judged."""
        return bool(self.waiting) and self.window.revision != self._judged_revision

    def retry_waiting(self) -> None:
        for v in list(self.waiting)[-1:]:  # the newest only: older ones are superseded
            for old in self.waiting[:-1]:
                self.status_of[old] = "superseded"
            self.waiting = self.waiting[-1:]
            self.consider(v)

    def _queue_swap(self, version: int, drafter, kind: str, figures: dict, reason: str) -> None:
        serve = drafter.to_dtype(self.serve_dtype) if self.serve_dtype is not None else drafter
        with self._lock:
            if self.pending is not None and self.pending[0] != version:
                self.status_of[self.pending[0]] = "superseded"  # approved, but a newer one came first
            self.pending = (version, drafter, serve, kind, figures)
            self.status_of[version] = "approved"
        self._decide(kind, version, reason + " (swap at the next step boundary)", figures, count=kind == "promote")

    # ---- engine thread -------------------------------------------------------------------------
    def apply_pending(self) -> bool:
        """Swap in an approved version (engine thread, between two steps)."""
        with self._lock:
            pending, self.pending = self.pending, None
        if pending is None:
            return False
        version, fp32, serve, kind, figures = pending
        with self._lock:
            previous = self.current
            if figures.get("candidate_acceptance") is not None:
                self.expected[version] = figures["candidate_acceptance"]
            self.proposer.swap(serve, expected_acceptance=self.expected.get(version))
            self.previous, self.current = previous, version
            self.drafters = {v: d for v, d in self.drafters.items() if v == previous}
            self.drafters[version] = fp32
            self.status_of[previous] = "promoted" if kind != "rollback" else "rolled back"
            self.status_of[version] = "serving"
            if kind == "rollback":
                if self.state.promoted and self.state.promoted[-1] == previous:
                    self.state.promoted.pop()
            elif version not in self.state.promoted or self.state.promoted[-1] != version:
                self.state.promoted.append(version)
            self.state.current = version
            self.counts["swaps"] += 1
        self.state.save(self.root)
        self._decide("swap", version, f"serving version {version} (was {previous})", {"previous": previous},
                     count=False)
        if kind != "rollback":
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
            self._decide("live-ok", verdict.version, verdict.reason, figures, count=False)

    def promote(self, version: int) -> dict:
        """Manual promotion (admin, engine thread): validated, not gated, swapped at once."""
        if version not in list_versions(self.root):
            raise KeyError(f"version {version} not found in {self.root}")
        if version == self.current:
            return {"version": version, "status": "already serving"}
        try:
            drafter, manifest = load_candidate(self.root, version, self.target, self.drafters[self.current])
        except CandidateError as exc:
            raise ValueError(f"version {version} cannot be served: {exc}") from None
        self.manifests[version] = manifest
        self._queue_swap(version, drafter, "manual-promote", {"step": manifest.step}, "promoted by an operator")
        self.apply_pending()
        return {"version": version, "status": "serving", "previous": self.previous}

    def rollback(self, reason: str = "rolled back by an operator", figures: dict | None = None,
                 automatic: bool = False) -> dict:
        """Go back to the version served before the current one (engine thread)."""
        with self._lock:
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
        with self._lock:
            self.pending = (target, drafter, serve, "rollback", figures or {})
        self.counts["rollbacks"] += 1
        self._decide("rollback", bad, f"{reason}; back to version {target}", {**(figures or {}), "to": target},
                     count=False)
        self.apply_pending()
        self.status_of[bad] = "rolled back"
        with self._lock:
            self.previous = None
        return {"version": target, "rolled_back": bad, "automatic": automatic}

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _decide(self, kind: str, version: int | None, detail: str, figures: dict | None = None,
                count: bool = True) -> Decision:
        d = Decision(time.time(), kind, version, detail, figures or {})
        with self._lock:
            self.decisions.append(d)
            self.decisions = self.decisions[-500:]
            if count:
                key = {"promote": "promotions", "reject": "rejections", "invalid": "invalid"}.get(kind)
                if key:
                    self.counts[key] += 1
            if kind in ("reject", "invalid") and version is not None:
                self.status_of[version] = "rejected" if kind == "reject" else "invalid"
            self.state.decisions.append({"t": d.t, "kind": kind, "version": version, "detail": detail, **d.figures})
        self.state.save(self.root)
        level = logging.WARNING if kind in ("invalid", "rollback") else logging.INFO
        log.log(level, "drafter %s v%s: %s %s", kind, version, detail, d.figures or "")
        return d

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
            out.append({"version": v, "parent": m.parent, "kind": m.kind, "step": m.step, "samples": m.samples,
                        "heldout_acceptance": m.heldout_acceptance, "created": m.created,
                        "status": self.status_of.get(v, "promoted" if v in self.state.promoted else "candidate")})
        return out
