"""Bringing a new drafter version into a running engine: validate, gate, swap, watch, roll back.

* ``load_candidate``: off the step loop, a published version is checked before it can serve: sha256 of
  every weight file against its manifest, the tensors' names, shapes and finiteness (EAGLE-3, plus the mask
  vector of a parallel drafter: ``checkpoints.load_drafter``), and kind, vocabulary maps and aux layers equal
  to the serving drafter's (the loaders check d2t/t2d themselves). Any failure is a ``CandidateError``
  naming the file and the problem; serving is untouched.
* ``Gate``: a candidate is promoted only if its simulated acceptance length on a held-out window of recent
  traces (chunks the trainer never trained on) is at least the serving version's on the same window.
  Both are measured here, by the engine side, not read from the manifest: a candidate is judged on
  evidence, not on its own claim.
* ``LiveMonitor``: acceptance is not speed (drafting costs time, and the real speedup depends on batch
  sizes), so after a promotion the committed tokens per second of decode steps are watched per batch-size
  bucket for ``live_window_steps`` steps and compared, bucket by bucket, with the previous version's
  (and, for the record, with speculation off as the controller's measured cost model predicts it). A
  regression beyond ``rollback_threshold`` rolls back automatically. (Aurora, arXiv 2602.06932, logs
  speedup but uses neither a gate nor a rollback; this is its "utility feedback" idea carried further.)
* ``VersionManager`` (versions.py) ties these together: candidates are judged in a background thread and
  recorded, swapped, watched and rolled back on the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import TrainerConfig
from ..speculation.utility import pow2_bucket
from .objective import SoftTargets, simulated_acceptance
from .publish import VersionError, read_manifest, verify_checksums, version_dir
from .traces import TraceChunk

log = logging.getLogger("onspec.train")


class CandidateError(ValueError):
    """A version cannot be served (corrupt, wrong shapes, foreign vocabulary); the message says why."""


def load_candidate(root: Path, version: int, target, reference=None):
    """(fp32 drafter, manifest) of a version, validated against the target and the serving drafter."""
    from ..speculation.checkpoints import drafter_kind, kind_text, load_drafter
    from ..speculation.eagle import DrafterLoadError

    d = version_dir(root, version)
    try:
        manifest = verify_checksums(d, read_manifest(d))
        drafter = load_drafter(d, target, dtype=torch.float32)
    except (VersionError, DrafterLoadError) as exc:
        raise CandidateError(str(exc)) from None
    if reference is not None:
        a, b = drafter.cfg, reference.cfg
        if drafter_kind(drafter) != drafter_kind(reference):
            raise CandidateError(f"{d}: {kind_text(drafter_kind(drafter))}, the serving drafter is "
                                 f"{kind_text(drafter_kind(reference))}")
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
        cand, roots = simulated_acceptance(candidate, samples, candidate.unroll_steps(self.cfg.ttt_steps),
                                           autocast=self.cfg.autocast)
        if roots < self.cfg.gate_min_positions:
            return None
        # The serving drafter's figure only changes with the window (or a swap): computed once per window.
        key = tuple((c.key, c.start, len(c)) for c in chunks)
        if self._cache is not None and self._cache[0] is current and self._cache[1] == key:
            cur = self._cache[2]
        else:
            cur, _ = simulated_acceptance(current, samples, current.unroll_steps(self.cfg.ttt_steps),
                                          autocast=self.cfg.autocast)
            self._cache = (current, key, cur)
        ok = cand >= cur + self.cfg.gate_margin
        reason = (f"held-out acceptance {cand:.3f} {'>=' if ok else '<'} serving {cur:.3f}"
                  + (f" + margin {self.cfg.gate_margin}" if self.cfg.gate_margin else "") + f" over {roots} roots")
        return GateResult(ok, cand, cur, roots, reason)


# ---- live utility -------------------------------------------------------------------------------------
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
        b = pow2_bucket(batch)
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
