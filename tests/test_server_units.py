"""Unit tests of the server's pure pieces: stop-string hold-back, chunk merging, the per-second series and
the speedup meter's bound."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from onspec.server.bridge import Chunk, EngineSnapshot, merge_by_index, stop_holdback
from onspec.engine.step import StepResult
from onspec.server.metrics import SeriesRecorder, SpeedupMeter
from onspec.server.settings import ServerConfig


@pytest.mark.parametrize("text,stops,expected", [
    ("hello wor", ["world"], 3), ("hello", ["world"], 0), ("ab\n", ["\n\n"], 1), ("abc", [], 0),
    ("x END", ["END"], 0),   # a complete stop string is the engine's job (it cuts it); nothing is held
    ("xyzEN", ["END", "NO"], 2), ("xyzN", ["END", "NO"], 1), ("", ["END"], 0), ("E", ["END"], 1),
])
def test_stop_holdback(text, stops, expected):
    assert stop_holdback(text, stops) == expected


def test_merge_by_index_joins_steps_per_sample_in_order():
    chunks = [Chunk(0, "a", [1], False, None, ["a"], [(-1.0, [])]), Chunk(1, "x", [7], False, None),
              Chunk(0, "b", [2], False, None, ["b"], [(-2.0, [])]), Chunk(0, "c", [3], True, "length", ["c"],
                                                                          [(-3.0, [])])]
    merged = merge_by_index(chunks)
    assert [m.index for m in merged] == [0, 1]
    m0 = merged[0]
    assert (m0.text, m0.token_ids, m0.finished, m0.finish_reason) == ("abc", [1, 2, 3], True, "length")
    assert m0.tokens == ["a", "b", "c"] and [lp for lp, _ in m0.logprobs] == [-1.0, -2.0, -3.0]
    assert chunks[0].text == "a"  # inputs untouched


def _snap(t, gen, steps, decode, accepted, by, plain, spent, waiting=0, running=0):
    return EngineSnapshot(time=t, generated_tokens=gen, steps=steps, decode_steps_seq=decode, accepted=accepted,
                          by_strategy=by, plain_seconds_est=plain, spec_seconds=spent, waiting=waiting,
                          running=running)


def test_series_rates_and_event_dedup():
    rec = SeriesRecorder(maxlen=3)
    assert rec.sample(_snap(100.0, 0, 0, 0, 0, {}, 0, 0), 0, None, now=100.0) is None  # first: baseline only
    p = rec.sample(_snap(101.0, 50, 10, 20, 30, {"suffix": (20, 50)}, 2.0, 1.0, waiting=3, running=2), 4,
                   {"version": 7, "events": [{"t": 100.5, "kind": "swap", "version": 7}]}, now=101.0)
    assert p.tokens_per_s == 50 and p.acceptance == 2.5 and p.acceptance_by_strategy == {"suffix": 2.5}
    assert p.speedup == 2.0 and p.queue == 3 and p.batch == 2.0 and p.requests_per_s == 4
    assert p.drafter_version == 7
    rec.add_event("promote", 8, "admin request", t=101.2)
    # the learner reports the same promote a moment later, and the swap again: both recorded once
    rec.sample(_snap(102.0, 50, 10, 20, 30, {"suffix": (20, 50)}, 2.0, 1.0), 4,
               {"events": [{"t": 100.5, "kind": "swap", "version": 7}, {"t": 101.3, "kind": "promote",
                                                                          "version": 8}]}, now=102.0)
    assert [e["kind"] for e in rec.events] == ["swap", "promote"]
    for i in range(5):
        rec.sample(_snap(103.0 + i, 50, 10, 20, 30, {}, 2.0, 1.0), 4, None, now=103.0 + i)
    assert len(rec.points) == 3  # ring buffer
    assert rec.to_json(since=106.5)["points"][0]["t"] == 107.0


def test_speedup_meter_never_exceeds_acceptance_length():
    """Even with a cost model that says small forwards are dearer than big ones (warm-up noise)."""
    cost = SimpleNamespace(cost=lambda n, kind="masked": 10.0 if n <= 2 else 0.01)
    spec = SimpleNamespace(draft_seconds=0.0, controller=SimpleNamespace(cost=cost))
    engine = SimpleNamespace(counters=SimpleNamespace(drafted=8, accepted=6), spec=spec)
    meter = SpeedupMeter()
    meter.observe(engine, StepResult(rows=2, tokens=10, seconds=0.03, num_decode=2))
    acceptance = (6 + 2) / 2
    assert meter.plain_seconds / meter.spec_seconds <= acceptance + 1e-9


def test_server_config_validation_names_fields():
    with pytest.raises(ValueError, match="max_concurrency"):
        ServerConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="train"):
        ServerConfig(train="sometimes")
    assert ServerConfig(max_concurrency=4, max_queue=2).capacity == 6
    assert ServerConfig(api_key="a").effective_admin_key == "a"


def test_serve_flag_turns_prefix_reuse_off_in_the_engine(tiny_llama):
    import argparse

    from onspec.server.app import build_engine
    from onspec.server.commands import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert config_from_args(p.parse_args([])).prefix_reuse
    cfg = config_from_args(p.parse_args(["--model", str(tiny_llama), "--dtype", "float32", "--speculation", "off",
                                         "--max-concurrency", "2", "--no-prefix-reuse"]))
    assert not cfg.prefix_reuse
    engine = build_engine(cfg)
    assert not engine.cfg.prefix_reuse
    engine.step()
    assert not engine.scheduler.reuse_prefixes
