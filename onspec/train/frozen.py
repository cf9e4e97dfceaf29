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

The drafter is frozen: nothing records traces and no version is published. In ``auto`` the controller
prices it by its manifest's held-out acceptance (as a resumed online version is priced), so a weak
head is kept out of the way; an imported checkpoint without a manifest is explored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import SpecConfig

NEEDS_DRAFTER = ("learned", "hybrid")
log = logging.getLogger("onspec.train")


def _frozen_drafter(engine, speculator: str, versions_dir: str, mode: str):
    """(fp32 drafter, expected acceptance or None, where it came from)."""
    from ..speculation.eagle import load_eagle3
    from .online import default_versions_dir
    from .publish import VersionError, latest_promoted, read_manifest
    from .swap import CandidateError, load_candidate

    loaded = engine.loaded
    if speculator:
        path = Path(speculator)
        if not path.is_dir():
            raise ValueError(f"speculator: {path} is not a directory (expected an EAGLE-3 checkpoint: "
                             "config.json + model.safetensors)")
        drafter = load_eagle3(path, loaded, dtype=torch.float32)  # DrafterLoadError is a ValueError
        try:
            estimate = read_manifest(path).heldout_acceptance
        except (VersionError, OSError, ValueError):
            estimate = None  # another project's checkpoint: no figure, the controller explores it
        return drafter, estimate, str(path)
    root = Path(versions_dir) if versions_dir else default_versions_dir(loaded)
    version = latest_promoted(root) if root.is_dir() else None
    if version is None:
        raise ValueError(f"speculation: {mode!r} needs a trained drafter and {root} has no promoted version; "
                         "run `onspec warmup` first, pass a speculator (an EAGLE-3 checkpoint directory), "
                         "or serve with --train online")
    try:
        drafter, manifest = load_candidate(root, version, loaded)
    except CandidateError as exc:
        raise ValueError(f"speculation: cannot load version {version} of {root}: {exc}") from None
    return drafter, manifest.heldout_acceptance, f"version {version} of {root}"


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
    from ..speculation.eagle import attach_learned

    drafter, estimate, origin = _frozen_drafter(engine, speculator, versions_dir, mode)
    spec = attach_learned(engine, spec_cfg, drafter.to_dtype(engine.loaded.model.embed_tokens.weight.dtype),
                          expected_acceptance=estimate)
    log.info("speculation %r with a frozen learned drafter: %s", mode, origin)
    return spec
