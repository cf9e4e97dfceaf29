"""Jump-forward drafting: where a request's grammar allows exactly one continuation (a key, punctuation, the
rest of an enum value, closing brackets), those tokens are proposed as a draft.

The idea is SGLang's jump-forward decoding (compressed finite-state machines), used here as a drafter
rather than as a shortcut around the model: the forced tokens still go through verification, so the output
is exactly constrained decoding's even where the model would tokenize the forced text differently (such a
draft is simply rejected at that token). xgrammar tokenizes the forced text and leaves out a last token
that a longer one could extend (``GrammarState.forced_tokens``).

Forced tokens combine with the other strategies' drafts in one tree: the chain is merged into the tree the
controller chose for the request (``with_forced_tokens``), and the merged tree is judged as strategy
``grammar`` (its calibration, its record, its measured utility) like any other.
"""

from __future__ import annotations

from .proposer import Proposer
from .tree import DraftTree, merge_trees

GRAMMAR = "grammar"
FORCED_SCORE = 0.95  # prior acceptance of a forced token; the controller calibrates it by what is accepted


class GrammarProposer(Proposer):
    """Proposes, for each request with a grammar, the chain of tokens its grammar forces next."""

    name = GRAMMAR

    def propose(self, seqs: list, budgets: dict[int, int]) -> dict[int, DraftTree]:
        out: dict[int, DraftTree] = {}
        for seq in seqs:
            if seq.grammar is None:
                continue
            forced = seq.grammar.forced_tokens()[:budgets[seq.seq_id]]
            if forced:
                out[seq.seq_id] = DraftTree.chain(seq.tokens[-1], forced, [FORCED_SCORE] * len(forced), GRAMMAR)
        return out


def with_forced_tokens(chosen: dict[int, DraftTree], candidates: dict[int, list[DraftTree]],
                       max_nodes: int) -> dict[int, DraftTree]:
    """Each request's chosen tree with its grammar's forced chain merged in (the chain alone where nothing
    else was chosen); requests without a forced chain keep their tree."""
    out = dict(chosen)
    for sid, trees in candidates.items():
        forced = next((t for t in trees if t.source == GRAMMAR and t.num_draft), None)
        if forced is None:
            continue
        other = chosen.get(sid)
        out[sid] = forced if other is None or other is forced else merge_trees([forced, other], max_nodes, GRAMMAR)
    return out
