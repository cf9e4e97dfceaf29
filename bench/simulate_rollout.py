"""The rollout simulator checked against measured rollouts, then run at scale (``onspec simulate-rollout``).

Validation: for 1 and 2 workers (2: local Ray actors, one thread each), a real rollout (speculation off,
no GRPO update) runs on this machine; the simulator then runs the same configuration with the measured
response lengths (group by group), the cost profile measured on this machine (``profile_costs``), the
same slots per worker and the mean prompt length, and its makespan is compared with the measured one.

Scale: at N = 64 workers on a heavy-tailed lognormal length distribution, each policy's throughput
(FIFO's makespan over its own) and tail reduction against FIFO, under the measured CPU cost table and
under a stated flat (GPU-like) step cost, with onspec's recorded grouped acceptance and with a higher one,
next to Seer's published figures (arXiv 2511.14617: up to 2.04x rollout throughput, 72-94% lower tail
latency).

    .venv/bin/python bench/simulate_rollout.py                   # both parts
    .venv/bin/python bench/simulate_rollout.py --skip-validate   # the scale part only
    .venv/bin/python bench/simulate_rollout.py --reuse-validation  # re-simulate the last measured rollouts

Writes bench/results/simulate_rollout.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, busy_warning, machine_info, print_table, write_results  # noqa: E402

from onspec.rl.simulate.cost import KINDS, LinearCost, TableCost, measure_cost  # noqa: E402
from onspec.rl.simulate.events import Cluster, Policy, simulate  # noqa: E402
from onspec.rl.simulate.sweep import SweepConfig, length_stats, run_sweep  # noqa: E402
from onspec.rl.simulate.workload import Acceptance, Workload, parse_lengths  # noqa: E402

SEER_PUBLISHED = {"throughput_up_to": 2.04, "tail_reduction_range": [0.72, 0.94], "source": "arXiv 2511.14617"}
# A flat step cost: decoding on a GPU is memory-bound, so a step costs about the same for 1 or 64 rows.
# Stated, not measured: 30 ms per step plus 0.01 ms per token computed.
FLAT = LinearCost(fixed=0.030, per_row=0.0, per_token=0.00001,
                  source="assumed GPU-like step: 30 ms + 0.01 ms per token (memory-bound decode; not measured)")


def measured_rollout(args, workers: int, schedule: str) -> dict:
    """One real rollout (step ``args.step``) with ``workers`` engines; its seconds, tail and lengths."""
    from onspec.rl.config import RLConfig
    from onspec.rl.loop import RLRunner
    from onspec.rl.rollout import RolloutConfig
    from onspec.rl.tasks import TaskConfig

    rollout = RolloutConfig(group_size=args.group_size, max_tokens=args.max_tokens, schedule=schedule,
                            grouped_drafting=False, max_running=args.max_running, seed=args.seed)
    cfg = RLConfig(model=args.model, task=TaskConfig(name=args.task, seed=args.seed), prompts_per_step=args.prompts,
                   steps=1, rollout=rollout, speculation="off", threads=1, workers=workers, seed=args.seed)
    runner = RLRunner(cfg)
    steps: list[list[float]] = []                    # [rows, tokens, seconds] of every engine step
    actors = getattr(runner.backend, "actors", [])
    if actors:  # Ray workers: the same recorder, installed in each actor's process
        import ray

        ray.get([a.__ray_call__.remote(_install_recorder) for a in actors])
    else:
        record_steps(runner.backend.engine, steps)
    try:
        out = []
        for step in range(args.repeats + 1):          # the first rollout warms the engines up
            _, prompts = runner.prompt_ids(step)
            steps.clear()
            result = runner.backend.rollout(prompts, step)
            if actors:
                steps.extend(x for part in ray.get([a.__ray_call__.remote(_drain_recorder) for a in actors])
                             for x in part)
            if step == 0:
                continue
            groups = [[len(it.generated) for it in result.items if it.group == g] for g in range(len(prompts))]
            out.append({"step": step, "seconds": result.seconds, "tail_seconds": result.tail_seconds,
                        "groups": groups, "prompt_tokens": statistics.mean(len(p) for p in prompts),
                        "rollout": asdict(rollout), "engine_steps": [list(x) for x in steps]})
        return {"workers": workers, "schedule": schedule, "steps": out}
    finally:
        runner.close()


def _install_recorder(worker) -> None:
    """In a Ray actor (a ``RolloutWorker``): time its engine's steps into ``worker.step_log``."""
    worker.step_log = []
    record_steps(worker.engine, worker.step_log)


