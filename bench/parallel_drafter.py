"""The parallel drafter (P-EAGLE, arXiv 2602.01469) against the sequential EAGLE-3 head: what a proposal
costs next to a plain target step, and how many drafted tokens each gets accepted, depth by depth.

(a) Warm start: the target answers ``--train-prompts`` generic prompts (``onspec warmup``'s list) greedily;
    one target pass per answer records its aux and final hidden states (what verification records), and
    both drafters, from the same day-0 initialisation and draft vocabulary, train ``--steps`` optimizer
    steps on the same soft labels (train/objective.py; the parallel drafter through
    train/parallel_objective.py).
(b) Acceptance per depth: greedy chain drafting of ``--depths`` tokens at every generated position of the
    answers to ``--heldout-prompts`` other prompts; the share of roots whose first d drafted tokens were
    all accepted (``objective.accepted_by_depth``), d = 1 .. depths, and the expected accepted drafts.
(c) Proposal cost, at batch 1 and 8 (``--batches``): the engine decodes the held-out prompts with
    speculation off (plain target steps), with the parallel strategy and with the sequential one (both
    forced to draft every step, ``--budget`` nodes), interleaved over ``--repeats``; per decoding step the
    plain step's time and each proposal's time (``propose``: all its drafter forwards, top-k and tree
    building). Medians over the steps of all repeats; ratios are within this run.

    python bench/parallel_drafter.py                           # default model, bf16, 2 threads
    python bench/parallel_drafter.py --depths 5 --steps 80 --repeats 3 --train-prompts 24
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (busy_warning, chat_texts, machine_info, median, print_table, set_threads,  # noqa: E402
                    write_results)


def answers(lm, args, prompts: list[list[int]]) -> list[list[int]]:
    """The target's greedy answers (plain decoding), prompt included."""
    from onspec.config import EngineConfig, SpecConfig
    from onspec.engine.engine import Engine
    from onspec.engine.sampler import SamplingParams

    eng = Engine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads, max_num_seqs=8,
                              max_model_len=1024, spec=SpecConfig(mode="off")), loaded=lm)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    while eng.has_unfinished():
        eng.step()
    return [list(p) + list(eng.requests[str(i)][0].output_ids) for i, p in enumerate(prompts)]


def traces(lm, seqs: list[list[int]], prompt_lens: list[int], aux_layers: tuple[int, ...]) -> list:
    """One target pass per sequence: what verification would have recorded (``TraceChunk``)."""
    import torch

    from onspec.engine.kv_cache import KVCache
    from onspec.engine.runner import ModelRunner, RowSpec
    from onspec.train.traces import TraceChunk

    out = []
    for i, (ids, p) in enumerate(zip(seqs, prompt_lens)):
        runner = ModelRunner(lm.model, KVCache(lm.arch, 1, len(ids) + 4, lm.model.embed_tokens.weight.dtype))
        runner.aux_layers = aux_layers
        with torch.inference_mode():
            step = runner.run([RowSpec(0, 0, ids, logits_from=0)], want_aux=True)
        L = len(ids)
        out.append(TraceChunk(key=str(i), start=0, tokens=torch.tensor(ids), aux=step.aux[0].float().clone(),
                              hidden=step.hidden[0].float().clone(), has_hidden=torch.ones(L, dtype=torch.bool),
                              generated=torch.arange(L) >= p))
    return out


