"""The OpenAI-compatible server, driven over loopback by the official ``openai`` client and by httpx.

A tiny random llama (float32, the real tokenizer and chat template) keeps these fast; one test serves the
real default model. Checks: chat, completions, streaming, n > 1, stop, seeds, logprobs, usage counts,
32 concurrent streams equal to the offline engine, abort on disconnect, 503 when full, auth on every route
that needs it, OpenAI-format errors, admin routes, metrics, and a graceful SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.routing import APIRoute

from onspec import LLM, SamplingParams
from onspec.server.app import build_engine, create_app
from onspec.server.state import require_admin_key, require_api_key
from test_server_support import FakeLearner, free_port, make_chat_model, running_server, tiny_config, wait_until

API_KEY = "sk-test-key"
ADMIN_KEY = "sk-admin-key"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("server") / "tiny-chat")


@pytest.fixture(scope="module")
def server(chat_model):
    learner = FakeLearner()
    cfg = tiny_config(chat_model, api_key=API_KEY, admin_key=ADMIN_KEY)
    with running_server(cfg, handle=learner) as srv:
        srv.learner = learner
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def state(server):
    return server.app.state.onspec


def assert_idle(server) -> None:
    st = state(server)
    assert wait_until(lambda: st.bridge.outstanding == 0 and st.worker.snapshot.active_requests == 0
                      and st.worker.snapshot.free_slots == st.worker.snapshot.num_slots
                      and not st.worker.snapshot.running and not st.worker.snapshot.waiting), (
        st.bridge.outstanding, st.worker.snapshot)


# ---- basic OpenAI surface ----------------------------------------------------------------------------
def test_models_and_model_names(server, client):
    ids = [m.id for m in client.models.list().data]
    assert "default" in ids and str(state(server).model_name) in ids
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"


def test_chat_completion_and_usage(server, client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason == "length"
    assert len(ch.logprobs.content) == 12 == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in ch.logprobs.content)
    # greedy: the chosen token is the most likely one
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4 for t in ch.logprobs.content)
    assert "".join(t.token for t in ch.logprobs.content) == ch.message.content
    tok = state(server).engine.tokenizer
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_prompt_forms_n_and_usage(server, client):
    r = client.completions.create(model="default", prompt=["one two three", "four five"], n=3, max_tokens=5,
                                  temperature=0.9, seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == list(range(6))
    assert all(c.finish_reason == "length" for c in r.choices)
    tok = state(server).engine.tokenizer
    prompt_tokens = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in ("one two three", "four five"))
    assert r.usage.prompt_tokens == prompt_tokens and r.usage.completion_tokens == 30
    # the three samples of one prompt use seeds 11, 12, 13 (engine n): not all equal
    assert len({c.text for c in r.choices[:3]}) > 1
    ids = client.completions.create(model="default", prompt=[[5, 6, 7, 8], [9, 10]], max_tokens=3, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 6 and ids.usage.completion_tokens == 6


def test_streaming_equals_non_streaming(server, client):
    kw = dict(model="default", max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(messages=[{"role": "user", "content": "Count to ten."}], **kw)
    parts, reasons, usage = [], [], None
    stream = client.chat.completions.create(messages=[{"role": "user", "content": "Count to ten."}], stream=True,
                                            stream_options={"include_usage": True}, **kw)
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert "".join(parts) == full.choices[0].message.content
    assert reasons == ["length"]
    assert usage.completion_tokens == full.usage.completion_tokens == 30
    assert usage.prompt_tokens == full.usage.prompt_tokens

    text = "".join(c.choices[0].text for c in client.completions.create(prompt="a b c", stream=True, **kw))
    assert text == client.completions.create(prompt="a b c", **kw).choices[0].text


def test_stream_chunks_follow_the_openai_shape(server, client):
    """n = 3 with logprobs: at most one entry per choice index in each chunk, text and logprobs line up."""
    body = {"model": "default", "prompt": "tick tock tick tock tick", "n": 3, "max_tokens": 20, "temperature": 0.7,
            "seed": 5, "logprobs": 1, "stream": True, "ignore_eos": True}
    texts, tokens, reasons = ["", "", ""], [[], [], []], [None] * 3
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth(), timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for ev in events[:-1]:
        chunk = json.loads(ev)
        assert chunk["object"] == "text_completion"
        idx = [c["index"] for c in chunk["choices"]]
        assert len(idx) == len(set(idx))
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
            if c["logprobs"]:
                tokens[c["index"]] += c["logprobs"]["tokens"]
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    assert reasons == ["length"] * 3
    assert all(len(t) == 20 for t in tokens) and all(texts)


def test_stop_strings_stream_and_non_stream(server, client):
    kw = dict(model="default", prompt="The list: alpha, beta,", max_tokens=40, temperature=0,
              extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    assert len(text) > 20
    stop = text[12:16]
    expected = text[:text.find(stop)]
    r = client.completions.create(stop=[stop, "\x00never"], **kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = [c.choices[0] for c in client.completions.create(stop=stop, stream=True, **kw)]
    assert "".join(c.text for c in streamed) == expected
    assert streamed[-1].finish_reason == "stop"


def test_seed_reproducible_with_and_without_speculation(chat_model):
    """Same seed, same text: across calls, and whether the server speculates or not (the seeded sampler
    draws each position's token from noise keyed by (seed, position), so the draft cannot change it)."""
    kw = dict(model="default", prompt="seeded sampling tick tock tick tock tick", max_tokens=25,
              temperature=1.0, top_p=0.9, n=2, extra_body={"ignore_eos": True})
    texts = {}
    for mode in ("off", "suffix"):
        with running_server(tiny_config(chat_model, speculation=mode)) as srv:
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
            a = [ch.text for ch in c.completions.create(seed=1234, **kw).choices]
            b = [ch.text for ch in c.completions.create(seed=1234, **kw).choices]
            other = [ch.text for ch in c.completions.create(seed=99, **kw).choices]
            assert a == b and a != other
            texts[mode] = a
    assert texts["off"] == texts["suffix"]


# ---- concurrency, equality with the offline engine -----------------------------------------------------
def test_32_concurrent_streams_equal_offline_engine(server, chat_model):
    prompts = [f"Request {i}: " + " ".join(["tick", "tock"] * (i % 5 + 1)) for i in range(32)]
    max_tokens = 24

    async def one(ac: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        parts, reason = [], None
        stream = await ac.completions.create(model="default", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(parts), reason

    async def main():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(ac, p) for p in prompts))
        finally:
            await ac.close()

    served = asyncio.run(main())
    assert all(reason == "length" for _, reason in served)
    offline = LLM(engine=build_engine(tiny_config(chat_model)))
    outs = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    assert [t for t, _ in served] == [o.outputs[0].text for o in outs]
    assert_idle(server)


# ---- disconnects and admission control ---------------------------------------------------------------
def test_stream_disconnect_frees_slot(server):
    st = state(server)
    before = st.worker.snapshot.generated_tokens
    body = {"model": "default", "prompt": "go on forever", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as hc:
        with hc.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
            assert wait_until(lambda: st.worker.snapshot.running == 1)
    assert_idle(server)
    assert st.worker.snapshot.generated_tokens - before < 3000  # aborted, not run to the end


def test_non_stream_disconnect_frees_slot(server):
    st = state(server)
    before = st.worker.snapshot.generated_tokens
    body = {"model": "default", "prompt": "go on forever", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, headers=auth(), timeout=1.0)
    assert_idle(server)
    assert st.worker.snapshot.generated_tokens - before < 3000


def test_full_queue_answers_503_with_retry_after(chat_model):
    cfg = tiny_config(chat_model, max_concurrency=1, max_queue=1, retry_after=3)
    body = {"model": "default", "prompt": "long", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with running_server(cfg) as srv:
        st = srv.app.state.onspec
        stop = threading.Event()

        def hold():
            with httpx.Client(timeout=60) as hc, hc.stream("POST", srv.url + "/v1/completions", json=body) as r:
                for _ in r.iter_lines():
                    if stop.is_set():
                        break

        threads = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_until(lambda: st.bridge.outstanding == 2)
        r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "queue_full"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:   # the client's class for 5xx statuses
            c.completions.create(model="default", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
        # n larger than the whole capacity can never be served: 400 naming n
        r = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "n": 3}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        stop.set()
        for t in threads:
            t.join(30)
        assert wait_until(lambda: st.bridge.outstanding == 0 and st.worker.snapshot.free_slots == 1)
        assert "onspec_requests_rejected_total 2.0" in httpx.get(srv.url + "/metrics").text
        ok = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200


def test_engine_failure_is_a_clean_error_and_serving_goes_on(chat_model):
    cfg = tiny_config(chat_model, speculation="off")
    engine = build_engine(cfg)
    real_step, calls = engine.step, {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] in (3, 10):
            raise RuntimeError("simulated kernel failure")
        return real_step()

    engine.step = flaky_step
    with running_server(cfg, engine=engine) as srv:
        body = {"model": "default", "prompt": "hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert "Traceback" not in r.text and "simulated" not in r.text
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as resp:
            text = "".join(resp.iter_lines())
        assert '"code":"engine_error"' in text
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20
        assert_idle(srv)


# ---- auth ----------------------------------------------------------------------------------------------
def _protected_routes(app) -> dict[tuple[str, str], str]:
    out = {}
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        calls = {d.call for d in route.dependant.dependencies}
        kind = "admin" if require_admin_key in calls else "api" if require_api_key in calls else "public"
        for method in route.methods:
            out[(method, route.path.replace("{model_id:path}", "default"))] = kind
    return out


def test_auth_enforced_on_every_route_that_needs_it(server):
    routes = _protected_routes(server.app)
    # every /v1 route needs a key; only health, metrics and the static dashboard are public
    for (method, path), kind in routes.items():
        assert (kind != "public") == path.startswith("/v1/"), (method, path, kind)
    assert routes[("POST", "/v1/speculator/rollback")] == "admin"
    for (method, path), kind in routes.items():
        url = server.url + path
        body = {} if method == "POST" else None
        for headers in ({}, auth("wrong"), {"X-API-Key": "wrong"}):
            r = httpx.request(method, url, json=body, headers=headers, timeout=30)
            if kind == "public":
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.json()["error"]["type"] == "authentication_error"
        if kind == "admin":  # the API key is not an admin key
            assert httpx.request(method, url, json=body, headers=auth(API_KEY), timeout=30).status_code == 401
    assert httpx.get(server.url + "/v1/models", headers={"X-API-Key": API_KEY}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="bad", max_retries=0).models.list()


# ---- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch,param", [
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"), ({"n": True}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10**9}, "max_tokens"),
    ({"top_k": -5}, "top_k"), ({"stop": [""]}, "stop"), ({"logprobs": 50}, "logprobs"), ({"seed": -3}, "seed"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"prompt": []}, "prompt"), ({"prompt": [10**7]}, "prompt"),
    ({"prompt": "x " * 5000}, "prompt"), ({"echo": True}, "echo"), ({"model": None}, "model"),
])
def test_invalid_parameters_are_400_naming_the_field(server, patch, param):
    body = {"model": "default", "prompt": "hello", "max_tokens": 4, **patch}
    r = httpx.post(server.url + "/v1/completions", json=body, headers=auth(), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and param in err["message"]
    assert "Traceback" not in r.text


def test_prompt_over_context_length(chat_model):
    with running_server(tiny_config(chat_model, max_model_len=64)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="default", messages=[{"role": "user", "content": "word " * 100}])
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"


def test_chat_specific_errors(server):
    url = server.url + "/v1/chat/completions"
    cases = [({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
             ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
             ({"tools": [{"type": "function"}]}, "tools"), ({"response_format": {"type": "xml"}},
                                                            "response_format"),
             ({"top_logprobs": 3}, "top_logprobs")]
    for patch, param in cases:
        body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **patch}
        r = httpx.post(url, json=body, headers=auth(), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (patch, r.text)


def test_non_json_bodies_and_unknown_routes(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=30,
                   headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json=[1, 2], headers=auth(), timeout=30)
    assert r.status_code == 400
    for literal in ("NaN", "Infinity", "-Infinity"):  # Python's json accepts these; the API must not
        raw = b'{"model": "default", "prompt": "x", "temperature": %s}' % literal.encode()
        r = httpx.post(server.url + "/v1/completions", content=raw, timeout=30,
                       headers={**auth(), "content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.get(server.url + "/v1/engines", headers=auth(), timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(server.url + "/v1/completions", headers=auth(), timeout=30)
    assert r.status_code == 405 and "error" in r.json()


# ---- admin, metrics, dashboard data ------------------------------------------------------------------
def test_admin_routes_call_the_learner_on_the_engine_thread(server):
    admin = auth(ADMIN_KEY)
    info = httpx.get(server.url + "/v1/speculator", headers=admin, timeout=30).json()
    assert info["online_learning"]["enabled"] and info["learner"]["version"] == 1
    assert isinstance(info["strategies"], dict) and "estimated_speedup" in info
    assert isinstance(info["measured_utility"], dict)  # per batch bucket: drafting open or closed, both rates
    assert set(info["draft_policy"]) == {"steps", "strategies"}  # steps by reason, strategies by gate
    r = httpx.post(server.url + "/v1/speculator/promote", json={"version": 3}, headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["promote"]["version"] == 3
    r = httpx.post(server.url + "/v1/speculator/promote", json={"version": 9}, headers=admin, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "version"
    r = httpx.post(server.url + "/v1/speculator/promote", json={}, headers=admin, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "version"
    r = httpx.post(server.url + "/v1/speculator/rollback", headers=admin, timeout=30)
    assert r.status_code == 200 and r.json()["rollback"]["version"] == 2
    learner = server.learner
    assert {name for what, name in learner.calls if what in ("promote", "rollback")} == {"onspec-engine"}

    def kinds() -> list[str]:
        series = httpx.get(server.url + "/v1/dashboard/series", headers=auth(), timeout=30).json()
        return [e["kind"] for e in series["events"]]

    # the learner reports its own events (polled once a second); each appears once
    assert wait_until(lambda: {"promote", "rollback", "swap"} <= set(kinds()), timeout=10), kinds()
    assert sorted(kinds()) == ["promote", "rollback", "swap"]


def test_admin_without_online_learning_is_409(chat_model):
    with running_server(tiny_config(chat_model)) as srv:
        r = httpx.post(srv.url + "/v1/speculator/rollback", timeout=30)
        assert r.status_code == 409 and "online learning is off" in r.json()["error"]["message"]
        info = httpx.get(srv.url + "/v1/speculator", timeout=30).json()
        assert info["online_learning"]["enabled"] is False and info["learner"] is None
        # float32 takes PyTorch's products: the server says its outputs are not bit-exact across batches
        assert info["compute_path"]["exact"] is False and "float32" in info["compute_path"]["reason"]


def test_train_online_without_trainer_module_serves_anyway(chat_model):
    cfg = tiny_config(chat_model, train="online", online_hook="onspec_no_such_module.online:start")
    app = create_app(cfg, engine=build_engine(tiny_config(chat_model, speculation="off")))
    st = app.state.onspec
    assert st.handle is None and "not installed" in st.handle_reason


def test_metrics_after_traffic(server, client):
    client.completions.create(model="default", prompt="x y z", max_tokens=8, temperature=0)
    assert wait_until(lambda: state(server).last_status is not None, timeout=5)
    text = httpx.get(server.url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            values[name] = float(v)
    assert values["onspec_generation_tokens_total"] >= 8
    assert values['onspec_requests_total{route="/v1/completions",status="200"}'] >= 1
    for name in ("onspec_queue_depth", "onspec_batch_size", "onspec_step_seconds_count",
                 "onspec_acceptance_length", "onspec_drafter_version", "onspec_trainer_steps_total",
                 "onspec_drafter_promotions_total", "onspec_drafter_rollbacks_total"):
        assert name in values, name
    assert values["onspec_step_seconds_count"] > 0
    assert values["onspec_trainer_steps_total"] == 42
    assert any(k.startswith("onspec_acceptance_length_by_strategy{") for k in values)
    assert any(k.startswith("onspec_draft_policy_steps_total{reason=") for k in values)


def test_dashboard_series_and_page(server, client):
    client.completions.create(model="default", prompt="tick tock tick tock", max_tokens=40, temperature=0)
    points = state(server).series.points      # one a second, from the server's sampler
    assert wait_until(lambda: sum(p.tokens_per_s > 0 for p in list(points)) >= 1 and len(points) >= 2, timeout=10)
    data = httpx.get(server.url + "/v1/dashboard/series", headers=auth(), timeout=30).json()
    assert data["meta"]["model"] and len(data["points"]) >= 2
    assert any(p["tokens_per_s"] > 0 for p in data["points"])
    assert data["meta"]["drafter_version"] is not None
    last = data["points"][-1]["t"]
    newer = httpx.get(server.url + f"/v1/dashboard/series?since={last}", headers=auth()).json()["points"]
    assert all(p["t"] > last for p in newer) and len(newer) <= 2
    page = httpx.get(server.url + "/dashboard", timeout=30)
    assert page.status_code == 200 and "<canvas" in page.text
    for asset in ("charts.js", "dashboard.js", "style.css"):
        assert httpx.get(server.url + "/dashboard/assets/" + asset, timeout=30).status_code == 200
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from outside


# ---- the real model, and SIGTERM -------------------------------------------------------------------
def test_default_model_chat():
    from onspec.server.settings import ServerConfig

    cfg = ServerConfig(model="default", max_model_len=512, max_concurrency=4, max_queue=4)
    with running_server(cfg) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=24, temperature=0,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content


FAKE_HOOK = '''
import json, os, threading, time
class Handle:
    def __init__(self, out): self.out = out
    def status(self): return {"version": 1, "events": []}
    def promote(self, version): return {"version": version}
    def rollback(self): return {"version": 0}
    def stop(self, save=True):
        with open(self.out, "w") as f:
            json.dump({"save": save, "thread": threading.current_thread().name}, f)
def start(engine, cfg):
    return Handle(os.path.join(cfg.speculator_dir, "saved.json"))
'''


def test_sigterm_finishes_in_flight_requests_and_saves_the_learner(chat_model, tmp_path):
    (tmp_path / "fakehook.py").write_text(FAKE_HOOK)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "onspec.cli", "serve", "--model", str(chat_model), "--dtype", "float32",
           "--port", str(port), "--train", "online", "--online-hook", "fakehook:start", "--speculator-dir",
           str(tmp_path), "--max-model-len", "4096", "--shutdown-timeout", "60", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=120, interval=0.2), proc.stdout.read1().decode() if proc.poll() else ""
        body = {"model": "default", "prompt": "keep going", "max_tokens": 300, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        lines = []
        with httpx.Client(timeout=120) as hc, hc.stream("POST", url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert lines[-2] == "" or lines[-1] == "data: [DONE]" or "data: [DONE]" in lines
        assert '"completion_tokens":300' in "".join(lines)
        assert proc.wait(timeout=60) == 0
        assert '"save": true' in (tmp_path / "saved.json").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
