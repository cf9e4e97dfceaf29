"""DraftTree: the one shape every proposer returns and the verifier consumes.

Node 0 is the root: the sequence's last committed token, which is not yet in the KV cache. Every other
node is a drafted token whose parent index is smaller than its own, so node order is a topological order
and a chain is simply the tree whose parents are ``[-1, 0, 1, 2, ...]``.

For verification the target runs all nodes in one forward: node ``i`` sits at position
``cache_len + depth[i]`` and may attend to the cached prefix plus its own ancestors (and itself).

``child_dists`` is optional: ``child_dists[i]`` is the drafter's distribution q over the target
vocabulary from which node ``i``'s children were *sampled* (i.i.d.). Children of a node without an
entry are treated as point masses (deterministic proposals), which keeps rejection sampling lossless
however they were chosen. ``scores[i]`` is the proposer's estimate that node ``i`` is accepted given
its parent was (used by the controller to spend a draft budget where it pays).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class DraftTree:
    tokens: list[int]
    parents: list[int]
    scores: list[float] = field(default_factory=list)
    child_dists: dict[int, torch.Tensor] = field(default_factory=dict)
    source: str = "none"
    # Suffix drafting: per node, (effective match length, count ratio) its probability came from, so the
    # drafter can learn from the verdict (speculation/suffix_calibration.py); empty for other drafters.
    match_evidence: list[tuple[int, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError("DraftTree needs one parent per token and at least the root")
        if self.parents[0] != -1:
            raise ValueError("node 0 must be the root (parent -1)")
        for i, p in enumerate(self.parents[1:], start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must precede children")
        if not self.scores:
            self.scores = [1.0] * len(self.tokens)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def root_only(cls, root_token: int) -> "DraftTree":
        return cls(tokens=[root_token], parents=[-1])

    @classmethod
    def chain(cls, root_token: int, draft: list[int], scores: list[float] | None = None,
              source: str = "chain") -> "DraftTree":
        n = len(draft)
        return cls(tokens=[root_token, *draft], parents=list(range(-1, n)),
                   scores=[1.0, *(scores or [1.0] * n)], source=source)

    # ---- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_draft(self) -> int:
        return len(self.tokens) - 1

    def depths(self) -> list[int]:
        d = [0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            d[i] = d[self.parents[i]] + 1
        return d

    def children(self, i: int) -> list[int]:
        return [j for j in range(i + 1, len(self.tokens)) if self.parents[j] == i]

    def matched_depth(self, continuation: Sequence[int]) -> int:
        """Draft tokens a greedy verifier would accept if the target's next tokens are ``continuation``:
        the depth of the longest root path whose tokens equal its prefix. For point-mass drafts this is
        also a sample of the lossless sampling verifier's accepted count when ``continuation`` was
        sampled from the target: both accept child x with probability p(x)."""
        node = n = 0
        while n < len(continuation):
            nxt = next((c for c in self.children(node) if self.tokens[c] == continuation[n]), None)
            if nxt is None:
                break
            node, n = nxt, n + 1
        return n

    def path(self, i: int) -> list[int]:
        """Node indices from the root to ``i`` inclusive."""
        out = []
        while i != -1:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def ancestor_mask(self) -> torch.Tensor:
        """Bool [n, n]: mask[i, j] is True when j is i or an ancestor of i."""
        n = len(self.tokens)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            mask[i, i] = True
            p = self.parents[i]
            if p >= 0:
                mask[i] |= mask[p]
        return mask

    def path_scores(self) -> list[float]:
        """Cumulative probability (product of scores) that each node is reached and accepted."""
        out = [1.0] * len(self.tokens)
        for i in range(1, len(self.tokens)):
            out[i] = out[self.parents[i]] * self.scores[i]
        return out

    def prune(self, keep: int) -> "DraftTree":
        """Keep the ``keep`` nodes (root included) with the highest cumulative score; ancestors of a kept
        node always score at least as high, so the result is a valid tree."""
        if keep >= len(self.tokens):
            return self
        cum = self.path_scores()
        order = sorted(range(1, len(self.tokens)), key=lambda i: (-cum[i], i))[: max(0, keep - 1)]
        kept = sorted([0, *order])
        kept_set = set(kept)
        # A node with equal cumulative score to its child could be ranked after it; repair by adding ancestors.
        for i in list(kept):
            p = self.parents[i]
            while p > 0 and p not in kept_set:
                kept_set.add(p)
                p = self.parents[p]
        return self.select(sorted(kept_set))

    def select(self, kept: list[int], child_dists: dict[int, torch.Tensor] | None = None) -> "DraftTree":
        """The tree of the nodes ``kept`` (sorted, the root and every kept node's parent included), with
        ``child_dists`` (by the old indices) in place of the tree's own where given."""
        dists = self.child_dists if child_dists is None else child_dists
        remap = {old: new for new, old in enumerate(kept)}
        return DraftTree(
            tokens=[self.tokens[i] for i in kept],
            parents=[-1 if i == 0 else remap[self.parents[i]] for i in kept],
            scores=[self.scores[i] for i in kept],
            child_dists={remap[i]: d for i, d in dists.items() if i in remap},
            source=self.source,
            match_evidence=[self.match_evidence[i] for i in kept] if self.match_evidence else [],
        )


def merge_trees(trees: list[DraftTree | None], max_nodes: int, source: str, evidence: bool = False) -> DraftTree:
    """Union of draft trees with the same root, nodes matched by token path; a node held by several trees
    keeps the largest path probability; then the ``max_nodes`` most probable nodes.

    Why merge rather than pick the tree with the highest expected accepted length (sum of path
    probabilities): the best single tree is one of the candidate node sets of the union, and keeping the
    top ``max_nodes`` nodes of the union scores at least as high, so merging never does worse by the
    estimate; it lets, say, a request's long copy and a sibling's text share one budget. The max, not a
    sum, because sources with different match lengths have incomparable counts; since every tree's path
    probability falls along a path, so does the max, and scores stay conditional probabilities <= 1.

    ``child_dists`` are dropped: every child becomes a point-mass proposal, which the verifier accepts
    losslessly whatever the proposals are (i.i.d. sampling semantics would not survive a union). A tree
    for another root cannot be merged and is left out. ``evidence``: keep the suffix drafter's
    ``match_evidence`` (of the tree whose path probability a node keeps) when every tree carries it."""
    trees = [t for t in trees if t is not None]
    if not trees:
        raise ValueError("merge_trees: no trees")
    root = trees[0].tokens[0]
    trees = [t for t in trees if t.tokens[0] == root]
    keep_evidence = evidence and all(len(t.match_evidence) == len(t.tokens) for t in trees)
    tokens, parents, path = [root], [-1], [1.0]
    ev: list[tuple[int, float]] = [(0, 1.0)]
    index: dict[tuple[int, int], int] = {}
    for tree in trees:
        ps = tree.path_scores()
        where = [0] * len(tree)
        for i in range(1, len(tree)):
            key = (where[tree.parents[i]], tree.tokens[i])
            e = tree.match_evidence[i] if keep_evidence else (0, 1.0)
            j = index.get(key)
            if j is None:
                j = index[key] = len(tokens)
                tokens.append(tree.tokens[i])
                parents.append(key[0])
                path.append(ps[i])
                ev.append(e)
            elif ps[i] > path[j]:
                path[j] = ps[i]
                ev[j] = e
            where[i] = j
    scores = [1.0] + [path[i] / path[parents[i]] if path[parents[i]] > 0 else 0.0 for i in range(1, len(tokens))]
    return DraftTree(tokens, parents, scores, source=source,
                     match_evidence=ev if keep_evidence else []).prune(max_nodes + 1)
