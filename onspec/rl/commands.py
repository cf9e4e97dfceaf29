"""``onspec rl``: GRPO on a reasoning-gym task, rollouts through the engine with lossless speculation.

    onspec rl --task basic_arithmetic --group-size 8 --steps 30 --out runs/rl --plot
"""

from __future__ import annotations

import argparse
import json

from ..config import SPECULATION_MODES
from ..cpu import native_bf16_product


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    from .rollout import SCHEDULES
    from .tasks import DEFAULT_TASK

    p.add_argument("--model", default="default", help="'default', a model directory, a .gguf file or a hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="policy dtype in the rollout engine (the trainer keeps float32 master weights; a "
                        "bfloat16 engine is faster but rounds small updates away)")
    p.add_argument("--no-autocast", action="store_true",
                   help="train with float32 matrix products (the default where the CPU has no native bf16 product: AMX or avx512_bf16)")
    p.add_argument("--task", default=DEFAULT_TASK, help="reasoning-gym task name ('list' prints them)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="reasoning-gym dataset option (repeatable); replaces the task's preset")
    p.add_argument("--format-reward", type=float, default=0.1, help="bonus for a bare-answer reply")
    p.add_argument("--group-size", "-G", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompts", type=int, default=4, help="prompts (groups) per RL step")
    p.add_argument("--steps", type=int, default=20, help="RL steps")
    p.add_argument("--max-tokens", type=int, default=96, help="response length cap")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--clip", type=float, default=0.2, help="PPO clip epsilon (low side)")
    p.add_argument("--clip-high", type=float, default=None, help="upper clip epsilon (default: = --clip)")
    p.add_argument("--kl", type=float, default=0.0, help="KL-to-reference coefficient (0: off)")
    p.add_argument("--minibatches", type=int, default=1, help="optimizer steps per rollout batch")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    p.add_argument("--speculation", default=None, choices=SPECULATION_MODES,
                   help="rollout speculation (default: auto: the controller drafts where it pays)")
    p.add_argument("--schedule", default="seer", choices=SCHEDULES)
    p.add_argument("--chunk-tokens", type=int, default=0, help="divided rollout chunk size (0: undivided)")
    p.add_argument("--no-group-drafting", action="store_true", help="siblings do not share a suffix tree")
    p.add_argument("--max-running", type=int, default=0, help="concurrent requests per worker (0: engine slots)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine slots per worker")
    p.add_argument("--workers", type=int, default=1, help="Ray rollout workers (1: in-process)")
    p.add_argument("--ray-address", default="", help="Ray cluster to join ('' starts Ray locally)")
    p.add_argument("--cotrain", action="store_true", help="co-train a learned drafter in the rollout tail")
    p.add_argument("--cotrain-share", type=float, default=0.25,
                   help="co-train only while at most this share of the rollout's rows is active and a core "
                        "is free (threads x 2 <= CPUs)")
    p.add_argument("--cotrain-keep-up", action="store_true",
                   help="also score a copy of the drafter frozen at step 0 on each step's held-out traces "
                        "(metrics: drafter.keep_up)")
    p.add_argument("--cotrain-from", default="", metavar="DIR",
                   help="start co-training from this EAGLE-3 checkpoint (onspec warmup's, export-speculator's) "
                        "instead of a day-0 head")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="directory for metrics.jsonl (and curves.png)")
    p.add_argument("--plot", action="store_true", help="write PNG curves into --out")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace):
    from .config import RLConfig
    from .grpo import GRPOConfig
    from .rollout import RolloutConfig
    from .tasks import TaskConfig, parse_options

    options = parse_options(args.task_option) if args.task_option else None
    task = TaskConfig(name=args.task, options=options, seed=args.seed, format_reward=args.format_reward)
    rollout = RolloutConfig(group_size=args.group_size, max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, schedule=args.schedule, chunk_tokens=args.chunk_tokens,
                            grouped_drafting=not args.no_group_drafting, max_running=args.max_running,
                            seed=args.seed)
    grpo = GRPOConfig(lr=args.lr, clip_low=args.clip, clip_high=args.clip_high, kl_coef=args.kl,
                      minibatches=args.minibatches, micro_batch=args.micro_batch,
                      autocast=native_bf16_product() and not args.no_autocast)
    return RLConfig(model=args.model, dtype=args.dtype, task=task, prompts_per_step=args.prompts,
                    steps=args.steps, rollout=rollout, grpo=grpo,
                    speculation=args.speculation or "auto",
                    max_num_seqs=args.max_num_seqs, threads=args.threads, workers=args.workers,
                    ray_address=args.ray_address, cotrain=args.cotrain,
                    cotrain_share=args.cotrain_share, cotrain_keep_up=args.cotrain_keep_up,
                    cotrain_from=args.cotrain_from, out=args.out,
                    plot=args.plot,
                    seed=args.seed)


def run(args: argparse.Namespace) -> int:
    if args.task == "list":
        from .tasks import available_tasks

        print("\n".join(available_tasks()))
        return 0
    cfg = config_from_args(args)
    from .loop import RLRunner

    cotrainer = None
    if cfg.cotrain:
        from .cotrain import make_cotrainer

        cotrainer = make_cotrainer(cfg)
    runner = RLRunner(cfg, cotrainer=cotrainer)
    history = runner.run(progress_bar=not args.no_progress)
    first = history[: min(5, len(history))]
    last = history[-min(5, len(history)):]
    summary = {
        "steps": len(history),
        "reward_first": sum(m.reward for m in first) / len(first),
        "reward_last": sum(m.reward for m in last) / len(last),
        "rollout_seconds_median": sorted(m.rollout_seconds for m in history)[len(history) // 2],
        "acceptance_length_mean": sum(m.acceptance_length for m in history) / len(history),
    }
    print(json.dumps(summary))
    if cfg.out:
        print(f"metrics: {cfg.out}/metrics.jsonl" + (f", curves: {cfg.out}/curves.png" if cfg.plot else ""))
    return 0
