"""The drafters that can be served and learned: the sequential EAGLE-3 head and the parallel drafter.

``Head`` says, for one kind (``TrainerConfig.drafter``: ``"eagle"`` or ``"parallel"``), what the rest of the
learning loop needs and would otherwise hard-code:

* ``strategy``: the proposer it serves as (``"learned"``; ``"parallel"``), the one the version manager swaps;
* ``strategies``: the strategies it brings (the hybrid strategy wraps the learned one), dropped together when
  its trainer dies;
* ``root(base)``: its lineage of versions. The EAGLE-3 head's is the versions directory itself (as before
  there were two kinds), the parallel drafter's its ``parallel/`` folder: each lineage has its own version
  numbers, ``state.json``, promotions and rollbacks, so publish / gate / swap / roll back work unchanged on
  either;
* ``day0`` and ``from_checkpoint``: a random drafter of its kind, or one made from a checkpoint (a
  parallel drafter from an EAGLE-3 head: its layers, a fresh mask vector, ``parallel_drafter.from_eagle``).

``attach_drafters`` gives an engine the suffix drafter plus whichever of the two kinds it is handed: with
both (auto mode) the draft policy asks both and judges each by its own record and measured-utility arm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import TrainerConfig
from ..speculation.checkpoints import DRAFTER_KINDS, EAGLE, PARALLEL, drafter_kind

log = logging.getLogger("onspec.train")
PARALLEL_LINEAGE = "parallel"


@dataclass(frozen=True)
class Served:
    """A drafter (float32) to attach, its held-out acceptance length if measured, and where it came from."""

    drafter: object
    estimate: float | None = None
    origin: str = ""


@dataclass(frozen=True)
class Head:
    """One kind of drafter; see the module docstring."""

    kind: str

    @property
    def strategy(self) -> str:
        return "parallel" if self.kind == PARALLEL else "learned"

    @property
    def strategies(self) -> tuple[str, ...]:
        return ("parallel",) if self.kind == PARALLEL else ("learned", "hybrid")

    def root(self, base: Path) -> Path:
        return Path(base) / PARALLEL_LINEAGE if self.kind == PARALLEL else Path(base)

    def day0(self, loaded, cfg: TrainerConfig):
        """A random (day-0) drafter of this kind for ``loaded``, float32."""
        from ..speculation.eagle import EagleConfig, init_drafter

        head = init_drafter(loaded, EagleConfig.for_target(loaded.arch), seed=cfg.seed)
        return self.from_checkpoint(head, cfg, "a day-0 head")

    def from_checkpoint(self, drafter, cfg: TrainerConfig, origin: str):
        """``drafter`` as this kind: as it is, or an EAGLE-3 head made a parallel drafter of
        ``cfg.parallel_depths`` depths; a parallel drafter cannot become a sequential head (ValueError)."""
        kind = drafter_kind(drafter)
        if kind == self.kind:
            return drafter
        if self.kind == PARALLEL:
            from ..speculation.parallel_drafter import ParallelConfig, from_eagle

            return from_eagle(drafter, ParallelConfig(depths=cfg.parallel_depths), seed=cfg.seed)
        raise ValueError(f"speculator: {origin} is a parallel drafter; the sequential EAGLE-3 head cannot start "
                         "from it (learn the parallel drafter: --train-drafter parallel)")


def attach_head(engine, spec_cfg, head: Head, served: Served):
    """``attach_drafters`` with one drafter, of ``head``'s kind."""
    parallel = head.kind == PARALLEL
    return attach_drafters(engine, spec_cfg, None if parallel else served, served if parallel else None)


def promoted_version(root: Path, loaded) -> Served | None:
    """The latest promoted version of the lineage in ``root``, float32 (None: none promoted); a ``ValueError``
    if it cannot be loaded."""
    from .publish import latest_promoted
    from .swap import CandidateError, load_candidate

    version = latest_promoted(root) if Path(root).is_dir() else None
    if version is None:
        return None
    try:
        drafter, manifest = load_candidate(root, version, loaded)
    except CandidateError as exc:
        raise ValueError(f"speculation: cannot load version {version} of {root}: {exc}") from None
    return Served(drafter, manifest.heldout_acceptance, f"version {version} of {root}")


def companion(base: Path, kind: str, loaded) -> tuple[str, Served] | None:
    """(kind, drafter) of the other kind's latest promoted version, served frozen beside a drafter of ``kind``
    in auto so the draft policy measures both; None when there is none, or (with a warning) when it cannot
    be loaded: it is optional, and a damaged one must not stop serving."""
    other = EAGLE if kind == PARALLEL else PARALLEL
    try:
        served = promoted_version(head_for(other).root(base), loaded)
    except ValueError as exc:
        log.warning("not serving the %s drafter beside the %s one: %s", other, kind, exc)
        return None
    return None if served is None else (other, served)


def head_for(kind: str) -> Head:
    if kind not in DRAFTER_KINDS:
        raise ValueError(f"drafter: must be {EAGLE!r} or {PARALLEL!r}, got {kind!r}")
    return Head(kind)


def mode_serves(mode: str, kind: str) -> bool:
    """Whether speculation ``mode`` can draft with a drafter of ``kind`` (auto and suffix: either)."""
    if mode in ("learned", "hybrid"):
        return kind == EAGLE
    if mode == "parallel":
        return kind == PARALLEL
    return True


def attach_drafters(engine, spec_cfg, eagle: Served | None, parallel: Served | None):
    """Attach the suffix drafter and the given drafters (in the engine's dtype); returns the ``Speculation``.
    A sequential head whose aux layers differ from the parallel drafter's is left out, with a warning (one
    engine returns one set of aux states)."""
    from ..speculation.eagle import attach_learned
    from ..speculation.parallel_proposer import LearnedHead, attach_parallel

    dtype = engine.loaded.model.embed_tokens.weight.dtype
    if parallel is None:
        return attach_learned(engine, spec_cfg, eagle.drafter.to_dtype(dtype), expected_acceptance=eagle.estimate)
    learned = None
    if eagle is not None:
        a, b = tuple(eagle.drafter.cfg.aux_layers), tuple(parallel.drafter.cfg.aux_layers)
        if a == b:
            learned = LearnedHead(eagle.drafter.to_dtype(dtype), eagle.estimate)
        else:
            log.warning("the sequential head (%s) reads aux layers %s, the parallel drafter (%s) %s: serving the "
                        "parallel drafter alone", eagle.origin, a, parallel.origin, b)
    return attach_parallel(engine, spec_cfg, parallel.drafter.to_dtype(dtype), expected_acceptance=parallel.estimate,
                           learned=learned)


__all__ = ["PARALLEL_LINEAGE", "Head", "Served", "attach_drafters", "attach_head", "companion", "head_for",
           "mode_serves", "promoted_version"]
