"""Test-only references and statistics shared by the test modules: a chi-square p-value, and deliberately
wrong or test-only verifiers that show the losslessness tests have power (they live here, not in onspec)."""

from __future__ import annotations

from unittest import mock

import torch

from onspec.speculation import verify as verify_mod
from onspec.speculation.tree import DraftTree
from onspec.speculation.verify import NoiseFn, _verify_greedy


def chisq_pvalue(observed: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness-of-fit p-value, pooling cells whose expected count is < min_expected; a
    draw in a cell of probability 0 fails outright (p = 0).

    The p-value is the chi-square survival function sf(x; df) = Q(df/2, x/2), the regularised upper
    incomplete gamma function, which torch ships as ``torch.special.gammaincc`` (so scipy is not needed;
    ``test_verify.test_chisq_pvalue_matches_tables`` checks it against published critical values)."""
    observed = observed.double().flatten()
    expected = probs.double().flatten() * observed.sum()
    impossible = expected == 0  # e.g. tokens top-p removed: one draw there fails the test outright
    if observed[impossible].sum() > 0:
        return 0.0
    observed, expected = observed[~impossible], expected[~impossible]
    small = expected < min_expected
    if small.any():
        observed = torch.cat([observed[~small], observed[small].sum(0, keepdim=True)])
        expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    stat = ((observed - expected) ** 2 / expected).sum()
    df = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _lossy_race(tree: DraftTree, target: torch.Tensor, noise: NoiseFn) -> tuple[list[int], int]:
    """A child is accepted whenever its token is among the race's two best (not only the winner), which
    over-weights drafted tokens."""
    children = [tree.children(i) for i in range(len(tree))]
    node, accepted = 0, [0]
    while True:
        p, e = target[node], noise(len(accepted) - 1).to(target.device)
        scores = torch.where(p > 0, p / e, torch.full_like(p, -1.0))
        top2 = [t for t in scores.topk(min(2, p.shape[-1])).indices.tolist() if float(p[t]) > 0]
        nxt = next((c for c in children[node] if tree.tokens[c] in top2), -1)
        if nxt < 0:
            return accepted, top2[0]
        node = nxt
        accepted.append(node)


def lossy_verify_tree(tree: DraftTree, target: torch.Tensor, greedy: bool,
                      generator: torch.Generator | None = None,
                      noise: NoiseFn | None = None) -> tuple[list[int], int]:
    """A deliberately *wrong* ``verify_tree``, to show the losslessness tests have power: rejection sampling
    that never updates the residual (over-weights proposed tokens, lets a rejected duplicate be accepted);
    with ``noise`` (seeded), a child is accepted when it is among the race's two best tokens. Greedy is
    ``verify_tree``'s."""
    assert target.dim() == 2 and target.shape[0] == len(tree), (tuple(target.shape), len(tree))
    if greedy:
        return _verify_greedy(tree, target)
    if noise is not None:
        return _lossy_race(tree, target, noise)
    # The verifier's own rejection sampling with a residual that is never updated: every test uses the
    # original p and, after rejecting all children, it draws from the original p.
    with mock.patch.object(verify_mod, "_normalise_or", lambda residual, original: original):
        return verify_mod.verify_tree(tree, target, greedy=False, generator=generator)


def verify_chain_greedy(draft: torch.Tensor, target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched greedy verification of chains, the reference ``verify_tree`` is checked against.

    ``draft`` [B, k] drafted tokens; ``target_argmax`` [B, k+1] the target's argmax after the root and after
    each drafted token. Returns ``(n_accepted [B], next_token [B])``: the length of the prefix on which
    ``draft == target_argmax[:, :k]`` and the target's argmax after it."""
    n = (draft == target_argmax[:, :-1]).int().cumprod(-1).sum(-1)
    return n, target_argmax.gather(-1, n.unsqueeze(-1).long()).squeeze(-1)


class FakeClock:
    """An injected clock (``Engine.clock``, ``Speculation.clock``): time moves only when a test says so
    (``advance``) and, with ``tick``, by that much at every reading, so timed work takes the same seconds
    on any machine."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
