"""The step loop: schedule -> propose -> verify -> commit -> emit.

One ``step()`` runs one target forward over every scheduled sequence: prefill chunks and, for decoding
sequences, a draft tree rooted at their last token (a root-only tree is plain decoding). Verification
accepts a path of each tree (lossless: greedy equality, rejection sampling against the request's own
processed distribution, or for seeded requests an exponential race keyed by (seed, position)), the KV rows of that path are compacted into the prefix, and the committed
tokens are checked for stop conditions one by one, so nothing past a stop string, EOS or max_tokens is
ever emitted. Streamed text (``SeqDelta.new_text``) also holds back, while a sequence runs, the longest tail
that could still grow into a stop string, so a stream never shows text that the final text omits.

The samples of an ``n > 1`` request prefill the prompt once: the scheduler admits the others only once a
sibling has processed the whole prompt; ``step`` copies its first ``P - 1`` cache rows into their slots and
each runs only the last prompt token (its own logits row, so its first token is its own draw). A learned drafter
gets the copied rows' aux states from what it kept of the sibling that computed them (``Prefill`` of origin
``shared``, ``Speculation.recall_aux``).

Prefix reuse (scheduler.py): a sequence may start from the rows a freed slot still holds. A learned drafter
gets their aux states from the proposer that kept them with the slot (origin ``reused``).

What crosses the step's phases is typed (``step.py``: ``Prefill``, ``DraftInput``, ``VerifyInput``,
``Verdict``, ``StepResult``) and everything that learns from a step subscribes to the engine's events
(``events.py``): the engine's ``Speculation`` first, then the trace recorder, the server's meter, the online
learner.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig
from ..models.loader import DTYPES, LoadedModel, load_model
from ..speculation.tree import DraftTree
from ..speculation.verify import verify_tree
from .events import EngineEvents
from .grammar import GrammarCompiler, apply_mask
from .kv_cache import KVCache
from .penalties import LogitContext, adjust_logits
from .runner import ModelRunner, RowSpec
from .sampler import SamplingParams, process_logits, race_noise, sample, seeded_sample, token_logprobs
from .scheduler import Scheduler
from .sequence import Sequence, Status
from .step import DraftInput, Prefill, StepResult, Verdict, VerifyInput


class PromptTooLongError(ValueError):
    pass


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class SeqDelta:
    """What one step produced for one sequence (the unit of streaming)."""

    request_id: str
    index: int
    seq_id: int
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[tuple[float, list[tuple[int, float]]]]
    finished: bool
    finish_reason: str | None


@dataclass
class EngineCounters:
    steps: int = 0
    forward_seconds: float = 0.0
    prefill_seconds: float = 0.0   # of forward_seconds, steps with prompt rows (a mixed step counts whole)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps_seq: int = 0      # (sequence, step) pairs that decoded
    drafted: int = 0
    accepted: int = 0
    requests_finished: int = 0
    shared_prompt_tokens: int = 0  # prompt cache rows copied from a sibling instead of prefilled
    reused_prefix_tokens: int = 0  # cache rows a sequence found in its slot instead of prefilling (prefix reuse)
    grammar_seconds: float = 0.0   # structured outputs: walking trees, masks, advancing matchers
    by_strategy: dict[str, list[int]] = field(default_factory=dict)  # strategy -> [seq-steps, committed]


class Engine:
    def __init__(self, cfg: EngineConfig, loaded: LoadedModel | None = None,
                 grammars: GrammarCompiler | None = None) -> None:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.cfg = cfg
        self.loaded = loaded or load_model(cfg.model, cfg.dtype, cfg.device, cfg.cache_dir)
        self.tokenizer = self.loaded.tokenizer
        arch = self.loaded.arch
        self.max_model_len = min(cfg.max_model_len, arch.max_position_embeddings)
        dtype = DTYPES[cfg.dtype]
        per_token = KVCache.bytes_per_token(arch, dtype)
        reserve = cfg.spec.max_draft_tokens + 1
        slot_len = self.max_model_len + reserve
        full_budget = cfg.max_num_seqs * slot_len
        if cfg.kv_cache_memory == 0:
            budget = full_budget
        elif cfg.kv_cache_memory > 1:
            budget = int(cfg.kv_cache_memory // per_token)
        else:
            import psutil

            budget = int(psutil.virtual_memory().available * cfg.kv_cache_memory // per_token)
        budget = min(budget, full_budget)
        if budget < slot_len:
            raise ValueError(f"kv_cache_memory holds {budget} tokens, less than one sequence ({slot_len})")
        self.kv = KVCache(arch, cfg.max_num_seqs, slot_len, dtype, cfg.device)
        self.runner = ModelRunner(self.loaded.model, self.kv, cfg.device)
        self.scheduler = Scheduler(self.kv, cfg.max_num_seqs, cfg.max_num_batched_tokens, budget, reserve)
        self.eos_ids = set(self.loaded.eos_token_ids)
        self.counters = EngineCounters()
        self.seqs: dict[int, Sequence] = {}
        self.requests: dict[str, list[Sequence]] = {}
        self._ids = itertools.count()
        # Unseeded requests draw from this engine's generator (seeded by cfg.seed), not torch's global one:
        # a run is reproducible from its config, and nothing else in the process shifts its draws.
        self.rng = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        self.spec = None  # set by use_speculation() (speculation/controller.py attach_speculation); None: plain
        # True while a caller waits for every running request at once (LLM.generate, set_closed_batch):
        # speculation may then value tokens by how much they shorten the batch (SpecConfig.objective).
        self.closed_batch = False
        self.events = EngineEvents()  # prefill, step, finish, weights changed, drafter swapped (events.py)
        self.clock: Callable[[], float] = time.perf_counter  # what forwards are timed by (tests inject one)
        self._weights_seen = self._weights_key()  # what the rows that freed slots retain were computed with
        self._grammars = grammars  # structured outputs; built from the tokenizer on first use when not given

    # ---- what drives the engine ----------------------------------------------------------------
    def use_speculation(self, spec) -> None:
        """Draft with ``spec`` (a ``Speculation``) from the next step on: it becomes the first subscriber of
        the engine's events, in place of the one before it."""
        if self.spec is not None:
            self.events.unsubscribe(self.spec)
        self.spec = spec
        self.events.subscribe(spec, first=True)

    def set_closed_batch(self, closed: bool) -> None:
        """Whether the caller waits for every running request at once (``LLM.generate`` does)."""
        self.closed_batch = closed

    # ---- requests ----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Text -> token ids (no special tokens added); a list of token ids as it is. Anything else (a
        tokenizer's ``BatchEncoding``, floats, nested lists) is a ValueError naming ``prompt``."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in prompt):
            raise ValueError(f"prompt: must be a string or a list of token ids, not {type(prompt).__name__}"
                             + (" of other values" if isinstance(prompt, (list, tuple)) else ""))
        return list(prompt)

    def _checked_prompt(self, prompt: str | list[int], request_ids: list[str]) -> list[int]:
        """The prompt's token ids, or a ValueError naming what is wrong with it or with the request ids."""
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.loaded.arch.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; the context length is {self.max_model_len} "
                f"(leave room for at least one generated token)")
        for i, rid in enumerate(request_ids):
            if rid in self.requests or rid in request_ids[:i]:
                raise ValueError(f"request_id {rid!r} is already in use")
        return ids

    def _check_vocab(self, params: SamplingParams) -> None:
        """A ValueError naming ``logit_bias`` when it biases a token id outside the model's vocabulary."""
        vocab = self.loaded.arch.vocab_size
        bad = [t for t in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def grammar_compiler(self) -> GrammarCompiler:
        """The tokenizer's grammar compiler (built once, on first use: ~0.2 s for a 49k vocabulary)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler.for_tokenizer(self.tokenizer, self.loaded.arch.vocab_size,
                                                           sorted(self.eos_ids))
        return self._grammars

    def _check_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar now (cached), so a bad one is a ``GrammarError`` naming its field
        before any sequence is added."""
        if params.grammar is not None:
            self.grammar_compiler().compile(params.grammar)

    def _add_seq(self, seq: Sequence) -> Sequence:
        seq.seq_id = next(self._ids)
        if seq.params.grammar is not None:
            seq.grammar = self.grammar_compiler().state(seq.params.grammar)
        if seq.params.seed is None and seq.generator is None:
            seq.generator = self.rng
        self.seqs[seq.seq_id] = seq
        self.scheduler.add(seq)
        if self.spec is not None:
            self.spec.add_request(seq)
        return seq

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    priority: int = 0, group: str | None = None) -> list[Sequence]:
        ids = self._checked_prompt(prompt, [request_id])
        self._check_vocab(params)
        self._check_grammar(params)
        group = group or (request_id if params.n > 1 else None)
        seqs: list[Sequence] = []
        for i in range(params.n):
            p = params
            if params.n > 1 and params.seed is not None:
                p = SamplingParams(**{**params.__dict__, "seed": params.seed + i})
            seq = Sequence(prompt_ids=ids, params=p, request_id=request_id, priority=priority, group=group)
            if params.n > 1:
                seq.siblings = seqs  # share the prompt's prefill (see Scheduler)
            seqs.append(self._add_seq(seq))
        self.requests[request_id] = seqs
        return seqs

    def add_siblings(self, request_ids: list[str], prompt: str | list[int], params: list[SamplingParams],
                     priorities: list[int] | None = None, group: str | None = None,
                     join: Sequence | None = None) -> list[Sequence]:
        """Add one single-sample request per id, all with one prompt, as siblings that prefill it once.

        What ``n > 1`` does inside one request, for requests that must stay separate: each has its own
        ``SamplingParams`` (its own seed: the RL rollout's per-response seeds), priority and request id (it
        finishes, is read and released on its own). The first sample prefills the prompt; the others copy
        its first ``P - 1`` cache rows (same scheduler machinery as ``n > 1``: waiting, preemption, abort,
        chunked prefill). ``join``: a sequence added earlier by ``add_siblings`` with the same prompt; the
        new samples join its siblings and copy the rows from whichever of them still holds them. Sharing
        changes no token: a sample's first token comes from its own logits row over identical cache rows.
        """
        if not request_ids or len(params) != len(request_ids):
            raise ValueError("add_siblings: need one SamplingParams per request id (at least one)")
        if any(p.n != 1 for p in params):
            raise ValueError("add_siblings: every sample's params must have n = 1")
        priorities = priorities if priorities is not None else [0] * len(request_ids)
        if len(priorities) != len(request_ids):
            raise ValueError("add_siblings: need one priority per request id")
        ids = self._checked_prompt(prompt, list(request_ids))
        for p in params:
            self._check_vocab(p)
            self._check_grammar(p)
        siblings: list[Sequence] = []
        if join is not None:
            if join.siblings is None or join.prompt_ids != ids:
                raise ValueError("add_siblings: join must be a sibling sequence with the same prompt")
            siblings = join.siblings
        out = []
        for rid, p, prio in zip(request_ids, params, priorities):
            seq = Sequence(prompt_ids=ids, params=p, request_id=rid, priority=prio, group=group)
            seq.siblings = siblings
            siblings.append(seq)  # before the scheduler sees it: it waits for the first unfinished sibling
            self._add_seq(seq)
            self.requests[rid] = [seq]
            out.append(seq)
        return out

    def abort(self, request_id: str) -> bool:
        seqs = self.requests.pop(request_id, None)
        if not seqs:
            return False
        for seq in seqs:
            if not seq.finished:
                self.scheduler.abort(seq.seq_id)
                self._retire(seq, "abort")
            self.seqs.pop(seq.seq_id, None)
            seq.siblings = None
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step ----------------------------------------------------------------------------
    def _weights_key(self) -> int:
        """Changes whenever a parameter is written in place (RL weight sync, a loaded state) or replaced."""
        return hash(tuple((p.data_ptr(), p._version) for p in self.loaded.model.parameters()))

    def _check_retained_rows(self) -> None:
        """Prefix reuse is lossless only if the retained rows are what the model would compute now: the same
        weights. A drafter that reads every prompt position's aux hidden states must also keep them with the
        rows (``Speculation.recalls_aux``), or reuse stays off."""
        sched = self.scheduler
        sched.reuse_prefixes = self.cfg.prefix_reuse and (self.spec is None or self.spec.recalls_aux)
        if sched.retained and sched.waiting:
            key = self._weights_key()
            if key != self._weights_seen:
                self._weights_seen = key
                sched.forget_retained(running_too=True)
                self.events.weights_changed()

    def step(self) -> list[SeqDelta]:
        self._check_retained_rows()
        batch = self.scheduler.schedule()
        if batch.empty:
            return []
        trees: dict[int, DraftTree] = {}
        if self.spec is not None and batch.decode:
            trees = self.spec.draft(DraftInput(batch.decode, batch.num_tokens))
        for src, dst, n_rows in batch.shared:
            self.kv.copy_prefix(src.slot, dst.slot, n_rows)
            self.counters.shared_prompt_tokens += n_rows
            self._emit_prefill(Prefill(dst, n_rows, "shared"))
        for seq, n_rows in batch.reused:
            self.counters.reused_prefix_tokens += n_rows
            self._emit_prefill(Prefill(seq, n_rows, "reused"))
        rows: list[RowSpec] = []
        for seq, n in batch.prefill:
            final = seq.cache_len + n == len(seq.tokens)
            rows.append(RowSpec(seq.slot, seq.cache_len, seq.tokens[seq.cache_len:seq.cache_len + n],
                                logits_from=n - 1 if final else -1))
        masks: dict[int, torch.Tensor] = {}
        for seq in batch.decode:
            tree = trees.get(seq.seq_id) or DraftTree.root_only(seq.tokens[-1])
            if seq.grammar is not None:
                t0 = self.clock()
                constrained = seq.grammar.constrain(tree)
                tree, masks[seq.seq_id] = constrained.tree, constrained.mask
                self.counters.grammar_seconds += self.clock() - t0
            trees[seq.seq_id] = tree
            if len(tree) == 1:
                rows.append(RowSpec(seq.slot, seq.cache_len, tree.tokens, logits_from=0))
            else:
                rows.append(RowSpec(seq.slot, seq.cache_len, tree.tokens, depths=tree.depths(),
                                    tree_mask=tree.ancestor_mask(), logits_from=0))
        want_aux = self.spec is not None and self.spec.wants_aux
        if want_aux and self.spec.aux_layers():
            self.runner.aux_layers = self.spec.aux_layers()  # what the drafter reads (it may change on a swap)
        t0 = self.clock()
        out = self.runner.run(rows, want_aux=want_aux)
        seconds = self.clock() - t0
        num_tokens = sum(len(r.tokens) for r in rows)
        self.counters.steps += 1
        self.counters.forward_seconds += seconds
        if batch.prefill:
            self.counters.prefill_seconds += seconds

        deltas: list[SeqDelta] = []
        for i, (seq, n) in enumerate(batch.prefill):
            self.counters.prompt_tokens += n
            seq.cache_len += n
            logits = out.logits[i]
            if logits is not None:
                token = self._sample_one(seq, logits[-1])
                self._commit(seq, [token], [logits[-1]])
            self._emit_prefill(Prefill(seq, n, "computed", out.aux[i]))
            deltas.append(self._delta(seq))
        verdicts: list[Verdict] = []
        for j, seq in enumerate(batch.decode):
            i = len(batch.prefill) + j
            tree = trees[seq.seq_id]
            logits = out.logits[i]
            start = seq.cache_len
            accepted, next_token = self._verify(VerifyInput(seq, tree, logits, masks.get(seq.seq_id)))
            self.kv.compact(seq.slot, seq.cache_len, accepted)
            seq.cache_len += len(accepted)
            emitted = [tree.tokens[a] for a in accepted[1:]] + [next_token]
            committed = self._commit(seq, emitted, [logits[a] for a in accepted])
            self._count_decode(seq, tree, len(accepted) - 1, committed)
            verdicts.append(Verdict(seq, tree, accepted, next_token, start, out.aux[i], out.hidden[i]))
            deltas.append(self._delta(seq))
        self.events.step(StepResult(verdicts, len(rows), num_tokens, seconds, len(batch.decode), len(batch.prefill)))
        for seq in list(batch.decode) + [s for s, _ in batch.prefill]:
            if seq.finished:
                self.scheduler.finish(seq)
        return deltas

    def _emit_prefill(self, prefill: Prefill) -> None:
        """Tell the subscribers that rows entered a cache; rows this step did not compute get the aux rows a
        proposer kept for them (``Speculation.recall_aux``)."""
        if self.spec is None:
            return
        if prefill.origin != "computed" and self.spec.wants_aux:
            prefill.aux = self.spec.recall_aux(prefill)
        self.events.prefill(prefill)

    def _verify(self, v: VerifyInput) -> tuple[list[int], int]:
        seq, tree, logits = v.seq, v.tree, self._adjusted(v.seq, v.logits, v.tree, v.mask)
        if seq.params.greedy:
            if len(tree) == 1:
                return [0], int(logits[0].argmax())
            return verify_tree(tree, logits, greedy=True)
        probs = process_logits(logits, seq.params)
        seed = seq.params.seed
        if seed is not None:
            # Seeded: the exponential race on noise keyed by (seed, output position) -- the child of a node
            # at depth d is output token num_output + d -- so the text does not depend on the draft.
            t0, vocab = seq.num_output, probs.shape[-1]
            if len(tree) == 1:
                return [0], seeded_sample(probs[0], seed, t0)
            return verify_tree(tree, probs, greedy=False, noise=lambda d: race_noise(seed, t0 + d, vocab))
        if len(tree) == 1:
            return [0], sample(probs[0], seq.generator)
        return verify_tree(tree, probs, greedy=False, generator=seq.generator)

    def _adjusted(self, seq: Sequence, logits: torch.Tensor, tree: DraftTree | None,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        """The rows with the request's bias, min_tokens and penalties applied, each for its own tree path
        (penalties.py), and the tokens its grammar forbids there at -inf (grammar.py); the rows themselves
        when the request sets none of them."""
        p = seq.params
        if p.adjusts_logits:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids))
            logits = adjust_logits(logits, p, LogitContext(seq.prompt_ids, seq.output_ids, stops, tree))
        if mask is not None:
            t0 = self.clock()
            logits = apply_mask(logits, mask)
            self.counters.grammar_seconds += self.clock() - t0
        return logits

    def _sample_one(self, seq: Sequence, logits: torch.Tensor) -> int:
        mask = seq.grammar.next_mask() if seq.grammar is not None else None
        logits = self._adjusted(seq, logits[None], None, mask)[0]
        if seq.params.greedy:
            return int(logits.argmax())
        probs = process_logits(logits[None], seq.params)[0]
        if seq.params.seed is not None:
            return seeded_sample(probs, seq.params.seed, seq.num_output)  # output position num_output
        return sample(probs, seq.generator)

    def _count_decode(self, seq: Sequence, tree: DraftTree, accepted: int, committed: int) -> None:
        c = self.counters
        c.decode_steps_seq += 1
        c.drafted += tree.num_draft
        c.accepted += accepted
        seq.stats.steps += 1
        seq.stats.drafted += tree.num_draft
        seq.stats.accepted += accepted
        for stats in (c.by_strategy, seq.stats.by_strategy):
            entry = stats.setdefault(tree.source if tree.num_draft else "off", [0, 0])
            entry[0] += 1
            entry[1] += committed

    # ---- commit, stop conditions, emit -------------------------------------------------------
    def _commit(self, seq: Sequence, tokens: list[int], logits_rows: list[torch.Tensor]) -> int:
        """Append tokens one at a time until a stop condition; returns how many were committed."""
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        p = seq.params
        done = 0
        cut = False
        for token, row in zip(tokens, logits_rows):
            seq.tokens.append(token)
            done += 1
            if p.logprobs is not None:
                seq.logprobs.append(token_logprobs(row, token, p.logprobs))
            reason = None
            if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
                reason = "stop"
            elif seq.grammar is not None and self._grammar_ended(seq, token):
                reason = "stop"
            elif p.stop and seq.num_output >= p.min_tokens:  # vLLM: no stop before min_tokens
                text = self._decode(seq)
                # Only the tail can hold a new match: search from where the previous text could end one.
                start = max(0, len(seq.text) - max(len(s) for s in p.stop))
                hits = [i for i in (text.find(s, start) for s in p.stop) if i >= 0]
                seq.text = text[:min(hits)] if hits else text
                if hits:
                    reason, cut = "stop", True
            if reason is None and (seq.num_output >= p.max_tokens or len(seq.tokens) >= self.max_model_len):
                reason = "length"
            if reason is not None:
                self._retire(seq, reason, notify=False)
                break
        self.counters.generated_tokens += done
        if not cut:
            seq.text = self._decode(seq)
        if self.spec is not None:
            self.spec.on_commit(seq, seq.tokens[len(seq.tokens) - done:])
        if seq.finished:
            self.events.finish(seq)
        return done

    def _grammar_ended(self, seq: Sequence, token: int) -> bool:
        """Advance the sequence's grammar by a committed token; True once nothing may follow (its stop
        token was accepted, e.g. an EOS under ``ignore_eos``). A token the grammar refuses cannot be sampled
        (it was masked); should one come anyway, the output ends there rather than leave the grammar."""
        t0 = self.clock()
        ok = seq.grammar.accept([token])
        self.counters.grammar_seconds += self.clock() - t0
        return not ok or seq.grammar.terminated

    def _decode(self, seq: Sequence) -> str:
        return self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)

    def _retire(self, seq: Sequence, reason: str, notify: bool = True) -> None:
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.counters.requests_finished += 1
        if notify:
            self.events.finish(seq)

    def _delta(self, seq: Sequence) -> SeqDelta:
        text = seq.text
        safe = len(text)
        if not seq.finished:
            # Hold back a trailing replacement character (the rest of a multi-byte character is still coming)
            # and the longest tail that could still become a stop string (cut if it completes).
            safe = len(text.rstrip("\ufffd"))
            safe -= stop_holdback(text[:safe], seq.params.stop)
        new_text = text[seq.emitted_text:safe] if safe > seq.emitted_text else ""
        seq.emitted_text = max(seq.emitted_text, safe)
        new_ids = seq.output_ids[seq.emitted_tokens:]
        new_lp = seq.logprobs[seq.emitted_tokens:] if seq.params.logprobs is not None else []
        seq.emitted_tokens = seq.num_output
        index = self.requests[seq.request_id].index(seq) if seq.request_id in self.requests else 0
        return SeqDelta(seq.request_id, index, seq.seq_id, new_text, new_ids, new_lp, seq.finished,
                        seq.finish_reason)

    def release_request(self, request_id: str) -> None:
        """Forget a finished request's bookkeeping (the API calls this once it has read the outputs)."""
        for seq in self.requests.pop(request_id, []):
            self.seqs.pop(seq.seq_id, None)
            seq.siblings = None  # no reference cycle left behind
