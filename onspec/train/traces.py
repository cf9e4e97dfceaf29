"""What verification records for the drafter trainer, and the bounded buffer the trainer samples from.

Every target forward already computes, for every token it processes, the auxiliary hidden states the
EAGLE-3 drafter reads (low/mid/high layers) and the final normed hidden state (whose lm_head projection is
the target's next-token distribution). Recording them costs a copy, not a forward, so verification is a free
source of training data (the "Aurora" design, arXiv 2602.06932):

* committed positions: a sequence's tokens with the target's aux/hidden at each position, from prefill
  chunks (prompt positions) and from the accepted path of every draft tree (generated positions);
* rejected branches: tree nodes verification refused. Their aux/hidden are the target's view of states the
  drafter actually proposed; the trainer's "discard" term fits the drafter to the target there too.

The trainer does not get logits: it recomputes the target's distribution from the final hidden state
through the frozen lm_head (restricted to the draft vocabulary), which is 4x smaller than a 49k-row logit
vector and exact.

A sequence's trace is cut into :class:`TraceChunk` s of ``chunk_positions`` positions; a continued chunk
repeats the last ``chunk_context`` positions of its predecessor as attention context (no loss there), so a
long generation reaches the trainer while it is still running. Every ``heldout_every``-th chunk is held
out: the trainer never trains on it, and the promotion gate measures candidates on it.

Nothing here blocks the engine: the recorder appends row copies to per-sequence lists and hands finished
chunks to a sink (in practice :class:`onspec.train.trainer.TraceSender`, a bounded drop-oldest queue).
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..config import TrainerConfig
from ..engine.events import EngineObserver
from ..engine.runner import bucket_tokens
from ..engine.step import Prefill, StepResult, Verdict
from .arena import ArenaRing, aligned


def padded_cells(n: int, max_len: int) -> int:
    """Positions of a batch of ``n`` sequences of at most ``max_len`` positions once ``objective.collate``
    pads both to ``bucket_tokens`` sizes: what a training or evaluation step's memory scales with (its
    logits are ``cells x draft vocabulary`` floats per unroll step)."""
    return bucket_tokens(n) * bucket_tokens(max_len)


# ---- the record ---------------------------------------------------------------------------------------
@dataclass
class TraceChunk:
    """Consecutive committed positions of one sequence plus the rejected tree nodes hanging off them.

    Position ``t`` (local index) holds token ``tokens[t]`` and the target's states after processing it:
    ``aux[t]`` (concatenated aux layers) and ``hidden[t]`` (final normed hidden, whose lm_head projection is
    the target's distribution of token ``t + 1``; ``has_hidden[t]`` is False where the engine did not
    provide it, e.g. prompt positions). In ``EagleDrafter.forward_train``'s convention the drafter at
    position ``t`` reads ``aux[t - 1]`` and ``tokens[t]``; at unroll step ``i`` it predicts token
    ``t + 1 + i``, whose target distribution comes from ``hidden[t + i]``. Labels at positions
    ``< loss_from`` are context only (they repeat the previous chunk's tail, which was trained there).

    Branches (rejected nodes): ``br_token[r]`` was proposed as the child of ``br_parent[r]``: a local
    committed position when ``>= 0``, else branch ``-1 - br_parent[r]`` (a rejected node's child).
    ``br_aux[r]``/``br_hidden[r]`` are the target's states after the branch token (tree attention gives
    the target's exact view of that state). The drafter row of a branch sits one position after its parent,
    reads the parent's aux and the branch token, and its label comes from ``br_hidden[r]``.
    """

    key: str
    start: int                      # absolute position of local index 0 in the sequence
    tokens: torch.Tensor            # [L] int64
    aux: torch.Tensor               # [L, A]
    hidden: torch.Tensor            # [L, H] (zeros where has_hidden is False)
    has_hidden: torch.Tensor        # [L] bool
    generated: torch.Tensor         # [L] bool: the token was generated (not part of the prompt)
    loss_from: int = 0              # labels at positions < loss_from were trained in the previous chunk
    br_token: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    br_parent: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    br_aux: torch.Tensor | None = None      # [R, A]
    br_hidden: torch.Tensor | None = None   # [R, H]
    heldout: bool = False
    created: float = field(default_factory=time.time)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_branches(self) -> int:
        return int(self.br_token.shape[0])

    def nbytes(self) -> int:
        ts = [self.tokens, self.aux, self.hidden, self.has_hidden, self.generated, self.br_token, self.br_parent,
              self.br_aux, self.br_hidden]
        return sum(t.numel() * t.element_size() for t in ts if t is not None) + 256

    # ---- serialization (bytes cross the process boundary: no shared-memory file descriptors) ----------
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({k: getattr(self, k) for k in self.__dataclass_fields__}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "TraceChunk":
        d = torch.load(io.BytesIO(data), weights_only=True)
        return cls(**d)


# ---- engine side: the recorder ------------------------------------------------------------------------
@dataclass
class _Pending:
    """Positions of one sequence not yet sent, as row blocks (cheap to append, concatenated at flush)."""

    key: str
    prompt_len: int
    next_pos: int = 0               # absolute index of the next position to record
    start: int = 0                  # absolute position of the first pending row
    context: int = 0                # leading pending rows that repeat the previous chunk's tail
    tokens: list[int] = field(default_factory=list)
    aux: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor | None] = field(default_factory=list)   # None: block without final hidden
    has: list[torch.Tensor | None] = field(default_factory=list)      # per-row mask when partly present
    branches: list[tuple[int, int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    next_branch: int = 0            # branch ids (parents of nested branches refer to them)

    @property
    def num(self) -> int:
        return len(self.tokens)


class TraceRecorder(EngineObserver):
    """Turns prefill observations and verdicts into :class:`TraceChunk` s, handed to ``sink``.

    An engine event subscriber (:func:`attach_recorder`): prefill events and each step's verdicts. Call
    :meth:`sweep` now and then to drop the state of aborted sequences (the online-learning handle does).
    """

    def __init__(self, cfg: TrainerConfig, sink: Callable[[TraceChunk], None], hidden_size: int | None = None) -> None:
        self.cfg = cfg
        self.sink = sink
        self.hidden_size = hidden_size  # width of final hidden states (for chunks that have none yet)
        self.pending: dict[int, _Pending] = {}
        self.chunks = 0
        self.positions = 0
        self.branches = 0
        self.resyncs = 0
        self.enabled = True

    # ---- engine events -----------------------------------------------------------------------------
    def on_prefill(self, prefill: Prefill) -> None:
        self.record_prefill(prefill.seq, prefill.n, prefill.aux, prefill.hidden)

    def on_step(self, result: StepResult) -> None:
        self.record_verdicts(result.verdicts)

    def record_prefill(self, seq, n: int, aux: torch.Tensor | None, hidden: torch.Tensor | None = None) -> None:
        """``n`` prompt (or recomputed) tokens just entered the cache; ``aux`` [n, A], ``hidden`` [n, H]."""
        if not self.enabled or aux is None or n <= 0:
            return
        st = self._state(seq)
        first = seq.cache_len - n  # absolute position of aux row 0
        if first > st.next_pos:     # a gap (recorder attached mid-sequence): start over from here
            self._restart(st, first)
        skip = st.next_pos - first  # rows already recorded (a preempted sequence is prefilled again)
        if skip >= n:
            return
        toks = seq.tokens[first + skip:first + n]
        hid = hidden[skip:n] if hidden is not None and hidden.shape[0] == n else None
        self._append(st, toks, aux[skip:n], hid)
        self._maybe_flush(st)

    def record_verdicts(self, verdicts: Iterable[Verdict]) -> None:
        """One step's verdicts (their aux [n, A] and hidden [n, H] rows of every tree node)."""
        if not self.enabled:
            return
        for v in verdicts:
            seq, tree, accepted, aux, hidden = v.seq, v.tree, v.accepted, v.aux, v.hidden
            if aux is None or hidden is None:
                continue
            st = self._state(seq)
            n_tok = len(seq.tokens)
            # The root (node 0) is the token at position next_pos: recorded positions end right before it.
            root_pos = st.next_pos
            if root_pos >= n_tok or seq.tokens[root_pos] != tree.tokens[0]:
                root_pos = n_tok - 1 - len(accepted)  # resync, assuming no stop cut this step short
                if root_pos < 0 or seq.tokens[root_pos] != tree.tokens[0]:
                    self._forget(seq)
                    continue
                self._restart(st, root_pos)
            # Accepted node k sits at root_pos + k; a stop condition may have cut the commit short.
            keep = [a for k, a in enumerate(accepted) if root_pos + k < n_tok]
            idx = torch.tensor(keep, dtype=torch.long)
            self._append(st, [tree.tokens[a] for a in keep], aux.index_select(0, idx),
                         hidden.index_select(0, idx))
            if len(tree) > 1 and self.cfg.discard_weight > 0:
                self._record_branches(st, tree, keep, root_pos, aux, hidden)
            if seq.finished:
                self._forget(seq)
            else:
                self._maybe_flush(st)

    def sweep(self, live_seq_ids: set[int]) -> None:
        """Flush and forget sequences the engine no longer runs (aborted, released)."""
        for sid in [s for s in self.pending if s not in live_seq_ids]:
            self._flush(self.pending.pop(sid), final=True)

    def flush_all(self) -> None:
        for sid in list(self.pending):
            self._flush(self.pending.pop(sid), final=True)

    # ---- internals -------------------------------------------------------------------------------
    def _forget(self, seq) -> None:
        st = self.pending.pop(seq.seq_id, None)
        if st is not None:
            self._flush(st, final=True)

    def _state(self, seq) -> _Pending:
        st = self.pending.get(seq.seq_id)
        if st is None:
            st = _Pending(key=f"{seq.request_id}/{seq.seq_id}", prompt_len=seq.num_prompt)
            self.pending[seq.seq_id] = st
        return st

    def _restart(self, st: _Pending, pos: int) -> None:
        self.resyncs += 1
        st.tokens, st.aux, st.hidden, st.has, st.branches = [], [], [], [], []
        st.start = st.next_pos = pos
        st.context = 0

    def _append(self, st: _Pending, toks: list[int], aux: torch.Tensor, hidden: torch.Tensor | None) -> None:
        if not toks:
            return
        st.tokens.extend(int(t) for t in toks)
        st.aux.append(aux.detach().clone())
        st.hidden.append(hidden.detach().clone() if hidden is not None else None)
        st.has.append(None)
        st.next_pos += len(toks)

    def _record_branches(self, st: _Pending, tree, keep: list[int], root_pos: int, aux: torch.Tensor,
                         hidden: torch.Tensor) -> None:
        on_path = {a: root_pos + k for k, a in enumerate(keep)}  # node -> absolute position
        branch_of: dict[int, int] = {}                             # rejected node -> branch id
        nodes: list[tuple[int, int, int]] = []                     # (node, branch id, parent ref)
        for j in range(1, len(tree)):
            if j in on_path:
                continue
            p = tree.parents[j]
            if p in on_path:
                parent_ref = on_path[p]                     # absolute position, made local at flush
            elif p in branch_of:
                parent_ref = -1 - branch_of[p]
            else:
                continue  # below an accepted node that a stop cut off
            branch_of[j] = st.next_branch
            nodes.append((j, st.next_branch, parent_ref))
            st.next_branch += 1
        if not nodes:
            return
        idx = torch.tensor([j for j, _, _ in nodes], dtype=torch.long)
        rows_a, rows_h = aux.index_select(0, idx), hidden.index_select(0, idx)  # one copy for all of them
        for r, (j, bid, parent_ref) in enumerate(nodes):
            st.branches.append((bid, parent_ref, int(tree.tokens[j]), rows_a[r], rows_h[r]))

    def _maybe_flush(self, st: _Pending) -> None:
        if st.num - st.context >= self.cfg.chunk_positions:
            self._flush(st, final=False)

    def _flush(self, st: _Pending, final: bool) -> None:
        if st.num - st.context < 2 and not st.branches:
            return  # nothing new to train on yet
        tokens, aux, hidden, has = self._concat(st)
        self.sink(self._build(st, tokens, aux, hidden, has))
        st.branches = []
        if final:
            return
        # The tail becomes the attention context of the next chunk (its pairs are not trained again).
        c = min(self.cfg.chunk_context, st.num)
        first = st.num - c
        st.start += first
        st.tokens = st.tokens[first:]
        if not c:
            st.aux, st.hidden, st.has = [], [], []
        elif bool(has[first:].any()):
            st.aux, st.hidden, st.has = [aux[first:]], [hidden[first:]], [has[first:]]
        else:  # no hidden state in the tail: keep it as a block without one (its width is not known here)
            st.aux, st.hidden, st.has = [aux[first:]], [None], [None]
        st.context = c

    def _concat(self, st: _Pending) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        aux = torch.cat(st.aux)
        H = next((h.shape[1] for h in st.hidden if h is not None), None)
        if H is None:
            H = st.branches[0][4].shape[0] if st.branches else (self.hidden_size or 1)
        hid, has = [], []
        for a, h, m in zip(st.aux, st.hidden, st.has):
            k = a.shape[0]
            hid.append(h if h is not None else torch.zeros(k, H, dtype=aux.dtype))
            has.append(m if m is not None else torch.full((k,), h is not None, dtype=torch.bool))
        return st.tokens, aux, torch.cat(hid), torch.cat(has)

    def _build(self, st: _Pending, tokens: list[int], aux: torch.Tensor, hidden: torch.Tensor,
               has: torch.Tensor) -> TraceChunk:
        L = len(tokens)
        pos = torch.arange(st.start, st.start + L)
        every = self.cfg.heldout_every
        chunk = TraceChunk(
            key=st.key, start=st.start, tokens=torch.tensor(tokens, dtype=torch.long), aux=aux, hidden=hidden,
            has_hidden=has, generated=pos >= st.prompt_len, loss_from=st.context,
            heldout=self.chunks % every == every - 1,
        )
        # Branch parents: absolute positions -> local indices, branch ids -> local branch indices.
        local_of: dict[int, int] = {}
        toks, parents, baux, bhid = [], [], [], []
        for bid, parent, tok, a, h in st.branches:
            if parent >= 0:
                ref = parent - st.start
                if not 0 <= ref < L:
                    continue
            else:
                src = -1 - parent
                if src not in local_of:
                    continue
                ref = -1 - local_of[src]
            local_of[bid] = len(toks)
            toks.append(tok)
            parents.append(ref)
            baux.append(a)
            bhid.append(h)
        if toks:
            chunk.br_token = torch.tensor(toks, dtype=torch.long)
            chunk.br_parent = torch.tensor(parents, dtype=torch.long)
            chunk.br_aux = torch.stack(baux)
            chunk.br_hidden = torch.stack(bhid)
        self.chunks += 1
        self.positions += L - st.context
        self.branches += len(toks)
        return chunk


def attach_recorder(engine, recorder: TraceRecorder) -> Callable[[], None]:
    """Subscribe ``recorder`` to ``engine``'s events; returns a function that unsubscribes it.

    Prefill events carry the aux rows of prompt positions but not their final hidden states (the engine
    computes logits only at a chunk's last row): the trainer falls back to hard targets there.
    """
    if engine.spec is None:
        raise ValueError("speculation: online learning needs speculation attached to the engine")
    if recorder.hidden_size is None:
        recorder.hidden_size = engine.loaded.arch.hidden_size
    engine.events.subscribe(recorder)

    def detach() -> None:
        recorder.enabled = False
        engine.events.unsubscribe(recorder)

    return detach


# ---- trainer side: the bounded, recency-weighted buffer ----------------------------------------------
class TraceBuffer:
    """Chunks up to a byte budget (oldest evicted); sampling favours recent chunks.

    A chunk's sampling weight is its number of positions times ``2 ** (-age / half_life)``, where ``age``
    counts the positions added after it: recent traffic dominates (the drafter follows a shifting workload)
    while older data still regularises (less overfitting than training on the last requests only).

    Storage: the budget is one preallocated, touched arena (:class:`onspec.train.arena.ArenaRing`) and an
    added chunk's tensors are copied into it, so the buffer's resident footprint is fixed from the start
    instead of growing for the first few hundred requests of a server (memory must not grow with traffic).
    Entries are the added objects with their tensor fields replaced by views of the arena: they stay
    valid while the entry is in the buffer (collate/evaluate copy what they use before the next ``add``),
    and an evicted entry's tensors are overwritten by later ones. A chunk larger than the whole arena is
    kept with its own tensors (and evicts everything else), as the old buffer kept it.
    Works for any dataclass with tensor fields, ``__len__`` and ``nbytes()`` (``TraceChunk``, ``Sample``).
    """

    def __init__(self, max_bytes: int, half_life: int, preallocate: bool = True) -> None:
        self.max_bytes = max_bytes
        self.half_life = half_life
        self.arena = ArenaRing(max_bytes, touch=preallocate)
        self.items: deque[tuple[int, object]] = deque()  # (positions added before it, chunk)
        self._in_arena: deque[bool] = deque()            # per item: stored in the arena (else its own)
        self.bytes = 0
        self.added_positions = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def positions(self) -> int:
        return sum(len(c) for _, c in self.items)

    @property
    def allocated_bytes(self) -> int:
        """Bytes this buffer holds memory for: the arena, plus any oversized chunk kept outside it."""
        own = sum(c.nbytes() for (_, c), inside in zip(self.items, self._in_arena) if not inside)
        return self.arena.capacity + own

    def add(self, chunk):
        """Store ``chunk`` (copied into the arena); returns the stored entry."""
        fields = [(f.name, getattr(chunk, f.name)) for f in dataclasses.fields(chunk)]
        tensors = [(name, t) for name, t in fields if isinstance(t, torch.Tensor)]
        size = sum(aligned(t.numel() * t.element_size()) for _, t in tensors)
        inside = self.arena.fits(size)
        if inside:
            region = self.arena.reserve(size)
            while self.arena.overlaps_oldest(region):
                self._evict()
            self.arena.take(region)
            views, off = {}, 0
            for name, t in tensors:
                views[name] = self.arena.view(region, off, t.detach().contiguous())
                off += aligned(t.numel() * t.element_size())
            chunk = dataclasses.replace(chunk, **views)
        else:
            while self.items:
                self._evict()
        self.items.append((self.added_positions, chunk))
        self._in_arena.append(inside)
        self.added_positions += len(chunk)
        self.bytes += chunk.nbytes()
        while self.bytes > self.max_bytes and len(self.items) > 1:
            self._evict()
        return chunk

    def _evict(self) -> None:
        _, old = self.items.popleft()
        if self._in_arena.popleft():
            self.arena.release_oldest()
        self.bytes -= old.nbytes()
        self.evicted += 1

    def weights(self) -> list[float]:
        now = self.added_positions
        return [len(c) * math.pow(2.0, -(now - (at + len(c))) / self.half_life) for at, c in self.items]

    def sample(self, positions: int, rng: random.Random, max_cells: int | None = None) -> list[TraceChunk]:
        """Chunks (without replacement) totalling about ``positions`` positions.

        ``max_cells`` bounds the padded batch (:func:`padded_cells`): a drawn chunk that would take it past
        the bound is passed over (it stays in the buffer for later steps), and drawing stops after a few
        such misses. Why: chunks run from a few positions to ``chunk_positions + chunk_context``, and one
        long chunk drawn with twenty short ones padded 512 positions to 24 x 320 = 7680, whose logits,
        softmaxes and gradients took well over a GiB for that one step; the rare large draws set the
        trainer process's high-water mark, which then rose in steps over a long-running server.
        The first chunk is always taken, so a batch is never empty."""
        if not self.items:
            return []
        w = self.weights()
        idx = list(range(len(self.items)))
        out: list = []
        total = longest = misses = 0
        while idx and total < positions and misses < 8:
            (k,) = rng.choices(range(len(idx)), weights=[w[i] for i in idx])
            i = idx.pop(k)
            chunk = self.items[i][1]
            if out and max_cells is not None and padded_cells(len(out) + 1, max(longest, len(chunk))) > max_cells:
                misses += 1
                continue
            out.append(chunk)
            total += len(chunk)
            longest = max(longest, len(chunk))
        return out

    def recent(self, positions: int) -> list[TraceChunk]:
        """The newest chunks totalling at least ``positions`` positions (newest last)."""
        out, total = [], 0
        for _, c in reversed(self.items):
            if total >= positions:
                break
            out.append(c)
            total += len(c)
        return out[::-1]
