"""Fuzz the request bodies with hypothesis, from the app's own OpenAPI schema: never a 5xx, never a trace.

Each body mixes values that follow the schema (including just past its bounds) with arbitrary JSON in any
field, plus bodies that are not objects or not JSON at all. Every answer must be a 2xx with the OpenAI
shape or a 4xx with an OpenAI error object. The engine is a real one (tiny model, short context, small
capacity) so accepted bodies really generate, stream included.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onspec.server.app import build_engine, create_app
from test_server_support import FakeLearner, make_chat_model, tiny_config

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def strategy_for(schema: dict, defs: dict, junk: bool, depth: int = 0) -> st.SearchStrategy:
    """A value following ``schema``; with ``junk``, bounds widened a little (to cross them) and any JSON
    allowed in every field."""
    def sub(s: dict) -> st.SearchStrategy:
        return strategy_for(s, defs, junk, depth + 1)

    if depth > 6:
        return JSON
    if "$ref" in schema:
        return sub(defs[schema["$ref"].rsplit("/", 1)[-1]])
    if "anyOf" in schema:
        return st.one_of([sub(s) for s in schema["anyOf"]])
    if "enum" in schema or "const" in schema:
        values = st.sampled_from(schema.get("enum") or [schema.get("const")])
        return values | st.text(max_size=8) if junk else values
    kind = schema.get("type")
    widen = 2 if junk else 0
    if kind == "integer":
        lo, hi = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum")
        lo = None if lo is None else int(lo) - widen
        hi = None if hi is None or hi > 2**62 else int(hi) + widen
        return st.integers(lo, hi) | st.integers() if junk else st.integers(lo, hi)
    if kind == "number":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        lo = schema.get("exclusiveMinimum", lo) if lo is None else lo
        return st.floats(None if lo is None else lo - widen, None if hi is None else hi + widen, allow_nan=False,
                         allow_infinity=False, exclude_min="exclusiveMinimum" in schema and not junk)
    if kind == "string":
        return st.text(max_size=40)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(sub(schema.get("items", {})), max_size=4)
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if not props:
            extra = schema.get("additionalProperties")
            return st.dictionaries(st.text(max_size=6), sub(extra) if isinstance(extra, dict) else JSON, max_size=3)
        required = set(schema.get("required", []))
        field = {k: (sub(v) | JSON) if junk else sub(v) for k, v in props.items()}
        return st.fixed_dictionaries({k: field[k] for k in props if k in required},
                                     optional={k: field[k] for k in props if k not in required})
    return JSON


# In the "valid" half, fields this server refuses on purpose keep their neutral values and max_tokens stays
# small, so those bodies reach the engine; the "junk" half covers every field's refusals.
NEUTRAL = {"presence_penalty": st.just(0.0), "frequency_penalty": st.none(), "logit_bias": st.none(),
           "tools": st.none(), "tool_choice": st.none(), "echo": st.just(False), "best_of": st.none(),
           "suffix": st.none(), "response_format": st.none(), "model": st.just("default"),
           "max_tokens": st.integers(1, 24) | st.none(), "max_completion_tokens": st.none(),
           "n": st.integers(1, 3), "prompt": st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 49151),
                                                                                      min_size=1, max_size=8)}


def body_strategy(app, path: str) -> st.SearchStrategy:
    spec = app.openapi()
    defs = spec["components"]["schemas"]
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = defs[ref["$ref"].rsplit("/", 1)[-1]]
    overrides = {k: v for k, v in NEUTRAL.items() if k in schema["properties"]}
    valid = st.tuples(strategy_for(schema, defs, junk=False), st.fixed_dictionaries(overrides)).map(
        lambda t: {**t[0], **t[1]})
    return valid | strategy_for(schema, defs, junk=True) | JSON


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    model = make_chat_model(tmp_path_factory.mktemp("fuzz") / "tiny-chat")
    cfg = tiny_config(model, max_model_len=64, max_concurrency=4, max_queue=4, admin_key="adm")
    app = create_app(cfg, engine=build_engine(cfg), handle=FakeLearner(), start_learning=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def check(response, body, generation: bool = True) -> None:
    assert response.status_code < 500, (body, response.status_code, response.text[:500])
    assert "Traceback" not in response.text
    if response.status_code >= 400:
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err
        return
    if not generation:
        assert isinstance(response.json(), dict)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", response.text[-300:]
        for ev in events[:-1]:
            assert "choices" in json.loads(ev)
    else:
        data = response.json()
        assert data["choices"] and data["usage"]["total_tokens"] >= data["usage"]["completion_tokens"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzz_generation_bodies(api, path):
    statuses: dict[int, int] = {}

    @SETTINGS
    @given(body=body_strategy(api.app, path))
    def run(body):
        r = api.post(path, json=body)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        check(r, body)

    run()
    assert statuses.get(200, 0) >= 5, statuses  # the fuzz reached the engine, not only the validators


@SETTINGS
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzz_raw_bytes(api, raw):
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/speculator/promote"):
        r = api.post(path, content=raw, headers={"content-type": "application/json", "authorization": "Bearer adm"})
        check(r, raw, generation=path != "/v1/speculator/promote")


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON, since=st.text(max_size=12))
def test_fuzz_admin_and_series(api, body, since):
    check(api.post("/v1/speculator/promote", json=body, headers={"authorization": "Bearer adm"}), body, False)
    check(api.get("/v1/dashboard/series", params={"since": since}), since, False)
