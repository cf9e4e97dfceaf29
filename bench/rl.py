"""RL rollout benchmark: the same GRPO run (same seeds, same prompts) under four rollout configurations.

  (a) no speculation, FIFO                         the baseline: every response prefills its own prompt
  (b) + context-aware scheduling (Seer)            probe-first, longest-estimate-first, anti-starvation,
                                                   and a group's responses prefill their prompt once
  (c) + grouped suffix drafting                    siblings share a suffix tree (lossless speculation)
  (d) + co-trained learned drafter (TLT)           EAGLE-3 drafter trained in each rollout's idle tail (few
                                                   rows left and a core free: --threads 1 on 2 cores), used
                                                   where the controller measures that it pays

Each configuration runs ``--steps`` full RL steps (rollout, reward, GRPO update, weights back into the
engine) from the same initial model. Reported per configuration: median rollout-phase seconds per RL
step, median tail latency (time to finish the last 10% of responses), generated tokens/s, acceptance
length (overall and per strategy) and the reward curve. Speculation is lossless, so the reward curves
must agree within sampling noise; the speed ratios are against (a) measured in the same run.

    .venv/bin/python bench/rl.py --quick        # a few minutes on a shared 2-core CPU
    .venv/bin/python bench/rl.py                # bigger: more steps, prompts and tokens
    .venv/bin/python bench/rl.py --long         # long, variable-length reasoning rollouts (gsm_symbolic)
    .venv/bin/python bench/rl.py --tail         # short answers with a heavy tail (chain_sum, 512 tokens)
    .venv/bin/python bench/rl.py --keep-up --steps 30 --cotrain-from DIR   # (d) only: co-trained vs frozen

``--long`` is the setting Seer (arXiv 2511.14617) and TLT target: step-by-step answers to grade-school word
problems (reasoning-gym ``gsm_symbolic``) up to 512 tokens, whose lengths vary widely within a group, so
the last responses form a long tail. ``--tail`` is a heavy tail on a short-answer task: most chain_sum
answers are a dozen tokens, a few run on to max_tokens, so each step waits on a handful of long
responses, the shape TLT measures in real RL runs. The default workload (one-digit sums, ~30-token answers) has almost
no tail and a large prompt-prefill share. ``--baseline-shares-prefill`` gives (a) the group prefill
sharing too (as a vLLM prefix cache would), to separate that gain from scheduling and speculation.

Writes bench/results/rl.json and bench/results/rl.png (reward, rollout time, tail, acceptance by step).

``--keep-up``: configuration (d) alone, with a copy of the drafter frozen at step 0 scored on every step's
held-out rollout traces beside the co-trained one (TLT's claim: the co-trained drafter keeps up with the
policy, the frozen one goes stale). ``--cotrain-from DIR`` starts both from a warm head (``onspec warmup``)
instead of a day-0 one. Writes rl_keep_up.json / .png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, busy_warning, machine_info, print_table, write_results  # noqa: E402

from onspec.rl.config import RLConfig  # noqa: E402
from onspec.rl.grpo import GRPOConfig  # noqa: E402
from onspec.rl.rollout import RolloutConfig  # noqa: E402
from onspec.rl.tasks import TaskConfig  # noqa: E402

CONFIGS = {
    "a: off, FIFO": dict(schedule="fifo", speculation="off", grouped=False, cotrain=False, share=False),
    "b: + Seer scheduling": dict(schedule="seer", speculation="off", grouped=False, cotrain=False, share=True),
    # auto with no learned drafter attached: the grouped suffix drafter, budgeted by the controller
    "c: + grouped suffix": dict(schedule="seer", speculation="auto", grouped=True, cotrain=False, share=True),
    "d: + co-trained drafter": dict(schedule="seer", speculation="auto", grouped=True, cotrain=True, share=True),
}

# --long: reason step by step (long, variable-length answers) and end with a gradable line
LONG_TASK = "gsm_symbolic"
LONG_INSTRUCTION = "Solve it step by step, then give the final number on a last line: Answer: <number>"
# --tail: a short-answer task whose few long responses run on (default model, temperature 1, max_tokens 512:
# p50 12 tokens, p90 49, p99 at the cut, 2% cut; docs/results.md)
TAIL_TASK = "chain_sum"


def run_config(name: str, spec: dict, base: RLConfig, keep_up: bool = False, cotrain_from: str = "") -> list[dict]:
    from onspec.rl.cotrain import make_cotrainer
    from onspec.rl.loop import RLRunner

    rollout = replace(base.rollout, schedule=spec["schedule"], grouped_drafting=spec["grouped"],
                      share_prefill=spec["share"])
    cfg = replace(base, rollout=rollout, speculation=spec["speculation"], cotrain=spec["cotrain"],
                  cotrain_keep_up=keep_up and spec["cotrain"], cotrain_from=cotrain_from if spec["cotrain"] else "")
    cotrainer = make_cotrainer(cfg) if cfg.cotrain else None
    runner = RLRunner(cfg, cotrainer=cotrainer)
    t0 = time.perf_counter()
    history = runner.run(progress_bar=True)
    print(f"[{name}] {len(history)} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return [asdict(m) for m in history]


def length_distribution(rows: list[dict]) -> dict:
    """Response lengths over every step of a run: p50, p90, p99, max and the share cut at max_tokens."""
    lengths = sorted(n for r in rows for n in r.get("response_lengths", []))
    if not lengths:
        return {}

    def q(p: float) -> int:
        return lengths[min(len(lengths) - 1, int(p * len(lengths)))]

    return {"responses": len(lengths), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": lengths[-1],
            "cut": statistics.mean(r.get("truncated", 0.0) for r in rows)}


def summarise(rows: list[dict]) -> dict:
    med = statistics.median
    strategies: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r["acceptance_by_strategy"].items():
            strategies.setdefault(k, []).append(v)
    return {
        "rollout_seconds": med(r["rollout_seconds"] for r in rows),
        # sampled lengths differ between configurations (lossless speculation and batch shapes change which
        # random draws a token gets), so also compare time per generated token
        "seconds_per_1k_tokens": 1000 * sum(r["rollout_seconds"] for r in rows)
        / max(1, sum(r["generated_tokens"] for r in rows)),
        "tail_seconds": med(r["tail_seconds"] for r in rows),
        "tokens_per_second": med(r["tokens_per_second"] for r in rows),
        "prefill_tokens": statistics.mean(r["prefill_tokens"] for r in rows),
        "shared_prompt_tokens": statistics.mean(r.get("shared_prompt_tokens", 0) for r in rows),
        "response_tokens": statistics.mean(r["response_tokens"] for r in rows),
        "truncated": statistics.mean(r.get("truncated", 0.0) for r in rows),
        "acceptance_length": med(r["acceptance_length"] for r in rows),
        "acceptance_by_strategy": {k: statistics.mean(v) for k, v in strategies.items()},
        "reward_mean": statistics.mean(r["reward"] for r in rows),
        "reward_curve": [r["reward"] for r in rows],
        "rollout_curve": [r["rollout_seconds"] for r in rows],
        "tail_curve": [r["tail_seconds"] for r in rows],
        "acceptance_curve": [r["acceptance_length"] for r in rows],
        "drafter": [r.get("drafter", {}) for r in rows],
        "lengths": length_distribution(rows),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (2 steps, 2 prompts x 8, 96 tokens)")
    p.add_argument("--long", action="store_true",
                   help=f"long reasoning rollouts: task {LONG_TASK}, step-by-step instruction, 512 tokens")
    p.add_argument("--tail", action="store_true",
                   help=f"heavy-tailed short answers: task {TAIL_TASK}, 512 tokens")
    p.add_argument("--task", default=None, help="reasoning-gym task (default basic_arithmetic; --long: "
                   f"{LONG_TASK}; --tail: {TAIL_TASK})")
    p.add_argument("--keep-up", action="store_true",
                   help="(d) only, default 30 steps: co-trained drafter vs a copy frozen at step 0")
    p.add_argument("--cotrain-from", default="", metavar="DIR", help="(d) starts from this EAGLE-3 checkpoint")
    p.add_argument("--baseline-shares-prefill", action="store_true",
                   help="(a) also prefills each group's prompt once (isolates that gain)")
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--max-running", type=int, default=None, help="concurrent responses in the engine")
    p.add_argument("--chunk-tokens", type=int, default=0, help="divided rollout chunk (0: undivided)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is best on a busy 2-core CPU)")
    p.add_argument("--cotrain-share", type=float, default=0.25,
                   help="(d) co-trains only while at most this share of the rows is active and a core is free")
    p.add_argument("--only", default="", help="comma-separated config letters to run (e.g. a,c)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="results file name (default rl, or rl_long with --long)")
    args = p.parse_args(argv)
    if args.long and args.tail:
        p.error("--long and --tail are two workloads: choose one")
    args.name = args.name or ("rl_keep_up" if args.keep_up else "rl_long" if args.long else
                              "rl_tail" if args.tail else "rl")
    steps = args.steps or (2 if args.quick else 30 if args.keep_up else 5)
    prompts = args.prompts or (2 if args.quick else 4)
    max_tokens = args.max_tokens or (96 if args.quick else 512 if args.long or args.tail else 128)
    max_running = args.max_running or (8 if args.quick else 16)
    task_name = args.task or (LONG_TASK if args.long else TAIL_TASK if args.tail else None)
    task = TaskConfig(seed=args.seed, **({"name": task_name} if task_name else {}),
                      **({"instruction": LONG_INSTRUCTION} if args.long else {}))
    base = RLConfig(model=args.model, task=task, prompts_per_step=prompts, steps=steps,
                    rollout=RolloutConfig(group_size=args.group_size, max_tokens=max_tokens, temperature=1.0,
                                          chunk_tokens=args.chunk_tokens, max_running=max_running, seed=args.seed),
                    grpo=GRPOConfig(), max_num_seqs=max_running, threads=args.threads,
                    cotrain_share=args.cotrain_share, seed=args.seed)
    only = "d" if args.keep_up else args.only
    chosen = {k: v for k, v in CONFIGS.items() if not only or k[0] in only.split(",")}
    if args.baseline_shares_prefill:
        chosen = {k: {**v, "share": True} for k, v in chosen.items()}
    warn = busy_warning(args.threads or 2)
    runs: dict[str, list[dict]] = {}
    for name, spec in chosen.items():
        runs[name] = run_config(name, spec, base, args.keep_up, args.cotrain_from)
    if args.keep_up:
        return report_keep_up(args, base, runs)
    summary = {name: summarise(rows) for name, rows in runs.items()}
    base_name = next(iter(summary))
    b = summary[base_name]
    cols = ["config", "rollout s/step", "s/1k tok", "tail s", "resp tok", "prefill tok", "accept len",
            "by strategy", "reward", "speedup", "speedup/tok", "tail vs (a)"]
    table = []
    for name, s in summary.items():
        strat = " ".join(f"{k}:{v:.2f}" for k, v in sorted(s["acceptance_by_strategy"].items()))
        table.append([name, s["rollout_seconds"], s["seconds_per_1k_tokens"], s["tail_seconds"],
                      s["response_tokens"], s["prefill_tokens"], s["acceptance_length"],
                      strat, s["reward_mean"], b["rollout_seconds"] / s["rollout_seconds"],
                      b["seconds_per_1k_tokens"] / s["seconds_per_1k_tokens"],
                      s["tail_seconds"] / b["tail_seconds"] if b["tail_seconds"] > 0 else float("nan")])
    notes = [f"task {task.name}; {steps} RL steps x {prompts} prompts x {args.group_size} responses, "
             f"max_tokens {max_tokens}, "
             f"{max_running} concurrent; medians over steps; speedup = (a) rollout time / this one; "
             f"speedup/tok: the same per generated token (sampled lengths differ between configurations); "
             f"resp tok: mean response length (cut at max_tokens: "
             + ", ".join(f"{k[0]} {v['truncated']:.0%}" for k, v in summary.items())
             + "); prefill tok: prompt tokens computed per step (a group's "
             f"responses share one prefill from (b) on"
             + (", and in (a) too: --baseline-shares-prefill)." if args.baseline_shares_prefill else ").")]
    lengths = summary[base_name]["lengths"]
    if lengths:
        notes.append(f"(a)'s response lengths over {lengths['responses']} responses: p50 {lengths['p50']}, p90 "
                     f"{lengths['p90']}, p99 {lengths['p99']}, max {lengths['max']}, cut {lengths['cut']:.1%}")
    if warn:
        notes.append(warn)
    print_table("RL rollout phase (same seeds, same prompts)", cols, table, notes)
    payload = {"machine": machine_info(args.threads), "config": asdict(base), "summary": summary, "runs": runs,
               "notes": notes}
    jpath, _ = write_results(args.name, payload)
    from onspec.rl.plots import plot_runs

    ppath = plot_runs(runs, RESULTS_DIR / f"{args.name}.png", title="RL rollouts: (a)-(d), same seeds",
                      panels=(("reward", "mean reward"), ("rollout_seconds", "rollout seconds / step"),
                              ("tail_seconds", "tail seconds (last 10%)"), ("acceptance_length", "acceptance length"),
                              ("tokens_per_second", "rollout tokens/s"), ("response_tokens", "mean response tokens")))
    print(f"results: {jpath}\nplot: {ppath}")
    return 0


def plot_keep_up(curve: list[dict], path: Path) -> Path:
    """Held-out acceptance of both drafters by RL step, and the policy's reward beside it."""
    from onspec.rl.plots import plot_runs

    series = {"co-trained": [{"step": c["step"], "acceptance": c["cotrained"], "reward": c["reward"]}
                             for c in curve if "cotrained" in c],
              "frozen at step 0": [{"step": c["step"], "acceptance": c["frozen"]} for c in curve if "frozen" in c]}
    return plot_runs(series, path, title="Drafter keep-up during RL (held-out rollout traces)",
                     panels=(("acceptance", "held-out acceptance length"), ("reward", "policy's mean reward")))


