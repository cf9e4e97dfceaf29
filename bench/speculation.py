"""Speculative decoding against the same engine with speculation off, and against transformers'
prompt-lookup decoding, on the default model in bfloat16.

Workloads (one run, same machine, medians over ``--repeats``; a fresh engine for every repeat so no
repeat drafts from the suffix store an earlier repeat of the same prompts filled):

(a) chat: AlpacaEval instructions, one at a time, greedy;
(b) HumanEval: complete a function, one at a time, greedy;
(c) code editing: rewrite a HumanEval solution with a small change (mostly copying), one at a time;
(d) a group of 8 sampled responses to one prompt (temperature 0.8, ``n = 8``): speculation with group
    drafting (siblings' outputs draft for each other, the "Seer" idea) against per-request drafting
    (each response drafts only from its own prompt and output) against speculation off;
(e) batch sizes 1, 8, 32, 64 of mixed chat and HumanEval prompts, greedy: the controller must never make
    things slower (it turns speculation off where verification does not pay).

Speedup = tokens/s with speculation / tokens/s without, whole requests (prefill included). Decode
speedup: the same for the decoding phase alone, i.e. without the seconds of the steps that prefilled prompts
(``EngineCounters.prefill_seconds``) and without each request's first token, which comes out of its
prefill. Prefill costs the same in both arms, so it caps the whole-request figure: when a third of the
speculative arm's time is prefill, no drafter lifts the speedup past 3x. Acceptance length = tokens
committed per target forward while decoding (bonus token included). Transformers plain and prompt-lookup
(``prompt_lookup_num_tokens=10``) run on the same prompts for (a)-(c), and so does llama.cpp on the GGUF
file the default model comes from (plain and its prompt-lookup decoding), where llama-cpp-python is
installed (``make bench-peers``; ``--skip llamacpp`` leaves it out).

Targets: (a) >= 1.4x and (c) >= 2.0x over off on every CPU kind, and >= 1.1x / >= 1.5x over llama.cpp
plain; (d) group drafting >= 1.2x per-request drafting; (e) no batch size below 0.97x.

    python bench/speculation.py --quick       # 1 prompt per workload, 64 tokens, 1 repeat
    python bench/speculation.py --repeats 3
    python bench/speculation.py --skip hf,a,b,group,batches --attention pytorch   # (c) with PyTorch's attention
    python bench/speculation.py --skip hf,group,batches --variant "raw ratios:suffix_calibrate=false"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (Measurement, busy_warning, chat_texts, hf_generate, llamacpp_available,  # noqa: E402
                          llamacpp_single, machine_info, measure_interleaved, print_table, ratio, set_threads,
                          write_results)

ALL_SOURCES = ("request", "group", "global")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 prompt per workload, 64 tokens, 1 repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request, workloads (a)-(d)")
    p.add_argument("--prompts", type=int, default=3, help="prompts per workload (a) and (b)")
    # The edits cycle through four kinds (data.code_edit_prompts), so 8 prompts hold each kind twice. With
    # 3, one kind was missing and a single prompt on which the bf16 model stops copying decided the figure.
    p.add_argument("--edit-prompts", type=int, default=8, help="prompts for the code-editing workload (c)")
    p.add_argument("--group-prompts", type=int, default=2, help="prompts for the group workload (d)")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--batch-tokens", type=int, default=64, help="new tokens per request in (e)")
    p.add_argument("--budgets", default="",
                   help="comma-separated max_draft_tokens to run beside the default in (a)-(c), e.g. 16")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
                   help="an extra auto engine in (a)-(c) with these SpecConfig fields changed, e.g. "
                        "'raw ratios:suffix_calibrate=false' (repeatable)")
    p.add_argument("--skip", default="", help="comma-separated: hf, llamacpp, group, batches, a, b, c")
    p.add_argument("--name", default="speculation", help="results file stem under bench/results/")
    p.add_argument("--attention", choices=("kernel", "pytorch"), default="kernel",
                   help="where onspec's row-local bf16 attention kernel applies (AVX2 CPUs without a native bf16 "
                        "product), 'pytorch' uses PyTorch's attention instead: what bit-exact bf16 speculation "
                        "costs or saves (bench/verify_cost.py times single forwards the same way)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.max_tokens, args.prompts, args.group_prompts, args.edit_prompts = 1, 64, 1, 1, 1
        args.batches, args.batch_tokens = "1,8,32", 32
    if min(args.repeats, args.max_tokens, args.prompts, args.edit_prompts, args.threads, args.batch_tokens) < 1:
        p.error("--repeats, --max-tokens, --prompts, --edit-prompts, --threads and --batch-tokens must be >= 1")
    try:
        args.variants = dict(parse_variant(v) for v in args.variant)
        args.variants.update({f"auto, {b} nodes": {"max_draft_tokens": int(b)}
                              for b in args.budgets.split(",") if b.strip()})
    except ValueError as e:
        p.error(str(e))
    return args


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:field=value,field=value' -> (NAME, SpecConfig overrides), values typed like the field's default."""
    import dataclasses

    from onspec.config import SpecConfig

    name, sep, body = text.partition(":")
    if not sep or not name.strip() or not body.strip():
        raise ValueError(f"--variant {text!r}: expected NAME:FIELD=VALUE[,FIELD=VALUE]")
    defaults = {f.name: getattr(SpecConfig(), f.name) for f in dataclasses.fields(SpecConfig)}
    out: dict = {}
    for item in body.split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in defaults:
            raise ValueError(f"--variant {text!r}: {key!r} is not a SpecConfig field (FIELD=VALUE)")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--variant {text!r}: {key} takes true or false, got {value!r}")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = kind(value)
            except ValueError:
                raise ValueError(f"--variant {text!r}: {key} takes a {kind.__name__}, got {value!r}") from None
    return f"auto, {name.strip()}", out