def _drain_recorder(worker) -> list[list[float]]:
    out = list(worker.step_log)
    worker.step_log.clear()
    return out


def record_steps(engine, into: list[list[float]]) -> None:
    """Time every engine step with the rows and tokens the scheduler gave it (wraps two methods)."""
    schedule, step = engine.scheduler.schedule, engine.step
    last: dict[str, int] = {}

    def scheduled():
        batch = schedule()
        last["rows"], last["tokens"] = len(batch.prefill) + len(batch.decode), batch.num_tokens
        return batch

    def timed():
        last.clear()
        t0 = time.perf_counter()
        out = step()
        if last.get("rows"):
            into.append([last["rows"], last["tokens"], time.perf_counter() - t0])
        return out

    engine.scheduler.schedule, engine.step = scheduled, timed


def live_table(engine_steps: list[list[float]], source: str) -> TableCost:
    """A cost table from timed engine steps: per kind and power-of-two bucket of tokens, the median seconds
    at the bucket's mean size (``StepCostModel``'s layout)."""
    from onspec.speculation.utility import pow2_bucket

    buckets: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for rows, tokens, secs in engine_steps:
        kind = "plain" if tokens <= rows else "masked"
        buckets.setdefault((kind, pow2_bucket(int(tokens))), []).append((tokens, secs))
    tables: dict[str, dict[int, float]] = {k: {} for k in KINDS}
    for (kind, _), pts in buckets.items():
        tables[kind][round(statistics.mean(t for t, _ in pts))] = statistics.median(s for _, s in pts)
    return TableCost(tables=tables, source=source)


def measure(args) -> list[dict]:
    """The measured rollouts, one row per measured step."""
    rows = []
    for workers in args.workers:
        for schedule in args.schedules:
            t0 = time.perf_counter()
            m = measured_rollout(args, workers, schedule)
            print(f"[measured] {workers} worker(s), {schedule}: {time.perf_counter() - t0:.0f} s", flush=True)
            for s in m["steps"]:
                rows.append({"workers": workers, "schedule": schedule, "step": s["step"], "measured_s": s["seconds"],
                             "measured_tail_s": s["tail_seconds"], "groups": s["groups"],
                             "prompt_tokens": s["prompt_tokens"], "rollout": s["rollout"],
                             "engine_steps": s["engine_steps"],
                             "lengths": length_stats(s["groups"], s["rollout"]["max_tokens"])})
    return rows


def compare(rows: list[dict], cost: TableCost) -> list[dict]:
    """Each measured step simulated with its own lengths and configuration, under two cost tables: the
    profile measured before the runs (``cost``), and a table of the run's own engine steps, timed as they
    ran (median seconds per row-count bucket). The first tests the whole prediction; the second holds the
    step price fixed to what the run paid and tests the rest: dispatch, step counts, ticks, the tail. On a
    shared machine the first moves with the other processes' load (2x between minutes here)."""
    from onspec.rl.rollout import RolloutConfig

    out = []
    for r in rows:
        cfg = RolloutConfig(**r["rollout"])
        cluster = Cluster(workers=r["workers"], capacity=cfg.max_running, prompt_tokens=round(r["prompt_tokens"]))
        sim = simulate(Policy(r["schedule"], cfg), cluster, r["groups"], cost, Acceptance())
        row = {**r, "simulated_s": sim.makespan, "error": sim.makespan / r["measured_s"] - 1.0,
               "simulated_tail_s": sim.tail, "simulated_steps": sim.steps,
               "measured_steps": len(r.get("engine_steps", [])) or None}
        if r.get("engine_steps"):
            live = live_table(r["engine_steps"], "this run's own engine steps (all workers)")
            lsim = simulate(Policy(r["schedule"], cfg), cluster, r["groups"], live, Acceptance())
            row.update(live_simulated_s=lsim.makespan, live_error=lsim.makespan / r["measured_s"] - 1.0,
                       live_table=live.to_dict())
        out.append(row)
    return out