def report_keep_up(args, base: RLConfig, runs: dict[str, list[dict]]) -> int:
    """The co-trained drafter against the step-0 copy, step by step, on the same held-out traces."""
    rows = next(iter(runs.values()))
    curve = [{"step": r["step"], "reward": r["reward"], **r["drafter"].get("keep_up", {}),
              "version": r["drafter"].get("version"), "tail_train_seconds": r["drafter"].get("tail_train_seconds")}
             for r in rows]
    table = [[c["step"], c.get("cotrained", float("nan")), c.get("frozen", float("nan")),
              c.get("cotrained", float("nan")) - c.get("frozen", float("nan")), c.get("roots", 0), c["version"],
              c["tail_train_seconds"], c["reward"]] for c in curve]
    start = f"warm head {args.cotrain_from}" if args.cotrain_from else "a day-0 head"
    lengths = length_distribution(rows)
    notes = [f"held-out simulated acceptance length (1 + accepted drafts of greedy chains) on the newest rollouts' "
             f"traces; both drafters start from {start}; the frozen one never trains"]
    if lengths:
        notes.append(f"response lengths: p50 {lengths['p50']}, p90 {lengths['p90']}, p99 {lengths['p99']}, "
                     f"max {lengths['max']}, cut {lengths['cut']:.1%} ({lengths['responses']} responses)")
    print_table("Co-trained drafter against a copy frozen at step 0", ["step", "co-trained", "frozen", "gap", "roots",
                "version", "tail train s", "reward"], table, notes)
    payload = {"machine": machine_info(args.threads), "config": asdict(base), "cotrain_from": args.cotrain_from,
               "curve": curve, "lengths": lengths, "runs": runs, "notes": notes}
    jpath, _ = write_results(args.name, payload)
    ppath = plot_keep_up(curve, RESULTS_DIR / f"{args.name}.png")
    print(f"results: {jpath}\nplot: {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
