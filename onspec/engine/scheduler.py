"""Continuous-batching bookkeeping: who runs this step and with how many tokens. Never touches a tensor.

Each step every running sequence that is decoding gets one token (plus whatever draft budget the
speculation controller later spends), and what is left of the per-step token budget goes to prefill
chunks: first to sequences already part-way through their prompt, then to waiting requests in priority
order (lower ``priority`` first, then arrival). A prompt longer than the budget is prefilled in chunks.

KV memory is a token budget shared by all slots. When running sequences would outgrow it, the
lowest-priority, latest-arrived sequence is preempted: its slot is freed and it returns to the waiting
queue with its tokens, to be recomputed later (preemption by recompute; never a crash).

Samples of one ``n > 1`` request share the prompt's prefill. The first sample prefills as usual; the others
wait in the queue (taking no slot and no budget) until some running sibling has processed the whole prompt
(so they start one step behind the first sample, whose output then drafts for them in grouped suffix
drafting). A sample admitted then copies that sibling's first ``P - 1`` cache rows, starts with
``cache_len = P - 1`` and prefills only the last prompt token, which gives it its own logits row (its first
token is its own draw). The batch lists the row copies in ``shared`` and the engine performs them before the
forward (the scheduler never touches a tensor). A preempted sample shares again if a sibling still holds the
rows and recomputes otherwise. The sample that prefills for the others is the first unfinished sibling: if
it finishes without sharing (e.g. ``max_num_seqs = 1``) or is aborted, the next one prefills and the rest
wait for it. Separate requests can be siblings too (``Engine.add_siblings``: RL responses, each with its own
seed); a request joining later copies the rows from any running sibling.

Prefix reuse (``reuse_prefixes``): a freed slot keeps its cache rows until it is allocated again, and the
scheduler remembers which tokens they hold (``retained``). A new (or preempted) sequence is given the free
slot whose rows share the longest prefix with its tokens and starts with ``cache_len`` at that length, so
a shared system prompt, a chat's earlier turns or a preempted sequence's own context are not computed again
(the idea of vLLM's automatic prefix caching, here without copies: the rows are used where they lie). Free
slots whose rows match nothing are handed out least recently released first, so the freshest prefixes last
longest. The engine decides when rows may be reused (same weights; ``Engine._check_retained_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .sequence import Sequence, Status


class SlotAllocator(Protocol):
    num_free: int
    free_slots: list[int]

    def allocate(self, slot: int | None = None) -> int: ...

    def free(self, slot: int) -> None: ...


@dataclass
class ScheduledBatch:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    reused: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, cache rows it found in its slot)
    # (source, target, rows): copy the first ``rows`` cache rows of source's slot into target's slot
    # before the forward (n > 1 siblings sharing the prompt's prefill)
    shared: list[tuple[Sequence, Sequence, int]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill) + len(self.decode)


def _order(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, seq.arrival, seq.seq_id)


class Scheduler:
    def __init__(self, slots: SlotAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 kv_token_budget: int, draft_reserve: int = 0) -> None:
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv_token_budget = kv_token_budget
        self.draft_reserve = draft_reserve  # cache rows each decoding sequence may need for a draft tree
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.reuse_prefixes = False
        # free slot -> the tokens whose cache rows it still holds, in release order (an entry leaves when its
        # slot is allocated and comes back at the end when it is released: the first is the oldest)
        self.retained: dict[int, list[int]] = {}
        self._tainted: set[int] = set()            # running slots whose rows must not be retained (forget_retained)

    # ---- queue -------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def abort(self, seq_id: int) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self._release(seq)
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step ----------------------------------------------------------------------------
    def _kv_need(self, seq: Sequence) -> int:
        return len(seq.tokens) + 1 + self.draft_reserve

    def _release(self, seq: Sequence) -> None:
        if seq.slot >= 0:
            self.slots.free(seq.slot)
            if self.reuse_prefixes and seq.cache_len > 0 and seq.slot not in self._tainted:
                self.retained[seq.slot] = seq.tokens[:seq.cache_len]
            self._tainted.discard(seq.slot)
        seq.slot = -1
        seq.cache_len = 0

    def _pick_slot(self, seq: Sequence) -> tuple[int | None, int]:
        """(free slot to allocate, cache rows of it that ``seq`` can reuse); (None, 0): the allocator's choice.

        At most ``len(tokens) - 1`` rows are reused: the last token must run through the model to give
        the logits of the next one."""
        if not self.reuse_prefixes or not self.retained:
            return None, 0
        tokens, cap = seq.tokens, len(seq.tokens) - 1
        free = self.slots.free_slots
        best, best_len = None, 0
        for slot in free:
            held = self.retained.get(slot)
            if not held or held[0] != tokens[0]:
                continue
            n, limit = 0, min(len(held), cap)
            while n < limit and held[n] == tokens[n]:
                n += 1
            if n > best_len:
                best, best_len = slot, n
        if best is not None:
            return best, best_len
        # Nothing to reuse: spare the retained rows; if every free slot holds some, take the least recently
        # released (retained slots are all free, so the first entry is one)
        blank = [s for s in free if s not in self.retained]
        return (min(blank) if blank else next(iter(self.retained))), 0

    def forget_retained(self, running_too: bool = False) -> None:
        """The rows of free slots are no longer valid (the weights changed, or something wrote them).
        ``running_too``: nor are the rows running sequences computed so far (the weights changed under them),
        so their slots are not retained when they are released."""
        self.retained.clear()
        if running_too:
            self._tainted.update(s.slot for s in self.running if s.slot >= 0)

    def _preempt(self, out: ScheduledBatch) -> None:
        victim = max(self.running, key=_order)
        self.running.remove(victim)
        self._release(victim)
        victim.status = Status.WAITING
        victim.preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(victim)
        out.preempted.append(victim)

    @staticmethod
    def _prefix_source(seq: Sequence) -> Sequence | None:
        """A running sibling that has processed the whole prompt: its first ``P - 1`` cache rows are copied."""
        if seq.siblings is None or seq.num_prompt < 2:
            return None
        for sib in seq.siblings:
            if sib is not seq and sib.status is Status.RUNNING and sib.slot >= 0 and sib.cache_len >= seq.num_prompt:
                return sib
        return None

    @staticmethod
    def _awaits_prefix(seq: Sequence) -> bool:
        """A fresh sample waits while another sibling, the first unfinished one, has yet to prefill the prompt.

        The first unfinished sibling, not the first: if the first was aborted or finished without sharing
        (or a sample joined after it finished, ``Engine.add_siblings``), the next one prefills for the rest."""
        if seq.siblings is None or seq.num_prompt < 2 or seq.num_output:
            return False
        lead = next((s for s in seq.siblings if not s.finished), seq)
        return lead is not seq

    def schedule(self) -> ScheduledBatch:
        out = ScheduledBatch()
        # Keep the running set inside the KV budget (the newest, lowest-priority work yields first).
        while len(self.running) > 1 and sum(self._kv_need(s) for s in self.running) > self.kv_token_budget:
            self._preempt(out)
        used_kv = sum(self._kv_need(s) for s in self.running)
        budget = self.max_num_batched_tokens
        for seq in sorted(self.running, key=_order):
            if not seq.is_prefilling and budget > 0:
                out.decode.append(seq)
                budget -= 1
        for seq in sorted(self.running, key=_order):
            if seq.is_prefilling and budget > 0:
                n = min(seq.num_pending, budget)
                out.prefill.append((seq, n))
                budget -= n
        self.waiting.sort(key=_order)
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs and self.slots.num_free:
            seq = self.waiting[i]
            source = self._prefix_source(seq)
            if source is None and self._awaits_prefix(seq):
                i += 1  # holds nothing while it waits; work behind it may start
                continue
            need = self._kv_need(seq)
            if self.running and used_kv + need > self.kv_token_budget:
                break
            self.waiting.pop(i)
            slot, reuse = self._pick_slot(seq)
            seq.slot = self.slots.allocate(slot)
            self.retained.pop(seq.slot, None)
            seq.cache_len = reuse
            if source is not None and seq.num_prompt - 1 > reuse:
                seq.cache_len = seq.num_prompt - 1
                out.shared.append((source, seq, seq.cache_len))
            elif reuse:
                out.reused.append((seq, reuse))
            seq.status = Status.RUNNING
            self.running.append(seq)
            used_kv += need
            n = min(seq.num_pending, budget)
            out.prefill.append((seq, n))
            budget -= n
        return out