# ---- engines ---------------------------------------------------------------------------------------


def sources_adapter(spec, sources: tuple[str, ...]):
    """The suffix drafter restricted to some of its trees (request / group / global): the switch between
    group drafting and per-request drafting, without touching the controller."""
    from onspec.speculation.controller import SuffixAdapter

    class SourcesSuffixAdapter(SuffixAdapter):
        def propose(self, seqs, budgets):
            return {s.seq_id: self.inner.propose(s.seq_id, budgets[s.seq_id], sources=sources) for s in seqs}

    return SourcesSuffixAdapter(spec)


def make_llm(loaded, mode: str, threads: int, sources: tuple[str, ...] | None = None, max_num_seqs: int = 64,
             spec_overrides: dict | None = None):
    """A fresh engine over the shared loaded weights (cheap), with speculation ``mode``."""
    from onspec import LLM
    from onspec.config import EngineConfig, SpecConfig
    from onspec.engine.engine import Engine
    from onspec.speculation.controller import Controller, attach_speculation, profile_costs

    spec = SpecConfig(mode=mode, **(spec_overrides or {}))
    cfg = EngineConfig(model="default", dtype="bfloat16", num_threads=threads, max_num_seqs=max_num_seqs,
                       max_model_len=2048, spec=spec)
    eng = Engine(cfg, loaded=loaded)
    if mode != "off":
        extra = {"suffix": sources_adapter(spec, sources)} if sources is not None else None
        attach_speculation(eng, spec, extra)
    else:
        # The same start-up work as a speculating engine: its cost profile runs forwards over 32 scratch
        # slots, and those first writes fault in the (lazily zeroed) K/V cache pages of every slot (huge
        # pages span slots). Without it the engine with speculation off paid those faults inside the
        # timed run (1.7 s against 0.2 s in the K/V cache writes at batch 32, a one-off profile).
        profile_costs(eng, Controller(spec))
    return LLM(engine=eng)


