"""``onspec simulate-rollout``: hand-computed makespans on tiny clusters, the real scheduler as its driver,
and bad input as a one-line error with exit code 2.

Costs are injected (``LinearCost``), never timed. With ``fixed=1`` and nothing else every engine step takes
one second, and a response of L tokens takes L steps (the prefill step samples the first token), so the
makespans below can be worked out by hand; each test says how.
"""

from __future__ import annotations

import json

import pytest

from onspec import cli
from onspec.rl import rollout
from onspec.rl.simulate import events
from onspec.rl.simulate.cost import LinearCost, load_cost_table, parse_cost
from onspec.rl.simulate.events import Cluster, SimWorker, simulate
from onspec.rl.simulate.sweep import SweepConfig, make_policy, run_sweep
from onspec.rl.simulate.workload import Acceptance, LengthDistribution, Workload, parse_lengths

UNIT = LinearCost(fixed=1.0, per_row=0.0, per_token=0.0)
# three groups of two: g0 short, g1 medium, g2 long (its probe 6, its sibling 8)
LENGTHS = [[1, 1], [2, 2], [6, 8]]


def policy(name: str, chunk: int = 0, group_size: int = 2, max_tokens: int = 16):
    # tail = time after the 80% mark (the 5th of 6 responses), so that one response's wait shows
    base = rollout.RolloutConfig(group_size=group_size, max_tokens=max_tokens, tail_fraction=0.2)
    return make_policy(name, base, chunk)


def run(name: str, lengths=LENGTHS, workers: int = 2, capacity: int = 1, cost=UNIT, chunk: int = 0,
        acceptance: Acceptance | None = None, prompt_tokens: int = 4, prefix_reuse: bool = True):
    cluster = Cluster(workers=workers, capacity=capacity, prompt_tokens=prompt_tokens, prefix_reuse=prefix_reuse)
    return simulate(policy(name, chunk, len(lengths[0])), cluster, lengths, cost, acceptance or Acceptance())


# ---- hand-computed makespans -----------------------------------------------------------------------
def test_fifo_two_workers() -> None:
    # w0: (0,0) 0-1, (1,0) 1-3, (2,0) 3-9;  w1: (0,1) 0-1, (1,1) 1-3, (2,1) 3-11
    r = run("fifo")
    assert r.makespan == pytest.approx(11.0)
    assert r.generated_tokens == 20 and r.chunks == 6 and r.moves == 0
    # finish times 1, 1, 3, 3, 9, 11: the tail runs from the 5th (9) to the end
    assert r.tail == pytest.approx(2.0)
    assert r.utilisation == pytest.approx((9 + 11) / (2 * 11))


def test_seer_two_workers() -> None:
    # probes first: w0 (0,0) 0-1, w1 (1,0) 0-2; w0 takes the last probe (2,0) 1-7. At 2 g2 has no finished
    # response, so its estimate is max_tokens and (2,1) runs next on w1, 2-10; w0 then takes (1,1)
    # (estimate 2) 7-9 and (0,1) (estimate 1) 9-10
    r = run("seer")
    assert r.makespan == pytest.approx(10.0)
    assert r.tail == pytest.approx(0.0)  # finish times 1, 2, 7, 9, 10, 10: the 5th is the last


def test_divided_rollout_two_workers() -> None:
    # FIFO with chunks of 2 tokens and free re-prefill: as FIFO, but g2's responses come back to the
    # buffer every 2 tokens and go out again at once. At 9 (2,0) ends on w0 before (2,1) comes back from
    # w1, so both workers are free and the least-loaded rule's tie sends its last chunk to w0: one move
    r = run("fifo+divided", chunk=2)
    assert r.makespan == pytest.approx(11.0)
    assert r.chunks == 1 + 1 + 1 + 1 + 3 + 4 and r.moves == 1
    assert r.reprefill_tokens == (4 + 2) + (4 + 4) + (4 + 2) + (4 + 4) + (4 + 6)


