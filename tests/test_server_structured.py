"""Structured outputs and tool calls over HTTP, through the official ``openai`` client.

* ``response_format`` json_schema / json_object, vLLM's ``structured_outputs`` and ``guided_*`` (extra_body):
  answers obey the grammar, equal the offline engine's, and a bad schema, regex, grammar or a doubled
  constraint is a 400 naming the field, after which the server goes on.
* Tools on a qwen2 model with a Hermes template: ``required`` and a named choice give ``tool_calls`` whose
  arguments validate against the tool's parameters, with ``finish_reason`` ``tool_calls``; streamed, the
  deltas accumulate to the same calls; ``none`` sends no tools; a template without tools is a 400.
* The parsers: Hermes blocks in text, whole and streamed in pieces.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest

from conftest import make_tiny_model
from onspec import LLM, SamplingParams
from onspec.engine.grammar import GrammarSpec
from onspec.server.app import build_engine
from onspec.server.tools import ToolCallStream, parse_tool_calls
from test_server_support import make_chat_model, running_server, tiny_config

SCHEMA = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                           "size": {"enum": ["S", "M", "L"]}, "ok": {"type": "boolean"}},
          "required": ["colour", "size", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Berlin", "Rome"]},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]

# A compact Hermes-style template, as qwen2.5 and qwen3 models ship (tools in the system turn, calls in
# <tool_call> blocks, results as <tool_response>).
HERMES = """{%- if tools %}<|im_start|>system
You may call functions.
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer a call as <tool_call>
{"name": <name>, "arguments": <args>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("structured") / "tiny-chat")


@pytest.fixture(scope="module")
def served(chat_model):
    with running_server(tiny_config(chat_model)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> Path:
    out = make_tiny_model(tmp_path_factory.mktemp("tools") / "tiny-qwen2", "qwen2", vocab_size=49152)
    (out / "chat_template.jinja").write_text(HERMES)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def tool_client(tool_model):
    with running_server(tiny_config(tool_model, max_model_len=2048)) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)



# ---- structured outputs ------------------------------------------------------------------------------------


def test_json_schema_answers_validate_and_equal_the_offline_engine(served, client, chat_model) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}
    got = []
    for seed in range(3):
        r = client.chat.completions.create(model="default", messages=USER, max_tokens=60, temperature=0.8,
                                           seed=seed, response_format=fmt)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        got.append(text)
    engine = build_engine(tiny_config(chat_model))  # the server's engine belongs to its thread
    llm = LLM(engine=engine)
    prompt = engine.tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    offline = []
    for seed in range(3):
        params = SamplingParams(max_tokens=60, temperature=0.8, seed=seed, grammar=GrammarSpec.json_schema(SCHEMA))
        offline.append(llm.generate([prompt], params)[0].outputs[0].text)
    assert got == offline


def test_json_object_regex_choice_and_grammar(client) -> None:
    r = client.chat.completions.create(model="default", messages=USER, max_tokens=40, temperature=0,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    r = client.completions.create(model="default", prompt="Count:", max_tokens=30, temperature=0.7, seed=3,
                                  extra_body={"guided_regex": r"[0-9]{1,3}(, [0-9]{1,3}){2}\."})
    assert re.fullmatch(r"[0-9]{1,3}(, [0-9]{1,3}){2}\.", r.choices[0].text), r.choices[0].text
    r = client.chat.completions.create(model="default", messages=USER, max_tokens=10, temperature=1.0, seed=1,
                                       extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert r.choices[0].message.content in ("sunny", "rainy")
    r = client.chat.completions.create(model="default", messages=USER, max_tokens=10, temperature=1.0, seed=2,
                                       extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].message.content in ("yes", "no")


def test_streamed_structured_output_equals_the_whole_answer(client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
    whole = client.chat.completions.create(model="default", messages=USER, max_tokens=60, temperature=0,
                                           response_format=fmt).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="default", messages=USER, max_tokens=60, temperature=0, response_format=fmt, stream=True) if c.choices]
    assert "".join(parts) == whole


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"guided_grammar": "root ::= "}}, "guided_grammar"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"structured_outputs": {"json": {"type": "object"}, "regex": "a"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"xml": "a"}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a+"}}, "guided_regex"),
    ({"extra_body": {"guided_json": "{not json"}}, "guided_json"),
])
def test_bad_constraints_are_400_naming_the_field_and_serving_goes_on(client, extra: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=USER, max_tokens=5, **extra)
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert "Traceback" not in e.value.body["message"]
    r = client.chat.completions.create(model="default", messages=USER, max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---- tools -----------------------------------------------------------------------------------------------


def check_call(call, tools: list[dict]) -> None:
    fn = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert call.id.startswith("call_") and call.type == "function"


def test_required_and_named_tool_choice_give_valid_calls(tool_client) -> None:
    tools = [WEATHER, TIME]
    r = tool_client.chat.completions.create(model="default", messages=USER, tools=tools, tool_choice="required",
                                            max_tokens=120, temperature=0.7, seed=4, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    check_call(choice.message.tool_calls[0], tools)
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        r = tool_client.chat.completions.create(model="default", messages=USER, tools=tools, tool_choice=named,
                                                max_tokens=120, temperature=1.0, seed=seed)
        calls = r.choices[0].message.tool_calls
        assert calls and all(c.function.name == "get_time" for c in calls), r.choices[0]
        for c in calls:
            check_call(c, tools)


def test_streamed_tool_call_deltas_accumulate_to_the_same_calls(tool_client) -> None:
    kw = dict(model="default", messages=USER, tools=[WEATHER, TIME], tool_choice="required", max_tokens=120,
              temperature=0.7, seed=9, parallel_tool_calls=False)
    whole = tool_client.chat.completions.create(**kw).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in tool_client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": "", "id": None})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]


def test_tool_results_go_back_through_the_template_and_none_sends_no_tools(tool_client) -> None:
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "c"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    r = tool_client.chat.completions.create(model="default", messages=history, tools=[WEATHER], max_tokens=8,
                                            temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = tool_client.chat.completions.create(model="default", messages=USER, tools=[WEATHER], tool_choice="none",
                                            max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.usage.prompt_tokens < 40


@pytest.mark.parametrize("kw, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice"),
])
def test_bad_tool_requests_are_400_naming_the_field(tool_client, kw: dict, param: str) -> None:
    args = {"tools": [WEATHER], **kw}
    if args["tools"] is None:
        del args["tools"]
    with pytest.raises(openai.BadRequestError) as e:
        tool_client.chat.completions.create(model="default", messages=USER, max_tokens=5, **args)
    assert e.value.body["param"] == param, e.value.body


def test_a_template_without_tools_is_a_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=USER, tools=[WEATHER], max_tokens=5)
    assert e.value.body["param"] == "tools" and "does not take tools" in e.value.body["message"]


# ---- the parsers -------------------------------------------------------------------------------------------

TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>')


def test_hermes_blocks_parse_whole_and_streamed_in_any_pieces() -> None:
    content, calls = parse_tool_calls(TEXT)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "c"}
    for size in (1, 3, 7, 50):
        stream = ToolCallStream()
        text, got = "", []
        for i in range(0, len(TEXT), size):
            piece, new = stream.feed(TEXT[i:i + size])
            text += piece
            got += new
        text += stream.finish()
        assert text.strip() == "Let me check." and [(c.name, c.arguments) for c in got] == \
            [(c.name, c.arguments) for c in calls]
    assert parse_tool_calls("plain <tool_call>not json</tool_call>") == ("plain <tool_call>not json</tool_call>", [])
