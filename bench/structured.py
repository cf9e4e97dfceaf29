"""Structured outputs: JSON extraction with a schema, greedy, one request at a time, with speculation off, with
suffix drafting, and with suffix + grammar (jump-forward) drafting; and what the grammar's masks cost.

Workload: ``--prompts`` extraction prompts for each of three schemas (a person, a product, an event; the
texts are made from fixed templates and a fixed seed), the default model's chat template, ``--max-tokens``
tokens at most. Each configuration gets a fresh engine per repeat (the suffix drafter learns from the
repeat's earlier answers, as a server would), the configurations run interleaved, and every figure is a
median over ``--repeats`` repeats of the whole workload.

Reported: tokens per second and the ratio to ``off``; drafted / accepted tokens; the grammar's own time
(walking draft trees, filling masks, masking rows, advancing matchers) per committed token, and as a share
of a decoding step of ``off`` in the same run; whether every answer parses and validates against its schema
and whether every configuration gave the same tokens (lossless).

    python bench/structured.py                     # 20 prompts x 3 schemas, 2 threads, 2 repeats
    python bench/structured.py --prompts 5 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (busy_warning, machine_info, measure_interleaved, print_table, ratio,  # noqa: E402
                    set_threads, write_results)

PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 4}},
    "required": ["name", "age", "city", "hobbies"], "additionalProperties": False}
PRODUCT = {"type": "object", "properties": {
    "product": {"type": "string"}, "price": {"type": "number"}, "currency": {"enum": ["USD", "EUR", "GBP"]},
    "in_stock": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 4}},
    "required": ["product", "price", "currency", "in_stock", "tags"], "additionalProperties": False}
EVENT = {"type": "object", "properties": {
    "title": {"type": "string"}, "day": {"enum": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
                                                  "Saturday", "Sunday"]},
    "location": {"type": "string"}, "attendees": {"type": "array", "items": {"type": "string", "maxLength": 32}, "maxItems": 6}},
    "required": ["title", "day", "location", "attendees"], "additionalProperties": False}

NAMES = ["Alice", "Bob", "Carla", "Deepak", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Luis"]
CITIES = ["Paris", "Berlin", "Lisbon", "Osaka", "Toronto", "Nairobi", "Lima", "Oslo", "Seoul", "Dublin"]
HOBBIES = ["chess", "climbing", "painting", "cycling", "baking", "jazz", "gardening", "running", "poetry"]
PRODUCTS = ["wireless headphones", "espresso machine", "trail backpack", "desk lamp", "mechanical keyboard",
            "yoga mat", "electric kettle", "rain jacket", "smart watch", "cast iron pan"]
EVENTS = ["team offsite", "book club", "product launch", "charity run", "board meeting", "hackathon",
          "wine tasting", "piano recital"]
DAYS = EVENT["properties"]["day"]["enum"]


def workload(n: int, seed: int = 0) -> list[tuple[str, dict, str]]:
    """(schema name, schema, text) for n texts per schema, made from fixed templates."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, city = rng.choice(NAMES), rng.choice(CITIES)
        hobbies = rng.sample(HOBBIES, 2)
        out.append(("person", PERSON, f"{name} is {rng.randint(19, 80)} years old, lives in {city} and enjoys "
                                      f"{hobbies[0]} and {hobbies[1]}."))
    for _ in range(n):
        product, cur = rng.choice(PRODUCTS), rng.choice(["USD", "EUR", "GBP"])
        stock = rng.choice(["is in stock", "is sold out"])
        out.append(("product", PRODUCT, f"The {product} costs {rng.randint(10, 400)}.{rng.randint(0, 99):02d} "
                                        f"{cur} and {stock}; it is tagged {rng.choice(HOBBIES)} and gift."))
    for _ in range(n):
        event, day, city = rng.choice(EVENTS), rng.choice(DAYS), rng.choice(CITIES)
        people = rng.sample(NAMES, 3)
        out.append(("event", EVENT, f"The {event} is on {day} in {city}; {', '.join(people[:2])} and {people[2]} "
                                    f"will attend."))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=20, help="prompts per schema")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default="structured")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.repeats < 1 or args.max_tokens < 1:
        ap.error("--prompts, --repeats and --max-tokens must be >= 1")

    set_threads(args.threads)
    import jsonschema

    from onspec import LLM, SamplingParams
    from onspec.config import EngineConfig, SpecConfig
    from onspec.engine.engine import Engine
    from onspec.engine.grammar import GrammarSpec
    from onspec.models.loader import load_model
    from onspec.speculation.controller import attach_speculation

    loaded = load_model(args.model, dtype="bfloat16")
    items = workload(args.prompts)
    prompts = [loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Extract the {kind} as JSON.\n{text}"}], tokenize=False,
        add_generation_prompt=True) for kind, _, text in items]
    params = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens, grammar=GrammarSpec.json_schema(schema))
              for _, schema, _ in items]
    configs = {"off": SpecConfig(mode="off"), "suffix": SpecConfig(mode="suffix", grammar_drafts=False),
               "suffix+grammar": SpecConfig(mode="suffix", grammar_drafts=True)}
    outputs: dict[str, list[list[int]]] = {}
    valid: dict[str, int] = {}

    def setup(spec: SpecConfig):
        def make() -> Engine:
            eng = Engine(EngineConfig(model=args.model, dtype="bfloat16", num_threads=args.threads, spec=spec),
                         loaded=loaded)
            if spec.mode != "off":
                attach_speculation(eng, spec)
            return eng
        return make

    def run(name: str):
        def go(eng: Engine):
            llm = LLM(engine=eng)
            outs = [llm.generate([p], sp)[0].outputs[0] for p, sp in zip(prompts, params)]
            outputs[name] = [o.token_ids for o in outs]
            ok = 0
            for o, (_, schema, _) in zip(outs, items):
                try:
                    jsonschema.validate(json.loads(o.text), schema)
                    ok += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
            valid[name] = ok
            c = eng.counters
            tokens = sum(len(o.token_ids) for o in outs)
            return tokens, {"drafted": c.drafted, "accepted": c.accepted, "steps": c.steps,
                            "forward_seconds": c.forward_seconds, "grammar_seconds": c.grammar_seconds,
                            "generated": c.generated_tokens, "by_strategy": dict(c.by_strategy)}
        return go

    warn = busy_warning(args.threads)
    if warn:
        print(warn, file=sys.stderr)
    res = measure_interleaved({n: (run(n), setup(s)) for n, s in configs.items()}, args.repeats, warmup=0)
    base = res["off"].tps
    off_step = sorted(e["forward_seconds"] / max(1, e["steps"]) for e in res["off"].extras)[len(res["off"].extras) // 2]
    rows, summary = [], {}
    for name, m in res.items():
        ex = m.extras
        mask_per_token = sorted(e["grammar_seconds"] / max(1, e["generated"]) for e in ex)[len(ex) // 2]
        summary[name] = {"tokens_per_second": m.tps, "x_off": ratio(m.tps, base), "spread": m.spread,
                         "drafted": m.extra["drafted"], "accepted": m.extra["accepted"],
                         "mask_ms_per_token": mask_per_token * 1e3,
                         "mask_share_of_off_step": mask_per_token / off_step if off_step else float("nan"),
                         "valid": valid[name], "by_strategy": m.extra["by_strategy"]}
        rows.append([name, m.tps, ratio(m.tps, base), m.extra["drafted"], m.extra["accepted"],
                     mask_per_token * 1e3, 100 * summary[name]["mask_share_of_off_step"],
                     f"{valid[name]}/{len(items)}"])
    same = all(outputs[n] == outputs["off"] for n in outputs)
    print_table(f"JSON extraction, {len(items)} prompts ({args.prompts} x 3 schemas), greedy, one at a time",
                ["config", "tok/s", "x off", "drafted", "accepted", "mask ms/token", "mask % of off step", "valid"],
                rows, [f"same tokens in every configuration: {same}",
                       f"off: {off_step * 1e3:.1f} ms per decoding step (forward)"])
    payload = {"machine": machine_info(args.threads), "args": vars(args), "configs": summary,
               "same_tokens": same, "off_step_ms": off_step * 1e3,
               "measurements": {n: m.to_dict() for n, m in res.items()}}
    jpath, ppath = write_results(args.name, payload, {"tokens / s": {n: m.tps for n, m in res.items()},
                                                      "x off": {n: summary[n]["x_off"] for n in res}})
    print(f"wrote {jpath}" + (f" and {ppath}" if ppath else ""))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
