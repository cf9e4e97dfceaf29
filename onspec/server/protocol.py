"""The OpenAI wire format: request models (pydantic, strict) and the JSON shapes of responses and chunks.

Requests are validated strictly (no ``"3"`` for an integer, no ``true`` for a number, no NaN) with the
OpenAI ranges, so a bad field is a 400 naming it before anything reaches the engine (a ``logit_bias`` token
id outside the vocabulary, and a grammar xgrammar cannot compile, are named by the engine, which knows the
vocabulary). Structured outputs (``response_format``, vLLM's ``structured_outputs`` and ``guided_*``) become
the engine's ``GrammarSpec`` (structured.py); tools are resolved against the model by the chat route
(tools.py). Parameters we accept but do not implement (echo, best_of != n, suffix) are refused with a 400
naming the field when set to anything but their neutral value, rather than silently ignored.
Unknown fields are ignored, as OpenAI-compatible servers usually do.

Responses are built as plain dicts (one per SSE chunk is cheaper than a pydantic model) in exactly the
shapes of the OpenAI API reference for completions, chat completions, their stream chunks, usage and
logprobs.
"""

from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.grammar import GrammarSpec
from ..engine.sampler import SamplingParams
from .errors import APIError
from .structured import GUIDED_FIELDS, checked_schema, grammar_of

MAX_SEED = 2**62
MAX_TOP_LOGPROBS = 20


class _Base(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Base):
    include_usage: bool = False


class TextPart(_Base):
    type: Literal["text"]
    text: str


class FunctionCall(_Base):
    name: str
    arguments: str


class ToolCallIn(_Base):
    """A tool call of an earlier assistant message, as the client sends it back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Base):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class JSONSchemaFormat(_Base):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore", populate_by_name=True)
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None


class FunctionDef(_Base):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Base):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Base):
    name: str


class NamedToolChoice(_Base):
    type: Literal["function"]
    function: NamedFunction


class _Sampling(_Base):
    """Fields shared by both routes."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    user: str | None = None
    # onspec extensions (vLLM spells them the same way)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = Field(0, ge=-1000, le=1000)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    # structured outputs: the OpenAI field, and vLLM's (structured.py)
    response_format: ResponseFormat | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def grammar(self) -> GrammarSpec | None:
        """The request's structured-output constraint, or None (a 400 names a bad or doubled one)."""
        guided = {k: getattr(self, k) for k in GUIDED_FIELDS if getattr(self, k) is not None}
        return grammar_of(self.response_format, self.structured_outputs, guided)

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 16:
            raise APIError(400, "stop: at most 16 stop sequences", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop sequences must be non-empty strings", "stop")
        return stops

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        grammar: GrammarSpec | None = None) -> SamplingParams:
        """The engine's parameters; ``max_tokens=None`` means "the rest of the context" (the bridge caps it)."""
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                min_p=self.min_p or 0.0, seed=self.seed, max_tokens=max_tokens or 2**31,
                stop=self.stops(), stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos, logprobs=logprobs,
                presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=dict(self.logit_bias or {}), min_tokens=self.min_tokens, grammar=grammar)
        except ValueError as exc:
            field = str(exc).partition(":")[0]
            raise APIError(400, str(exc), field) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif not p:
            raise APIError(400, "prompt: must not be empty", "prompt")
        elif isinstance(p[0], int):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if any(len(x) == 0 for x in prompts):
            raise APIError(400, "prompt: must not be empty", "prompt")
        if self.echo:
            raise APIError(400, "echo: not supported by this server", "echo")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of: only best_of == n is supported", "best_of")
        if self.suffix:
            raise APIError(400, "suffix: not supported by this server", "suffix")
        return prompts

    def to_params(self) -> SamplingParams:
        return self.sampling_params(self.max_tokens, self.logprobs, self.grammar())


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def active_tools(self) -> list[dict]:
        """The tools the model may call (OpenAI's shape, parameters checked as JSON schemas), or [] when
        there are none or ``tool_choice`` is ``none``; a 400 names a choice that does not fit the tools."""
        choice = self.tool_choice
        if not self.tools:
            if choice not in (None, "none", "auto"):
                raise APIError(400, "tool_choice: requires tools", "tool_choice")
            return []
        if choice == "none":
            return []
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise APIError(400, "tools: function names must be unique", "tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(400, f"tool_choice: no tool is named {choice.function.name!r}", "tool_choice")
        out = []
        for t in self.tools:
            fn = t.function.model_dump(exclude_none=True)
            if t.function.parameters is not None:
                checked_schema(t.function.parameters, "tools")
            out.append({"type": "function", "function": fn})
        return out

    def tool_choice_wire(self) -> str | dict:
        choice = self.tool_choice or "auto"
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice

    def to_params(self, tool_grammar: GrammarSpec | None = None) -> SamplingParams:
        """The engine's parameters; ``tool_grammar``: the grammar that checks tool calls (tools.py)."""
        grammar = self.grammar()
        if grammar is not None and tool_grammar is not None:
            raise APIError(400, f"{grammar.field}: cannot be combined with tools (use tool_choice 'none')",
                           grammar.field)
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs to be true", "top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, lp, grammar or tool_grammar)

    def conversation(self) -> list[dict]:
        """Messages as the tokenizer's chat template expects them ('developer' is a system prompt); earlier
        tool calls carry their arguments as objects where they parse (Hermes templates print them as JSON)."""
        out = []
        for m in self.messages:
            msg: dict = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name,
                                                   "arguments": _json_or_text(c.function.arguments)}}
                                     for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---- response shapes ---------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[str], entries: list[tuple[float, list[tuple[str, float]]]],
                        text_offset: int) -> dict:
    """The legacy completions ``logprobs`` object: parallel lists and one {token: logprob} dict per token."""
    offsets, pos = [], text_offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
            "top_logprobs": [dict(alts) for _, alts in entries], "text_offset": offsets}


def chat_logprobs(tokens: list[str], entries: list[tuple[float, list[tuple[str, float]]]]) -> dict:
    def item(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]}
                        for t, (lp, alts) in zip(tokens, entries)]}


def completion_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def chat_response(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": use, "system_fingerprint": None}


def completion_chunk(rid: str, model: str, created: int, choices: list[dict], use: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if use is not None:
        out["usage"] = use
    return out


def chat_chunk(rid: str, model: str, created: int, choices: list[dict], use: dict | None = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": choices, "system_fingerprint": None}
    if use is not None:
        out["usage"] = use
    return out


def model_card(name: str, created: int, owned_by: str = "onspec") -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def now() -> int:
    return int(time.time())
