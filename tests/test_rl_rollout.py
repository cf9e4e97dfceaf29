"""Rollout scheduling (probe-first, longest-first, anti-starvation), divided rollout, grouped drafting."""

from __future__ import annotations

import pytest
import torch

from onspec.rl.rollout import (ChunkResult, ChunkRunner, Coordinator, RolloutConfig, RolloutItem, chunk_seed,
                               dispatch_order, group_estimates, order_buffer, run_rollout)

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


def _item(group: int, index: int, generated: int = 0, finished: bool = False, enq: int = 0) -> RolloutItem:
    return RolloutItem(group=group, index=index, prompt_ids=[1], group_id=f"g{group}",
                       generated=[7] * generated, finished=finished, enqueued=enq)


# ---- pure policy -------------------------------------------------------------------------------------
def test_probes_first_shortest_generated_first():
    cfg = RolloutConfig(group_size=3, max_tokens=100)
    items = [_item(g, i, enq=3 * g + i) for g in range(3) for i in range(3)]
    items[0].generated = [1] * 10   # probe of group 0 already has 10 tokens (a continuing chunk)
    order = order_buffer(items, items, cfg)
    assert [(it.group, it.index) for it in order[:3]] == [(1, 0), (2, 0), (0, 0)]
    assert all(not it.is_probe for it in order[3:])


def test_longest_estimate_first_after_probes_finish():
    cfg = RolloutConfig(group_size=3, max_tokens=100)
    items = [_item(g, i, enq=3 * g + i) for g in range(3) for i in range(3)]
    # group 0's probe finished with 20 tokens, group 1's with 60; group 2 has no finished member.
    items[0].generated, items[0].finished = [1] * 20, True
    items[3].generated, items[3].finished = [1] * 60, True
    assert group_estimates(items, 100) == {0: 20, 1: 60, 2: 100}
    waiting = [it for it in items if not it.finished]
    order = order_buffer(waiting, items, cfg)
    assert order[0].key == (2, 0)                               # the remaining probe first
    assert [it.group for it in order[1:]] == [2, 2, 1, 1, 0, 0]  # then 100 > 60 > 20


def test_fifo_is_arrival_order():
    cfg = RolloutConfig(group_size=2, schedule="fifo")
    items = [_item(g, i, enq=10 - (2 * g + i)) for g in range(2) for i in range(2)]
    assert [it.enqueued for it in order_buffer(items, items, cfg)] == [7, 8, 9, 10]


def test_anti_starvation_serves_the_longest_waiting_item():
    cfg = RolloutConfig(group_size=2, max_tokens=100, starvation_every=3)
    short = [_item(0, 0, finished=True, generated=5), _item(0, 1, enq=0)]   # estimate 5: always ranked last
    short[1].waited = 9
    longs = [_item(g, 1, enq=g) for g in range(1, 6)]                       # estimate 100 each
    items = short + longs
    buffer = [short[1]] + longs
    # Without the starvation rule the short-group item would come last; with it, the 3rd dispatch is it.
    picked = dispatch_order(buffer, items, cfg, slots=3, served=0)
    assert [it.key for it in picked][:2] == [(1, 1), (2, 1)]
    assert picked[2].key == (0, 1)


def test_anti_starvation_bounds_the_wait_in_a_long_stream():
    cfg = RolloutConfig(group_size=2, max_tokens=100, starvation_every=4)
    coord = Coordinator([[1]] * 8, cfg, capacities=[1])
    # finish every probe: group 0 short (2 tokens), the rest long (90)
    for g in range(8):
        it = coord.item((g, 0))
        coord.buffer.remove(it)
        it.generated, it.finished = [1] * (2 if g == 0 else 90), True
    served = []
    while coord.buffer:
        work = coord.assign()[0]
        served.append(work[0].key)
        coord.complete(0, ChunkResult(work[0].key, [2], "stop", work[0].max_tokens))
    # group 0's response is the shortest job, so longest-first alone would run it last (8th);
    # the starvation slot serves it by the 4th dispatch.
    assert served.index((0, 1)) <= 3


def test_coordinator_divides_and_counts_reprefill():
    cfg = RolloutConfig(group_size=1, max_tokens=10, chunk_tokens=4, temperature=0.0)
    coord = Coordinator([[1, 2, 3]], cfg, capacities=[1, 1])
    w = coord.assign()
    (wid, [work]), = w.items()
    assert work.max_tokens == 4 and work.prompt_ids == [1, 2, 3] and work.seed is None
    assert not coord.complete(wid, ChunkResult(work.key, [7, 7, 7, 7], "length", 4))
    assert coord.buffer  # back in the global buffer
    (wid2, [work2]), = coord.assign().items()
    assert work2.prompt_ids == [1, 2, 3, 7, 7, 7, 7] and work2.max_tokens == 4 and work2.chunk == 1
    assert coord.reprefill_tokens == 7
    coord.complete(wid2, ChunkResult(work2.key, [8, 8, 8, 8], "length", 4))
    (_, [work3]), = coord.assign().items()
    assert work3.max_tokens == 2  # min(chunk, remaining)
    assert coord.complete(_, ChunkResult(work3.key, [9, 9], "length", 2))
    assert coord.done and coord.items[0].generated == [7] * 4 + [8] * 4 + [9] * 2


