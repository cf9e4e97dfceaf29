"""Verification of a DraftTree against the target model's next-token distributions.

Inputs: a :class:`DraftTree` and ``target`` [n, V], where row ``i`` is the target's *processed* next-token
distribution after node ``i`` (temperature / top-k / top-p already applied, so it is exactly the
distribution plain autoregressive sampling would draw from). Output: the accepted path of node indices
(always starting with the root, 0) and ``next_token``, the token drawn at the last accepted node.
The emitted tokens of one step are ``[tree.tokens[i] for i in accepted[1:]] + [next_token]``.

Greedy
------
A node is accepted when its token is the argmax of its parent's row and its parent is accepted; any such
path is exactly the greedy continuation, so we take the deepest accepted node (ties: lowest index; with
no duplicate siblings there is only one accepted path anyway) and emit the argmax after it.

Sampling (lossless recursive rejection sampling, SpecInfer / EAGLE)
--------------------------------------------------------------------
At an accepted node ``u`` start with the residual ``r = p = target[u]`` and try its children in order:

* i.i.d. children (``u in tree.child_dists``, children drawn i.i.d. from ``q``): accept child token ``x``
  with probability ``min(1, r[x] / q[x])``; on rejection ``r <- normalise(max(r - q, 0))`` and try the
  next child. This is one step of ordinary speculative sampling per child: a draw ``x ~ q`` that is
  accepted with prob ``min(1, r/q)`` and otherwise replaced by a draw from ``norm(max(r - q, 0))`` is
  distributed exactly as ``r``. The next sibling is a fresh independent draw from ``q``, so by induction
  over the siblings (the last "replacement" being the final draw from the residual) the token leaving
  ``u`` is distributed as ``p``.
* point-mass children (no entry; proposals may be anything chosen independently of the verifier's coins,
  duplicates included): accept ``x`` with probability ``r[x]``; on rejection ``r[x] <- 0`` and
  renormalise. "Accept ``x`` w.p. ``r[x]``, else draw from ``r`` conditioned on ``!= x``" is again exactly
  ``r``. A duplicate ``x`` after a rejected ``x`` meets ``r[x] = 0`` and is never accepted, as it must be.

If a child is accepted we move to it and repeat with ``p = target[child]``; if every child is rejected,
``next_token ~ r`` (the current residual); at a leaf ``next_token ~ target[leaf]``. Each emitted token is
therefore distributed as the target's next-token distribution given everything emitted before it, i.e.
the output is distributed exactly as target sampling.

Degenerate residual: the probability of the rejection branch equals the residual mass it leaves behind
(``sum max(r - q, 0) = TV(r, q)`` for i.i.d.; ``1 - r[x]`` for a point mass). So a residual of (near)
zero mass can only be reached with (near) zero probability -- exactly zero in exact arithmetic (``r == q``
resp. ``r == delta_x`` means every draw is accepted), with float rounding at most ``_EPS``. When it happens
we keep the residual from before the subtraction; the total-variation error this can cause is bounded by
``_EPS`` per rejection.

Caveat for proposers: i.i.d. children must really be an i.i.d. sample from ``child_dists[u]`` as seen by
the verifier. Dropping some of them depending on their *values* (e.g. pruning the low-score ones, or
de-duplicating) breaks that and makes sampling lossy; dropping a value-independent suffix is fine. Point
mass children may be pruned/deduplicated freely.

All randomness comes from ``generator`` (uniforms drawn once per call on the generator's device), so a
fixed generator state reproduces the outcome for the same inputs (but not across different drafts).

Seeded requests: exponential race on position-keyed noise (``noise=``)
----------------------------------------------------------------------
Rejection sampling consumes random numbers depending on the draft, so with it the same seed gives a
different (equally well distributed) text for every draft. A seeded request instead samples output
position ``t`` as ``argmax_x p_t(x) / E_t(x)`` with ``E_t`` i.i.d. Exp(1) keyed by (seed, t) alone
(engine/sampler.py: ``race_noise``). ``noise(d)`` returns the vector for the child of a node at depth ``d``
(output position = tokens already emitted + ``d``): every node at one depth shares it. Verification is
then greedy verification with "target token after node u" = ``argmax(target[u] / noise(depth(u)))``:
accept the deepest path whose tokens equal those target tokens and emit the target token after its last
node. Lossless: every emitted token is ``argmax p(. | prefix) / E_t`` where ``E_t`` is independent of
the prefix and of the draft (drafts only see emitted tokens, i.e. noise of earlier positions), hence an
exact draw from ``p(. | prefix)``; and the output is identical to plain seeded decoding, token for token.

Acceptance: a set S of point-mass children is accepted with probability ``p(S)`` -- the race winner is
in S -- exactly as with recursive rejection sampling, so nothing is lost for the suffix drafter. For
i.i.d. children drawn from ``q`` the race accepts less (one child: ``sum p q`` against rejection
sampling's ``sum min(p, q)``), because the winner is fixed before looking at the draft; unseeded requests
therefore keep rejection sampling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onspec.engine.sampler import race_sample
from onspec.speculation.tree import DraftTree

NoiseFn = Callable[[int], torch.Tensor]  # depth of the parent node -> Exp(1) noise [V] for its children

_EPS = 1e-6  # residual mass below which we treat the rejection branch as (numerically) impossible


def _normalise_or(r: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``r / r.sum()``, or ``fallback`` when ``r`` has (numerically) no mass left (see module docstring)."""
    s = float(r.sum())
    return fallback if s <= _EPS else r / s


