"""Model-free drafting from suffix tries (SuffixDecoding, arXiv 2411.04975; Seer, arXiv 2511.14617).

Why: LLM outputs repeat themselves: code edits copy the prompt, agents re-emit tool schemas, and the
samples of one prompt (``n > 1``, RL rollout groups) share long stretches of text. A trie that counts
every recent suffix predicts those continuations for free: no draft model, no GPU, a few tens of
microseconds per step, and a per-node acceptance estimate the controller can budget with.

What:

* ``SuffixTree``: a suffix trie of bounded depth ``D`` with occurrence counts over a set of token
  sequences, each under a hashable key. Every suffix of every sequence, cut to ``D`` tokens, is a path
  from the root, and a node's count is the number of occurrences of its path. ``extend`` is
  incremental (it advances one cursor per live suffix, at most ``D`` per appended token), ``remove``
  takes a whole sequence back out (FIFO eviction), ``match`` finds the longest suffix of a context that
  the trie holds, and ``speculate`` grows a draft tree best-first from there (or from a shorter match
  that leaves more of the bounded depth to draft), scoring a path by the product of its
  ``child_count / parent_count`` ratios, as SuffixDecoding does.
* ``SuffixProposer``: the drafter the engine calls. Three trees feed it: one per request (its prompt
  and output so far), one per group of sibling requests (their outputs, so sibling A's text drafts for
  sibling B, as in Seer's grouped drafting) and a bounded FIFO store of recently finished outputs.

Memory: a plain depth-``D`` trie costs about ``D`` nodes per token, since nearly every suffix becomes
unique after a few tokens. So a node whose path has occurred exactly once is kept as a *leaf* that
points into its sequence (``seq``, ``pos``) instead of spelling out the rest of the path: the path
continues implicitly along ``seq[pos:end]`` and grows for free as the sequence is appended to (a
suffix-tree trick: once a leaf, always a leaf). A leaf is split one level at a time when a second
occurrence walks into it. That makes the trie about one object per token plus the shared
(repeated) part, and makes appending cheap, since most cursors sit in their own leaf and have nothing
to do.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field

from onspec.config import SpecConfig
from onspec.speculation.suffix_calibration import MatchCalibration
from onspec.speculation.tree import DraftTree, merge_trees

SOURCES: tuple[str, ...] = ("request", "group", "global")


class _Node:
    """A trie node. ``count`` = occurrences of the node's path.

    Explicit node: ``seq is None``; every occurrence that goes on past it does so through ``children``.
    Leaf: ``seq is not None`` and ``count == 1``; its one occurrence continues implicitly along
    ``seq[pos : min(len(seq), end)]`` (``end`` = that occurrence's start + max_depth) and ``children``
    is None. A split leaf keeps ``pos`` (the index just past its path), which its owner's cursor uses
    to find its way down the newly explicit levels.
    """

    __slots__ = ("count", "children", "seq", "pos", "end")

    def __init__(self, count: int, seq: list[int] | None = None, pos: int = 0, end: int = 0) -> None:
        self.count = count
        self.children: dict[int, _Node] | None = None
        self.seq = seq
        self.pos = pos
        self.end = end


# A position in the trie: (node, p). p == -1: at the explicit node itself (or at a leaf's own token);
# p >= 0: inside leaf ``node``'s implicit tail, the next token being node.seq[p].
_Locus = tuple[_Node, int]
# (effective match length, count ratio) -> probability that the drafted token is accepted
Estimate = Callable[[int, float], float]


def _raw_ratio(match_len: int, ratio: float) -> float:
    """The uncalibrated estimate: the count ratio itself."""
    return ratio


class _SeqState:
    """One stored sequence: its tokens and a cursor for each suffix shorter than max_depth.

    Cursor i (oldest first) belongs to the suffix that starts at ``len(tokens) - len(cur_nodes) + i``.
    ``cur_nodes[i]`` is either the explicit node at the end of that suffix's path, or the leaf that holds
    its (implicit) end; ``cur_pos[i]`` is the token index just past ``cur_nodes[i]``'s path.
    """

    __slots__ = ("tokens", "cur_nodes", "cur_pos")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.cur_nodes: list[_Node] = []
        self.cur_pos: list[int] = []


class SuffixTree:
    """Bounded-depth suffix trie with occurrence counts over keyed token sequences."""

    def __init__(self, max_depth: int) -> None:
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self._root = _Node(0)  # root.count = total number of tokens (= suffix starts)
        self._seqs: dict[Hashable, _SeqState] = {}
        self._num_nodes = 0  # materialized nodes, root excluded

    # ---- bookkeeping --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._seqs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._seqs

    @property
    def num_nodes(self) -> int:
        """Materialized nodes (root excluded); implicit leaf tails are not counted."""
        return self._num_nodes

    @property
    def num_tokens(self) -> int:
        return self._root.count

    def sequence(self, key: Hashable) -> list[int]:
        """The stored tokens of ``key`` (the live list: do not mutate it)."""
        return self._seqs[key].tokens

    # ---- updates ------------------------------------------------------------------------------
    def extend(self, key: Hashable, new_tokens: Iterable[int]) -> None:
        """Append ``new_tokens`` to sequence ``key`` (created if new); O(max_depth) per token."""
        st = self._seqs.get(key)
        if st is None:
            st = self._seqs[key] = _SeqState()
        toks, nodes, poss = st.tokens, st.cur_nodes, st.cur_pos
        root, depth_cap = self._root, self.max_depth
        for t in new_tokens:
            n = len(toks)  # t goes to index n; it is appended only after all cursors moved (see below)
            nodes.append(root)  # the new suffix starting at n: empty path, at the root
            poss.append(n)
            k = len(nodes)
            # Newest (shortest) suffix first. A step can split a leaf only of an *older* suffix of this
            # same sequence (a node at depth d reached by the suffix starting at j is on the path of a
            # start j' < j); going newest-first, that owner is processed after the split and walks down
            # to its new end. ``t`` is kept out of ``toks`` meanwhile so the split does not materialize
            # ``t`` on the owner's behalf before the owner counts it itself (which would count it twice).
            for i in range(k - 1, -1, -1):
                node = nodes[i]
                if node.seq is not None:
                    continue  # still our own leaf: its implicit tail grows with ``toks`` for free
                p = poss[i]
                # A leaf of ours that got split: follow the levels materialized since, down to our end.
                while p < n:
                    node = node.children[toks[p]]  # type: ignore[index]
                    p += 1
                    if node.seq is not None:
                        break
                if node.seq is not None:
                    nodes[i] = node
                    poss[i] = p
                    continue
                # Explicit node at the end of this suffix's path: step by ``t``.
                ch = node.children
                if ch is None:
                    ch = node.children = {}
                child = ch.get(t)
                if child is None:
                    start = n - (k - 1 - i)
                    child = ch[t] = _Node(1, toks, n + 1, start + depth_cap)
                    self._num_nodes += 1
                else:
                    if child.seq is not None:
                        self._split(child)
                    child.count += 1
                nodes[i] = child
                poss[i] = n + 1
            root.count += 1
            toks.append(t)
            if k >= depth_cap:  # the oldest suffix has reached max_depth tokens: it grows no more
                del nodes[0]
                del poss[0]

    def _split(self, leaf: _Node) -> None:
        """Make ``leaf`` explicit, materializing one level of its tail (a second occurrence arrives)."""
        seq = leaf.seq
        assert seq is not None
        leaf.seq = None
        p = leaf.pos
        if p < len(seq) and p < leaf.end:
            leaf.children = {seq[p]: _Node(1, seq, p + 1, leaf.end)}
            self._num_nodes += 1
        # else the owner's path ends here for now; its cursor steps from this node on its next append.

    def remove(self, key: Hashable) -> bool:
        """Remove every suffix of sequence ``key``; zero-count nodes are deleted. False if unknown."""
        st = self._seqs.pop(key, None)
        if st is None:
            return False
        toks, depth_cap, root = st.tokens, self.max_depth, self._root
        n = len(toks)
        root.count -= n
        for j in range(n):
            stop = min(n, j + depth_cap)
            node, p = root, j
            while p < stop:
                tok = toks[p]
                ch = node.children
                assert ch is not None
                child = ch[tok]
                child.count -= 1
                if child.count == 0:
                    del ch[tok]
                    if not ch:
                        node.children = None
                    # Its whole subtree was this one occurrence: the rest of this path, materialized
                    # down to a leaf or to the path's end. Count those nodes out.
                    while True:
                        self._num_nodes -= 1
                        p += 1
                        if child.seq is not None or p >= stop:
                            break
                        child = child.children[toks[p]]  # type: ignore[index]
                    break
                node = child
                p += 1
        return True

    # ---- queries ------------------------------------------------------------------------------
    def _locate(self, tokens: Sequence[int], lo: int, hi: int) -> _Locus | None:
        """The locus of path ``tokens[lo:hi]``, or None when the trie does not hold it."""
        node, p = self._root, -1
        for i in range(lo, hi):
            tok = tokens[i]
            if p >= 0:  # inside a leaf's implicit tail
                seq = node.seq
                assert seq is not None
                if p < len(seq) and p < node.end and seq[p] == tok:
                    p += 1
                    continue
                return None
            ch = node.children
            if ch is None:
                return None
            nxt = ch.get(tok)
            if nxt is None:
                return None
            node = nxt
            p = nxt.pos if nxt.seq is not None else -1
        return node, p

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of ``tokens`` as a substring (only tracked up to max_depth tokens)."""
        if len(tokens) > self.max_depth:
            return 0
        loc = self._locate(tokens, 0, len(tokens))
        return 0 if loc is None else loc[0].count

    def match(self, context: Sequence[int], self_len: int = 0) -> tuple[_Locus, int]:
        """Longest suffix of ``context`` (at most max_depth - 1 tokens, so one more can be drafted) that is
        a path in the trie: ``(locus, match_len)``; match_len 0 means nothing matched.

        ``self_len``: the last ``self_len`` tokens of ``context`` are themselves the end of a sequence stored
        here (the live request). That occurrence has no continuation yet, so for suffixes no longer than
        ``self_len`` it is not counted: a suffix matches only if it also occurs somewhere else.
        """
        n = len(context)
        # Matching is monotone: if the last m tokens occur (elsewhere), so do the last m - 1 (the
        # discount can only make a shorter suffix's count drop by the one occurrence a longer one lacks).
        # So binary search the length: O(D log D) dict lookups.
        lo, hi = 0, min(n, self.max_depth - 1)
        best: _Locus = (self._root, -1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            loc = self._locate(context, n - mid, n)
            if loc is not None and loc[0].count > (1 if mid <= self_len else 0):
                lo, best = mid, loc
            else:
                hi = mid - 1
        return best, lo

    def speculate(self, context: Sequence[int], max_nodes: int, min_prob: float, alpha: float,
                  self_len: int = 0, source: str = "suffix", estimate: Estimate | None = None) -> DraftTree:
        """Draft tree rooted at ``context[-1]``, grown best-first from a matching suffix of ``context``.

        Nodes are taken in order of path probability (product of ``child.count / parent.count`` along the
        path); expansion stops below ``min_prob``, at ``max_nodes`` drafted nodes, and at depth
        ``alpha * match_len``. ``scores[i]`` is node i's count ratio, so ``path_scores()`` gives the path
        probability. ``self_len`` as in ``match``. ``estimate(match_len, ratio)``, when given, turns a count
        ratio into the probability of acceptance (``MatchCalibration.estimate``): the scores, the best-first
        order and the ``min_prob`` cut then use it. Every node records its (effective match length, ratio)
        in ``match_evidence``.

        The trie holds paths of at most max_depth tokens, so a match of length m leaves only
        ``max_depth - m`` tokens to draft: a 31-token match in a depth-32 trie drafts one token. So
        besides the longest match, the longest *shorter* match that leaves the most room (depth
        ``min(alpha * m, max_depth - m, max_nodes)``) is tried too, and the tree with the higher expected
        accepted length (sum of path probabilities) wins. A shorter match pools more occurrences, so its
        counts already price in the lost specificity. (ArcticInference tries every match length; two
        keep the per-step cost low.)
        """
        if not context:
            raise ValueError("speculate needs a non-empty context (its last token is the root)")
        root = context[-1]
        loc, m = self.match(context, self_len)
        if m == 0 or max_nodes <= 0:
            return DraftTree([root], [-1], [1.0], source=source)
        best, best_score = self._grow(root, loc, m, self_len, max_nodes, min_prob, alpha, source, estimate)
        m2 = self._roomiest_len(m, max_nodes, alpha)
        if m2 < m:
            n = len(context)
            loc2 = self._locate(context, n - m2, n)
            assert loc2 is not None  # a suffix of a match is a match
            cand, score = self._grow(root, loc2, m2, self_len, max_nodes, min_prob, alpha, source, estimate)
            if score > best_score:
                best = cand
        return best

    def _roomiest_len(self, m: int, max_nodes: int, alpha: float) -> int:
        """The largest match length <= m that maximizes the draft depth min(alpha*m', D - m', max_nodes).

        Going down from m, D - m' grows and alpha * m' shrinks, so the depth rises, plateaus, then falls:
        stop at the first step that does not raise it."""
        d = self.max_depth
        best_m, best_g = m, min(int(alpha * m), d - m, max_nodes)
        for m2 in range(m - 1, 0, -1):
            g = min(int(alpha * m2), d - m2, max_nodes)
            if g <= best_g:
                break
            best_m, best_g = m2, g
        return best_m

    def _grow(self, root: int, loc: _Locus, m: int, self_len: int, max_nodes: int, min_prob: float,
              alpha: float, source: str, estimate: Estimate | None = None) -> tuple[DraftTree, float]:
        """Best-first draft from the locus of a length-``m`` match: (tree, sum of path probabilities)."""
        if estimate is None:
            estimate = _raw_ratio
        tokens, parents, scores, evidence = [root], [-1], [1.0], [(0, 1.0)]
        total = 0.0
        depth_cap = min(int(alpha * m), self.max_depth - m)
        if depth_cap <= 0:
            return DraftTree(tokens, parents, scores, source=source, match_evidence=evidence), total
        node, p = loc
        # Node counts include occurrences that end right there (sequence ends), so children may sum to
        # less than the parent: divide by the node count anyway; the missing mass is "stop here".
        # At the match itself the live request's own occurrence has no continuation: discount it.
        denom = node.count - (1 if m <= self_len else 0)
        heap: list[tuple[float, int, int, float, float, int, int, _Node, int]] = []
        seq_no = 0  # tie-break: equal probabilities pop in push order (shallower, earlier first)

        def push_children(nd: _Node, q: int, prob: float, parent: int, depth: int, den: int) -> None:
            # A node at ``depth`` below the match is predicted from m + depth - 1 tokens of context, if its
            # ancestors are accepted: its effective match length.
            nonlocal seq_no
            if q >= 0:  # inside a leaf tail: one continuation, ratio 1/1
                seq = nd.seq
                assert seq is not None
                if q < len(seq) and q < nd.end:
                    cond = estimate(m + depth - 1, 1.0)
                    if prob * cond >= min_prob:
                        seq_no += 1
                        heapq.heappush(heap, (-prob * cond, seq_no, seq[q], cond, 1.0, parent, depth, nd, q + 1))
                return
            ch = nd.children
            if ch is None:
                return
            for tok, c in ch.items():
                ratio = c.count / den
                cond = estimate(m + depth - 1, ratio)
                pp = prob * cond
                if pp >= min_prob:
                    seq_no += 1
                    heapq.heappush(heap, (-pp, seq_no, tok, cond, ratio, parent, depth, c,
                                          c.pos if c.seq is not None else -1))

        push_children(node, p, 1.0, 0, 1, denom)
        while heap and len(tokens) <= max_nodes:
            negp, _, tok, cond, ratio, parent, depth, nd, q = heapq.heappop(heap)
            idx = len(tokens)
            tokens.append(tok)
            parents.append(parent)
            scores.append(cond)
            evidence.append((m + depth - 1, ratio))
            total -= negp
            if depth < depth_cap:
                push_children(nd, q, -negp, idx, depth + 1, nd.count)
        return DraftTree(tokens, parents, scores, source=source, match_evidence=evidence), total


# ---------------------------------------------------------------------------------------------------
@dataclass
class _Request:
    tree: SuffixTree                    # prompt + output of this request, under its seq_id (caught up lazily)
    group: str | None
    key: int                            # unique per registration: its key in the group and global trees
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    in_tree: int = 0                    # tokens of prompt + output already in ``tree``


@dataclass
class _Group:
    tree: SuffixTree                    # outputs of the members (finished ones stay until the group ends)
    members: set[int] = field(default_factory=set)


class SuffixProposer:
    """Model-free drafter over per-request, per-group and global suffix trees (see module docstring).

    A request's own trie and the global store are brought up to date lazily, when a draft reads them
    (``propose``, ``global_tree``), not on every committed token and every finish. Why: where the controller
    drafts nothing (the draft policy's gates ``batch_size`` and ``unpaid``, speculation/policy.py) those eager
    updates were speculation's whole overhead: at batch 32 the global store's insertions alone took 0.2 s of
    a 10 s run (cProfile), for a store no draft read before the run ended. Catching up later makes the same
    updates in the same order, so the tries and the drafts are the same. Group trees stay eager: their
    members' tokens interleave, and the order of insertion breaks ties between equally frequent
    continuations, so a lazy group tree would draft differently (and siblings are few). See
    docs/decisions.md, 'Lazy suffix tries'."""

    def __init__(self, cfg: SpecConfig) -> None:
        self.cfg = cfg
        self._reqs: dict[int, _Request] = {}
        self._groups: dict[str, _Group] = {}
        self._global = SuffixTree(cfg.suffix_max_depth)
        self._global_fifo: deque[int] = deque()
        # Finished outputs not yet in the global tree, newest last. Bounded like the store: an output more
        # than ``global_store_requests`` finishes old would be evicted the moment it went in.
        self._global_pending: deque[tuple[int, list[int]]] = deque(maxlen=max(1, cfg.global_store_requests))
        # Group/global tree keys are internal and never reused: an engine may reuse a seq_id while the
        # finished request's output still sits in its group's tree.
        self._next_key = 0
        self._num_proposals = 0
        self._num_draft_tokens = 0
        self._expected_accepted = 0.0
        # Count ratios made acceptance probabilities by what verification accepted so far (None: raw ratios).
        self.calibration: MatchCalibration | None = MatchCalibration() if cfg.suffix_calibrate else None

    # ---- request lifecycle --------------------------------------------------------------------
    def add_request(self, seq_id: int, prompt: list[int], group: str | None = None) -> None:
        if seq_id in self._reqs:
            raise ValueError(f"request {seq_id} is already registered")
        if not prompt:
            raise ValueError("prompt must not be empty (its last token roots the first draft)")
        self._reqs[seq_id] = _Request(tree=SuffixTree(self.cfg.suffix_max_depth), group=group, key=self._next_key,
                                      prompt=list(prompt))
        self._next_key += 1
        if group is not None:
            g = self._groups.get(group)
            if g is None:
                g = self._groups[group] = _Group(tree=SuffixTree(self.cfg.suffix_max_depth))
            g.members.add(seq_id)

    def on_commit(self, seq_id: int, tokens: list[int]) -> None:
        """``tokens`` were committed to the request (accepted drafts + the bonus/sampled token)."""
        if not tokens:
            return
        req = self._reqs[seq_id]
        req.output.extend(tokens)
        if req.group is not None:
            self._groups[req.group].tree.extend(req.key, tokens)

    def finish(self, seq_id: int, keep_output: bool = True) -> None:
        """Drop the request; its output joins the global store unless ``keep_output`` is False (aborts).
        Unknown ids are ignored, so cleanup paths may call this twice."""
        req = self._reqs.pop(seq_id, None)
        if req is None:
            return
        if req.group is not None:
            g = self._groups[req.group]
            g.members.discard(seq_id)
            if not g.members:
                del self._groups[req.group]
        if keep_output and self.cfg.global_store_requests > 0 and req.output:
            self._global_pending.append((req.key, req.output))

    # ---- catching the tries up ----------------------------------------------------------------
    @staticmethod
    def _catch_up(req: _Request, seq_id: int) -> None:
        n_prompt = len(req.prompt)
        if req.in_tree < n_prompt:
            req.tree.extend(seq_id, req.prompt[req.in_tree:])
            req.in_tree = n_prompt
        if req.in_tree < n_prompt + len(req.output):
            req.tree.extend(seq_id, req.output[req.in_tree - n_prompt:])
            req.in_tree = n_prompt + len(req.output)

    def _catch_up_global(self) -> None:
        cap = self.cfg.global_store_requests
        while self._global_pending:
            key, output = self._global_pending.popleft()
            self._global.extend(key, output)
            self._global_fifo.append(key)
            while len(self._global_fifo) > cap:
                self._global.remove(self._global_fifo.popleft())

    # ---- drafting -----------------------------------------------------------------------------
    def propose(self, seq_id: int, max_nodes: int | None = None,
                sources: tuple[str, ...] = SOURCES) -> DraftTree:
        """Draft tree for ``seq_id`` rooted at its last context token (root only when nothing matches)."""
        req = self._reqs[seq_id]
        self._catch_up(req, seq_id)
        ctx = req.tree.sequence(seq_id)
        if max_nodes is None:
            max_nodes = self.cfg.max_draft_tokens
        cfg = self.cfg
        est = self.calibration.estimate if self.calibration is not None else None
        cands: list[DraftTree] = []
        if max_nodes > 0:
            for src in sources:
                if src == "request":
                    # The whole context is this tree's sequence: discount its own (live) occurrence.
                    t = req.tree.speculate(ctx, max_nodes, cfg.suffix_min_prob, cfg.suffix_alpha,
                                           self_len=len(ctx), estimate=est)
                elif src == "group":
                    if req.group is None:
                        continue
                    # The group tree holds this request's output too (that is how siblings see it).
                    t = self._groups[req.group].tree.speculate(
                        ctx, max_nodes, cfg.suffix_min_prob, cfg.suffix_alpha, self_len=len(req.output),
                        estimate=est)
                elif src == "global":
                    self._catch_up_global()
                    if not len(self._global):
                        continue
                    t = self._global.speculate(ctx, max_nodes, cfg.suffix_min_prob, cfg.suffix_alpha, estimate=est)
                else:
                    raise ValueError(f"unknown suffix source {src!r}; expected a subset of {SOURCES}")
                if t.num_draft:
                    cands.append(t)
        if not cands:
            out = DraftTree.root_only(ctx[-1])
            out.source = "suffix"
        elif len(cands) == 1:
            out = cands[0]
        else:
            out = merge_trees(cands, max_nodes, "suffix", evidence=True)
        self._num_proposals += 1
        self._num_draft_tokens += out.num_draft
        self._expected_accepted += sum(out.path_scores()[1:])
        return out

    def observe(self, tree: DraftTree, accepted: list[int]) -> None:
        """Verification accepted the nodes ``accepted`` (indices, root first) of ``tree``, a tree this drafter
        proposed: learn how its count ratios translate into acceptance."""
        if self.calibration is not None and tree.match_evidence:
            self.calibration.observe(tree, accepted)

    # ---- accessors ----------------------------------------------------------------------------
    def group_tree(self, group: str) -> SuffixTree | None:
        """The shared tree of ``group`` (None once its last member finished), e.g. for a coordinator
        that replicates group trees across engines."""
        g = self._groups.get(group)
        return None if g is None else g.tree

    def global_tree(self) -> SuffixTree:
        """The store of recently finished outputs, brought up to date."""
        self._catch_up_global()
        return self._global

    def stats(self) -> dict[str, float]:
        n = self._num_proposals
        return {
            "requests": len(self._reqs),
            "groups": len(self._groups),
            "global_requests": len(self.global_tree()),
            "global_nodes": self._global.num_nodes,
            "proposals": n,
            "mean_draft_tokens": self._num_draft_tokens / n if n else 0.0,
            "mean_expected_accepted": self._expected_accepted / n if n else 0.0,
        }