def warm_start(drafter, samples: list, cfg, steps: int, batch: int, seed: int) -> list[float]:
    """``steps`` optimizer steps on random batches of ``samples``; the losses."""
    import torch

    from onspec.speculation.parallel_drafter import ParallelDrafter
    from onspec.train.objective import clip, collate, make_optimizer, objective, trainable_parameters
    from onspec.train.parallel_objective import train_step

    drafter.train().requires_grad_(True)
    params = trainable_parameters(drafter, cfg.train_head)
    opt = make_optimizer(params, cfg)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        b = collate(rng.sample(samples, min(batch, len(samples))))
        if isinstance(drafter, ParallelDrafter):
            losses.append(train_step(drafter, b, opt, params, cfg, gen).loss)
            continue
        loss, parts = objective(drafter, b, cfg, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip(params, cfg.grad_clip)
        opt.step()
        losses.append(parts["loss"])
    drafter.eval().requires_grad_(False)
    return losses


def force_drafting(spec) -> None:
    """Every step drafts and verifies the whole proposal (as the tests' ``force_all_drafts``)."""
    from onspec.speculation.controller import Plan

    spec.controller.plan = lambda trees, base, nd, remaining=None: Plan(
        trees, sum(t.num_draft for t in trees.values()), 0.0, 0.0)
    spec.controller.worth_drafting = lambda *a, **k: True
    spec.policy.price = lambda *a, **k: None


def decode_run(lm, args, prompts: list[list[int]], mode: str, drafter) -> dict:
    """Decode ``prompts`` (all at once) in ``mode``; per decoding step (no prefill in it) the step's time and
    the proposal's time; the proposer's forwards per proposal and accepted drafts per row-step."""
    from onspec.config import EngineConfig, SpecConfig
    from onspec.engine.engine import Engine
    from onspec.engine.sampler import SamplingParams
    from onspec.speculation.eagle import attach_learned
    from onspec.speculation.parallel_proposer import attach_parallel

    spec_cfg = SpecConfig(mode=mode, max_draft_tokens=args.budget, profile_at_start=False, objective="throughput")
    eng = Engine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                              max_num_seqs=len(prompts), max_model_len=1024, spec=spec_cfg), loaded=lm)
    prop = None
    if mode == "parallel":
        spec = attach_parallel(eng, spec_cfg, drafter, topk=args.topk)
    elif mode == "learned":
        spec = attach_learned(eng, spec_cfg, drafter, topk=args.topk, max_depth=args.depths)
    if mode != "off":
        force_drafting(spec)
        prop = spec.proposers[mode]
    propose_s: list[float] = []
    if prop is not None:
        inner = prop.propose

        def timed(seqs, budgets):
            t0 = time.perf_counter()
            out = inner(seqs, budgets)
            propose_s.append(time.perf_counter() - t0)
            return out

        prop.propose = timed
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    step_s = []
    while eng.has_unfinished():
        prefill = eng.counters.prefill_seconds
        t0 = time.perf_counter()
        eng.step()
        dt = time.perf_counter() - t0
        if eng.counters.prefill_seconds == prefill:
            step_s.append(dt)
    c = eng.counters
    return {"step_s": step_s, "propose_s": propose_s,
            "forwards_per_proposal": prop.stats.forwards / max(1, prop.stats.proposals) if prop else 0.0,
            "accepted_per_row_step": c.accepted / max(1, c.decode_steps_seq)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", type=int, default=4, help="draft depths (parallel: per forward; sequential: max)")
    ap.add_argument("--topk", type=int, default=4, help="children per tree node")
    ap.add_argument("--budget", type=int, default=8, help="draft nodes per row and step")
    ap.add_argument("--train-prompts", type=int, default=12)
    ap.add_argument("--heldout-prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64, help="answer length of the warm-start prompts")
    ap.add_argument("--steps", type=int, default=30, help="warm-start optimizer steps per drafter")
    ap.add_argument("--batch", type=int, default=4, help="answers per optimizer step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8],
                    help="decoding batch sizes for the cost (none: acceptance only)")
    ap.add_argument("--tokens", type=int, default=24, help="decoded tokens per row in each cost run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="parallel_drafter")
    args = ap.parse_args(argv)
    set_threads(args.threads)

    from onspec.config import TrainerConfig
    from onspec.models.loader import load_model
    from onspec.speculation.eagle import EagleConfig, day0_token_counts, init_drafter
    from onspec.speculation.parallel_drafter import ParallelConfig, from_eagle
    from onspec.train.objective import SoftTargets, accepted_by_depth, collate
    from onspec.train.warmup import warmup_prompts

    notes = [w for w in [busy_warning(args.threads)] if w]
    lm = load_model(args.model, args.dtype)
    tok = lm.tokenizer
    texts = warmup_prompts(args.train_prompts + args.heldout_prompts)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in chat_texts(tok, texts)]
    t0 = time.perf_counter()
    seqs = answers(lm, args, prompts)
    ecfg = EagleConfig.for_target(lm.arch)
    chunks = traces(lm, seqs, [len(p) for p in prompts], ecfg.aux_layers)
    record_s = time.perf_counter() - t0
    train_chunks, held_chunks = chunks[:args.train_prompts], chunks[args.train_prompts:]
    counts = day0_token_counts(lm.arch.vocab_size, seen_token_ids=[t for s in seqs[:args.train_prompts] for t in s],
                               always_include=tuple(lm.eos_token_ids))
    sequential = init_drafter(lm, ecfg, seed=args.seed, token_counts=counts)
    parallel = from_eagle(init_drafter(lm, ecfg, seed=args.seed, token_counts=counts),
                          ParallelConfig(depths=args.depths), seed=args.seed)
    cfg = TrainerConfig(lr=args.lr, ttt_steps=args.depths, seed=args.seed)
    soft = SoftTargets(lm.model.lm_head.weight, sequential.draft_ids, cfg.target_topk)
    samples = [soft.prepare(c, cfg.prompt_weight) for c in train_chunks]
    held = collate([soft.prepare(c, cfg.prompt_weight, labels=False) for c in held_chunks], bucket=False)
    results: dict = {"record_seconds": record_s, "positions": sum(len(c) for c in train_chunks)}
    for name, d in (("sequential", sequential), ("parallel", parallel)):
        t0 = time.perf_counter()
        losses = warm_start(d, samples, cfg, args.steps, args.batch, args.seed)
        by_depth, roots = accepted_by_depth(d, held, args.depths)
        results[name] = {"train_seconds": time.perf_counter() - t0, "loss_first": losses[0], "loss_last": losses[-1],
                         "accepted_by_depth": [n / max(1, roots) for n in by_depth], "roots": roots,
                         "expected_accepted": sum(by_depth) / max(1, roots)}
        print(f"{name}: warm start {results[name]['train_seconds']:.0f} s, loss {losses[0]:.3f} -> "
              f"{losses[-1]:.3f}", file=sys.stderr, flush=True)

    rows = [[f"depth {d + 1}: all first {d + 1} accepted"] +
            [f"{results[n]['accepted_by_depth'][d]:.3f}" for n in ("sequential", "parallel")]
            for d in range(args.depths)]
    rows.append(["expected accepted drafts (chain)"] +
                [f"{results[n]['expected_accepted']:.3f}" for n in ("sequential", "parallel")])
    print_table(f"Held-out greedy chain acceptance after {args.steps} warm-start steps ({results['sequential']['roots']} "
                f"roots)", ["", "sequential EAGLE-3", "parallel (P-EAGLE)"], rows)

    drafters = {"off": None, "parallel": parallel.to_dtype(lm.model.embed_tokens.weight.dtype),
                "learned": sequential.to_dtype(lm.model.embed_tokens.weight.dtype)}
    held_prompts = prompts[args.train_prompts:]
    cost: dict = {}
    for B in args.batches:
        batch_prompts = (held_prompts * (B // len(held_prompts) + 1))[:B]
        runs = {m: [] for m in drafters}
        for r in range(args.repeats):
            order = list(drafters) if r % 2 == 0 else list(drafters)[::-1]
            for mode in order:
                runs[mode].append(decode_run(lm, args, batch_prompts, mode, drafters[mode]))
                print(f"  batch {B} repeat {r + 1}/{args.repeats}: {mode} done", file=sys.stderr, flush=True)
        plain = median([s for run in runs["off"] for s in run["step_s"]])
        cost[B] = {"plain_step_s": plain}
        for mode in ("parallel", "learned"):
            prop = median([s for run in runs[mode] for s in run["propose_s"]])
            cost[B][mode] = {"propose_s": prop, "ratio_to_plain_step": prop / plain,
                             "forwards_per_proposal": median([run["forwards_per_proposal"] for run in runs[mode]]),
                             "accepted_per_row_step": median([run["accepted_per_row_step"] for run in runs[mode]]),
                             "step_s": median([s for run in runs[mode] for s in run["step_s"]])}
    results["cost"] = cost
    payload = {"machine": machine_info(args.threads), "args": vars(args), "results": results}
    if not cost:
        print(f"results: {write_results(args.name, payload)[0]}")
        return 0
    rows = []
    for B, c in cost.items():
        for mode, label in (("parallel", "parallel (P-EAGLE)"), ("learned", "sequential EAGLE-3")):
            m = c[mode]
            rows.append([B, label, f"{1e3 * c['plain_step_s']:.1f}", f"{1e3 * m['propose_s']:.2f}",
                         f"{m['ratio_to_plain_step']:.3f}", f"{m['forwards_per_proposal']:.2f}",
                         f"{m['accepted_per_row_step']:.2f}"])
    print_table(f"Proposal cost, {args.model} {args.dtype}, {args.threads} threads, depth {args.depths}, budget "
                f"{args.budget}", ["batch", "drafter", "plain step ms", "proposal ms", "proposal / step",
                                   "forwards / proposal", "accepted / row-step"], rows, notes)
    jpath, _ = write_results(args.name, payload)
    print(f"results: {jpath}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
