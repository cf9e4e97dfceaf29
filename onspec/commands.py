"""The engine's own subcommands: ``generate``, ``chat`` and ``bench`` (a quick speed check)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import SPECULATION_MODES


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default', a model directory, a .gguf file or a hub id")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--speculation", default="auto", choices=SPECULATION_MODES,
                   help="learned/hybrid/parallel need a drafter: --speculator, or a version from `onspec warmup`")
    p.add_argument("--speculator", default="", metavar="PATH", help="a drafter checkpoint directory: EAGLE-3 "
                   "(learned/hybrid) or a parallel drafter from `export-speculator --parallel` (default: the "
                   "latest promoted version of the mode's kind)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, -2..2")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, -2..2")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="vLLM/HF repetition penalty, > 0 (1: off)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit (repeatable)")
    p.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop before this many tokens")
    g = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="SCHEMA", help="JSON output following this JSON schema "
                   "(JSON text, or @FILE)")
    g.add_argument("--json", action="store_true", help="a JSON object")
    g.add_argument("--regex", help="output matching this regex")
    g.add_argument("--choice", action="append", metavar="TEXT", help="exactly one of these strings (repeatable)")
    g.add_argument("--grammar", metavar="EBNF", help="output in this EBNF grammar (xgrammar's; text or @FILE)")


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    add_model_arguments(p)
    if name == "generate":
        p.add_argument("prompt", help="prompt text ('-' reads standard input)")
        p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
        p.add_argument("--stats", action="store_true", help="print speculation statistics to stderr")
    if name in ("generate", "chat"):
        add_sampling_arguments(p)
    if name == "bench":
        p.add_argument("--max-tokens", type=int, default=128)


def _llm(args: argparse.Namespace):
    from . import LLM

    return LLM(model=args.model, dtype=args.dtype, speculation=args.speculation, num_threads=args.threads,
               speculator=args.speculator)


def _params(args: argparse.Namespace):
    from .engine.sampler import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                          logit_bias=_logit_bias(args.logit_bias), min_tokens=args.min_tokens,
                          grammar=_grammar(args))


def _text_or_file(value: str, field: str) -> str:
    """A flag's value, or the contents of the file it names as ``@FILE``."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except OSError as exc:
        raise ValueError(f"{field}: cannot read {value[1:]!r}: {exc.strerror}") from None


def _grammar(args: argparse.Namespace):
    """The structured-output flags -> a GrammarSpec, or None."""
    from .engine.grammar import GrammarSpec

    if args.json_schema is not None:
        text = _text_or_file(args.json_schema, "json_schema")
        try:
            schema = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"json_schema: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return GrammarSpec.json_schema(schema, "json_schema")
    if args.json:
        return GrammarSpec.json_schema(None, "json")
    if args.regex is not None:
        return GrammarSpec("regex", args.regex, "regex")
    if args.choice:
        return GrammarSpec.choice(args.choice, "choice")
    if args.grammar is not None:
        return GrammarSpec("ebnf", _text_or_file(args.grammar, "grammar"), "grammar")
    return None


def _logit_bias(items: list[str]) -> dict[str, float]:
    """``--logit-bias ID=BIAS`` flags -> {ID: BIAS} (SamplingParams checks the ids and the range)."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError(item)
            out[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"logit_bias: expected ID=BIAS, got {item!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    return {"generate": _generate, "chat": _chat, "bench": _bench}[args.command](args)


def _generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ValueError("prompt: must not be empty")
    params = _params(args)
    llm = _llm(args)
    text = prompt if args.raw else llm.apply_chat_template([{"role": "user", "content": prompt}])
    last = None
    for delta in llm.stream(text, params):
        sys.stdout.write(delta.new_text)
        sys.stdout.flush()
        last = delta
    sys.stdout.write("\n")
    if args.stats and last is not None:
        c = llm.engine.counters
        steps = max(1, c.decode_steps_seq)
        print(f"[{c.generated_tokens} tokens, acceptance length {(c.accepted + steps) / steps:.2f}, "
              f"drafted {c.drafted}, accepted {c.accepted}]", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    params = _params(args)
    llm = _llm(args)
    history: list[dict[str, str]] = []
    print("onspec chat: type a message; /reset clears the conversation, /quit or Ctrl-D leaves.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        reply = []
        for delta in llm.stream(llm.apply_chat_template(history), params):
            sys.stdout.write(delta.new_text)
            sys.stdout.flush()
            reply.append(delta.new_text)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def _bench(args: argparse.Namespace) -> int:
    from . import LLM, SamplingParams

    prompts = [
        "Rewrite this function with type hints and a docstring:\n\ndef area(w, h):\n    return w * h\n",
        "List the planets of the solar system, one per line.",
        "Explain what a hash map is in two sentences.",
    ]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    rows = []
    for mode in ("off", args.speculation if args.speculation != "off" else "auto"):
        llm = LLM(model=args.model, dtype=args.dtype, speculation=mode, num_threads=args.threads,
                  speculator=args.speculator if mode != "off" else "")
        texts = [llm.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
        llm.generate(texts[:1], SamplingParams(temperature=0, max_tokens=8))  # warm up
        t0 = time.perf_counter()
        outs = [llm.generate(t, params)[0] for t in texts]
        dt = time.perf_counter() - t0
        ntok = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append((mode, ntok / dt))
    base = rows[0][1]
    for mode, tps in rows:
        print(f"{mode:>8}: {tps:7.1f} tok/s  {tps / base:5.2f}x")
    return 0
