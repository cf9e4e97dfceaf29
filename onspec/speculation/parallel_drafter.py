"""The parallel drafter: an EAGLE-3 head that drafts every depth of a tree in ONE forward.

Why: the sequential EAGLE-3 head (speculation/eagle_model.py) runs one drafter forward per draft depth; on a
2-core CPU that is 2-3 ms a depth against a 12-14 ms target step, and drafting overhead, not draft
quality, is what keeps a learned drafter from paying on small targets. P-EAGLE (arXiv
2602.01469; the same family as Medusa heads, arXiv 2401.10774, which predict several future tokens from
one hidden state) makes a whole draft cost one forward.

Shape: the EAGLE-3 module (arXiv 2503.01840) unchanged, plus one learned vector ``mask_hidden`` in the
target's aux space ``[3 Ht]`` (where vLLM's ``Eagle3LlamaForCausalLM`` keeps it) and a fixed mask token
(``ParallelConfig.mask_token_id``, vLLM's ``ptd_token_id``). With the sequential head's position
convention (drafter position ``p`` pairs aux of token ``p - 1`` with token ``p`` and predicts token
``p + 1``), let the last committed token with an aux state sit at position ``a`` (the anchor) and the root
(the last committed token, not yet seen by the target) at ``a + 1``. One forward over these rows::

    depth 1:  fc(aux[a]),          embed(root),       rotary position a + 1   -> predicts token a + 2
    depth d:  fc(mask_hidden),     embed(mask token), rotary position a + d   -> predicts token a + d + 1

Row ``d`` stands for the (unknown) token at depth ``d - 1`` and predicts depth ``d``. Its attention sees the
context rows (positions 1..a, cached), the root row and the rows of depths ``2..d`` (itself included), never
a row of a greater depth: so depth ``d``'s prediction cannot depend on any input standing for a token at
depth ``>= d``. Depth 1 is exactly the sequential head's root row, so a head copied from an EAGLE-3 drafter
drafts depth 1 as it did.

The k distributions are marginals: depth d's does not know which tokens were drafted at depths < d. The
tree (``tree_from_depths``) is grown best-first by the product of the depths' probabilities, each node's
children being the top tokens of the next depth, under the controller's node budget.

Training (train/parallel_objective.py) reuses EAGLE-3's unrolled ``forward_train``: unroll step ``i`` is
depth ``i + 1``, and its inputs for ``i >= 1`` are the placeholders instead of the drafter's own output
(``_unroll_inputs``), with the same attention pattern (real context, then the same position's rows of the
earlier steps). So ``forward_train(..., ttt_steps=depths)[i][:, t]`` is what one proposal at root ``t``
computes for depth ``i + 1``, and the trainer's soft labels and KL apply unchanged.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError
from .eagle_model import EagleConfig, EagleDrafter, init_drafter
from .tree import DraftTree

PARALLEL_SOURCE = "parallel"


@dataclass(frozen=True)
class ParallelConfig:
    """What the parallel drafter adds to an EAGLE-3 head's shape."""

    depths: int = 5               # k: draft depths one forward predicts (P-EAGLE's ``para_depths``)
    mask_token_id: int = 0        # token fed at depths >= 2 (vLLM's ``ptd_token_id`` / ``pard_token``)

    def __post_init__(self) -> None:
        if not isinstance(self.depths, int) or not 1 <= self.depths <= 16:
            raise ConfigError("depths", f"must be an integer in [1, 16], got {self.depths!r}")
        if not isinstance(self.mask_token_id, int) or self.mask_token_id < 0:
            raise ConfigError("mask_token_id", f"must be a non-negative token id, got {self.mask_token_id!r}")


@dataclass
class ParallelInput:
    """One parallel-drafting forward over B sequences and R new rows each (built by the proposer).

    Rows of sequence b: its uncached context rows (the last of them the root, depth 1), then the rows of
    depths 2..k_b, then padding. ``depth_rows[b, d - 1]`` is the row of depth d: the rows whose outputs are
    computed (the other context rows only give their keys and values to the cache). A sequence drafting
    fewer depths than the batch's most repeats its last depth row in the remaining columns."""

    tokens: torch.Tensor          # [B, R] int64 (the mask token at depths >= 2)
    features: torch.Tensor        # [B, R, H] fc(aux) for context rows, fc(mask_hidden) at depths >= 2
    positions: torch.Tensor       # [B, R] rotary positions
    mask: torch.Tensor            # [B, Q, P + R] bool, True = may attend: the depth rows' attention
    depth_rows: torch.Tensor      # [B, Q] int64
    past_k: torch.Tensor | None   # [B, kvh, P, D] cached context rows (None: P = 0)
    past_v: torch.Tensor | None


@dataclass
class ParallelOutput:
    logits: torch.Tensor          # [B, Q, draft_vocab]: depth d's logits at [:, d - 1]
    k: torch.Tensor               # [B, kvh, R, D] the new rows' keys (the caller caches the context rows')
    v: torch.Tensor


