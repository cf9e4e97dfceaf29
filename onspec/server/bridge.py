"""The engine thread and the asyncio bridge in front of it.

The engine is not thread-safe and a step blocks for tens of milliseconds, so it gets a thread of its own
(``EngineWorker``) and is touched by nothing else. Everything crosses through queues:

* into the engine: a thread-safe inbox of commands (add a request, abort one, run a function between two
  steps), drained before every step, so an abort or a drafter swap lands at a step boundary;
* out of it: after each step the worker groups that step's new text by request and hands the whole batch to
  the event loop with one ``call_soon_threadsafe``; each request reads its own ``asyncio.Queue``.

``Bridge`` is the event-loop side: admission control (a full server answers 503 with Retry-After instead of
queueing without bound), draining on shutdown, and ``Stream`` objects that abort their engine request when
they are closed early (client disconnect), which frees the request's cache slot at the next step boundary.

Streamed text is the engine's ``SeqDelta.new_text``: the engine holds back, while a sample runs, the longest
tail that could still become a stop string (vLLM does the same), so a stream never shows the start of a stop
string that the final text omits, and streamed text always concatenates to the non-streamed text.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.engine import stop_holdback  # noqa: F401  (re-exported; the engine applies it to streamed text)
from ..engine.sampler import SamplingParams
from .errors import APIError, bad_request

log = logging.getLogger("onspec.server")

_END = object()   # sentinel: every sample of the request finished


class EngineFailure(RuntimeError):
    """The engine raised while this request was in flight (details are in the server log)."""


@dataclass
class Chunk:
    """New output of one sample (``index``) since the previous chunk."""

    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    tokens: list[str] | None = None                                # token strings, when logprobs are on
    logprobs: list[tuple[float, list[tuple[str, float]]]] | None = None


@dataclass
class EngineSnapshot:
    """Copied by the engine thread after each step; read by metrics and the dashboard from anywhere."""

    time: float = 0.0
    steps: int = 0
    forward_seconds: float = 0.0
    prefill_seconds: float = 0.0
    prompt_tokens: int = 0
    reused_prefix_tokens: int = 0
    generated_tokens: int = 0
    decode_steps_seq: int = 0
    drafted: int = 0
    accepted: int = 0
    requests_finished: int = 0
    by_strategy: dict[str, tuple[int, int]] = field(default_factory=dict)     # name -> (seq-steps, committed)
    controller: dict[str, dict[str, float]] = field(default_factory=dict)    # name -> drafted/accepted/steps
    decisions: dict[str, int] = field(default_factory=dict)
    measured_utility: dict[int, dict] = field(default_factory=dict)  # batch bucket -> rates, open/closed
    # decoding steps by the draft policy's reason, strategies left out by gate (speculation/policy.py DraftCounts)
    draft_policy: dict = field(default_factory=lambda: {"steps": {}, "strategies": {}})
    draft_seconds: float = 0.0
    running: int = 0
    waiting: int = 0
    free_slots: int = 0
    num_slots: int = 0
    preemptions: int = 0
    last_batch: int = 0
    last_step_tokens: int = 0
    active_requests: int = 0
    plain_seconds_est: float = 0.0     # SpeedupMeter: what plain decoding would have spent
    spec_seconds: float = 0.0          # SpeedupMeter: what was spent (forward + drafting)


@dataclass
class _Req:
    """Engine-thread state of one engine request."""

    rid: str
    n: int
    sink: asyncio.Queue
    want_logprobs: bool
    base: int = 0                  # choice index of sample 0 (several prompts share one response)
    done: int = 0


@dataclass
class _Add:
    rid: str
    prompt: str | list[int]
    params: SamplingParams
    priority: int
    explicit_max_tokens: bool
    sink: asyncio.Queue
    base: int
    result: concurrent.futures.Future


@dataclass
class _Abort:
    rid: str


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    result: concurrent.futures.Future


class EngineWorker:
    """Owns the engine: runs its step loop on a dedicated thread and talks to the event loop by queues."""

    def __init__(self, engine, meter: Callable | None = None, idle_wait: float = 0.05, trimmer=None) -> None:
        self.engine = engine
        self.meter = meter
        self.trimmer = trimmer            # MemoryTrimmer (memory.py) or None
        self.idle_wait = idle_wait
        self.snapshot = EngineSnapshot(num_slots=engine.cfg.max_num_seqs, free_slots=engine.cfg.max_num_seqs)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._reqs: dict[str, _Req] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_batch = (0, 0)

    # ---- control (any thread) ------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="onspec-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)  # wake the loop
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, rid: str, prompt: str | list[int], params: SamplingParams, priority: int,
               explicit_max_tokens: bool, sink: asyncio.Queue, base: int = 0) -> concurrent.futures.Future:
        """Queue an engine request; the future resolves to its prompt length or a ``ValueError``."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive or self._stop.is_set():
            fut.set_exception(APIError(503, "the engine is not running", code="engine_stopped"))
            return fut
        self._inbox.put(_Add(rid, prompt, params, priority, explicit_max_tokens, sink, base, fut))
        return fut

    def abort(self, rid: str) -> None:
        self._inbox.put(_Abort(rid))

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between two steps; the future holds its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(RuntimeError("the engine thread is not running"))
            return fut
        self._inbox.put(_Call(fn, fut))
        return fut

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        last_snap = 0.0
        while not self._stop.is_set():
            try:
                self._drain(block=not engine.has_unfinished())
                if self._stop.is_set():
                    break
                if engine.has_unfinished():
                    self._dispatch(engine.step())
                    self._publish()
                    last_snap = time.monotonic()
                    if self.trimmer is not None:
                        self.trimmer.maybe_trim(busy=True)  # rate-limited: once a minute under load
                elif time.monotonic() - last_snap > 0.5:
                    self._publish()
                    last_snap = time.monotonic()
                    if self.trimmer is not None and not self._reqs:
                        self.trimmer.maybe_trim()  # idle: hand freed heap memory back to the OS
            except Exception:
                # The traceback goes to the log; the requests in flight get an error, the server keeps serving.
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all()
        # Leaving: nothing may wait forever on a request that will never finish.
        self._fail_all(reason="the server is shutting down")
        self._drain(block=False)

    def _drain(self, block: bool) -> None:
        try:
            cmd = self._inbox.get(timeout=self.idle_wait) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd) -> None:
        if cmd is None:  # the wake-up sent by stop()
            return
        if isinstance(cmd, _Add):
            if not cmd.result.set_running_or_notify_cancel():
                return  # the caller gave up (cancelled) before the engine saw the request: never add it
            if self._stop.is_set():
                cmd.result.set_exception(APIError(503, "the server is shutting down", code="shutting_down"))
                return
            try:
                cmd.result.set_result(self._add(cmd))
            except Exception as exc:  # ValueError: bad input (400); anything else is logged by the app
                cmd.result.set_exception(exc)
        elif isinstance(cmd, _Abort):
            self._abort(cmd.rid)
        elif isinstance(cmd, _Call):
            if not cmd.result.set_running_or_notify_cancel():
                return
            try:
                cmd.result.set_result(cmd.fn(self.engine))
            except Exception as exc:
                cmd.result.set_exception(exc)

    def _add(self, cmd: _Add) -> int:
        engine = self.engine
        ids = engine.encode(cmd.prompt)
        fits = 0 < len(ids) < engine.max_model_len  # else add_request names the prompt as the problem
        if cmd.explicit_max_tokens and fits and len(ids) + cmd.params.max_tokens > engine.max_model_len:
            raise ValueError(
                f"max_tokens: the context length is {engine.max_model_len} tokens; the prompt has {len(ids)} "
                f"and max_tokens asks for {cmd.params.max_tokens} more")
        engine.add_request(cmd.rid, ids, cmd.params, priority=cmd.priority)
        p = cmd.params
        self._reqs[cmd.rid] = _Req(cmd.rid, p.n, cmd.sink, p.logprobs is not None, base=cmd.base)
        return len(ids)

    def _abort(self, rid: str) -> None:
        req = self._reqs.pop(rid, None)
        if req is None:
            return
        seqs = list(self.engine.requests.get(rid, []))
        self.engine.abort(rid)
        for seq in seqs:  # Engine.abort forgets the request but not its sequences; drop them here
            self.engine.seqs.pop(seq.seq_id, None)

    def _fail_all(self, reason: str = "the engine failed while generating (see the server log)") -> None:
        out = []
        for rid, req in list(self._reqs.items()):
            try:
                self._abort(rid)
            except Exception:
                log.exception("abort of %s failed", rid)
                self._reqs.pop(rid, None)
            out.append((req.sink, [EngineFailure(reason)]))
        self._deliver(out)

    def _dispatch(self, deltas: list) -> None:
        engine = self.engine
        batches: dict[str, list] = {}
        for d in deltas:
            req = self._reqs.get(d.request_id)
            if req is None:
                continue
            text = d.new_text  # stop-string and partial-character hold-back are the engine's (Engine._delta)
            if not (text or d.new_token_ids or d.finished):
                continue
            chunk = Chunk(req.base + d.index, text, list(d.new_token_ids), d.finished, d.finish_reason)
            if req.want_logprobs and d.new_token_ids:
                tok = engine.tokenizer
                chunk.tokens = [tok.decode([t]) for t in d.new_token_ids]
                chunk.logprobs = [(lp, [(tok.decode([a]), alp) for a, alp in alts]) for lp, alts in d.new_logprobs]
            batches.setdefault(d.request_id, []).append(chunk)
            if d.finished:
                req.done += 1
        out = []
        for rid, chunks in batches.items():
            req = self._reqs[rid]
            if req.done >= req.n:
                engine.release_request(rid)
                del self._reqs[rid]
                chunks.append(_END)
            out.append((req.sink, chunks))
        self._deliver(out)

    def _deliver(self, out: list) -> None:
        if not out or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_put_all, out)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _publish(self) -> None:
        e = self.engine
        c = e.counters
        snap = EngineSnapshot(
            time=time.time(), steps=c.steps, forward_seconds=c.forward_seconds, prefill_seconds=c.prefill_seconds,
            prompt_tokens=c.prompt_tokens, reused_prefix_tokens=c.reused_prefix_tokens,
            generated_tokens=c.generated_tokens, decode_steps_seq=c.decode_steps_seq, drafted=c.drafted,
            accepted=c.accepted, requests_finished=c.requests_finished,
            by_strategy={k: (v[0], v[1]) for k, v in c.by_strategy.items()},
            running=len(e.scheduler.running), waiting=len(e.scheduler.waiting), free_slots=e.kv.num_free,
            num_slots=e.kv.num_slots, preemptions=e.scheduler.num_preemptions, active_requests=len(self._reqs))
        if e.spec is not None:
            ctl = e.spec.controller
            snap.controller = {k: {"drafted": s.drafted, "accepted": s.accepted, "steps": s.steps,
                                   "predicted": s.predicted} for k, s in ctl.stats.items()}
            snap.decisions = dict(ctl.decisions)
            snap.measured_utility = e.spec.utility.summary()
            snap.draft_policy = e.spec.policy.counts.summary()
            snap.draft_seconds = e.spec.draft_seconds
        if self.meter is not None:
            snap.last_batch, snap.last_step_tokens = self.meter.last_batch, self.meter.last_tokens
            snap.plain_seconds_est, snap.spec_seconds = self.meter.plain_seconds, self.meter.spec_seconds
        self.snapshot = snap  # one reference assignment: readers see the old or the new copy, never a mix


