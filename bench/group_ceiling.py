"""How much can siblings draft for each other? The ceiling of grouped suffix drafting, by replay.

Why: workload (d) of bench/speculation.py asks group drafting (Seer's idea: the samples of one prompt share text, so
sibling A's output drafts for sibling B) to beat per-request drafting by >= 1.2x in throughput. The
engine bench mixes two things: how much more the group trees *could* accept, and how much of that the
controller can afford to verify at batch 8 on this CPU. This bench measures the first alone, with
verification free: if even that is far below 1.2x, no scheduler or controller change can reach the
target on this workload, and the figure says by how much.

How: the engine (speculation off, so nothing depends on drafting) samples ``n = 8`` responses per prompt.
Then the suffix drafter (``SuffixProposer``, the engine's own code) is replayed over those responses, every
step drafting a full tree (``max_draft_tokens`` nodes), in three settings:

* per-request: each response drafts from its prompt and its own output so far;
* group, lockstep: all 8 step together (as in the engine), each also drafting from what its siblings
  have committed so far;
* group, sequential: each response runs after the previous siblings finished and drafts from their whole
  outputs: the best that probe-first or staggered scheduling could offer.

Acceptance = committed tokens per step: the longest tree path equal to the recorded continuation, plus one.
For drafts that are point masses (the suffix drafter's are) this has the same distribution as the lossless
verifier's acceptance: the verifier accepts child x with probability p(x), and the recorded token is x with
probability p(x), so the replay is an unbiased estimate, not an approximation.

    python bench/group_ceiling.py                              # 6 prompts x 8 responses, temperature 0.8
    python bench/group_ceiling.py --temperatures 0.8,0.4,0.1   # how the ceiling rises as sampling sharpens
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import chat_texts, machine_info, print_table, ratio, set_threads, write_results  # noqa: E402

SETTINGS = ("per-request", "group, lockstep", "group, sequential")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=6, help="prompts (alternating math word problems and HumanEval)")
    p.add_argument("--n", type=int, default=8, help="sampled responses per prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperatures", default="0.8", help="comma-separated sampling temperatures")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="group_ceiling", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    try:
        args.temps = [float(t) for t in args.temperatures.split(",") if t.strip()]
    except ValueError:
        p.error(f"--temperatures: expected comma-separated numbers, got {args.temperatures!r}")
    if not args.temps or min(args.temps) < 0:
        p.error("--temperatures: give at least one temperature >= 0")
    if min(args.prompts, args.n, args.max_tokens, args.threads) < 1:
        p.error("--prompts, --n, --max-tokens and --threads must be >= 1")
    return args


# ---- replay ----------------------------------------------------------------------------------------


def replay(prompt: list[int], outputs: list[list[int]], setting: str, spec_cfg) -> tuple[int, int, int]:
    """Replay the suffix drafter over recorded ``outputs`` of one prompt: (tokens, steps, drafted nodes)."""
    from onspec.speculation.suffix import SuffixProposer

    sources = ("request",) if setting == "per-request" else ("request", "group")
    prop = SuffixProposer(spec_cfg)
    done = [0] * len(outputs)
    steps = drafted = 0

    def step(i: int) -> None:
        nonlocal steps, drafted
        out, t = outputs[i], done[i]
        tree = prop.propose(i, sources=sources)
        n = tree.matched_depth(out[t:])
        commit = out[t:t + n + 1]            # the accepted drafts and the target's own next token
        prop.on_commit(i, commit)
        done[i] += len(commit)
        steps += 1
        drafted += tree.num_draft

    if setting == "group, sequential":
        # Sibling i starts once 0..i-1 have finished. They stay registered (never ``finish``ed), so the
        # group tree keeps their whole outputs.
        for i, out in enumerate(outputs):
            prop.add_request(i, prompt, group="g")
            while done[i] < len(out):
                step(i)
    else:
        for i in range(len(outputs)):
            prop.add_request(i, prompt, group="g")
        while any(d < len(o) for d, o in zip(done, outputs)):
            for i, out in enumerate(outputs):
                if done[i] < len(out):
                    step(i)
    return sum(done), steps, drafted


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    from bench.speculation import make_llm
    from onspec import SamplingParams
    from onspec.config import SpecConfig
    from onspec.data import humaneval_prompts, math_prompts
    from onspec.models.loader import load_model

    t_start = time.perf_counter()
    loaded = load_model("default", "bfloat16")
    half = (args.prompts + 1) // 2
    msgs = [m for pair in zip(math_prompts(half), humaneval_prompts(half)) for m in pair][:args.prompts]
    prompts = chat_texts(loaded.tokenizer, msgs)
    llm = make_llm(loaded, "off", args.threads)
    spec_cfg = SpecConfig()
    rows, results = [], {}
    for temp in args.temps:
        params = SamplingParams(temperature=temp, n=args.n, seed=args.seed, max_tokens=args.max_tokens)
        totals = {s: [0, 0, 0] for s in SETTINGS}
        per_prompt = []
        for p in prompts:
            out = llm.generate([p], params)[0]
            samples = [list(c.token_ids) for c in out.outputs]
            entry = {"lengths": [len(s) for s in samples]}
            for s in SETTINGS:
                tok, steps, drafted = replay(list(out.prompt_token_ids), samples, s, spec_cfg)
                entry[s] = tok / max(1, steps)
                for k, v in enumerate((tok, steps, drafted)):
                    totals[s][k] += v
            per_prompt.append(entry)
        acc = {s: t[0] / max(1, t[1]) for s, t in totals.items()}
        nodes = {s: t[2] / max(1, t[1]) for s, t in totals.items()}
        results[str(temp)] = {"acceptance_length": acc, "drafted_per_step": nodes, "per_prompt": per_prompt}
        base = acc["per-request"]
        for s in SETTINGS:
            rows.append([temp, s, acc[s], ratio(acc[s], base), nodes[s]])
    print_table(f"Suffix drafting replayed over {args.prompts} prompt(s) x {args.n} sampled responses, "
                f"{args.max_tokens} tokens max, {spec_cfg.max_draft_tokens}-node trees every step (free verification)",
                ["temperature", "drafting", "accept len", "x per-request", "drafted/step"], rows)
    notes = ["acceptance ratio = the most group drafting could gain over per-request drafting if verifying "
             "draft nodes cost nothing; the target is >= 1.2x in tokens/s",
             f"total bench time {time.perf_counter() - t_start:.0f} s"]
    for n in notes:
        print(n)
    payload = {"bench": "group_ceiling", "args": {k: v for k, v in vars(args).items() if k != "temps"},
               "machine": machine_info(args.threads), "results": results, "notes": notes}
    bars = {f"temperature {t}": {s: r["acceptance_length"][s] for s in SETTINGS} for t, r in results.items()}
    jpath, ppath = write_results(args.name, payload, bars, ylabel="acceptance length (tokens / step)")
    print(f"wrote {jpath} and {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