def spec_figures(llm) -> dict:
    c = llm.engine.counters
    steps = max(1, c.decode_steps_seq)
    spec = llm.engine.spec
    return {
        "acceptance_length": (c.accepted + c.decode_steps_seq) / steps,
        "drafted_per_seq_step": c.drafted / steps,
        "accepted": c.accepted, "drafted": c.drafted, "decode_seq_steps": c.decode_steps_seq,
        "forward_steps": c.steps, "forward_seconds": c.forward_seconds, "prefill_seconds": c.prefill_seconds,
        "draft_seconds": getattr(spec, "draft_seconds", 0.0) if spec else 0.0,
        "by_strategy": {k: list(v) for k, v in c.by_strategy.items()},
    }


def decode_rate(m: Measurement, requests: int) -> float:
    """Median tokens/s of the decoding phase: each repeat's tokens after the first of each request, over
    its seconds outside the steps that prefilled (``prefill_seconds`` of that repeat's fresh engine)."""
    rates = [(t - requests) / (s - ex["prefill_seconds"]) for t, s, ex in zip(m.tokens, m.seconds, m.extras)
             if "prefill_seconds" in ex and s > ex["prefill_seconds"]]
    return statistics.median(rates) if rates else float("nan")


def prefill_share(m: Measurement) -> float:
    """Median fraction of a repeat's wall time spent in steps that prefilled."""
    shares = [ex["prefill_seconds"] / s for s, ex in zip(m.seconds, m.extras) if "prefill_seconds" in ex and s > 0]
    return statistics.median(shares) if shares else float("nan")


def one_at_a_time(prompts: list[str], params):
    def run(llm):
        n = sum(len(llm.generate([p], params)[0].outputs[0].token_ids) for p in prompts)
        return n, spec_figures(llm)
    return run


