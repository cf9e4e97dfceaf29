"""The generation routes: POST /v1/completions and /v1/chat/completions, answered whole or as SSE.

A handler validates the body (protocol.py), reserves the request's sequences (503 when the server is full),
opens one engine request per prompt through the bridge, then either collects every chunk into one response
(while watching for the client leaving) or streams them as OpenAI chunks. Whichever way it ends (finished,
client gone, error), ``cleanup`` aborts what is still running, which frees the cache slots, and releases
the reservation exactly once.

With tools (tools.py), a chat answer's text is parsed for tool calls: the message carries ``tool_calls``
and ``finish_reason`` is ``tool_calls``; a stream sends each call as one delta once it is complete.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from ..engine.sampler import SamplingParams
from . import protocol as P
from .bridge import EngineFailure, Stream
from .errors import APIError
from .state import ServerState, get_state, require_api_key
from .tools import ToolCallStream, check_tool_support, parse_tool_calls, tool_grammar


def add_routes(app: FastAPI) -> None:
    @app.post("/v1/completions", dependencies=[Depends(require_api_key)])
    async def completions(body: P.CompletionRequest, request: Request) -> Response:
        st = get_state(request)
        st.check_model(body.model)
        prompts = body.prompts()
        params = body.to_params()
        return await _generate(st, request, "completion", body, prompts, params, body.max_tokens is not None,
                               "prompt")

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(body: P.ChatRequest, request: Request) -> Response:
        st = get_state(request)
        st.check_model(body.model)
        tokenizer = st.engine.tokenizer
        tools = body.active_tools()
        grammar = None
        if tools:
            fmt = check_tool_support(tokenizer, st.engine.loaded.arch.family, body.model)
            grammar = tool_grammar(fmt, tools, body.tool_choice_wire(), body.parallel_tool_calls is not False,
                                   tokenizer)
        params = body.to_params(grammar)
        try:
            text = tokenizer.apply_chat_template(body.conversation(), tools=tools or None, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # jinja's TemplateError (e.g. roles must alternate), a missing template ...
            raise APIError(400, f"messages: the model's chat template rejected them: {exc}", "messages") from None
        explicit = (body.max_completion_tokens or body.max_tokens) is not None
        return await _generate(st, request, "chat", body, [text], params, explicit, "messages", bool(tools))


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None


def _finish(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


async def _generate(st: ServerState, request: Request, kind: str, body, prompts: list, params: SamplingParams,
                    explicit_max_tokens: bool, param_name: str, tools: bool = False) -> Response:
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    rid = f"{prefix}-{uuid.uuid4().hex}"
    total = params.n * len(prompts)
    try:
        st.bridge.reserve(total, "n")
    except APIError as exc:
        if exc.status == 503:
            st.metrics.rejected.inc()
        raise
    stream: Stream | None = None
    try:
        stream = await st.bridge.open(rid, prompts, params, body.priority, explicit_max_tokens, param_name)
    except BaseException:
        st.bridge.release(total)
        raise
    t0 = time.perf_counter()
    route = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    done = {"released": False}

    def cleanup() -> None:
        if done["released"]:
            return
        done["released"] = True
        if not stream.finished:
            st.metrics.disconnects.inc()
        stream.close()
        st.bridge.release(total)
        st.requests_total += 1
        st.metrics.request_seconds.labels(route).observe(time.perf_counter() - t0)

    if body.stream:
        gen = _sse(st, stream, kind, rid, body, total, t0, route, cleanup, tools)
        return StreamingResponse(gen, media_type="text/event-stream", background=BackgroundTask(cleanup),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        return await _collect(st, request, stream, kind, rid, body, total, t0, route, tools)
    finally:
        cleanup()


async def _watch_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(st: ServerState, request: Request, stream: Stream, kind: str, rid: str, body, total: int,
                   t0: float, route: str, tools: bool = False) -> Response:
    choices = [_Choice() for _ in range(total)]
    first = [True]

    async def consume() -> None:
        async for chunks in stream.batches():
            for c in chunks:
                if first[0] and c.token_ids:
                    first[0] = False
                    st.metrics.ttft.labels(route).observe(time.perf_counter() - t0)
                ch = choices[c.index]
                ch.text.append(c.text)
                if c.tokens is not None:
                    ch.tokens.extend(c.tokens)
                    ch.logprobs.extend(c.logprobs or [])
                if c.finished:
                    ch.finish_reason = _finish(c.finish_reason)

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_watch_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        return Response(status_code=499)  # the client has gone; nobody reads this
    try:
        work.result()
    except EngineFailure as exc:
        raise APIError(500, str(exc), code="engine_error") from None
    created = P.now()
    use = P.usage(stream.prompt_tokens, stream.completion_tokens)
    wants_lp = body.logprobs not in (None, False)
    out = []
    for i, ch in enumerate(choices):
        text = "".join(ch.text)
        if kind == "chat":
            message: dict = {"role": "assistant", "content": text}
            finish = ch.finish_reason
            if tools:
                content, calls = parse_tool_calls(text)
                if calls:
                    message = {"role": "assistant", "content": content, "tool_calls": [c.wire() for c in calls]}
                    finish = "tool_calls" if finish == "stop" else finish
            out.append({"index": i, "message": message,
                        "logprobs": P.chat_logprobs(ch.tokens, ch.logprobs) if wants_lp else None,
                        "finish_reason": finish})
        else:
            out.append({"index": i, "text": text,
                        "logprobs": P.completion_logprobs(ch.tokens, ch.logprobs, 0) if wants_lp else None,
                        "finish_reason": ch.finish_reason})
    model = body.model
    resp = P.chat_response if kind == "chat" else P.completion_response
    return JSONResponse(resp(rid, model, created, out, use))


def _chat_delta(calls: ToolCallStream, text: str, finished: bool) -> dict:
    """A chat stream delta with tools on: content outside the calls, and the calls completed by ``text``
    (numbered across the choice's stream, as the OpenAI stream numbers them)."""
    first = len(calls.calls)
    content, new = calls.feed(text)
    if finished:
        content += calls.finish()
    delta: dict = {"content": content} if content else {}
    if new:
        delta["tool_calls"] = [c.wire(first + k) for k, c in enumerate(new)]
    return delta


def _sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _sse(st: ServerState, stream: Stream, kind: str, rid: str, body, total: int, t0: float, route: str,
               cleanup, tools: bool = False) -> AsyncIterator[str]:
    created = P.now()
    model = body.model
    wants_lp = body.logprobs not in (None, False)
    offsets = [0] * total
    held: list[tuple[list, list]] = [([], []) for _ in range(total)]  # logprobs of tokens with held-back text
    calls = [ToolCallStream() for _ in range(total)] if tools else []
    first = True
    try:
        if kind == "chat":
            yield _sse_event(P.chat_chunk(rid, model, created, [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(total)]))
        async for chunks in stream.batches():
            choices = []
            for c in chunks:
                if first and c.token_ids:
                    first = False
                    st.metrics.ttft.labels(route).observe(time.perf_counter() - t0)
                toks, lps = held[c.index]
                toks.extend(c.tokens or [])
                lps.extend(c.logprobs or [])
                if not c.text and not c.finished:
                    continue  # text held back (a stop-string prefix, a partial character): send it later
                lp = None
                if wants_lp and toks:
                    if kind == "chat":
                        lp = P.chat_logprobs(toks, lps)
                    else:
                        lp = P.completion_logprobs(toks, lps, offsets[c.index])
                held[c.index] = ([], [])
                offsets[c.index] += len(c.text)
                fr = _finish(c.finish_reason) if c.finished else None
                if kind == "chat":
                    delta = _chat_delta(calls[c.index], c.text, c.finished) if tools else (
                        {"content": c.text} if c.text else {})
                    if fr == "stop" and tools and calls[c.index].calls:
                        fr = "tool_calls"
                    choices.append({"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": fr})
                else:
                    choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": fr})
            if choices:
                make = P.chat_chunk if kind == "chat" else P.completion_chunk
                yield _sse_event(make(rid, model, created, choices))
        if body.include_usage:
            make = P.chat_chunk if kind == "chat" else P.completion_chunk
            yield _sse_event(make(rid, model, created, [], P.usage(stream.prompt_tokens, stream.completion_tokens)))
        yield "data: [DONE]\n\n"
    except EngineFailure as exc:
        yield _sse_event({"error": {"message": str(exc), "type": "server_error", "param": None,
                                    "code": "engine_error"}})
    finally:
        cleanup()
