"""Tool calls: ``tools`` and ``tool_choice`` for model families whose chat template takes tools, the
grammar that enforces ``required`` and named choices, and the parser that turns generated text into the
OpenAI ``tool_calls``, whole or as stream deltas.

Format. qwen2 and qwen3 templates use Hermes-style calls: ``<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>``, possibly several in a row. The grammar is xgrammar's builtin structural tag for
that format (``qwen_3``): text is free until the model opens ``<tool_call>``, and from there the call must
name one of the tools and give arguments that match its parameter schema. ``required`` asks for at least
one call and a named choice for a call of that function; ``auto`` leaves the choice to the model but still
checks every call it makes; ``none`` passes no tools to the template and constrains nothing.

A model whose template takes no tools, or whose family has no known call format, gets a 400 naming
``tools``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..engine.engine import stop_holdback
from ..engine.grammar import GrammarSpec
from .errors import APIError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# model family -> xgrammar's builtin structural-tag format of its tool calls
CALL_FORMATS = {"qwen2": "qwen_3", "qwen3": "qwen_3"}
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text (the OpenAI wire form)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def wire(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def template_source(tokenizer: Any) -> str:
    tpl = getattr(tokenizer, "chat_template", None) or ""
    return tpl if isinstance(tpl, str) else " ".join(str(v) for v in dict(tpl).values())


def check_tool_support(tokenizer: Any, family: str, model: str) -> str:
    """The call format of this model, or a 400 naming ``tools`` when its template or family has none."""
    if "tools" not in template_source(tokenizer):
        raise APIError(400, f"tools: the chat template of model {model!r} does not take tools", "tools")
    fmt = CALL_FORMATS.get(family)
    if fmt is None:
        raise APIError(400, f"tools: tool calls are parsed for the {', '.join(sorted(CALL_FORMATS))} families; "
                            f"model {model!r} is {family}", "tools")
    return fmt


def tool_grammar(fmt: str, tools: list[dict], tool_choice: Any, parallel: bool, tokenizer: Any) -> GrammarSpec:
    """The structural-tag grammar that checks every call (and forces one for ``required`` / a named choice)."""
    import xgrammar

    reasoning = "auto" if "<think>" in template_source(tokenizer) else "disabled"
    try:
        tag = xgrammar.get_builtin_structural_tag(fmt, tools=tools, tool_choice=tool_choice,
                                                  reasoning=reasoning, parallel_tool_calls=parallel,
                                                  max_whitespace_cnt=1)  # as in compact JSON (grammar.py)
    except ValueError as exc:
        raise APIError(400, f"tools: {str(exc).splitlines()[0]}", "tools") from None
    return GrammarSpec("structural_tag", tag.model_dump_json(), "tools")


def _call_of(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Generated text -> (the text outside the calls, stripped, None if empty; the calls). A block that is
    not a valid call stays in the text."""
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        call = _call_of(m.group(1).strip())
        if call is None:
            continue
        content.append(text[pos:m.start()])
        calls.append(call)
        pos = m.end()
    content.append(text[pos:])
    rest = "".join(content).strip()
    return (rest or None), calls


class ToolCallStream:
    """Streamed text -> content deltas and whole tool calls, for one choice.

    Text is passed on as content until ``<tool_call>`` opens (a tail that could be the start of the marker
    is held back); a call is emitted once its ``</tool_call>`` arrives, as one delta with its id, name and
    all its arguments (the OpenAI clients accumulate deltas, so one delta per call is a valid stream).
    Whitespace between calls is not content. ``finish`` flushes what is left (an unclosed block is text)."""

    def __init__(self) -> None:
        self.buffer = ""
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        out, new = [], []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = stop_holdback(self.buffer, [OPEN])  # the tail that could still open a call
                ready = self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(ready):]
                out.append(ready)
                break
            end = self.buffer.find(CLOSE, start)
            if end < 0:
                out.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            block_end = end + len(CLOSE)
            call = _call_of(self.buffer[start + len(OPEN):end].strip())
            if call is None:
                out.append(self.buffer[:block_end])  # not a valid call: the block stays text
            else:
                out.append(self.buffer[:start])
                new.append(call)
            self.buffer = self.buffer[block_end:]
        self.calls.extend(new)
        content = "".join(out)
        if self.calls and not content.strip():
            content = ""
        return content, new

    def finish(self) -> str:
        rest, self.buffer = self.buffer, ""
        return "" if self.calls and not rest.strip() else rest
