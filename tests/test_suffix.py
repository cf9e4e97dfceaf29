"""Tests for onspec.speculation.suffix: the bounded suffix trie and the model-free SuffixProposer."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from onspec.config import SpecConfig
from onspec.engine.step import StepResult, Verdict
from onspec.speculation.suffix import SuffixProposer, SuffixTree
from onspec.speculation.suffix_calibration import MatchCalibration
from onspec.speculation.tree import DraftTree


def naive_counts(seqs: dict[int, list[int]], depth: int) -> Counter:
    c: Counter = Counter()
    for s in seqs.values():
        for i in range(len(s)):
            for length in range(1, depth + 1):
                if i + length <= len(s):
                    c[tuple(s[i:i + length])] += 1
    return c


def count_nodes(tree: SuffixTree) -> int:
    """Materialized nodes under the root, checking the leaf invariant on the way (white-box)."""
    stack, total = [tree._root], 0
    while stack:
        node = stack.pop()
        if node.seq is not None:
            assert node.count == 1 and node.children is None
        for child in (node.children or {}).values():
            assert 0 < child.count <= node.count
            total += 1
            stack.append(child)
    return total


def occurs_in(seen: list[int], path: list[int]) -> bool:
    m = len(path)
    return any(seen[i:i + m] == path for i in range(len(seen) - m + 1))


def assert_valid(tree: DraftTree, root: int, max_nodes: int) -> None:
    assert tree.tokens[0] == root and tree.parents[0] == -1
    assert all(0 <= p < i for i, p in enumerate(tree.parents[1:], start=1))
    assert tree.num_draft <= max_nodes
    assert all(0.0 < s <= 1.0 for s in tree.scores)
    assert tree.source == "suffix"


# ---- SuffixTree ---------------------------------------------------------------------------------
def test_match_longest_suffix() -> None:
    t = SuffixTree(max_depth=8)
    t.extend("a", [1, 2, 3, 4, 5])
    assert t.match([9, 2, 3, 4])[1] == 3
    assert t.match([9, 9, 3])[1] == 1
    assert t.match([7])[1] == 0
    assert t.match([])[1] == 0
    # capped at max_depth - 1 so there is room for a drafted token
    t2 = SuffixTree(max_depth=4)
    t2.extend(0, list(range(10)))
    assert t2.match(list(range(8)))[1] == 3


def test_match_self_len_ignores_the_live_occurrence() -> None:
    t = SuffixTree(max_depth=8)
    ctx = [1, 2, 3, 7, 1, 2, 3]
    t.extend(0, ctx)
    assert t.match(ctx)[1] == 7  # the context itself is in the tree ...
    assert t.match(ctx, self_len=len(ctx))[1] == 3  # ... but only [1,2,3] occurs elsewhere
    assert t.speculate(ctx, 4, 0.1, 4.0, self_len=len(ctx)).tokens[1:] == [7, 1, 2, 3]


def test_counts_after_extend_and_remove_match_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(150):
        depth, alphabet = rng.randint(2, 6), rng.randint(1, 3)
        tree, seqs = SuffixTree(depth), {}
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.15 and seqs:
                key = rng.choice(list(seqs))
                assert tree.remove(key)
                del seqs[key]
            else:
                key = rng.randint(0, 4)
                chunk = [rng.randrange(alphabet) for _ in range(rng.randint(1, 5))] * rng.choice((1, 3))
                tree.extend(key, chunk)
                seqs.setdefault(key, []).extend(chunk)
            expected = naive_counts(seqs, depth)
            for s, c in expected.items():
                assert tree.count(s) == c
            for length in range(1, min(depth, 3) + 1):  # absent strings too
                for s in itertools.product(range(alphabet + 1), repeat=length):
                    assert tree.count(s) == expected.get(s, 0)
            assert tree.num_tokens == sum(map(len, seqs.values()))
            assert tree.num_nodes == count_nodes(tree)
        for key in list(seqs):
            tree.remove(key)
        assert tree.num_nodes == 0 and tree.num_tokens == 0 and len(tree) == 0
    assert not SuffixTree(4).remove("missing")


def test_incremental_extend_equals_bulk() -> None:
    rng = random.Random(1)
    toks = [rng.randrange(4) for _ in range(300)]
    a, b = SuffixTree(6), SuffixTree(6)
    a.extend(0, toks)
    for tok in toks:
        b.extend(0, [tok])
    for i in range(len(toks)):
        for length in range(1, 7):
            s = toks[i:i + length]
            assert a.count(s) == b.count(s)
    assert a.num_nodes == b.num_nodes


def test_counts_simple() -> None:
    t = SuffixTree(3)
    t.extend(0, [1, 2, 1, 2])
    assert t.count([1]) == 2 and t.count([1, 2]) == 2 and t.count([2, 1]) == 1
    assert t.count([1, 2, 1]) == 1 and t.count([1, 2, 1, 2]) == 0  # deeper than max_depth: not tracked
    t.extend(1, [1, 2])
    assert t.count([1, 2]) == 3
    t.remove(0)
    assert t.count([1, 2]) == 1 and t.count([2, 1]) == 0


def test_speculate_picks_most_frequent_continuation() -> None:
    t = SuffixTree(8)
    for k, tail in enumerate([[3, 9], [3, 9], [3, 9], [4, 8]]):
        t.extend(k, [1, 2, *tail])
    d = t.speculate([7, 1, 2], max_nodes=1, min_prob=0.1, alpha=4.0)
    assert d.tokens == [2, 3] and d.scores[1] == pytest.approx(0.75)
    d = t.speculate([7, 1, 2], max_nodes=8, min_prob=0.1, alpha=4.0)
    by_token = dict(zip(d.tokens[1:], d.path_scores()[1:]))
    assert by_token == pytest.approx({3: 0.75, 9: 0.75, 4: 0.25, 8: 0.25})
    assert d.tokens.index(9) < d.tokens.index(4)  # 3 -> 9 (prob 1) ranks above the 4 branch


def test_denominator_is_node_count_when_sequences_end() -> None:
    t = SuffixTree(8)
    t.extend(0, [1, 2, 5])
    t.extend(1, [1, 2])  # ends after [1, 2]: half the mass is "stop"
    d = t.speculate([1, 2], max_nodes=4, min_prob=0.1, alpha=4.0)
    assert d.tokens == [2, 5] and d.scores[1] == pytest.approx(0.5)


def test_min_prob_stops_expansion() -> None:
    t = SuffixTree(8)
    for k, tail in enumerate([3, 3, 3, 4]):
        t.extend(k, [1, 2, tail])
    assert 4 in t.speculate([1, 2], 8, min_prob=0.2, alpha=4.0).tokens
    d = t.speculate([1, 2], 8, min_prob=0.3, alpha=4.0)
    assert d.tokens == [2, 3]
    assert all(p >= 0.3 for p in d.path_scores())


def test_alpha_caps_depth() -> None:
    t = SuffixTree(32)
    t.extend(0, list(range(20)))
    assert max(t.speculate([5], 16, 0.1, alpha=2.0).depths()) == 2       # match_len 1
    assert max(t.speculate([4, 5], 16, 0.1, alpha=2.0).depths()) == 4    # match_len 2
    assert max(t.speculate([4, 5], 16, 0.1, alpha=1.5).depths()) == 3
    d = t.speculate([2, 3, 4, 5], 16, 0.1, alpha=4.0)
    assert d.tokens[1:] == list(range(6, 20))  # runs out of text before the cap


def test_max_nodes_respected_and_tree_valid() -> None:
    rng = random.Random(2)
    t = SuffixTree(16)
    for k in range(20):
        t.extend(k, [rng.randrange(3) for _ in range(50)])
    for max_nodes in (0, 1, 3, 7, 16, 40):
        ctx = [rng.randrange(3) for _ in range(10)]
        d = t.speculate(ctx, max_nodes, 0.01, 4.0)
        assert_valid(d, ctx[-1], max_nodes)
        if max_nodes:
            assert d.num_draft > 0
        # scores are count ratios: path probability is the product, and siblings sum to <= 1
        for i in range(len(d)):
            assert sum(d.scores[c] for c in d.children(i)) <= 1.0 + 1e-9
        # best-first: every node scores at least as high as any node it was preferred to
        ps = d.path_scores()
        assert all(ps[d.parents[i]] >= ps[i] for i in range(1, len(d)))
    with pytest.raises(ValueError):
        t.speculate([], 4, 0.1, 4.0)


def test_leaf_tail_drafts_after_split() -> None:
    t = SuffixTree(10)
    t.extend("a", [1, 2, 3, 4, 5, 6, 7, 8])
    t.extend("b", [0, 2, 3, 4, 9])  # splits a's leaves for [2, 3, 4]
    d = t.speculate([2, 3, 4], 8, 0.1, 4.0)
    assert sorted(zip(d.tokens[1:], d.scores[1:]))[:2] == [(5, 0.5), (6, 1.0)]
    assert d.tokens[1:] == [5, 9, 6, 7, 8]


# ---- SuffixProposer -----------------------------------------------------------------------------
def make(**kw) -> SuffixProposer:
    return SuffixProposer(SpecConfig(**kw))


def test_propose_empty_when_nothing_matches() -> None:
    sp = make()
    sp.add_request(0, [1, 2, 3, 4, 5])
    d = sp.propose(0, 8)
    assert d.tokens == [5] and d.parents == [-1] and d.source == "suffix"


def test_long_match_falls_back_to_a_match_with_room_to_draft() -> None:
    t = SuffixTree(8)
    toks = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    t.extend(0, toks)
    assert t.match([0, 1, 2, 3, 4, 5, 6, 7])[1] == 7  # leaves room for 1 token only
    d = t.speculate([0, 1, 2, 3, 4, 5, 6, 7], 16, 0.1, alpha=4.0)
    assert d.tokens[1:] == [8, 9, 10, 11, 12]  # drafted from the 2-token match [6, 7] (depth 6)
    assert t._roomiest_len(7, 16, 4.0) == 2 and t._roomiest_len(7, 3, 4.0) == 5


def test_repetitive_text_yields_long_drafts() -> None:
    phrase = list(range(100, 112))
    sp = make(suffix_max_depth=32, suffix_alpha=4.0, suffix_calibrate=False)  # raw count ratios
    sp.add_request(0, [1, 2, 3] + phrase * 4 + phrase[:3])
    d = sp.propose(0, 16)
    assert_valid(d, phrase[2], 16)
    assert d.is_chain() and d.num_draft == 16
    assert d.tokens[1:] == (phrase * 3)[3:19]
    # the self-occurrence is discounted, so the chain is confident; it halves only where one of the two
    # earlier occurrences of the matched 16 tokens runs into the end of the context
    assert d.scores[1:13] == [1.0] * 12 and min(d.scores) == 0.5
    assert sum(d.path_scores()[1:]) == pytest.approx(12 + 4 * 0.5)


def test_group_sharing_sibling_output_drafts_for_sibling() -> None:
    prompt = [7, 8, 9]
    answer = [50, 51, 52, 53, 54, 55, 56, 57, 58, 59]
    sp = make()
    sp.add_request(0, prompt, group="g")
    sp.add_request(1, prompt, group="g")
    sp.add_request(2, prompt)  # not in the group
    sp.on_commit(0, answer)
    for seq_id in (1, 2):
        sp.on_commit(seq_id, answer[:2])
    d = sp.propose(1, 8)
    assert d.tokens == [51, 52, 53, 54, 55, 56, 57, 58, 59]
    assert sp.propose(1, 8, sources=("request",)).num_draft == 0
    assert sp.propose(2, 8).num_draft == 0
    assert sp.group_tree("g") is not None and sp.group_tree("g").count([50, 51]) == 2
    # the finished sibling's output keeps drafting for the rest of the group
    sp.finish(0)
    assert sp.propose(1, 8, sources=("group",)).tokens[1:] == answer[2:]


def test_own_output_in_group_tree_is_discounted() -> None:
    sp = make()
    sp.add_request(0, [7, 8, 9], group="g")
    sp.on_commit(0, [40, 41, 42, 43])
    # only this request's own (live) output is in the group tree: nothing to draft from it
    assert sp.propose(0, 8, sources=("group",)).num_draft == 0


def test_global_store_drafts_and_fifo_eviction() -> None:
    sp = make(global_store_requests=2)
    outputs = [[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]]
    for i, out in enumerate(outputs):
        sp.add_request(i, [1])
        sp.on_commit(i, out)
        sp.finish(i)
    assert len(sp._global) == 0  # finished outputs join the store when a draft (or a reader) needs it
    g = sp.global_tree()
    assert sp.stats()["global_requests"] == 2
    assert g.count([10, 11]) == 0 and g.count([20, 21]) == 1 and g.count([30, 31]) == 1
    ref = SuffixTree(g.max_depth)
    ref.extend("b", outputs[1])
    ref.extend("c", outputs[2])
    assert g.num_nodes == ref.num_nodes and g.num_tokens == ref.num_tokens == 8
    for s in naive_counts({1: outputs[1], 2: outputs[2]}, 4):
        assert g.count(s) == ref.count(s)
    sp.add_request(9, [5, 20, 21])
    assert sp.propose(9, 8).tokens == [21, 22, 23]
    sp.add_request(10, [5, 10, 11])
    assert sp.propose(10, 8).num_draft == 0  # evicted


def test_global_store_disabled_and_abort() -> None:
    sp = make(global_store_requests=0)
    sp.add_request(0, [1])
    sp.on_commit(0, [2, 3, 4])
    sp.finish(0)
    assert sp.stats()["global_requests"] == 0
    sp2 = make()
    sp2.add_request(0, [1])
    sp2.on_commit(0, [2, 3, 4])
    sp2.finish(0, keep_output=False)
    assert sp2.stats()["global_requests"] == 0


def test_finish_cleans_up() -> None:
    sp = make()
    sp.add_request(0, [1, 2], group="g")
    sp.add_request(1, [1, 2], group="g")
    sp.on_commit(0, [3, 4])
    sp.finish(0)
    assert sp.group_tree("g") is not None
    sp.finish(1)
    sp.finish(1)  # idempotent
    assert sp.group_tree("g") is None
    st = sp.stats()
    assert st["requests"] == 0 and st["groups"] == 0 and st["global_requests"] == 1
    with pytest.raises(KeyError):
        sp.propose(0)
    with pytest.raises(KeyError):
        sp.on_commit(1, [5])
    # a reused seq_id starts fresh, including in a group whose old member output is still there
    sp.add_request(0, [9], group="h")
    sp.add_request(5, [9], group="h")
    sp.on_commit(0, [60, 61, 62])
    sp.finish(0)
    sp.add_request(0, [9], group="h")
    sp.on_commit(0, [60])
    assert sp.propose(0, 4, sources=("group",)).tokens == [60, 61, 62]
    with pytest.raises(ValueError):
        sp.add_request(0, [1])
    with pytest.raises(ValueError):
        sp.add_request(99, [])
    with pytest.raises(ValueError):
        sp.propose(0, 4, sources=("bogus",))


def test_merge_keeps_best_nodes_from_all_sources() -> None:
    sp = make(global_store_requests=4)
    sp.add_request(0, [1])
    sp.on_commit(0, [5, 6, 7, 8, 9])
    sp.finish(0)
    sp.add_request(1, [5, 6, 70, 71, 72, 1, 5])
    req = sp.propose(1, 8, sources=("request",))
    glob = sp.propose(1, 8, sources=("global",))
    both = sp.propose(1, 8)
    assert_valid(both, 5, 8)
    assert req.tokens[1] == glob.tokens[1] == 6
    assert set(req.tokens) | set(glob.tokens) == set(both.tokens)
    assert sum(both.path_scores()[1:]) >= max(sum(req.path_scores()[1:]), sum(glob.path_scores()[1:]))
    assert sp.propose(1, 2).num_draft == 2
    assert sp.propose(1, 0).tokens == [5]


def test_long_context_steps_are_correct() -> None:
    """A 2000-token context driven step by step: drafts stay valid and are truthful continuations of the
    text the proposer has seen (the cost of these steps is measured by a script, not asserted here)."""
    rng = random.Random(3)
    phrases = [[rng.randrange(32000) for _ in range(rng.randint(5, 30))] for _ in range(40)]
    text: list[int] = []
    while len(text) < 2600:
        text += rng.choice(phrases) if rng.random() < 0.7 else [rng.randrange(32000) for _ in range(3)]
    sp = make(max_draft_tokens=16)
    sp.add_request(0, text[:1000], group="g")
    sp.on_commit(0, text[1000:2000])
    pos, accepted, drafted = 2000, 0, 0
    seen = text[:2000]
    while pos < 2600:
        d = sp.propose(0)
        assert_valid(d, seen[-1], 16)
        drafted += d.num_draft
        # every drafted path is a continuation that occurred in the seen text after the matched suffix
        for i in range(1, len(d)):
            path = [d.tokens[j] for j in d.path(i)]
            assert occurs_in(seen, path)
        # greedy acceptance along the tree, then commit those tokens plus one "bonus" token
        n_acc = d.matched_depth(text[pos:])
        commit = text[pos:pos + n_acc + 1]
        sp.on_commit(0, commit)
        seen += commit
        pos += len(commit)
        accepted += n_acc
    assert drafted > 0 and accepted > 100  # repetitive text: drafts pay off
    assert sp.stats()["proposals"] > 0


def test_matched_depth_follows_the_continuation() -> None:
    # root 5 -> {7, 8}, 8 -> 9
    tree = DraftTree([5, 7, 8, 9], [-1, 0, 0, 2])
    assert tree.matched_depth([8, 9, 1]) == 2
    assert tree.matched_depth([7, 9]) == 1
    assert tree.matched_depth([1, 7]) == 0
    assert tree.matched_depth([]) == 0


def _group_ceiling_bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "group_ceiling.py"
    spec = importlib.util.spec_from_file_location("group_ceiling_bench", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_group_ceiling_replay_credits_sibling_text_only_to_group_drafting() -> None:
    """bench/group_ceiling.py's replay: four siblings with the same never-repeating output. Alone, nothing
    drafts (acceptance exactly 1); sequentially, siblings 1-3 copy sibling 0; in lockstep they copy
    whichever sibling is ahead, so they leapfrog. Every recorded token is replayed exactly once."""
    bench = _group_ceiling_bench()
    out = list(range(100, 160))
    outputs = [list(out) for _ in range(4)]
    cfg = SpecConfig()
    figures = {s: bench.replay([1, 2, 3], outputs, s, cfg) for s in bench.SETTINGS}
    for tokens, steps, _ in figures.values():
        assert tokens == 4 * len(out)
    acc = {s: tokens / steps for s, (tokens, steps, _) in figures.items()}
    assert acc["per-request"] == 1.0
    assert figures["per-request"][2] == 0
    assert acc["group, sequential"] > 2.0  # sibling 0 alone at 1.0, the others far above
    assert acc["group, lockstep"] > 2.0


# ---- acceptance calibration by match length (speculation/suffix_calibration.py) ----------------------------
def test_calibration_credits_only_the_nodes_verification_tested() -> None:
    # root -> 1 (len 2, ratio 1) -> 3 (len 3) -> 4 (len 4); root -> 2 (len 2, ratio 0.5) -> 5 (len 3)
    tree = DraftTree([5, 7, 8, 9, 10, 11], [-1, 0, 0, 1, 3, 2],
                     match_evidence=[(0, 1.0), (2, 1.0), (2, 0.5), (3, 1.0), (4, 1.0), (3, 1.0)])
    cal = MatchCalibration()
    cal.observe(tree, [0, 1])  # node 1 accepted, then node 3 rejected: 4 and 5 were never tested
    tested = {c: (h, r) for c, (h, r) in enumerate(zip(cal.hits, cal.ratios)) if r}
    assert tested == {cal.cell(2, 1.0): (1.0, 1.0), cal.cell(2, 0.5): (0.0, 0.5), cal.cell(3, 1.0): (0.0, 1.0)}
    assert cal.cell(4, 1.0) != cal.cell(3, 1.0)  # so node 4 left its own cell untouched
    cal.observe(DraftTree([5, 7], [-1, 0]), [0, 1])  # a tree without evidence (another drafter) teaches nothing
    assert sum(cal.ratios) == 2.5


def test_calibration_shrinks_drafts_after_short_matches_and_keeps_long_chains() -> None:
    cal = MatchCalibration()
    short = DraftTree([5, 6, 7], [-1, 0, 1], match_evidence=[(0, 1.0), (1, 1.0), (2, 1.0)])
    long = DraftTree([5, 6, 7], [-1, 0, 1], match_evidence=[(0, 1.0), (12, 1.0), (13, 1.0)])
    for _ in range(60):
        cal.observe(short, [0])          # 1-token matches: the first draft is always rejected
        cal.observe(long, [0, 1, 2])     # 12-token matches: always accepted
    assert cal.estimate(1, 1.0) < 0.1 < 0.95 < cal.estimate(12, 1.0) <= cal.cap
    # Raw count ratios say 1.0 for both continuations below; the calibrated tree drops the 1-token match.
    rng = random.Random(5)
    text = [rng.randrange(1000, 2000) for _ in range(40)]
    t = SuffixTree(32)
    t.extend(0, [7, 3, 4] + text)
    assert t.speculate([9, 7], 8, 0.1, 4.0).num_draft == 4                  # match [7]: depth cap 4
    assert t.speculate([9, 7], 8, 0.1, 4.0, estimate=cal.estimate).num_draft == 0
    chain = t.speculate(text[:12], 8, 0.1, 4.0, estimate=cal.estimate)     # a 12-token match
    assert chain.tokens[1:] == text[12:20]
    # lengths 12-15 share the learned cell; from 16 on (another cell, no evidence yet) the prior takes over
    assert min(chain.path_scores()[:5]) > 0.9
    assert chain.scores[5] == pytest.approx(min(cal.cap, cal.prior))
    assert chain.match_evidence[1:] == [(12 + d, 1.0) for d in range(8)]


def test_the_suffix_drafter_learns_from_verdicts_and_its_evidence_survives_merge_and_prune() -> None:
    from onspec.speculation.controller import SuffixAdapter

    adapter = SuffixAdapter(SpecConfig(global_store_requests=4))
    sp = adapter.inner
    sp.add_request(0, [1])
    sp.on_commit(0, [5, 6, 7, 8, 9])
    sp.finish(0)
    sp.add_request(1, [5, 6, 70, 71, 72, 1, 5])
    both = sp.propose(1, 8)  # request and global trees merged
    assert len(both.match_evidence) == len(both.tokens) and both.match_evidence[0] == (0, 1.0)
    pruned = both.prune(3)
    assert [pruned.match_evidence[i] for i in range(len(pruned))] == \
        [both.match_evidence[both.tokens.index(tok)] for tok in pruned.tokens]
    before = sp.calibration.estimate(1, 1.0)

    class Seq:
        seq_id = 1

    adapter.on_step(StepResult([Verdict(Seq(), pruned, [0], 3, start=0)]))  # its first node rejected
    assert sp.calibration.estimate(1, 1.0) < before
    assert SuffixProposer(SpecConfig(suffix_calibrate=False)).calibration is None


def test_speculation_bench_variants_parse_typed_spec_fields() -> None:
    """bench/speculation.py --variant builds extra auto engines from SpecConfig overrides (A/B in one run)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "speculation.py"
    spec = importlib.util.spec_from_file_location("speculation_bench", path)
    bench = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--variant", "raw:suffix_calibrate=false,suffix_alpha=2", "--budgets", "32"])
    assert args.variants == {"auto, raw": {"suffix_calibrate": False, "suffix_alpha": 2.0},
                             "auto, 32 nodes": {"max_draft_tokens": 32}}
    for bad in ("nocolon", "x:bogus=1", "x:suffix_calibrate=maybe", "x:max_draft_tokens=many"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--variant", bad])


def test_tries_catch_up_lazily_and_draft_as_if_updated_eagerly() -> None:
    """A request's trie and the global store take committed tokens and finished outputs when a draft reads
    them; the drafts are those of a proposer whose tries were brought up to date after every commit."""
    rng = random.Random(7)
    phrases = [[rng.randrange(50) for _ in range(6)] for _ in range(5)]
    lazy, eager = make(global_store_requests=3), make(global_store_requests=3)
    for i in range(6):
        prompt = [t for _ in range(3) for t in rng.choice(phrases)]
        for sp in (lazy, eager):
            sp.add_request(i, prompt)
        for _ in range(8):
            chunk = rng.choice(phrases)[: rng.randint(1, 6)]
            for sp in (lazy, eager):
                sp.on_commit(i, chunk)
            eager.propose(i, 8)                      # reads (so updates) its tries after every commit
        assert lazy._reqs[i].tree.num_tokens == 0   # nothing read the lazy one's trie yet
        d_lazy, d_eager = lazy.propose(i, 8), eager.propose(i, 8)
        assert d_eager.num_draft > 0
        assert (d_lazy.tokens, d_lazy.parents, d_lazy.scores) == (d_eager.tokens, d_eager.parents, d_eager.scores)
        for sp in (lazy, eager):
            sp.finish(i)
        eager.global_tree()
    assert len(lazy._global_pending) == 1 and not eager._global_pending   # the last finish waits for a reader
    for length in (1, 2, 3):
        for path in itertools.product(range(50), repeat=1) if length == 1 else \
                [tuple(p[j:j + length]) for p in phrases for j in range(len(p) - length + 1)]:
            assert lazy.global_tree().count(list(path)) == eager.global_tree().count(list(path))
    keys = ("requests", "global_requests", "global_nodes")
    assert [lazy.stats()[k] for k in keys] == [eager.stats()[k] for k in keys] == [0, 3, eager.global_tree().num_nodes]
