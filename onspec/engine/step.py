"""The typed phase boundaries of one engine step: what crosses from the scheduler to drafting, from drafting
to verification, and from verification to everything that learns from it.

A step is draft -> verify -> commit. Each boundary is a dataclass, so a reader sees what each phase gets
and a subscriber (a proposer, the trace recorder, the server's meter, the online learner) reads fields by
name instead of unpacking tuples by position:

* ``Prefill``: rows that entered a sequence's cache, computed by this step's forward or taken from a
  sibling's or a freed slot's rows, with their aux states where known;
* ``DraftInput``: the decoding sequences of the step and the tokens the step already runs (prefill rows
  included), handed to ``Speculation.draft``;
* ``VerifyInput``: one sequence's draft tree and the target's logits rows for its nodes;
* ``Verdict``: what verification decided for one sequence, with the target's aux and final hidden rows of
  every tree node (the learned drafter's context and the trainer's data);
* ``StepResult``: the whole step, as the engine's ``on_step`` event delivers it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from ..speculation.tree import DraftTree

if TYPE_CHECKING:
    from .sequence import Sequence


PrefillOrigin = Literal["computed", "shared", "reused"]


@dataclass
class Prefill:
    """``n`` tokens of ``seq`` that entered its cache this step, ending at ``seq.cache_len``.

    ``origin``: ``computed`` by this step's forward, ``shared`` (copied from a sibling that prefilled the
    same prompt) or ``reused`` (rows a freed slot retained, see scheduler.py); ``aux`` [n, A]: their aux
    states where known (computed rows when the step asked for them; otherwise what a proposer kept)."""

    seq: Sequence
    n: int
    origin: PrefillOrigin = "computed"
    aux: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def start(self) -> int:
        return self.seq.cache_len - self.n


@dataclass
class DraftInput:
    """What drafting gets: the step's decoding sequences and the tokens the step runs without drafts."""

    decode: list[Sequence]
    step_tokens: int

    @property
    def pure_decode(self) -> bool:
        """No prefill chunk rides along: every row of the step is one decoding token."""
        return self.step_tokens == len(self.decode)


@dataclass
class VerifyInput:
    """What verification of one sequence gets: its tree and the target's logits at every node."""

    seq: Sequence
    tree: DraftTree
    logits: torch.Tensor  # [len(tree), vocab]
    mask: torch.Tensor | None = None  # the grammar's packed mask per node (engine/grammar.py), if constrained


@dataclass
class Verdict:
    """What verification decided for one sequence in one step.

    ``accepted``: tree node indices of the accepted path (node 0, the root, first); ``next_token``: the
    token the target chose after it (the bonus token); ``start``: the cache position of the root, so node
    ``accepted[k]`` sits at ``start + k``; ``aux`` [len(tree), A] and ``hidden`` [len(tree), H]: the target's
    aux states and final hidden states of every node (None where not computed)."""

    seq: Sequence
    tree: DraftTree
    accepted: list[int]
    next_token: int
    start: int
    aux: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def num_accepted(self) -> int:
        """Draft tokens accepted (the root excluded)."""
        return len(self.accepted) - 1


@dataclass
class StepResult:
    """One finished step: its decoding verdicts and its size and time."""

    verdicts: list[Verdict] = field(default_factory=list)
    rows: int = 0            # rows of the forward (prefill chunks and decoding sequences)
    tokens: int = 0          # tokens of the forward
    seconds: float = 0.0     # the forward's wall time
    num_decode: int = 0
    num_prefill: int = 0