class ParallelDrafter(EagleDrafter):
    """EAGLE-3 drafter + ``mask_hidden`` (a parameter, so ``state_dict()`` carries it under the name vLLM's
    loader looks for); see the module docstring."""

    def __init__(self, cfg: EagleConfig, parallel: ParallelConfig,
                 embed: torch.Tensor | nn.Embedding | None = None) -> None:
        if parallel.mask_token_id >= cfg.vocab_size:
            raise ConfigError("mask_token_id", f"{parallel.mask_token_id} is outside the target vocabulary "
                                               f"({cfg.vocab_size})")
        super().__init__(cfg, embed)
        self.parallel = parallel
        self.mask_hidden = nn.Parameter(torch.zeros(3 * cfg.target_hidden_size))

    def blank(self) -> "ParallelDrafter":
        return ParallelDrafter(self.cfg, self.parallel)

    @property
    def depths(self) -> int:
        return self.parallel.depths

    def unroll_steps(self, ttt_steps: int) -> int:
        """Every depth of a proposal, whatever the sequential head's ``ttt_steps``: unroll step i is depth i + 1."""
        return self.depths

    def placeholders(self, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings and features [B, T, H] of rows standing for tokens not drafted yet."""
        tok = torch.full((B, T), self.parallel.mask_token_id, dtype=torch.long, device=self.mask_hidden.device)
        return self.embed(tok), self.project(self.mask_hidden).expand(B, T, -1)

    def _unroll_inputs(self, step: int, input_ids: torch.Tensor, prenorm: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        # Depth step + 1 reads placeholders, not the data's next token nor its own previous output.
        return self.placeholders(*input_ids.shape)

    def placeholder_feature(self) -> torch.Tensor:
        """fc(mask_hidden) [H]: the feature of every row standing for a token not drafted yet."""
        return self.project(self.mask_hidden.detach())

    def draft_parallel(self, inp: ParallelInput) -> ParallelOutput:
        """The one forward of a proposal: every depth's logits (see ``ParallelInput``). Only the depth rows
        run attention, the MLP and the lm_head; the other context rows give their keys and values."""
        prenorm, k, v = self.draft_step(inp.tokens, inp.features, inp.positions, inp.past_k, inp.past_v,
                                        inp.mask, queries=inp.depth_rows)
        return ParallelOutput(self.logits(prenorm), k, v)


# ------------------------------------------------------------------------------------------------
# initialisation
# ------------------------------------------------------------------------------------------------


def from_eagle(eagle: EagleDrafter, parallel: ParallelConfig = ParallelConfig(), seed: int = 0,
               dtype: torch.dtype | None = None) -> ParallelDrafter:
    """A parallel drafter with ``eagle``'s layers, draft vocabulary and embeddings, and a fresh
    ``mask_hidden`` (normal, std 0.02, from ``seed``, as ``init_drafter`` draws its random weights). Its
    depth 1 is ``eagle``'s root prediction; depths >= 2 start untrained."""
    out = ParallelDrafter(eagle.cfg, parallel)
    state = {k: v.float() if v.is_floating_point() else v for k, v in eagle.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state["mask_hidden"] = torch.randn(out.mask_hidden.shape, generator=g) * 0.02
    out.load_state_dict(state)
    out = out.to(dtype or eagle.dtype)
    out.embed_weight = eagle.embed_weight
    return out


def init_parallel(loaded_target, cfg: EagleConfig | None = None, parallel: ParallelConfig = ParallelConfig(),
                  seed: int = 0, token_counts: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> ParallelDrafter:
    """A day-0 parallel drafter for ``loaded_target``: ``init_drafter``'s random layers and free warm start
    (lm_head rows and final norm from the target's), and a random ``mask_hidden``."""
    return from_eagle(init_drafter(loaded_target, cfg, seed, token_counts), parallel, seed, dtype)


# ------------------------------------------------------------------------------------------------
# the draft tree
# ------------------------------------------------------------------------------------------------


@dataclass(order=True)
class _Candidate:
    neg_log_path: float           # -log of the path's probability (heap order: most likely first)
    order: int                    # creation order: ties go to the earlier candidate
    parent: int                   # tree node it would hang from
    depth: int                    # its depth (1-based)
    rank: int                     # its place in that depth's top-k


def tree_from_depths(root_token: int, log_probs: list[list[float]], tokens: list[list[int]], budget: int,
                     source: str = PARALLEL_SOURCE) -> DraftTree:
    """The ``budget`` most likely nodes of the tree whose depth-d children are depth d's top tokens.

    ``log_probs[d - 1]`` / ``tokens[d - 1]``: depth d's top-k log-probabilities (descending) and their target
    ids. A node's path probability is the product of its path's probabilities (the depths' distributions
    are taken as independent given the context: that is all one forward knows). Best-first: a heap of
    candidate nodes by path probability, starting with the root's children; a node taken brings in its
    own children. A child is never likelier than its parent and is created only once its parent is taken,
    so the nodes taken form a tree in topological order: the best ``budget`` nodes of the full tree.
    Scores are the depths' probabilities (what the controller calibrates); children are point-mass
    proposals (no ``child_dists``), which the verifier accepts losslessly whatever they are."""
    out_tokens, parents, scores = [root_token], [-1], [1.0]
    heap: list[_Candidate] = []
    order = 0

    def push_children(node: int, depth: int, base: float) -> None:
        nonlocal order
        if depth > len(log_probs):
            return
        for rank, lp in enumerate(log_probs[depth - 1]):
            heapq.heappush(heap, _Candidate(base - lp, order, node, depth, rank))
            order += 1

    push_children(0, 1, 0.0)
    while heap and len(out_tokens) - 1 < budget:
        c = heapq.heappop(heap)
        node = len(out_tokens)
        lp = log_probs[c.depth - 1][c.rank]
        out_tokens.append(tokens[c.depth - 1][c.rank])
        parents.append(c.parent)
        scores.append(math.exp(lp))
        push_children(node, c.depth + 1, c.neg_log_path)
    return DraftTree(out_tokens, parents, scores, source=source)


__all__ = ["PARALLEL_SOURCE", "ParallelConfig", "ParallelDrafter", "ParallelInput", "ParallelOutput", "from_eagle",
           "init_parallel", "tree_from_depths"]
