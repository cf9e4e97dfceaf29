"""Drafter checkpoints of either kind: tell them apart, load and save them.

A directory holds a sequential EAGLE-3 head (``eagle_model.save_eagle3``) or a parallel drafter
(``parallel_checkpoint.save_parallel``: the same tensors plus ``mask_hidden``, and the parallel-drafting
fields in ``config.json``). The fields decide: a config naming any of ``PARALLEL_CONFIG_KEYS`` is a
parallel drafter and is loaded (and checked) as one, anything else as an EAGLE-3 head; so a parallel
config whose weights lack ``mask_hidden`` and an EAGLE-3 config whose weights carry one are both refused
with the loader's ``DrafterLoadError`` naming the tensor. ``--speculator``, published versions, the
trainer and the promotion gate all read checkpoints through ``load_drafter``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .eagle_model import CONFIG_FILE, EagleDrafter, load_eagle3, save_eagle3
from .parallel_checkpoint import PARALLEL_CONFIG_KEYS, load_parallel, save_parallel
from .parallel_drafter import ParallelDrafter

EAGLE, PARALLEL = "eagle", "parallel"
DRAFTER_KINDS = (EAGLE, PARALLEL)


def checkpoint_kind(directory: str | Path) -> str:
    """``"parallel"`` when ``config.json`` carries a parallel-drafting field, else ``"eagle"`` (an unreadable
    or missing config too: the EAGLE-3 loader then says what is wrong with it)."""
    try:
        raw = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return EAGLE
    if isinstance(raw, dict) and any(raw.get(k) not in (None, False) for k in PARALLEL_CONFIG_KEYS):
        return PARALLEL
    return EAGLE


def drafter_kind(drafter: EagleDrafter) -> str:
    """Which kind a drafter module is (its checkpoint layout, its strategy)."""
    return PARALLEL if isinstance(drafter, ParallelDrafter) else EAGLE


def kind_text(kind: str) -> str:
    """A kind in words, for messages."""
    return "a parallel drafter" if kind == PARALLEL else "an EAGLE-3 head"


def load_drafter(directory: str | Path, target, dtype: torch.dtype | None = None) -> EagleDrafter:
    """The drafter in ``directory``, of whichever kind it is; ``DrafterLoadError`` (a ``ValueError``) names
    the file and the problem."""
    if checkpoint_kind(directory) == PARALLEL:
        return load_parallel(directory, target, dtype)
    return load_eagle3(directory, target, dtype)


def save_drafter(directory: str | Path, drafter: EagleDrafter) -> Path:
    """Write ``drafter`` in its kind's layout."""
    if isinstance(drafter, ParallelDrafter):
        return save_parallel(directory, drafter)
    return save_eagle3(directory, drafter)


__all__ = ["DRAFTER_KINDS", "EAGLE", "PARALLEL", "checkpoint_kind", "drafter_kind", "kind_text", "load_drafter",
           "save_drafter"]
