"""The parallel drafter as a proposer (strategy ``"parallel"``): one drafter forward per proposal.

``ParallelProposer`` is the EAGLE-3 proposer (speculation/eagle.py) with its drafting replaced: it keeps the same
per-sequence aux rows and drafter KV cache (so prefix reuse, shared prompts, swaps and the engine's events
work as they do for the learned strategy), but where the sequential proposer catches the cache up and then
runs one forward per tree depth, it runs ONE forward over the uncached context rows plus the rows of
depths 2..k (P-EAGLE, arXiv 2602.01469; speculation/parallel_drafter.py) and builds each tree best-first from the
k distributions (``tree_from_depths``). The context rows' keys/values are cached as usual; the depth rows'
are dropped (they stand for tokens not drafted yet).

Trees are point-mass proposals, so verification stays lossless whatever the drafter proposes. The
cost-aware depth of the sequential proposer (``price_depth``) does not apply: every depth costs the same
one forward, and the controller's plan keeps only the nodes that pay.

``attach_parallel(engine, spec_cfg, drafter)`` wires it into an engine next to the suffix drafter, and next to a
sequential EAGLE-3 head too when given one (``learned``): the draft policy then asks both and judges each by
its own record (strategy and measured-utility arm ``"parallel"``, priced as a drafter model: ``wants_aux``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .eagle import EagleDrafter, EagleProposer, attach_learned
from .parallel_drafter import PARALLEL_SOURCE, ParallelDrafter, ParallelInput, tree_from_depths
from .tree import DraftTree


class ParallelProposer(EagleProposer):
    """See the module docstring. ``topk``: children per node (each depth's top tokens)."""

    name = PARALLEL_SOURCE
    arm = PARALLEL_SOURCE   # its own measured-utility record: its one forward costs what the sequential head's
                            # several do not (wants_aux and keeps_aux come from EagleProposer: a drafter model)

    def __init__(self, drafter: ParallelDrafter, topk: int = 4, dtype: torch.dtype | None = None,
                 expected_acceptance: float | None = None) -> None:
        super().__init__(drafter, topk=topk, max_depth=drafter.depths, dtype=dtype,
                         expected_acceptance=expected_acceptance)
        self.drafter: ParallelDrafter
        self._placeholder: tuple[ParallelDrafter, torch.Tensor] | None = None   # (drafter, its fc(mask_hidden))

    def placeholder_feature(self) -> torch.Tensor:
        """The serving drafter's ``fc(mask_hidden)``, computed once per drafter: after a target step the
        drafter's weights are out of cache, and one more ``fc`` product cost ~0.1 ms a proposal."""
        if self._placeholder is None or self._placeholder[0] is not self.drafter:
            self._placeholder = (self.drafter, self.drafter.placeholder_feature())
        return self._placeholder[1]

    def depths_for(self, budget: int) -> int:
        """Depths a row with a budget of ``budget`` nodes computes: a tree of that many nodes is at most that
        deep."""
        return min(self.drafter.depths, budget)

    def swap(self, drafter: ParallelDrafter, expected_acceptance: float | None = None) -> None:
        self.max_depth = drafter.depths
        super().swap(drafter, expected_acceptance)

    # ---- the one forward -------------------------------------------------------------------------
    def parallel_input(self, active: list) -> ParallelInput:
        """The forward's inputs for ``(seq, state, budget)`` rows whose roots are pending.

        Sequence b has ``pend = n_aux - n_kv`` uncached context rows (drafter positions ``n_kv + 1 .. n_aux``;
        the last pairs the newest aux row with the root: depth 1), then depths ``2..k_b`` at positions
        ``n_aux + 1 .. n_aux + k_b - 1`` (anchor ``n_aux - 1`` plus the depth): so row r sits at ``n_kv + 1 + r``
        whatever it is. ``k_b = min(depths, budget)``: a tree of ``budget`` nodes is at most that deep, so
        rows it cannot use are not computed. Attention (the depth rows' only): every depth row sees the
        sequence's cached rows and the rows up to itself (causal), so depth d sees the context and depths < d.

        Built from Python lists and one ``fc`` product over all context rows: at batch 1 the drafter's
        forward is ~1 ms, so per-sequence tensor ops here would be a visible share of the proposal."""
        d = self.drafter
        B = len(active)
        n_kv = [st.n_kv for _, st, _ in active]
        pend = [st.n_aux - st.n_kv for _, st, _ in active]
        depths = [self.depths_for(budget) for _, _, budget in active]
        P = max(n_kv)
        R = max(p + k - 1 for p, k in zip(pend, depths))
        Q = max(depths)
        mask_token = d.parallel.mask_token_id
        tokens, depth_rows = [], []
        for (seq, _, _), lo, n, k in zip(active, n_kv, pend, depths):
            tokens.append(seq.tokens[lo + 1:lo + 1 + n] + [mask_token] * (R - n))
            depth_rows.append([min(n - 1 + i, n + k - 2) for i in range(Q)])
        ctx = torch.cat([st.aux[lo:lo + n] for (_, st, _), lo, n in zip(active, n_kv, pend)])
        ctx_features = d.project(ctx)
        features = self.placeholder_feature().expand(B, R, -1).clone()
        r = torch.arange(R)
        features[r[None, :] < torch.tensor(pend)[:, None]] = ctx_features              # the context rows
        rows = torch.tensor(depth_rows)                                                 # [B, Q]
        past = torch.tensor(n_kv)
        new = r[None, None, :] <= rows[:, :, None]                                      # causal, to itself
        old = (torch.arange(P)[None, None, :] < past[:, None, None]).expand(B, Q, P)
        past_k, past_v = self._past_kv(active, P)
        return ParallelInput(tokens=torch.tensor(tokens), features=features,
                             positions=past[:, None] + 1 + r[None, :], mask=torch.cat((old, new), dim=-1),
                             depth_rows=rows, past_k=past_k, past_v=past_v)

    def _draft(self, active: list) -> dict[int, DraftTree]:
        d = self.drafter
        inp = self.parallel_input(active)
        out = d.draft_parallel(inp)
        self.stats.forwards += 1
        pend = [st.n_aux - st.n_kv for _, st, _ in active]
        self.stats.catch_up_tokens += sum(pend)
        self._cache_rows(active, pend, out.k, out.v)
        val, idx = torch.log_softmax(out.logits.float(), dim=-1).topk(min(self.topk, d.cfg.draft_vocab_size), dim=-1)
        vals, tids = val.tolist(), d.draft_ids[idx].tolist()                          # [B][Q][topk]
        return {seq.seq_id: tree_from_depths(seq.tokens[-1], vals[b][:self.depths_for(budget)],
                                             tids[b][:self.depths_for(budget)], budget)
                for b, (seq, _, budget) in enumerate(active)}


def attach_parallel(engine, spec_cfg, drafter: ParallelDrafter, topk: int = 4, dtype: torch.dtype | None = None,
                    expected_acceptance: float | None = None, learned: LearnedHead | None = None):
    """Give ``engine`` speculation with the suffix and parallel strategies, plus the learned and hybrid ones
    when ``learned`` gives a sequential head; returns the ``Speculation``. The drafters run in ``dtype``, by
    default the engine's (as ``attach_learned`` does). Both drafters read the same aux states, so their aux
    layers must agree (a ``ValueError`` says so)."""
    from ..models.loader import DTYPES
    from .controller import attach_speculation

    if dtype is None:
        dtype = DTYPES.get(engine.cfg.dtype, drafter.dtype)
    proposer = ParallelProposer(drafter, topk=topk, dtype=dtype, expected_acceptance=expected_acceptance)
    proposer.attach(engine)
    if learned is None:
        return attach_speculation(engine, spec_cfg, extra={PARALLEL_SOURCE: proposer})
    if tuple(learned.drafter.cfg.aux_layers) != tuple(drafter.cfg.aux_layers):
        raise ValueError(f"drafter: the parallel drafter reads aux layers {tuple(drafter.cfg.aux_layers)}, the "
                         f"sequential head {tuple(learned.drafter.cfg.aux_layers)}: one engine serves one set")
    return attach_learned(engine, spec_cfg, learned.drafter, dtype=dtype,
                          expected_acceptance=learned.expected_acceptance, extra={PARALLEL_SOURCE: proposer})


@dataclass(frozen=True)
class LearnedHead:
    """A sequential EAGLE-3 head served beside a parallel drafter, and its held-out acceptance if measured."""

    drafter: EagleDrafter
    expected_acceptance: float | None = None


__all__ = ["LearnedHead", "ParallelProposer", "attach_parallel"]