def test_divided_rollout_pays_for_reprefill_unless_the_slot_kept_it() -> None:
    # one response of 4 tokens, prompt 4, step = 1 + 0.25 * tokens. Undivided: prefill 4 (2 s, token 1) and
    # three 1-token steps (1.25 s each) = 5.75. Chunks of 2 without prefix reuse: prefill 4 (2) + 1 step
    # (1.25), then the continuation re-prefills 6 tokens (2.5, token 3) + 1 step (1.25) = 7.0. With prefix
    # reuse it comes back to the slot holding its 6 tokens and computes only the last (1.25): 5.75 again
    cost = LinearCost(fixed=1.0, per_token=0.25)
    assert run("fifo", [[4]], workers=1, cost=cost).makespan == pytest.approx(5.75)
    divided = run("fifo+divided", [[4]], workers=1, cost=cost, chunk=2, prefix_reuse=False)
    assert divided.makespan == pytest.approx(7.0)
    assert divided.reprefill_tokens == 6 and divided.prefill_tokens == 4 + 6
    reused = run("fifo+divided", [[4]], workers=1, cost=cost, chunk=2)
    assert reused.makespan == pytest.approx(5.75) and reused.prefill_tokens == 4 + 1


def test_a_later_sibling_reuses_the_prompt_rows_a_finished_one_left() -> None:
    # two 3-token siblings through one slot, step = 1 + 0.5 * tokens: the first prefills the 4-token prompt
    # (3 s) and decodes twice (1.5 s each); the second finds the prompt in the freed slot and computes only
    # its last token (1.5 s), then decodes twice: 6 + 4.5. Without reuse it prefills all 4 again: 6 + 6
    cost = LinearCost(fixed=1.0, per_token=0.5)
    assert run("fifo", [[3, 3]], workers=1, cost=cost).makespan == pytest.approx(10.5)
    assert run("fifo", [[3, 3]], workers=1, cost=cost, prefix_reuse=False).makespan == pytest.approx(12.0)


def test_grouped_drafting_commits_more_per_step() -> None:
    # 5 tokens on one worker: the prefill step gives 1, then 4 more at 1 (off), 1.5 (suffix: 3 steps) or
    # 2 (grouped: 2 steps) per step
    acc = Acceptance(suffix=1.5, grouped=2.0, draft=2)
    assert run("seer", [[5]], workers=1, acceptance=acc).makespan == pytest.approx(5.0)
    assert run("seer+suffix", [[5]], workers=1, acceptance=acc).makespan == pytest.approx(4.0)
    grouped = run("seer+grouped", [[5]], workers=1, acceptance=acc)
    assert grouped.makespan == pytest.approx(3.0) and grouped.drafting_steps == 2


def test_drafting_only_where_it_pays() -> None:
    # step = 1 + 2 * tokens: decoding 1 row costs 3 s per token; verifying 1 + 2 drafted tokens costs 7 s
    # for 2 tokens (0.29 tokens/s < 0.33): the rule decodes plainly, as with speculation off
    acc = Acceptance(suffix=1.5, grouped=2.0, draft=2)
    cost = LinearCost(fixed=1.0, per_token=2.0)
    off = run("seer", [[5]], workers=1, cost=cost, acceptance=acc)
    grouped = run("seer+grouped", [[5]], workers=1, cost=cost, acceptance=acc)
    assert grouped.drafting_steps == 0 and grouped.makespan == pytest.approx(off.makespan)
    assert off.makespan == pytest.approx((1 + 2 * 4) + 4 * 3)  # prefill of the 4-token prompt, then 4 steps


def test_siblings_share_the_prompt_prefill() -> None:
    # two 3-token siblings on one worker with room for both, step = 1 + 0.5 * tokens. The first prefills
    # the 4-token prompt (3 s, its token 1); the second copies those rows and computes the last prompt token
    # beside the first's decoding step (2 tokens: 2 s); then both decode (2 s; the first is done) and the
    # second decodes alone (1.5 s)
    cost = LinearCost(fixed=1.0, per_token=0.5)
    r = run("fifo", [[3, 3]], workers=1, capacity=2, cost=cost)
    assert r.prefill_tokens == 4 + 1
    assert r.makespan == pytest.approx(3.0 + 2.0 + 2.0 + 1.5)


def test_chunk_arriving_mid_block_joins_at_the_next_step() -> None:
    cluster = Cluster(workers=1, capacity=2, prompt_tokens=1)
    pol = policy("fifo", group_size=1)
    worker = SimWorker(cluster, pol, UNIT, Acceptance(), {(0, 0): 10, (1, 0): 2})

    def work(group: int) -> rollout.WorkItem:
        return rollout.WorkItem(key=(group, 0), group_id=None, prompt_ids=[0], max_tokens=16, seed=None,
                                priority=0, chunk=0)

    assert worker.submit([work(0)], 0.0) and worker.next_event() == 1.0   # the prefill step
    assert worker.finish_block() == [] and worker.next_event() == 10.0    # 9 decoding steps in one block
    assert worker.submit([work(1)], 3.5)        # the step under way (3-4) ends, then the new chunk joins
    assert worker.next_event() == 4.0
    worker.finish_block()                       # 4-5: prefill of (1, 0) beside a decoding step of (0, 0)
    assert worker.next_event() == 5.0
    worker.finish_block()
    assert worker.next_event() == 6.0           # (1, 0) has 2 tokens at 6
    assert [r.key for r in worker.finish_block()] == [(1, 0)]
    assert worker.next_event() == 10.0
    assert [r.key for r in worker.finish_block()] == [(0, 0)]


