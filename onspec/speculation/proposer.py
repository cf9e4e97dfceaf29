"""What a drafter is to the engine: the ``Proposer`` base class, with its capabilities declared, not probed.

A proposer returns draft trees and learns from the engine's events (``EngineObserver``: prefill, step,
finish, weights changed); it never writes into the engine's objects. What it needs and what it keeps are
class-level declarations the speculation glue and the draft policy read:

* ``wants_aux``: it reads the target's auxiliary hidden states, so its proposals run a drafter model (an
  expensive strategy: priced apart from the step and judged against the cheap drafters);
* ``aux_layers()``: the target layers whose inputs it reads (the engine's runner returns those);
* ``keeps_aux``: it keeps the aux rows of cache rows a sequence did not compute itself (a sibling's
  prompt, a freed slot's retained prefix) and hands them out through ``recall_aux``, so prefix reuse and
  shared prompts serve it;
* ``wraps``: the proposer whose trees it merges with others (the hybrid proposer wraps the learned one:
  asking both in one step is redundant);
* ``arm``: the measured-utility record it is judged in (speculation/utility.py), by default its name;
* ``expected_acceptance``: a drafter model's held-out acceptance length, if measured (``estimate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.events import EngineObserver
from .tree import DraftTree

if TYPE_CHECKING:
    from ..engine.sequence import Sequence
    from ..engine.step import Prefill


class Proposer(EngineObserver):
    """Base class of every drafter; see the module docstring."""

    name: str = ""
    wants_aux: bool = False
    keeps_aux: bool = False
    arm: str | None = None
    wraps: Proposer | None = None
    expected_acceptance: float | None = None

    def aux_layers(self) -> tuple[int, ...]:
        return ()

    def estimate(self) -> float | None:
        """The held-out acceptance length its drafter is expected to reach; None: unknown or model-free."""
        return self.expected_acceptance

    def price_depth(self, tokens_per_second: float, calibration: float) -> None:
        """What one committed token is worth this step, for a drafter that grows its tree depth by depth
        (``EagleProposer._depth_pays``); model-free drafters ignore it."""

    def recall_aux(self, prefill: Prefill) -> torch.Tensor | None:
        """Aux rows of rows ``prefill`` did not compute (``keeps_aux`` proposers); None if unknown."""
        return None

    def add_request(self, seq: Sequence) -> None:
        """A sequence was added (its prompt is in ``seq.tokens``)."""

    def on_commit(self, seq: Sequence, tokens: list[int]) -> None:
        """``tokens`` were appended to ``seq``."""

    def propose(self, seqs: list[Sequence], budgets: dict[int, int]) -> dict[int, DraftTree]:
        raise NotImplementedError
