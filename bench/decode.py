"""Plain decoding speed of onspec against its peers, and batch throughput (speculation off throughout).

One run, the same prompts for everyone (a few AlpacaEval chat instructions and a few HumanEval
functions, chat template applied), greedy, ``--max-tokens`` new tokens per prompt (EOS ignored /
suppressed so every peer produces exactly that many), ``--threads`` torch/llama.cpp threads:

* onspec bfloat16 and float32, one prompt at a time (single stream);
* transformers ``generate`` on the same weights, plain and with prompt-lookup decoding
  (``prompt_lookup_num_tokens``), float32 and bfloat16;
* llama.cpp (llama-cpp-python) on the GGUF file the default model comes from, when installed;
* onspec bfloat16 throughput with 1, 8, 32 and 64 prompts submitted at once, with attention grouped by row
  width (the default) and in one padded grid per step.

Figures are medians over ``--repeats``; ratios are against transformers plain (float32) measured in the
same run. Targets: single-stream onspec bf16 >= 2.0x transformers float32 and >= 0.75x llama.cpp Q4_1
(which reads 4x fewer bytes); batch-32 throughput >= 4x single-stream.

    python bench/decode.py              # full (a few minutes)
    python bench/decode.py --quick      # 2 prompts, 32 tokens, 1 repeat: a smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (busy_warning, chat_texts, hf_generate, llamacpp_available, llamacpp_single,  # noqa: E402
                          machine_info, measure_interleaved, print_table, ratio, set_threads, write_results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 prompts, 32 tokens, 1 repeat, batches 1 and 8")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--chat", type=int, default=3, help="AlpacaEval prompts")
    p.add_argument("--code", type=int, default=3, help="HumanEval prompts")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--skip", default="", help="comma-separated peers to skip: hf, llamacpp, fp32, pld")
    p.add_argument("--name", default="decode", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.max_tokens, args.chat, args.code, args.batches = 1, 32, 1, 1, "1,8"
    if args.repeats < 1 or args.max_tokens < 1 or args.threads < 1:
        p.error("--repeats, --max-tokens and --threads must be >= 1")
    if args.chat < 0 or args.code < 0 or args.chat + args.code < 1:
        p.error("--chat and --code must be >= 0, and at least one prompt is needed")
    return args


# ---- onspec ----------------------------------------------------------------------------------------


def onspec_llm(dtype: str, threads: int, max_num_seqs: int = 64):
    from onspec import LLM

    return LLM(model="default", dtype=dtype, speculation="off", num_threads=threads, max_num_seqs=max_num_seqs)


def onspec_single(llm, prompts: list[str], max_tokens: int):
    from onspec import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)

    def run() -> int:
        return sum(len(llm.generate([p], params)[0].outputs[0].token_ids) for p in prompts)
    return run


def onspec_batch(llm, prompts: list[str], batch: int, max_tokens: int):
    from onspec import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]

    def run() -> int:
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(batch_prompts, params))
    return run


# ---- llama.cpp -------------------------------------------------------------------------------------


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    from onspec.data import chat_prompts, humaneval_prompts
    from onspec.models.loader import default_gguf_path, resolve_model_dir

    t_start = time.perf_counter()
    notes: list[str] = []
    warn = busy_warning(args.threads)
    if warn:
        notes.append("WARNING: " + warn)
    bf16 = onspec_llm("bfloat16", args.threads)
    tok = bf16.tokenizer
    messages = (chat_prompts(args.chat) if args.chat else []) + (humaneval_prompts(args.code) if args.code else [])
    prompts = chat_texts(tok, messages)
    R, N = args.repeats, args.max_tokens

    # Single stream: every peer generates N tokens for each prompt, one prompt at a time. All peers are
    # built first, then run round-robin per repeat, so load bursts from other processes hit them alike.
    configs: dict = {}
    bf16.generate(prompts[:1], None)  # warm-up (default params: a short sampled answer)
    configs["onspec bf16"] = (onspec_single(bf16, prompts, N), None)
    if "fp32" not in skip:
        fp32 = onspec_llm("float32", args.threads)
        fp32.generate(prompts[:1], None)
        configs["onspec fp32"] = (onspec_single(fp32, prompts, N), None)
    model_dir = resolve_model_dir("default")
    if "hf" not in skip:
        for dtype in ("float32", "bfloat16"):
            short = "fp32" if dtype == "float32" else "bf16"
            for lookup in (0, 10):
                if lookup and "pld" in skip:
                    continue
                name = f"transformers {short}" + (" prompt-lookup" if lookup else "")
                configs[name] = (hf_generate(model_dir, dtype, tok, N, exact_length=True)(prompts, lookup), None)
    else:
        notes.append("transformers: skipped (--skip hf)")
    if "llamacpp" not in skip:
        why = llamacpp_available()
        if why is None:
            gguf = default_gguf_path()
            for lookup in (0, 10):
                if lookup and "pld" in skip:
                    continue
                name = "llama.cpp Q4_1" + (" prompt-lookup" if lookup else "")
                try:
                    configs[name] = (llamacpp_single(gguf, args.threads, tok, prompts, N, lookup), None)
                except Exception as exc:  # a peer failing must not sink the run; say so in the table
                    notes.append(f"{name}: failed to start ({exc.__class__.__name__}: {exc})")
        else:
            notes.append(f"llama.cpp: skipped, {why}")
    results = measure_interleaved(configs, R)

    base_name = "transformers fp32"
    base = results[base_name].tps if base_name in results else float("nan")
    rows = [[name, m.tps, f"{m.spread * 100:.0f}%", sum(m.tokens) // max(1, len(m.tokens)), ratio(m.tps, base)]
            for name, m in results.items()]
    print_table(f"Single stream: {len(prompts)} prompts x {N} tokens, greedy, {args.threads} threads, "
                f"median of {R}", ["peer", "tok/s", "spread", "tokens/run", f"x {base_name}"], rows)

    # Throughput: the same prompts cycled to fill batches of 1, 8, 32, 64, all submitted at once (so their
    # prefill chunks share steps with decoding rows). "one grid" is the same engine with attention run in a
    # single padded grid per step (runner.group_attention = False), the engine before grouped attention.
    batches = [int(b) for b in args.batches.split(",")]
    one_grid = onspec_llm("bfloat16", args.threads)
    one_grid.engine.runner.group_attention = False
    thr_configs = {}
    for b in batches:
        thr_configs[f"batch {b}"] = (onspec_batch(bf16, prompts, b, N), None)
        thr_configs[f"batch {b} one grid"] = (onspec_batch(one_grid, prompts, b, N), None)
    thr_named = measure_interleaved(thr_configs, R)
    thr = {b: thr_named[f"batch {b}"] for b in batches}
    single = thr[batches[0]].tps if batches and batches[0] == 1 else results["onspec bf16"].tps
    rows2 = [[b, m.tps, f"{m.spread * 100:.0f}%", ratio(m.tps, single), thr_named[f"batch {b} one grid"].tps,
              ratio(m.tps, thr_named[f"batch {b} one grid"].tps)] for b, m in thr.items()]
    print_table(f"onspec bf16 throughput (speculation off), {N} tokens per request",
                ["batch", "tok/s", "spread", "x batch 1", "one grid tok/s", "x one grid"], rows2)

    def best(*names: str) -> float:
        vals = [results[n].tps for n in names if n in results]
        return max(vals) if vals else float("nan")

    targets = {"bf16_vs_transformers_fp32": ratio(results["onspec bf16"].tps, best("transformers fp32"))}
    if "llama.cpp Q4_1" in results:
        targets["bf16_vs_llamacpp_q4_1"] = ratio(results["onspec bf16"].tps, results["llama.cpp Q4_1"].tps)
    if 32 in thr and 1 in thr:
        targets["batch32_vs_batch1"] = ratio(thr[32].tps, thr[1].tps)
    wanted = {"bf16_vs_transformers_fp32": 2.0, "bf16_vs_llamacpp_q4_1": 0.75, "batch32_vs_batch1": 4.0}
    notes.append("targets: " + "; ".join(f"{k} = {v:.2f} (target >= {wanted[k]})" for k, v in targets.items()))
    notes.append(f"total bench time {time.perf_counter() - t_start:.0f} s")
    for n in notes:
        print(n)
    payload = {"bench": "decode", "args": vars(args), "machine": machine_info(args.threads),
               "prompts": messages, "single_stream": results, "throughput": {str(b): m for b, m in thr.items()},
               "throughput_one_grid": {str(b): thr_named[f"batch {b} one grid"] for b in batches},
               "targets": targets, "notes": notes}
    bars = {"single stream tok/s": {k: v.tps for k, v in results.items()},
            "onspec bf16 throughput tok/s": {f"batch {b}": m.tps for b, m in thr.items()},
            "one attention grid per step tok/s": {f"batch {b}": thr_named[f"batch {b} one grid"].tps for b in batches}}
    jpath, ppath = write_results(args.name, payload, bars)
    print(f"wrote {jpath} and {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