# ---- the real scheduler drives it ----------------------------------------------------------------
def test_it_drives_the_real_coordinator() -> None:
    assert events.rollout is rollout  # no copy: the policies are looked up in onspec.rl.rollout


def test_patching_the_real_policy_changes_the_simulation(monkeypatch) -> None:
    calls = []

    def lifo(buffer, items, cfg, slots, served):
        calls.append(slots)
        return sorted(buffer, key=lambda it: it.enqueued, reverse=True)[:slots]

    monkeypatch.setattr(rollout, "dispatch_order", lifo)
    # last in, first out: w0 (2,1) 0-8; w1 (2,0) 0-6, (1,1) 6-8; at 8 w0 takes (1,0) 8-10, w1 (0,1) 8-9 and
    # (0,0) 9-10
    r = run("fifo")
    assert calls and r.makespan == pytest.approx(10.0)


def test_patching_the_seer_order_changes_the_simulation(monkeypatch) -> None:
    # Seer's ranking replaced by arrival order: the seer policy then runs FIFO's schedule (11, not 10)
    monkeypatch.setattr(rollout, "order_buffer", lambda buffer, items, cfg: sorted(buffer, key=lambda it: it.enqueued))
    assert run("seer").makespan == pytest.approx(11.0)


# ---- workloads and sweeps ------------------------------------------------------------------------------
def test_lognormal_is_heavy_tailed_and_groups_correlate() -> None:
    w = parse_lengths("lognormal:median=200,sigma=0.8,group=0.9")
    groups = w.sample(400, 8, 100000, seed=1)
    flat = sorted(n for g in groups for n in g)
    p50, p99 = flat[len(flat) // 2], flat[int(0.99 * len(flat))]
    assert 170 < p50 < 230 and p99 >= 4 * p50
    spread_within = sum(max(g) / min(g) for g in groups) / len(groups)
    iid = parse_lengths("lognormal:median=200,sigma=0.8,group=0").sample(400, 8, 100000, seed=1)
    assert spread_within < sum(max(g) / min(g) for g in iid) / len(iid)


def test_recorded_lengths_are_used_in_order(tmp_path) -> None:
    path = tmp_path / "lengths.json"
    path.write_text(json.dumps({"groups": [[3, 5], [7, 9]]}))
    assert parse_lengths(f"recorded:{path}").sample(2, 2, 8, seed=0) == [[3, 5], [7, 8]]
    rows = [{"group_size": 2, "response_lengths": [1, 2, 3, 4]}]
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert parse_lengths(f"recorded:{jsonl}").groups == ((1, 2), (3, 4))


def test_sweep_runs_every_policy_on_the_same_lengths() -> None:
    cfg = SweepConfig(workers=(1, 2), policies=("fifo", "seer"), prompts_per_worker=2, group_size=2,
                      max_tokens=16, chunk_tokens=4, capacity=1)
    sweep = run_sweep(cfg, Workload(distribution=LengthDistribution("fixed", {"tokens": 5})), UNIT, Acceptance())
    assert [(r.policy, r.workers) for r in sweep.results] == [("fifo", 1), ("seer", 1), ("fifo", 2), ("seer", 2)]
    # fixed lengths, one slot per worker: 4 responses of 5 tokens per worker take 4 x 5 steps, whatever the order
    assert sweep.result("seer", 1).makespan == pytest.approx(20.0)
    assert sweep.versus("seer", 2, "fifo")["speedup"] == pytest.approx(1.0)


def test_cost_table_file(tmp_path) -> None:
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"source": "made up for a test", "plain": {"1": 0.01, "8": 0.02},
                                "masked": {"16": 0.04}}))
    table = load_cost_table(path)
    assert table.source == "made up for a test"
    assert table.seconds(1, 1) == pytest.approx(0.01) and table.seconds(8, 8) == pytest.approx(0.02)
    assert table.seconds(8, 16) == pytest.approx(0.04)   # drafting rows: the masked curve