def all_at_once(prompts: list[str], params):
    def run(llm):
        outs = llm.generate(prompts, params)
        return sum(len(c.token_ids) for o in outs for c in o.outputs), spec_figures(llm)
    return run


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.attention == "pytorch":
        from onspec.models import llama

        llama.attention_kernel_applies = lambda *tensors: False   # every layer then takes PyTorch's SDPA path
    from onspec import SamplingParams
    from onspec.data import chat_prompts, code_edit_prompts, humaneval_prompts, math_prompts
    from onspec.models.loader import load_model

    t_start = time.perf_counter()
    notes: list[str] = []
    warn = busy_warning(args.threads)
    if warn:
        notes.append("WARNING: " + warn)
    loaded = load_model("default", "bfloat16")
    tok = loaded.tokenizer
    R, N, k = args.repeats, args.max_tokens, args.prompts
    greedy = SamplingParams(temperature=0, max_tokens=N)
    make_llm(loaded, "off", args.threads).generate(chat_texts(tok, ["Hello"]), greedy)  # warm-up

    workloads = {"a": ("(a) chat", chat_prompts(k)), "b": ("(b) HumanEval", humaneval_prompts(k)),
                 "c": ("(c) code edit", code_edit_prompts(args.edit_prompts))}
    if "hf" not in skip:
        from onspec.models.loader import resolve_model_dir
        hf_make = hf_generate(resolve_model_dir("default"), "bfloat16", tok, N)
    if "llamacpp" not in skip and (why := llamacpp_available()) is not None:
        notes.append(f"llama.cpp: skipped ({why}; `make bench-peers` installs it)")
        skip.add("llamacpp")
    results: dict[str, dict[str, Measurement]] = {}
    rows, peer_rows = [], []
    for key, (label, msgs) in workloads.items():
        if key in skip:
            continue
        prompts = chat_texts(tok, msgs)
        configs = {mode: (one_at_a_time(prompts, greedy), lambda mode=mode: make_llm(loaded, mode, args.threads))
                   for mode in ("off", "auto")}
        for name, overrides in args.variants.items():
            configs[name] = (one_at_a_time(prompts, greedy),
                             lambda o=overrides: make_llm(loaded, "auto", args.threads, spec_overrides=o))
        if "hf" not in skip:
            configs["hf plain"] = (hf_make(prompts, 0), None)
            configs["hf prompt-lookup"] = (hf_make(prompts, 10), None)
        if "llamacpp" not in skip:
            from onspec.models.loader import default_gguf_path

            for lookup in (0, 10):
                name = "llama.cpp" + (" prompt-lookup" if lookup else "")
                configs[name] = (llamacpp_single(default_gguf_path(), args.threads, tok, prompts, N, lookup,
                                                 ignore_eos=False), None)
        res = measure_interleaved(configs, R)
        results[label] = res
        if "llama.cpp" in res:
            peer_rows.append([label, res["llama.cpp"].tps, res["llama.cpp prompt-lookup"].tps, res["auto"].tps,
                              ratio(res["auto"].tps, res["llama.cpp"].tps),
                              ratio(res["auto"].tps, res["llama.cpp prompt-lookup"].tps)])
        ex = res["auto"].extra
        decode_speedup = ratio(decode_rate(res["auto"], len(prompts)), decode_rate(res["off"], len(prompts)))
        rows.append([label, res["off"].tps, res["auto"].tps, ratio(res["auto"].tps, res["off"].tps),
                     decode_speedup, prefill_share(res["auto"]),
                     ex.get("acceptance_length", float("nan")), ex.get("drafted_per_seq_step", float("nan")),
                     res["hf plain"].tps if "hf plain" in res else float("nan"),
                     res["hf prompt-lookup"].tps if "hf prompt-lookup" in res else float("nan"),
                     ratio(res["hf prompt-lookup"].tps, res["hf plain"].tps) if "hf plain" in res else float("nan"),
                     ratio(res["auto"].tps, res["hf prompt-lookup"].tps) if "hf plain" in res else float("nan")])
    if rows:
        print_table(f"Speculation (auto) vs off, one request at a time, greedy, {N} tokens max, {args.threads} threads, "
                    f"median of {R}",
                    ["workload", "off tok/s", "spec tok/s", "speedup", "decode speedup", "spec prefill share",
                     "accept len", "drafted/step",
                     "HF plain", "HF PLD", "HF PLD speedup", "spec / HF PLD"], rows)
    if peer_rows:
        print_table("onspec (bf16, speculation auto) against llama.cpp (Q4_1 GGUF, same prompts, same run)",
                    ["workload", "llama.cpp tok/s", "llama.cpp PLD tok/s", "onspec spec tok/s", "x llama.cpp",
                     "x llama.cpp PLD"], peer_rows)
    budget_rows = [[label, name, m.tps, ratio(m.tps, results[label]["off"].tps),
                    m.extra.get("acceptance_length", float("nan")), m.extra.get("drafted_per_seq_step", float("nan"))]
                   for label in results for name, m in results[label].items() if name.startswith("auto")]
    if args.variants and budget_rows:
        print_table("Variants of the auto engine (SpecConfig fields changed: "
                    + "; ".join(f"{n}: {o}" for n, o in args.variants.items()) + "), same run",
                    ["workload", "engine", "tok/s", "speedup", "accept len", "drafted/step"], budget_rows)

    # (d) a group of 8 sampled responses: group vs per-request drafting.
    group_rows = []
    if "group" not in skip:
        half = (args.group_prompts + 1) // 2  # alternate math word problems and HumanEval functions
        gmsgs = [m for pair in zip(math_prompts(half), humaneval_prompts(half)) for m in pair][:args.group_prompts]
        gprompts = chat_texts(tok, gmsgs)
        sampled = SamplingParams(temperature=0.8, n=8, seed=0, max_tokens=N)
        configs = {"off": ("off", None), "per-request": ("auto", ("request",)),
                   "group": ("auto", ("request", "group")), "all sources": ("auto", ALL_SOURCES)}
        def run_groups(llm):
            n = 0
            for p in gprompts:  # one group at a time
                n += sum(len(c.token_ids) for c in llm.generate([p], sampled)[0].outputs)
            return n, spec_figures(llm)

        gres = measure_interleaved(
            {name: (run_groups, lambda mode=mode, sources=sources: make_llm(loaded, mode, args.threads, sources))
             for name, (mode, sources) in configs.items()}, R)
        results["(d) group of 8"] = gres
        off = gres["off"].tps
        for name, m in gres.items():
            ex = m.extra
            group_rows.append([name, m.tps, ratio(m.tps, off),
                               ratio(m.tps, gres["per-request"].tps) if name != "off" else float("nan"),
                               ex.get("acceptance_length", float("nan")) if name != "off" else float("nan"),
                               ex.get("drafted_per_seq_step", float("nan")) if name != "off" else float("nan")])
        print_table(f"(d) {len(gprompts)} prompt(s) x 8 sampled responses (temperature 0.8), {N} tokens max",
                    ["drafting", "tok/s", "x off", "x per-request", "accept len", "drafted/step"], group_rows)

    # (e) batch sizes.
    batch_rows = []
    if "batches" not in skip:
        mix = chat_texts(tok, chat_prompts(4) + humaneval_prompts(4))
        bparams = SamplingParams(temperature=0, max_tokens=args.batch_tokens)
        bres = {}
        for b in [int(x) for x in args.batches.split(",")]:
            prompts = [mix[i % len(mix)] for i in range(b)]
            res = measure_interleaved(
                {mode: (all_at_once(prompts, bparams),
                        lambda mode=mode, b=b: make_llm(loaded, mode, args.threads, max_num_seqs=max(64, b)))
                 for mode in ("off", "auto")}, R)
            bres[b] = res
            ex = res["auto"].extra
            batch_rows.append([b, res["off"].tps, res["auto"].tps, ratio(res["auto"].tps, res["off"].tps),
                               ex.get("acceptance_length", float("nan")),
                               ex.get("drafted_per_seq_step", float("nan"))])
        results["(e) batches"] = {f"{b} {m}": v for b, r in bres.items() for m, v in r.items()}
        print_table(f"(e) batch sizes, mixed chat + HumanEval prompts, greedy, {args.batch_tokens} tokens",
                    ["batch", "off tok/s", "spec tok/s", "speedup", "accept len", "drafted/step"], batch_rows)

    # Targets.
    targets = {}
    if "(c) code edit" in results:
        r = results["(c) code edit"]
        targets["code_edit_speedup"] = ratio(r["auto"].tps, r["off"].tps)
        targets["code_edit_decode_speedup"] = next(row[4] for row in rows if row[0] == "(c) code edit")
    if "(d) group of 8" in results:
        g = results["(d) group of 8"]
        targets["group_vs_per_request"] = ratio(g["group"].tps, g["per-request"].tps)
    if batch_rows:
        targets["min_batch_speedup"] = min(r[3] for r in batch_rows)
    if "(a) chat" in results:
        targets["chat_speedup"] = ratio(results["(a) chat"]["auto"].tps, results["(a) chat"]["off"].tps)
    for row in peer_rows:
        targets[f"{row[0]} x llama.cpp"] = row[4]
    notes.append("targets: " + ", ".join(f"{k} = {v:.2f}" for k, v in targets.items())
                 + "  (want chat_speedup >= 1.4, code_edit_speedup >= 2.0, group_vs_per_request >= 1.2, "
                   "min_batch_speedup >= 0.97; against llama.cpp plain >= 1.1 on chat, >= 1.5 on code editing)")
    notes.append(f"total bench time {time.perf_counter() - t_start:.0f} s")
    for n in notes:
        print(n)
    payload = {"bench": "speculation", "args": vars(args), "machine": machine_info(args.threads),
               "results": results, "targets": targets, "notes": notes}
    bars = {}
    speed = {row[0]: row[3] for row in rows}
    speed.update({f"(d) {row[0]}": row[2] for row in group_rows if row[0] != "off"})
    if speed:
        bars["speedup vs off (workloads)"] = speed
    if batch_rows:
        bars["speedup vs off (batch size)"] = {f"batch {r[0]}": r[3] for r in batch_rows}
    jpath, ppath = write_results(args.name, payload, bars or None, ylabel="speedup (x)")
    print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