def _put_all(out: list) -> None:
    for sink, items in out:
        for item in items:
            sink.put_nowait(item)


def merge_by_index(chunks: list[Chunk]) -> list[Chunk]:
    """One chunk per sample: what several steps produced while the reader was busy, joined in order
    (an OpenAI stream chunk carries at most one entry per choice index)."""
    merged: dict[int, Chunk] = {}
    for c in chunks:
        m = merged.get(c.index)
        if m is None:
            merged[c.index] = Chunk(c.index, c.text, list(c.token_ids), c.finished, c.finish_reason,
                                    list(c.tokens) if c.tokens is not None else None,
                                    list(c.logprobs) if c.logprobs is not None else None)
            continue
        m.text += c.text
        m.token_ids.extend(c.token_ids)
        m.finished, m.finish_reason = c.finished, c.finish_reason
        if c.tokens is not None:
            m.tokens = (m.tokens or []) + c.tokens
            m.logprobs = (m.logprobs or []) + (c.logprobs or [])
    return list(merged.values())


class Stream:
    """The event-loop side of one response: its engine requests (one per prompt) share one queue."""

    def __init__(self, bridge: "Bridge", rids: list[str], sink: asyncio.Queue, prompt_tokens: int) -> None:
        self.bridge = bridge
        self.rids = rids
        self.sink = sink
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.ended = 0               # engine requests whose samples all finished
        self.finished = False
        self.closed = False

    async def batches(self):
        """Yield lists of ``Chunk`` (whatever arrived together) until every sample finished."""
        while not self.finished:
            items = [await self.sink.get()]
            while not self.sink.empty():
                items.append(self.sink.get_nowait())
            chunks = []
            for item in items:
                if item is _END:
                    self.ended += 1
                    self.finished = self.ended >= len(self.rids)
                elif isinstance(item, Exception):
                    self.finished = True
                    raise item
                else:
                    self.completion_tokens += len(item.token_ids)
                    chunks.append(item)
            if chunks:
                yield merge_by_index(chunks)

    def close(self) -> None:
        """Idempotent; aborts unfinished engine requests (which frees their cache slots)."""
        if self.closed:
            return
        self.closed = True
        if not self.finished:
            for rid in self.rids:
                self.bridge.worker.abort(rid)