# ---- bad input -------------------------------------------------------------------------------------------
TINY = ["simulate-rollout", "--cost", "linear:fixed=1", "--workers", "1", "2", "--prompts-per-worker", "2",
        "--group-size", "2", "--max-tokens", "32", "--chunk-tokens", "8", "--max-running", "2", "--no-progress"]


@pytest.mark.parametrize("args, message", [
    (["--lengths", "weibull:shape=2"], "unknown distribution 'weibull'"),
    (["--lengths", "lognormal:sigma=-1"], "must be > 0"),
    (["--workers", "-1"], "workers: every count must be >= 1"),
    (["--policies", "fifo", "lottery"], "policy 'lottery'"),
    (["--cost", "/nonexistent/costs.json"], "no such file"),
    (["--cost", "linear:fixed=fast"], "is not a number"),
    (["--plot"], "--plot writes into --out"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(args, message, capsys) -> None:
    assert cli.main([*TINY, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("onspec simulate-rollout: error:") and message in err and "Traceback" not in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    (json.dumps({"plain": {"1": 0.01}}), "'source'"),
    (json.dumps({"source": "x", "plain": {"one": 0.01}}), "whole token counts"),
    (b"\xff\xfe", "cannot read it"),
])
def test_unreadable_cost_table(tmp_path, content, message, capsys) -> None:
    path = tmp_path / "costs.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert cli.main([*TINY, "--cost", str(path)]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError):
        parse_cost(str(path))


def test_cli_writes_jsonl_summary_and_plot(tmp_path, capsys) -> None:
    out = tmp_path / "sim"
    assert cli.main([*TINY, "--lengths", "fixed:tokens=6", "--out", str(out), "--plot"]) == 0
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5 and {r["workers"] for r in rows} == {1, 2}
    assert all(r["makespan"] > 0 and "speedup" in r for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources"]["cost"].startswith("linear model") and summary["lengths_at_largest_n"]["p50"] == 6
    assert (out / "curves.png").stat().st_size > 0
    assert "simulated rollout" in capsys.readouterr().out


def test_adaptive_budget_drafts_longer_when_it_pays() -> None:
    # grouped = 2 tokens at draft 1 means every drafted token is accepted (p = 1): at a flat step cost a
    # budget of up to 4 commits 5 tokens per step. 9 tokens: prefill (1), then 8 in 2 steps, not 4
    acc = Acceptance(suffix=1.5, grouped=2.0, draft=1, max_draft=4)
    assert acc.budgets(True) == [0, 1, 2, 4] and acc.budgets(False) == [0]
    fixed = run("seer+grouped", [[9]], workers=1, acceptance=Acceptance(suffix=1.5, grouped=2.0, draft=1))
    adaptive = run("seer+grouped", [[9]], workers=1, acceptance=acc)
    assert fixed.makespan == pytest.approx(1 + 4) and adaptive.makespan == pytest.approx(1 + 2)


def test_acceptance_recorded_from_an_rl_run(tmp_path) -> None:
    from onspec.rl.simulate.workload import parse_acceptance

    run_dir = tmp_path / "rl"
    run_dir.mkdir()
    rows = [{"acceptance_by_strategy": {"suffix": 1.4, "off": 1.0}}, {"acceptance_by_strategy": {"suffix": 1.6}},
            {"acceptance_by_strategy": {"off": 1.0}}]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (run_dir / "config.json").write_text(json.dumps({"rollout": {"grouped_drafting": False}}))
    acc = parse_acceptance("grouped=1.9,draft=3", str(run_dir / "metrics.jsonl"))
    assert acc.suffix == pytest.approx(1.5) and acc.grouped == 1.9 and acc.draft == 3
    assert "mean of 2 steps" in acc.source
    with pytest.raises(ValueError, match="at most draft"):
        parse_acceptance("grouped=9,draft=3")


def test_a_slot_needed_for_another_prompt_loses_its_rows() -> None:
    # one engine slot: the rows (0, 0) left are lost when (1, 0) needs the slot, so (0, 1) finds no prompt
    cluster = Cluster(workers=1, capacity=1, prompt_tokens=4, slots=1)
    worker = SimWorker(cluster, policy("fifo"), UNIT, Acceptance(), {})
    worker.retained.append(events._Retained((0, 0), 7))
    assert worker._take_slot((1, 0), 4) == 0 and worker.retained == []
    worker.retained.append(events._Retained((0, 0), 7))
    assert worker._take_slot((0, 1), 4) == 3                 # a sibling: the prompt, less its last token
    worker.retained.append(events._Retained((0, 1), 9))
    assert worker._take_slot((0, 1), 9) == 8                 # its own continuation: all but the last token