def _sample(p: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from the (possibly unnormalised, non-negative) distribution ``p`` using uniform ``u``.

    ``searchsorted(right=True)`` returns the first index whose cumulative mass exceeds ``u * total``, which
    always has ``p > 0`` (zero-probability tokens cannot be drawn)."""
    c = p.cumsum(-1)
    i = torch.searchsorted(c, c[-1:] * u, right=True)
    return min(int(i), p.shape[-1] - 1)


def _uniforms(n: int, generator: torch.Generator | None) -> list[float]:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64).tolist()


def _deepest_match(tree: DraftTree, target_token: Callable[[int], int]) -> tuple[list[int], int]:
    """Accept node i when its parent is accepted and its token is ``target_token(parent)``; return the
    deepest accepted node's path (ties: lowest index) and the target token after it. ``target_token`` is
    only called for accepted nodes (parents come before children in a DraftTree)."""
    ok = [True] + [False] * (len(tree) - 1)
    best, best_depth, depth = 0, 0, tree.depths()
    for i in range(1, len(tree)):
        p = tree.parents[i]
        ok[i] = ok[p] and tree.tokens[i] == target_token(p)
        if ok[i] and depth[i] > best_depth:
            best, best_depth = i, depth[i]
    return tree.path(best), target_token(best)


def _verify_greedy(tree: DraftTree, target: torch.Tensor) -> tuple[list[int], int]:
    am = target.argmax(-1).tolist()
    return _deepest_match(tree, am.__getitem__)


def _verify_race(tree: DraftTree, target: torch.Tensor, noise: NoiseFn) -> tuple[list[int], int]:
    """Seeded verification (module docstring): the target token after node u is the race winner
    ``argmax(target[u] / noise(depth(u)))``. Winners and noise vectors are computed lazily, only for accepted
    nodes and the depths they reach (one noise vector per emitted token, as in plain seeded decoding)."""
    depth = tree.depths()
    noises: dict[int, torch.Tensor] = {}
    winners: dict[int, int] = {}

    def winner(u: int) -> int:
        if u not in winners:
            d = depth[u]
            if d not in noises:
                noises[d] = noise(d)
            winners[u] = race_sample(target[u], noises[d])
        return winners[u]

    return _deepest_match(tree, winner)


def _verify_sample(tree: DraftTree, target: torch.Tensor, generator: torch.Generator | None) -> tuple[list[int], int]:
    if target.dtype in (torch.float16, torch.bfloat16):
        target = target.float()
    children: list[list[int]] = [[] for _ in range(len(tree))]
    for i in range(1, len(tree)):
        children[tree.parents[i]].append(i)
    us = iter(_uniforms(len(tree), generator))  # <= n-1 accept tests + 1 final draw
    node, accepted = 0, [0]
    while True:
        r = target[node]
        q = tree.child_dists.get(node)
        if q is not None:
            q = q.to(device=r.device, dtype=r.dtype)
        nxt = -1
        for c in children[node]:
            x, u = tree.tokens[c], next(us)
            if q is None:  # point mass: accept w.p. r[x]
                if u < float(r[x]):
                    nxt = c
                    break
                z = r.clone()
                z[x] = 0.0
                r = _normalise_or(z, r)
            else:  # i.i.d. from q: accept w.p. min(1, r[x] / q[x])
                if u * float(q[x]) < float(r[x]):
                    nxt = c
                    break
                r = _normalise_or((r - q).clamp_(min=0.0), r)
        if nxt < 0:
            return accepted, _sample(r, next(us))
        node = nxt
        accepted.append(node)


def verify_tree(tree: DraftTree, target: torch.Tensor, greedy: bool,
                generator: torch.Generator | None = None,
                noise: NoiseFn | None = None) -> tuple[list[int], int]:
    """Verify ``tree`` against ``target`` [n, V] (row i: processed next-token distribution after node i;
    logits are fine when ``greedy``). Returns (accepted node indices from the root 0, next_token).
    Sampling uses the exponential race on ``noise`` when given (seeded requests), otherwise recursive
    rejection sampling on ``generator``."""
    assert target.dim() == 2 and target.shape[0] == len(tree), (tuple(target.shape), len(tree))
    if greedy:
        return _verify_greedy(tree, target)
    if noise is not None:
        return _verify_race(tree, target, noise)
    return _verify_sample(tree, target, generator)
