"""Tests for onspec.speculation.verify: greedy walks on hand-built trees, the batched chain helper, and a
statistical check that tree rejection sampling is lossless (and that a deliberately lossy variant fails it).

Statistical set-up: a toy "target model" over V=6 tokens that is a fixed bigram table P[prev, next]; a
decode step drafts a tree rooted at the last emitted token, verifies it, and emits the accepted draft
tokens followed by next_token. We run steps until at least two tokens are emitted and check, by chi-square
goodness of fit, that the first emitted token ~ P[ROOT] and the first two jointly ~ P[ROOT, a] * P[a, b].
Seeds are fixed, so the outcome is deterministic (each test is at alpha = 1e-3 for the lossless sampler).
"""

from __future__ import annotations

import bisect
import random

import pytest
import torch

from helpers import chisq_pvalue, lossy_verify_tree, verify_chain_greedy
from onspec.speculation.tree import DraftTree
from onspec.speculation.verify import _normalise_or, verify_tree

# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def test_chisq_pvalue_matches_tables() -> None:
    # Upper-tail critical values of chi-square at alpha = 1e-3 (NIST/SEMATECH e-Handbook, table 1.3.6.7.4):
    # df=1: 10.828, df=5: 20.515, df=35: 66.619.
    for df, crit in [(1, 10.828), (5, 20.515), (35, 66.619)]:
        p = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                          torch.tensor(crit / 2, dtype=torch.float64)))
        assert abs(p - 1e-3) < 2e-6, (df, p)