def scale(args, cpu: TableCost) -> dict:
    """N = 64 on a heavy-tailed distribution: every policy against FIFO, in three scenarios: this machine's
    cost table and onspec's recorded acceptance; a flat (GPU-like, assumed) step cost with the same
    acceptance; and the flat cost with a higher grouped acceptance (assumed: long reasoning answers whose
    siblings repeat long spans), which is closer to the setting Seer reports from."""
    cfg = SweepConfig(workers=(64,), policies=tuple(args.policies), prompts_per_worker=args.scale_prompts_per_worker,
                      group_size=args.scale_group_size, max_tokens=args.scale_max_tokens,
                      chunk_tokens=args.scale_chunk, capacity=args.scale_capacity,
                      prompt_tokens=args.scale_prompt_tokens, seed=args.seed)
    workload = parse_lengths(args.scale_lengths)
    recorded = Acceptance(suffix=args.accept_suffix, grouped=args.accept_grouped, draft=args.draft,
                          max_draft=args.max_draft, source="onspec's recorded grouped acceptance (--accept-grouped)")
    high = Acceptance(suffix=args.accept_suffix, grouped=args.high_grouped, draft=args.draft,
                      max_draft=args.max_draft, source="assumed higher grouped acceptance (--high-grouped)")
    scenarios = {"measured CPU table": (cpu, recorded), "flat GPU-like (assumed)": (FLAT, recorded),
                 "flat GPU-like, high grouped acceptance (assumed)": (FLAT, high)}
    out = {"config": asdict(cfg), "lengths": workload.describe(), "scenarios": {}}
    for name, (cost, acceptance) in scenarios.items():
        t0 = time.perf_counter()
        sweep = run_sweep(cfg, workload, cost, acceptance)
        print(f"[scale] {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        out["length_stats"] = length_stats(sweep.lengths[64], cfg.max_tokens)
        longest = max(n for g in sweep.lengths[64] for n in g)
        # no schedule beats the longest response decoding alone from t = 0 (without speculation)
        bound = cost.seconds(1, cfg.prompt_tokens) + (longest - 1) * cost.seconds(1, 1)
        out["scenarios"][name] = {"cost": cost.source, "acceptance": asdict(acceptance),
                                  "longest_response_alone_s": bound, "results": [
            {**asdict(r), "tokens_per_second": r.tokens_per_second, **sweep.versus(r.policy, 64, "fifo")}
            for r in sweep.results]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--task", default="basic_arithmetic")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-running", type=int, default=8, help="slots per worker (queues form beyond them)")
    p.add_argument("--repeats", type=int, default=2, help="measured rollouts per configuration (after a warm-up)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--schedules", nargs="+", default=["fifo", "seer"])
    p.add_argument("--profile-context", type=int, default=96, help="cached tokens per row in the cost profile")
    p.add_argument("--profile-repeats", type=int, default=5)
    p.add_argument("--live-steps", type=int, default=8, help="live engine steps timed per row count in the profile")
    p.add_argument("--skip-validate", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--reuse-validation", action="store_true",
                   help="keep the measured rollouts and cost table of bench/results/NAME.json; rerun the scale part")
    p.add_argument("--policies", nargs="+",
                   default=["fifo", "seer", "seer+divided", "fifo+grouped", "seer+divided+grouped"])
    p.add_argument("--scale-lengths", default="lognormal:median=512,sigma=0.9,group=0.7")
    p.add_argument("--scale-prompts-per-worker", type=int, default=8)
    p.add_argument("--scale-group-size", type=int, default=8)
    p.add_argument("--scale-max-tokens", type=int, default=8192)
    p.add_argument("--scale-chunk", type=int, default=1024)
    p.add_argument("--scale-capacity", type=int, default=16)
    p.add_argument("--scale-prompt-tokens", type=int, default=256)
    # grouped: onspec's recorded grouped-suffix acceptance (bench/results/rl.json (c): 1.57 tokens per drafting
    # step, rl_long.json (c): 1.48); suffix alone and the budgets are assumptions
    p.add_argument("--accept-suffix", type=float, default=1.2)
    p.add_argument("--accept-grouped", type=float, default=1.5)
    p.add_argument("--draft", type=int, default=4)
    p.add_argument("--max-draft", type=int, default=16, help="adaptive budget up to this (0: fixed at --draft)")
    p.add_argument("--high-grouped", type=float, default=2.5, help="grouped acceptance of the third scenario")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="simulate_rollout")
    args = p.parse_args(argv)
    warn = busy_warning(2)
    if warn:
        print(warn, file=sys.stderr)

    previous = RESULTS_DIR / f"{args.name}.json"
    if args.reuse_validation:  # the slow part: keep its measured rollouts and the cost table they ran with
        old = json.loads(previous.read_text())
        cost = TableCost(tables={k: {int(t): v for t, v in old["cost_table"].get(k, {}).items()} for k in KINDS},
                         source=old["cost_table"]["source"])
    else:
        t0 = time.perf_counter()
        cost = measure_cost(args.model, "float32", threads=1, context=args.profile_context,
                            repeats=args.profile_repeats, live_steps=args.live_steps)
        print(f"[cost] measured in {time.perf_counter() - t0:.0f} s: {cost.source}", flush=True)
    payload: dict = {"machine": machine_info(1), "cost_table": cost.to_dict(), "seer_published": SEER_PUBLISHED,
                     "command": "python bench/simulate_rollout.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    measured = None
    if args.reuse_validation:
        measured = old["validation"]
        payload["machine_at_validation"] = old.get("machine_at_validation", old["machine"])
    elif not args.skip_validate:
        measured = measure(args)
    if measured is not None:
        rows = payload["validation"] = compare(measured, cost)
        print_table("simulator vs measured rollout (makespan)",
                    ["workers", "schedule", "step", "measured s", "sim: profile", "error", "sim: live table", "error",
                     "steps measured", "steps sim", "measured tail", "sim tail"],
                    [[r["workers"], r["schedule"], r["step"], f"{r['measured_s']:.1f}", f"{r['simulated_s']:.1f}",
                      f"{100 * r['error']:+.0f}%", f"{r.get('live_simulated_s', float('nan')):.1f}",
                      f"{100 * r.get('live_error', float('nan')):+.0f}%", r["measured_steps"] or "-",
                      r["simulated_steps"], f"{r['measured_tail_s']:.1f}", f"{r['simulated_tail_s']:.1f}"]
                     for r in rows])
    payload["scale"] = {} if args.skip_scale else scale(args, cost)
    for name, block in payload["scale"].get("scenarios", {}).items():
        print_table(f"N = 64, {payload['scale']['lengths']}, cost: {name}",
                    ["policy", "makespan s", "throughput x", "tail s", "tail -%", "util"],
                    [[r["policy"], f"{r['makespan']:.1f}", f"{r['speedup']:.2f}", f"{r['tail']:.1f}",
                      f"{100 * r['tail_reduction']:.0f}", f"{r['utilisation']:.2f}"] for r in block["results"]],
                    notes=[f"cost: {block['cost']}", f"acceptance: {block['acceptance']}",
                           f"the longest response decoding alone from t = 0: {block['longest_response_alone_s']:.1f} s",
                           f"Seer (arXiv 2511.14617): up to 2.04x throughput, "
                           f"72-94% lower tail latency"])
    if payload["scale"]:
        print(f"lengths at N = 64: {payload['scale']['length_stats']}")
    jpath, _ = write_results(args.name, payload)
    print(f"wrote {jpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
