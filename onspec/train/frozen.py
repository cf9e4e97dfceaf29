"""Speculation for an engine that serves a learned drafter without training it.

``LLM(speculation=...)``, ``onspec generate/chat/bench`` and ``onspec serve --train off`` attach
speculation through :func:`attach_for_mode`. Before it existed they attached the suffix drafter only, so
``"learned"`` and ``"hybrid"`` had no drafter to ask and decoded plainly without a word. (``onspec rl``
refuses those modes without ``--cotrain``, whose co-trainer attaches its own drafter: ``RLConfig``.)

Which drafters an engine gets:

* ``off``: none.
* ``suffix``, or ``auto`` with no ``speculator``: the suffix drafter. ``auto`` does not pick up a cached
  version on its own, so what ``auto`` measures does not depend on what a cache directory happens to hold.
* ``learned`` / ``hybrid``, or any mode given a ``speculator``: the suffix drafter plus a learned one,
  read from ``speculator`` (an EAGLE-3 directory: an ``onspec export-speculator`` output, a version
  directory, or another project's checkpoint) or else the latest promoted version of the versions
  directory (what ``onspec warmup`` and ``onspec serve --train online`` write). With neither, a
  :class:`ValueError` says how to get one: a random day-0 head drafts nothing useful and never improves
  here, since nothing trains it.
* ``parallel``: the same with a parallel drafter (strategy ``"parallel"``, one drafter forward per draft):
  a ``speculator`` in the P-EAGLE layout (``export-speculator --parallel``; the config's parallel-drafting
  fields tell it from an EAGLE-3 head, speculation/checkpoints.py) or the latest promoted version of the
  parallel lineage (``<versions>/parallel``, what ``--train-drafter parallel`` publishes).
* ``auto`` with a ``speculator`` of either kind: that drafter, plus the other kind's latest promoted version
  when its lineage has one, so the draft policy measures both and picks. A speculator of the wrong kind for
  a forced mode (a parallel drafter for ``learned``) is a ``ValueError`` saying so.

The drafter is frozen: nothing records traces and no version is published. In ``auto`` the controller
prices it by its manifest's held-out acceptance (as a resumed online version is priced), so a weak
head is kept out of the way; an imported checkpoint without a manifest is explored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import SpecConfig
from ..speculation.checkpoints import EAGLE, PARALLEL
from .heads import Served, attach_drafters, companion, head_for, mode_serves, promoted_version

NEEDS_DRAFTER = ("learned", "hybrid", "parallel")
log = logging.getLogger("onspec.train")


def _speculator(path: Path, loaded, mode: str) -> tuple[str, Served]:
    """(kind, drafter) of a ``--speculator`` directory, checked against ``mode``."""
    from ..speculation.checkpoints import checkpoint_kind, kind_text, load_drafter
    from .publish import VersionError, read_manifest

    if not path.is_dir():
        raise ValueError(f"speculator: {path} is not a directory (expected an EAGLE-3 or parallel drafter "
                         "checkpoint: config.json + model.safetensors)")
    kind = checkpoint_kind(path)
    if not mode_serves(mode, kind):
        want = "a parallel drafter (`onspec export-speculator --parallel DEPTHS` writes one)" if mode == "parallel" \
            else "a sequential EAGLE-3 head"
        raise ValueError(f"speculator: {path} is {kind_text(kind)}; "
                         f"speculation {mode!r} drafts with {want} (auto serves either)")
    drafter = load_drafter(path, loaded, dtype=torch.float32)  # DrafterLoadError is a ValueError
    try:
        estimate = read_manifest(path).heldout_acceptance
    except (VersionError, OSError, ValueError):
        estimate = None  # another project's checkpoint: no figure, the controller explores it
    return kind, Served(drafter, estimate, str(path))


def _frozen_drafters(engine, speculator: str, versions_dir: str, mode: str) -> dict[str, Served]:
    """The drafters to serve, by kind (see the module docstring)."""
    from .online import default_versions_dir

    loaded = engine.loaded
    base = Path(versions_dir) if versions_dir else default_versions_dir(loaded)
    out: dict[str, Served] = {}
    if speculator:
        kind, served = _speculator(Path(speculator), loaded, mode)
        out[kind] = served
        if mode == "auto" and (other := companion(base, kind, loaded)) is not None:
            out[other[0]] = other[1]   # a promoted version of the other kind: the draft policy measures both
        return out
    kind = PARALLEL if mode == "parallel" else EAGLE
    root = head_for(kind).root(base)
    served = promoted_version(root, loaded)
    if served is None:
        if kind == PARALLEL:
            raise ValueError(f"speculation: 'parallel' needs a trained parallel drafter and {root} has no promoted "
                             "version; pass a speculator (`onspec export-speculator --parallel DEPTHS` writes one) "
                             "or serve with --train online --train-drafter parallel")
        raise ValueError(f"speculation: {mode!r} needs a trained drafter and {root} has no promoted version; "
                         "run `onspec warmup` first, pass a speculator (an EAGLE-3 checkpoint directory), "
                         "or serve with --train online")
    out[kind] = served
    return out


def attach_for_mode(engine, spec_cfg: SpecConfig, speculator: str = "", versions_dir: str = ""):
    """Attach the drafters ``spec_cfg.mode`` needs (see the module docstring); returns the
    ``Speculation``, or None for ``off``."""
    from ..speculation.controller import attach_speculation

    mode = spec_cfg.mode
    if mode == "off":
        if speculator:
            raise ValueError("speculator: speculation is 'off', so a speculator would never be asked")
        return None
    if mode not in NEEDS_DRAFTER and not speculator:
        return attach_speculation(engine, spec_cfg)
    drafters = _frozen_drafters(engine, speculator, versions_dir, mode)
    spec = attach_drafters(engine, spec_cfg, drafters.get(EAGLE), drafters.get(PARALLEL))
    log.info("speculation %r with frozen drafters: %s", mode,
             "; ".join(f"{kind} from {d.origin}" for kind, d in drafters.items()))
    return spec