def test_chunk_seed_is_deterministic_and_distinct():
    a = chunk_seed(0, 1, 2, 3, 4)
    assert a == chunk_seed(0, 1, 2, 3, 4)
    assert len({chunk_seed(0, 1, g, i, o) for g in range(4) for i in range(4) for o in (0, 8)}) == 32
    assert 0 <= a < 2 ** 31


def test_rollout_config_errors():
    with pytest.raises(ValueError, match="schedule"):
        RolloutConfig(schedule="lifo")
    with pytest.raises(ValueError, match="chunk_tokens"):
        RolloutConfig(chunk_tokens=-1)


# ---- on a tiny engine ----------------------------------------------------------------------------------
def _engine(path, spec: str, max_num_seqs: int = 4, prefix_reuse: bool = False):
    from onspec.config import EngineConfig, SpecConfig
    from onspec.engine.engine import Engine
    from onspec.speculation.controller import attach_speculation

    # prefix_reuse off: these tests count prefill and sibling sharing exactly (reuse has its own test)
    e = Engine(EngineConfig(model=str(path), dtype="float32", max_num_seqs=max_num_seqs, max_model_len=128,
                            spec=SpecConfig(mode=spec, profile_at_start=False), prefix_reuse=prefix_reuse))
    if spec != "off":
        from test_speculation import FREE

        attach_speculation(e, e.cfg.spec)
        # Costs injected so that what is drafted, and so when each response finishes and which sibling can
        # join it, does not depend on this machine's timings (with live costs, a test of joins failed in
        # two of four runs once the suffix drafter's calibration made its trees timing-sensitive).
        e.spec.controller.cost = FREE
    return e


@pytest.fixture(scope="module")
def greedy_reference(tiny_llama):
    cfg = RolloutConfig(group_size=3, max_tokens=20, temperature=0.0, schedule="fifo")
    res = run_rollout(ChunkRunner(_engine(tiny_llama, "off", 16), cfg), PROMPTS, cfg)
    return [it.generated for it in res.items]


@pytest.mark.parametrize("spec", ["off", "suffix"])
@pytest.mark.parametrize("chunk", [0, 6])
@pytest.mark.parametrize("schedule", ["fifo", "seer"])
def test_divided_and_scheduled_rollout_equals_undivided_greedy(tiny_llama, greedy_reference, spec, chunk, schedule):
    torch.manual_seed(0)
    cfg = RolloutConfig(group_size=3, max_tokens=20, temperature=0.0, chunk_tokens=chunk, schedule=schedule)
    res = run_rollout(ChunkRunner(_engine(tiny_llama, spec, 4), cfg), PROMPTS, cfg)
    assert [it.generated for it in res.items] == greedy_reference
    assert all(len(g) == 20 or it.finish_reason == "stop" for it, g in zip(res.items, greedy_reference))
    if chunk:
        assert res.chunks > len(res.items) and res.reprefill_tokens > 0
    else:
        assert res.chunks == len(res.items) and res.reprefill_tokens == 0


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prefix_reuse_spares_divided_rollout_its_reprefills(tiny_llama, temperature):
    """A chunk that comes back to its engine finds its context's rows in a freed slot (prefix reuse) instead
    of prefilling them again; same tokens, greedy and seeded."""
    cfg = RolloutConfig(group_size=3, max_tokens=20, temperature=temperature, chunk_tokens=4, seed=2)
    runs = {reuse: run_rollout(ChunkRunner(_engine(tiny_llama, "off", 4, prefix_reuse=reuse), cfg), PROMPTS, cfg)
            for reuse in (False, True)}
    off, on = runs[False], runs[True]
    assert [it.generated for it in on.items] == [it.generated for it in off.items]
    assert off.reused_prefix_tokens == 0 < on.reused_prefix_tokens <= on.reprefill_tokens
    # the same contexts went in; reuse takes over some of what sibling copies did, and computes less
    assert (on.prefill_tokens + on.reused_prefix_tokens + on.shared_prompt_tokens
            == off.prefill_tokens + off.shared_prompt_tokens)
    assert on.prefill_tokens < 0.8 * off.prefill_tokens


def test_probe_runs_first_on_the_engine(tiny_llama):
    cfg = RolloutConfig(group_size=3, max_tokens=12, temperature=0.0, schedule="seer")
    runner = ChunkRunner(_engine(tiny_llama, "off", 3), cfg)
    coord = Coordinator(PROMPTS, cfg, capacities=[runner.capacity])
    first = coord.assign()[0]
    assert sorted(w.key for w in first) == [(0, 0), (1, 0), (2, 0)]


