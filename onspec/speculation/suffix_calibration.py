"""What a suffix-drafted token is really worth: acceptance learned online by match length.

Why: a suffix trie scores a continuation by its count ratio (SuffixDecoding, arXiv 2411.04975), and
a continuation seen once scores 1.0 whether it follows a 1-token match or a 30-token one. Verification
disagrees. On the code-editing workload (bench/speculation.py (c), a one-off log of 142 steps) the
first drafted token was accepted after half of the 1-token matches but after 34 of 35 matches of 8
tokens or more. Raw ratios made every 1-token match draft a deep chain that was thrown away, and the
controller's single per-strategy calibration could only scale all of them alike. See docs/decisions.md,
'Suffix calibration'.

What: ``MatchCalibration`` keeps, per cell (effective match length bucket x count-ratio class), the
accepted drafts and the summed count ratios of every drafted node whose parent was accepted (the
nodes verification actually tested). A node's probability is then ``ratio * a(cell)`` with
``a = (hits + w * prior) / (sum of ratios + w)``, a shrunk estimate of how far that cell's ratios
overstate acceptance. The prior is 1: a cell without evidence drafts as the raw ratios do (a prior of
0.75 made code-editing drafts too short until evidence came in: 1.88x against 1.97x with raw ratios in
one A/B run). The effective match length of a node at depth d below a match of m tokens is
m + d - 1: if its ancestors are accepted, that is the suffix the trie matched when predicting it.
Chains from a long match therefore stay confident deep down, and chains from a short one fade fast,
so the best-first tree (``SuffixTree.speculate``) and the controller's budget spend nodes where they
pay. The trees carry each node's (effective match length, count ratio) back to ``observe``
(``DraftTree.match_evidence``).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from onspec.speculation.tree import DraftTree

# Effective match lengths are bucketed on a roughly logarithmic scale: the difference between 1 and 2
# tokens of context is large, between 20 and 24 small.
LENGTH_EDGES: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24)
RATIO_CLASSES = 3   # ratio 1 (a single continuation seen), [0.5, 1), below 0.5
NUM_CELLS = len(LENGTH_EDGES) * RATIO_CLASSES


def ratio_class(ratio: float) -> int:
    return 0 if ratio >= 0.999 else (1 if ratio >= 0.5 else 2)


@dataclass
class MatchCalibration:
    """Online acceptance of suffix-drafted nodes per (match length bucket, ratio class)."""

    prior: float = 1.0           # a cell with no evidence: trust the count ratios as they are
    prior_weight: float = 4.0    # tested nodes' worth of belief in the prior
    cap: float = 0.99            # no drafted token is certain
    hits: list[float] = field(default_factory=lambda: [0.0] * NUM_CELLS)    # accepted tested nodes per cell
    ratios: list[float] = field(default_factory=lambda: [0.0] * NUM_CELLS)  # their summed count ratios

    @staticmethod
    def cell(match_len: int, ratio: float) -> int:
        bucket = max(0, bisect.bisect_right(LENGTH_EDGES, match_len) - 1)
        return bucket * RATIO_CLASSES + ratio_class(ratio)

    def factor(self, cell: int) -> float:
        return (self.hits[cell] + self.prior_weight * self.prior) / (self.ratios[cell] + self.prior_weight)

    def estimate(self, match_len: int, ratio: float) -> float:
        """Probability that a node is accepted if its parent is."""
        return min(self.cap, ratio * self.factor(self.cell(match_len, ratio)))

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        """Learn from one verified suffix tree: ``accepted`` = the node indices of its accepted path, root
        first. Every child of a node on that path was tested; per level, at most one was accepted."""
        evidence = tree.match_evidence
        if len(evidence) != len(tree.tokens):
            return
        on_path = set(accepted)
        for i in range(1, len(tree.tokens)):
            if tree.parents[i] in on_path:
                match_len, ratio = evidence[i]
                c = self.cell(match_len, ratio)
                self.hits[c] += i in on_path
                self.ratios[c] += ratio

    def table(self) -> dict[str, float]:
        """Learned factors of the cells with evidence, for logs and tests: 'L>=m r<class>' -> factor."""
        out = {}
        for c in range(len(self.hits)):
            if self.ratios[c] > 0:
                out[f"L>={LENGTH_EDGES[c // RATIO_CLASSES]} r{c % RATIO_CLASSES}"] = round(self.factor(c), 3)
        return out
