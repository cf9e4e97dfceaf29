"""``onspec simulate-rollout``: onspec's rollout scheduling at cluster scale, by discrete-event simulation.

    onspec simulate-rollout --cost measure --lengths lognormal:median=256,sigma=0.8 --out runs/sim --plot
    onspec simulate-rollout --cost gpu_costs.json --lengths recorded:runs/rl/metrics.jsonl --workers 1 2 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .sweep import DEFAULT_POLICIES, SweepConfig

POWERS_OF_TWO = [1 << k for k in range(9)]  # 1 .. 256


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    defaults = SweepConfig()
    p.add_argument("--workers", type=int, nargs="+", default=POWERS_OF_TWO, help="cluster sizes to simulate")
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   help="fifo|seer, then any of +divided, +suffix, +grouped")
    p.add_argument("--baseline", default="fifo", help="the policy ratios are taken against")
    p.add_argument("--lengths", default="lognormal:median=256,sigma=0.8,group=0.5",
                   help="lognormal:median=,sigma=,group= | pareto:min=,alpha=,group= | fixed:tokens= | "
                        "recorded:PATH (group = share of length variance siblings share)")
    p.add_argument("--cost", default="measure",
                   help="'measure' (onspec's cost profile on this machine), a cost table JSON with a 'source', "
                        "or linear:fixed=,per_row=,per_token=")
    p.add_argument("--save-cost", default="", help="write the cost table used (e.g. the measured one) here")
    p.add_argument("--model", default="default", help="model for --cost measure")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads for --cost measure (0: torch's default)")
    p.add_argument("--accept", default="", metavar="suffix=,grouped=,draft=,max_draft=",
                   help="tokens committed per drafting step by strategy at `draft` tokens drafted per row; "
                        "max_draft > draft lets each step pick a longer budget where it pays "
                        "(default: suffix=1.2,grouped=1.5,draft=4,max_draft=0)")
    p.add_argument("--accept-from", default="", metavar="METRICS_JSONL",
                   help="take the acceptance of the strategy an `onspec rl` run used from its metrics.jsonl")
    p.add_argument("--group-size", "-G", type=int, default=defaults.group_size, help="responses per prompt")
    p.add_argument("--prompts-per-worker", type=int, default=defaults.prompts_per_worker,
                   help="groups per worker (weak scaling)")
    p.add_argument("--prompts", type=int, default=0, help="groups in all, whatever N (replaces --prompts-per-worker)")
    p.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="response length cap")
    p.add_argument("--chunk-tokens", type=int, default=defaults.chunk_tokens, help="divided rollout chunk size")
    p.add_argument("--max-running", type=int, default=defaults.capacity, help="concurrent chunks per worker")
    p.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    p.add_argument("--prefill-budget", type=int, default=defaults.prefill_budget, help="prefill tokens per step")
    p.add_argument("--max-num-seqs", type=int, default=defaults.slots,
                   help="engine slots per worker (free ones keep released rows for prefix reuse)")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="every chunk prefills its whole context (as without the engine's prefix reuse)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="directory for metrics.jsonl and summary.json (and curves.png)")
    p.add_argument("--plot", action="store_true", help="write curves.png into --out")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig(workers=tuple(args.workers), policies=tuple(args.policies),
                       prompts_per_worker=0 if args.prompts else args.prompts_per_worker, prompts=args.prompts,
                       group_size=args.group_size, max_tokens=args.max_tokens, chunk_tokens=args.chunk_tokens,
                       capacity=args.max_running, prompt_tokens=args.prompt_tokens,
                       prefill_budget=args.prefill_budget, slots=args.max_num_seqs,
                       prefix_reuse=not args.no_prefix_reuse, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from .cost import TableCost, parse_cost
    from .report import print_table, write
    from .sweep import make_policy, run_sweep
    from .workload import parse_acceptance, parse_lengths

    cfg = config_from_args(args)
    if args.plot and not args.out:
        raise ValueError("--plot writes into --out: give --out DIR")
    if args.baseline not in cfg.policies:
        raise ValueError(f"--baseline {args.baseline!r} is not among --policies")
    for name in cfg.policies:  # bad names fail before the (slow) cost measurement
        make_policy(name, cfg.base_rollout(), cfg.chunk_tokens)
    workload = parse_lengths(args.lengths)
    acceptance = parse_acceptance(args.accept, args.accept_from)
    cost = parse_cost(args.cost, args.model, args.dtype, args.threads)
    if args.save_cost and isinstance(cost, TableCost):
        Path(args.save_cost).write_text(json.dumps(cost.to_dict(), indent=2))
    sources = {"cost": cost.source, "lengths": workload.describe(), "acceptance": acceptance.source,
               "acceptance_values": {"suffix": acceptance.suffix, "grouped": acceptance.grouped,
                                     "draft": acceptance.draft}}
    if isinstance(cost, TableCost):
        sources["cost_table"] = cost.to_dict()
    bar = None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cfg.workers) * len(cfg.policies), desc="simulating", unit="run", dynamic_ncols=True)

        def advance(policy: str, workers: int) -> None:
            bar.set_postfix_str(f"N={workers} {policy}")
            bar.update(1)

        progress = advance

    try:
        sweep = run_sweep(cfg, workload, cost, acceptance, progress)
    finally:
        if bar is not None:
            bar.close()
    print_table(sweep, args.baseline, {k: v for k, v in sources.items() if k != "cost_table"})
    if args.out:
        paths = write(sweep, Path(args.out), sources, args.baseline, args.plot)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
