"""Prefix reuse: time to first token and throughput with and without reusing the rows freed slots hold.

Default model, bfloat16, speculation off (so the prefill is all that differs), one request at a time,
both arms in the same run, interleaved, a fresh engine per repeat, medians over ``--repeats``:

(chat)          AlpacaEval instructions in the model's chat template: every prompt starts with the same
                system prompt (24 tokens for SmolLM2);
(conversation)  one multi-turn chat: each turn's prompt holds every earlier turn and answer, as a chat client
                sends it, so all but the newest message was computed by the previous turn.

Time to first token (TTFT) is the time from submitting a request to its first streamed token (its prefill).

    python bench/prefix_reuse.py --repeats 3
    python bench/prefix_reuse.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (Measurement, busy_warning, machine_info, measure_interleaved, print_table,  # noqa: E402
                          ratio, set_threads, write_results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 prompts, 3 turns, 16 tokens, 1 repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=12, help="chat prompts, one at a time")
    p.add_argument("--turns", type=int, default=6, help="turns of the conversation")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per request")
    p.add_argument("--name", default="prefix_reuse", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.prompts, args.turns, args.max_tokens = 1, 4, 3, 16
    if min(args.repeats, args.threads, args.prompts, args.turns, args.max_tokens) < 1:
        p.error("--repeats, --threads, --prompts, --turns and --max-tokens must be >= 1")
    return args


def streamed(llm, prompt: str, params) -> tuple[float, list[int]]:
    """(seconds to the first token, the tokens) of one request."""
    t0 = time.perf_counter()
    ttft, tokens = None, []
    for delta in llm.stream(prompt, params):
        if delta.new_token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        tokens.extend(delta.new_token_ids)
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


def chat_run(prompts: list[str], params):
    def run(llm):
        ttfts, n = [], 0
        for p in prompts:
            ttft, toks = streamed(llm, p, params)
            ttfts.append(ttft)
            n += len(toks)
        return n, figures(llm, ttfts)
    return run


def conversation_run(messages: list[str], params):
    def run(llm):
        tok = llm.engine.tokenizer
        history: list[dict] = []
        ttfts, n = [], 0
        for m in messages:
            history.append({"role": "user", "content": m})
            prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            ttft, toks = streamed(llm, prompt, params)
            ttfts.append(ttft)
            n += len(toks)
            history.append({"role": "assistant", "content": tok.decode(toks, skip_special_tokens=True)})
        return n, figures(llm, ttfts)
    return run


def figures(llm, ttfts: list[float]) -> dict:
    c = llm.engine.counters
    return {"ttft_median": statistics.median(ttfts), "ttft_total": sum(ttfts), "ttfts": ttfts,
            "prompt_tokens": c.prompt_tokens, "reused_prefix_tokens": c.reused_prefix_tokens,
            "prefill_seconds": c.prefill_seconds}


def median_extra(m: Measurement, key: str) -> float:
    vals = [ex[key] for ex in m.extras if key in ex]
    return statistics.median(vals) if vals else float("nan")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    from onspec import LLM, SamplingParams
    from onspec.config import EngineConfig
    from onspec.data import chat_prompts, chat_texts
    from onspec.engine.engine import Engine
    from onspec.models.loader import load_model

    t_start = time.perf_counter()
    notes = []
    warn = busy_warning(args.threads)
    if warn:
        notes.append("WARNING: " + warn)
    loaded = load_model("default", "bfloat16")
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)

    def make(reuse: bool):
        cfg = EngineConfig(model="default", dtype="bfloat16", num_threads=args.threads, max_num_seqs=8,
                           max_model_len=2048, prefix_reuse=reuse)
        return LLM(engine=Engine(cfg, loaded=loaded))   # no drafter attached: plain decoding

    make(False).generate(chat_texts(loaded.tokenizer, ["Hello"]), params)   # warm-up
    workloads = {"chat": chat_run(chat_texts(loaded.tokenizer, chat_prompts(args.prompts)), params),
                 # the conversation's messages: the AlpacaEval instructions after the chat workload's
                 "conversation": conversation_run(chat_prompts(args.prompts + args.turns)[args.prompts:], params)}
    results: dict[str, dict[str, Measurement]] = {}
    rows = []
    for name, run in workloads.items():
        res = measure_interleaved({"reuse off": (run, lambda: make(False)), "reuse on": (run, lambda: make(True))},
                                  args.repeats)
        results[name] = res
        off, on = res["reuse off"], res["reuse on"]
        ttft_off, ttft_on = median_extra(off, "ttft_median"), median_extra(on, "ttft_median")
        reused, prompt = median_extra(on, "reused_prefix_tokens"), median_extra(on, "prompt_tokens")
        rows.append([name, ttft_off * 1e3, ttft_on * 1e3, ratio(ttft_off, ttft_on), off.tps, on.tps,
                     ratio(on.tps, off.tps), reused / (reused + prompt) if reused + prompt else float("nan")])
    print_table(f"Prefix reuse, one request at a time, greedy, {args.max_tokens} tokens, speculation off, "
                f"{args.threads} threads, median of {args.repeats}",
                ["workload", "TTFT off (ms)", "TTFT on (ms)", "TTFT speedup", "off tok/s", "on tok/s",
                 "throughput speedup", "prompt share reused"], rows)
    notes.append(f"total bench time {time.perf_counter() - t_start:.0f} s")
    for n in notes:
        print(n)
    payload = {"bench": "prefix_reuse", "args": vars(args), "machine": machine_info(args.threads),
               "results": results, "table": rows, "notes": notes}
    bars = {"median TTFT (ms)": {f"{r[0]} {arm}": v for r in rows for arm, v in (("off", r[1]), ("on", r[2]))}}
    jpath, ppath = write_results(args.name, payload, bars, ylabel="ms")
    print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