def test_sampled_rollout_is_reproducible_and_divided_keeps_distribution_seeds(tiny_llama):
    cfg = RolloutConfig(group_size=3, max_tokens=16, temperature=1.0, chunk_tokens=5, seed=3)
    a = run_rollout(ChunkRunner(_engine(tiny_llama, "suffix", 4), cfg), PROMPTS, cfg, step=2)
    b = run_rollout(ChunkRunner(_engine(tiny_llama, "off", 9), cfg), PROMPTS, cfg, step=2)
    # Same seeds per (step, group, response, offset): the same tokens whatever the engine's batch.
    # (Speculation consumes randomness differently, so "suffix" vs "off" need not match token for token;
    # "off" with two different slot counts must.)
    c = run_rollout(ChunkRunner(_engine(tiny_llama, "off", 2), cfg), PROMPTS, cfg, step=2)
    assert [it.generated for it in b.items] == [it.generated for it in c.items]
    assert all(len(it.generated) > 0 for it in a.items)
    d = run_rollout(ChunkRunner(_engine(tiny_llama, "off", 9), cfg), PROMPTS, cfg, step=3)
    assert [it.generated for it in d.items] != [it.generated for it in b.items]


def test_group_tree_survives_between_chunks(tiny_llama):
    cfg = RolloutConfig(group_size=2, max_tokens=12, temperature=0.0, chunk_tokens=4)
    engine = _engine(tiny_llama, "suffix", 4)
    runner = ChunkRunner(engine, cfg)
    inner = engine.spec.proposers["suffix"].inner
    coord = Coordinator([PROMPTS[0]], cfg, capacities=[runner.capacity])
    for w, work in coord.assign().items():
        runner.submit(work)
    while runner.load:
        for res in runner.step():
            coord.complete(0, res)
    # Both first chunks finished: without the pin the group's tree would be gone now.
    tree = inner.group_tree(coord.items[0].group_id)
    assert tree is not None and tree.num_tokens == 8
    runner.share(coord.items[0].group_id, "elsewhere", [3, 4, 5])
    assert tree.num_tokens == 11
    runner.unpin_all()
    assert inner.group_tree(coord.items[0].group_id) is None


def test_progress_and_acceptance_reported(tiny_llama):
    cfg = RolloutConfig(group_size=4, max_tokens=20, temperature=0.0)
    seen = []
    res = run_rollout(ChunkRunner(_engine(tiny_llama, "suffix", 8), cfg), PROMPTS, cfg,
                      progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (12, 12)
    # greedy siblings are identical, so grouped suffix drafting must accept drafts
    assert res.acceptance_length("suffix") > 1.5
    assert res.tail_seconds <= res.seconds


@pytest.mark.parametrize("spec", ["off", "suffix"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("schedule,chunk", [("fifo", 0), ("seer", 0), ("seer", 6)])
def test_shared_prefill_keeps_every_token(tiny_llama, spec, temperature, schedule, chunk):
    """Siblings prefill their prompt once (add_siblings, joins included) and sample exactly the same tokens
    as when every response prefills its own prompt: greedy and seeded."""
    runs = {}
    for share in (False, True):
        cfg = RolloutConfig(group_size=4, max_tokens=16, temperature=temperature, schedule=schedule,
                            chunk_tokens=chunk, share_prefill=share, seed=5)
        runs[share] = run_rollout(ChunkRunner(_engine(tiny_llama, spec, 5), cfg), PROMPTS, cfg, step=1)
    off, on = runs[False], runs[True]
    assert [it.generated for it in on.items] == [it.generated for it in off.items]
    assert off.shared_prompt_tokens == 0
    # 5 slots for 3 groups x 4: some responses start later and join a running sibling of their group
    assert on.shared_prompt_tokens >= sum(2 * (len(p) - 1) for p in PROMPTS)
    assert on.prefill_tokens == off.prefill_tokens - on.shared_prompt_tokens
    if temperature:
        assert len({tuple(it.generated) for it in on.items}) > len(PROMPTS)


def test_shared_prefill_joins_later_chunks(tiny_llama):
    """One slot free at a time: every response after the first of a group joins a running sibling."""
    cfg = RolloutConfig(group_size=3, max_tokens=10, temperature=1.0, schedule="fifo", seed=1)
    engine = _engine(tiny_llama, "off", 2)
    res = run_rollout(ChunkRunner(engine, cfg), PROMPTS[:1], cfg)
    # responses 0 and 1 start together, response 2 when one of them finishes (its sibling still runs)
    assert res.shared_prompt_tokens == 2 * (len(PROMPTS[0]) - 1)
    assert engine.kv.num_free == engine.kv.num_slots and not engine.requests