class Bridge:
    """Admission control and request submission on the event loop (single-threaded: no locks needed)."""

    def __init__(self, worker: EngineWorker, capacity: int, retry_after: int = 1) -> None:
        self.worker = worker
        self.capacity = capacity          # sequences held at once (running + queued)
        self.retry_after = retry_after
        self.outstanding = 0              # sequences admitted and not yet released
        self.draining = False
        self.rejected = 0                 # 503s for a full queue

    def reserve(self, sequences: int, field_name: str = "n") -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down",
                           headers={"Retry-After": str(self.retry_after)})
        if sequences > self.capacity:
            raise APIError(400, f"{field_name}: this request needs {sequences} sequences; the server holds at "
                                f"most {self.capacity} at once", field_name)
        if self.outstanding + sequences > self.capacity:
            self.rejected += 1
            raise APIError(503, f"the server is at capacity ({self.outstanding} sequences running or queued); "
                                f"retry after {self.retry_after} s", code="queue_full",
                           headers={"Retry-After": str(self.retry_after)})
        self.outstanding += sequences

    def release(self, sequences: int) -> None:
        self.outstanding = max(0, self.outstanding - sequences)

    async def open(self, rid: str, prompts: list[str | list[int]], params: SamplingParams, priority: int = 0,
                   explicit_max_tokens: bool = False, param_name: str = "prompt") -> Stream:
        """Add one engine request per prompt (sequences already reserved); a ``ValueError`` becomes a 400."""
        sink: asyncio.Queue = asyncio.Queue()
        rids = [rid] if len(prompts) == 1 else [f"{rid}-{i}" for i in range(len(prompts))]
        futs = [self.worker.submit(r, p, params, priority, explicit_max_tokens, sink, base=i * params.n)
                for i, (r, p) in enumerate(zip(rids, prompts))]
        try:
            counts = [await asyncio.wrap_future(f) for f in futs]
        except BaseException as exc:
            for r in rids:  # an abort of a request that was never added is a no-op
                self.worker.abort(r)
            if isinstance(exc, ValueError) and not isinstance(exc, APIError):
                raise bad_request(exc, param_name) from None
            raise
        return Stream(self, rids, sink, sum(counts))

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        return await asyncio.wrap_future(self.worker.call(fn))