def onehot_rows(argmaxes: list[int], V: int = 10) -> torch.Tensor:
    t = torch.full((len(argmaxes), V), 0.01)
    t[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 0.9
    return t


# ------------------------------------------------------------------------------------------------
# greedy
# ------------------------------------------------------------------------------------------------


def test_greedy_chain() -> None:
    tree = DraftTree.chain(5, [1, 2, 3])
    assert verify_tree(tree, onehot_rows([1, 2, 4, 7]), greedy=True) == ([0, 1, 2], 4)
    assert verify_tree(tree, onehot_rows([1, 2, 3, 7]), greedy=True) == ([0, 1, 2, 3], 7)
    assert verify_tree(tree, onehot_rows([0, 2, 3, 7]), greedy=True) == ([0], 0)
    assert verify_tree(DraftTree.root_only(5), onehot_rows([6]), greedy=True) == ([0], 6)


def test_greedy_branching() -> None:
    #        0
    #      /   \
    #   1:7     2:3
    #   |      /   \
    #  3:1   4:4   5:9
    #               |
    #              6:2
    tree = DraftTree(tokens=[0, 7, 3, 1, 4, 9, 2], parents=[-1, 0, 0, 1, 2, 2, 5])
    assert verify_tree(tree, onehot_rows([3, 1, 9, 0, 0, 2, 8]), greedy=True) == ([0, 2, 5, 6], 8)
    assert verify_tree(tree, onehot_rows([7, 1, 9, 5, 0, 2, 8]), greedy=True) == ([0, 1, 3], 5)
    assert verify_tree(tree, onehot_rows([3, 1, 4, 0, 6, 2, 8]), greedy=True) == ([0, 2, 4], 6)
    # logits (negative, unnormalised) work as well as probabilities
    logits = torch.log(onehot_rows([3, 1, 9, 0, 0, 2, 8])) * 3.0 - 5.0
    assert verify_tree(tree, logits, greedy=True) == ([0, 2, 5, 6], 8)


def test_greedy_duplicate_siblings() -> None:
    # Nodes 1 and 2 both carry token 3; only node 2's subtree continues the greedy path -> take the deepest.
    tree = DraftTree(tokens=[0, 3, 3, 5], parents=[-1, 0, 0, 2])
    assert verify_tree(tree, onehot_rows([3, 9, 5, 1]), greedy=True) == ([0, 2, 3], 1)
    # Equal depth: lowest index wins; next token from that node's row.
    tree = DraftTree(tokens=[0, 3, 3], parents=[-1, 0, 0])
    assert verify_tree(tree, onehot_rows([3, 4, 6]), greedy=True) == ([0, 1], 4)


def test_chain_greedy_helper_matches_verify_tree() -> None:
    g = torch.Generator().manual_seed(0)
    B, k, V = 256, 5, 4
    target = torch.randn(B, k + 1, V, generator=g)
    am = target.argmax(-1)
    # Mostly-correct drafts so that every acceptance length occurs.
    draft = torch.where(torch.rand(B, k, generator=g) < 0.8, am[:, :k], torch.randint(0, V, (B, k), generator=g))
    n, nxt = verify_chain_greedy(draft, am)
    assert n.shape == (B,) and nxt.shape == (B,)
    assert set(n.tolist()) == set(range(k + 1))
    for b in range(B):
        acc, tok = verify_tree(DraftTree.chain(0, draft[b].tolist()), target[b], greedy=True)
        assert (len(acc) - 1, tok) == (int(n[b]), int(nxt[b]))


# ------------------------------------------------------------------------------------------------
# sampling: deterministic properties
# ------------------------------------------------------------------------------------------------


def test_sampling_reproducible_with_seed() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.softmax(torch.randn(7, 5, generator=g), -1)
    tree = DraftTree(tokens=[0, 1, 2, 3, 4, 0, 1], parents=[-1, 0, 0, 1, 1, 2, 5],
                     child_dists={0: torch.softmax(torch.randn(5, generator=g), -1)})
    a = [verify_tree(tree, target, False, torch.Generator().manual_seed(s)) for s in range(50)]
    b = [verify_tree(tree, target, False, torch.Generator().manual_seed(s)) for s in range(50)]
    assert a == b
    assert len(set(map(str, a))) > 1


def test_sampling_deterministic_targets() -> None:
    p = torch.zeros(4, 6)
    p[:, 2] = 1.0
    g = torch.Generator().manual_seed(0)
    # Point masses: the right token is always accepted, a wrong one always rejected.
    assert verify_tree(DraftTree.chain(0, [2, 2, 2]), p, False, g) == ([0, 1, 2, 3], 2)
    assert verify_tree(DraftTree.chain(0, [2, 5, 2]), p, False, g) == ([0, 1], 2)
    # i.i.d. children with q == p are always accepted (p/q = 1).
    q = torch.softmax(torch.randn(6, generator=g), -1)
    target = q.expand(3, 6).contiguous()
    tree = DraftTree(tokens=[0, 4, 1], parents=[-1, 0, 0], child_dists={0: q})
    for s in range(100):
        assert verify_tree(tree, target, False, torch.Generator().manual_seed(s))[0] == [0, 1]


def test_point_mass_duplicate_never_accepted_after_rejection() -> None:
    target = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    tree = DraftTree(tokens=[2, 0, 0], parents=[-1, 0, 0])
    outs = [verify_tree(tree, target, False, torch.Generator().manual_seed(s)) for s in range(400)]
    assert all(acc != [0, 2] for acc, _ in outs)
    assert {(tuple(a), t) for a, t in outs} == {((0, 1), 2), ((0,), 1)}
    lossy = [lossy_verify_tree(tree, target, False, torch.Generator().manual_seed(s)) for s in range(400)]
    assert any(acc == [0, 2] for acc, _ in lossy)  # the lossy variant does accept the duplicate


def test_degenerate_residual_falls_back() -> None:
    r = torch.tensor([0.25, 0.75])
    assert torch.equal(_normalise_or(torch.zeros(2), r), r)
    assert torch.allclose(_normalise_or(torch.tensor([1.0, 3.0]), r), r)


# ------------------------------------------------------------------------------------------------
# sampling: statistical losslessness
# ------------------------------------------------------------------------------------------------

V, ROOT, N_TRIALS = 6, 0, 20000

_g = torch.Generator().manual_seed(1234)
P = torch.softmax(torch.randn(V, V, generator=_g, dtype=torch.float64), -1)  # target bigram table
_Q = torch.softmax(1.5 * torch.randn(V, V, generator=_g, dtype=torch.float64), -1)
_Q[torch.arange(V), P.argmax(-1)] = 0.0  # the drafter can never propose the target's favourite token
Q = _Q / _Q.sum(-1, keepdim=True)  # drafter's sampling table (q != p, with zeros where p > 0)
Q_CUM = [Q[i].cumsum(0).tolist() for i in range(V)]
ORDER = [P[i].argsort(descending=True).tolist() for i in range(V)]  # most to least likely next tokens

PAIR_PROBS = P[ROOT][:, None] * P  # P(first = a, second = b)


def _q_draw(prev: int, rng: random.Random) -> int:
    c = Q_CUM[prev]
    return min(bisect.bisect_right(c, rng.random() * c[-1]), V - 1)


class _Builder:
    def __init__(self, root: int) -> None:
        self.tokens, self.parents, self.dists = [root], [-1], {}

    def add(self, parent: int, tok: int) -> int:
        self.tokens.append(tok)
        self.parents.append(parent)
        return len(self.tokens) - 1

    def iid(self, parent: int, k: int, rng: random.Random) -> list[int]:
        self.dists[parent] = Q[self.tokens[parent]]
        return [self.add(parent, _q_draw(self.tokens[parent], rng)) for _ in range(k)]

    def build(self) -> DraftTree:
        return DraftTree(tokens=self.tokens, parents=self.parents, child_dists=self.dists)


def bad_chain(root: int, rng: random.Random) -> DraftTree:
    b, n = _Builder(root), 0
    for _ in range(3):
        n = b.add(n, ORDER[b.tokens[n]][-1])
    return b.build()


def bad_tree(root: int, rng: random.Random) -> DraftTree:
    # root -> [worst, worst (duplicate), 2nd worst], each -> [worst, 2nd worst]
    b = _Builder(root)
    o = ORDER[root]
    for t in (o[-1], o[-1], o[-2]):
        c = b.add(0, t)
        for t2 in (ORDER[t][-1], ORDER[t][-2]):
            b.add(c, t2)
    return b.build()


def good_chain(root: int, rng: random.Random) -> DraftTree:
    b, n = _Builder(root), 0
    for _ in range(3):
        n = b.add(n, ORDER[b.tokens[n]][0])
    return b.build()


def good_tree(root: int, rng: random.Random) -> DraftTree:
    # root -> [best, 2nd, best (duplicate)], best -> [best, 2nd] -> best
    b = _Builder(root)
    o = ORDER[root]
    for t in (o[0], o[1], o[0]):
        c = b.add(0, t)
        for t2 in ORDER[t][:2]:
            b.add(c, t2)
    b.add(2, ORDER[b.tokens[2]][0])
    return b.build()


def sampled_chain(root: int, rng: random.Random) -> DraftTree:
    b, n = _Builder(root), 0
    for _ in range(3):
        (n,) = b.iid(n, 1, rng)
    return b.build()


def sampled_tree(root: int, rng: random.Random) -> DraftTree:
    b = _Builder(root)
    for c in b.iid(0, 3, rng):
        b.iid(c, 2, rng)
    return b.build()


def mixed_tree(root: int, rng: random.Random) -> DraftTree:
    # i.i.d. children at the root, point masses (the drafter's own argmax plus an unlikely token) below.
    b = _Builder(root)
    for c in b.iid(0, 2, rng):
        t = b.tokens[c]
        b.add(c, int(Q[t].argmax()))
        b.add(c, ORDER[t][-1])
    return b.build()


DRAFTERS = {f.__name__: f for f in (bad_chain, bad_tree, good_chain, good_tree,
                                    sampled_chain, sampled_tree, mixed_tree)}
_DETERMINISTIC = {"bad_chain", "bad_tree", "good_chain", "good_tree"}


def emitted_pairs(verify, drafter, n_trials: int = N_TRIALS, seed: int = 0) -> torch.Tensor:
    """Counts [V, V] of the first two emitted tokens over n_trials independent decodes from ROOT."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed + 1)
    cache: dict[int, tuple[DraftTree, torch.Tensor]] = {}
    counts = [0] * (V * V)
    for _ in range(n_trials):
        out: list[int] = []
        last = ROOT
        while len(out) < 2:
            if drafter.__name__ in _DETERMINISTIC:
                if last not in cache:
                    t = drafter(last, rng)
                    cache[last] = (t, P[t.tokens])
                tree, target = cache[last]
            else:
                tree = drafter(last, rng)
                target = P[tree.tokens]
            acc, nxt = verify(tree, target, False, gen)
            out += [tree.tokens[i] for i in acc[1:]]
            out.append(nxt)
            last = out[-1]
        counts[out[0] * V + out[1]] += 1
    return torch.tensor(counts, dtype=torch.float64).view(V, V)


def pvalues(counts: torch.Tensor) -> tuple[float, float]:
    """(first-token marginal p-value, first-two-tokens joint p-value)."""
    return chisq_pvalue(counts.sum(1), P[ROOT]), chisq_pvalue(counts, PAIR_PROBS)


def test_statistical_setup_is_sane() -> None:
    assert float((PAIR_PROBS * N_TRIALS).min()) > 1.0  # pooling only merges a few cells
    assert float((P - Q).abs().sum(-1).min()) > 0.3  # drafter really differs from the target
    # The good drafter accepts often and reaches depth 2, the bad one rarely does: the test covers both.
    t = good_tree(ROOT, random.Random(0))
    depths = [len(verify_tree(t, P[t.tokens], False, torch.Generator().manual_seed(s))[0]) - 1 for s in range(300)]
    assert sum(d >= 2 for d in depths) > 30


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_lossless(name: str) -> None:
    counts = emitted_pairs(verify_tree, DRAFTERS[name])
    p_first, p_pair = pvalues(counts)
    assert p_first > 1e-3, (name, p_first)
    assert p_pair > 1e-3, (name, p_pair)


@pytest.mark.parametrize("name", ["bad_chain", "bad_tree", "sampled_tree"])
def test_lossy_variant_fails(name: str) -> None:
    counts = emitted_pairs(lossy_verify_tree, DRAFTERS[name])
    p_first, p_pair = pvalues(counts)
    assert min(p_first, p_pair) < 1e-6, (name, p_first, p_pair)
