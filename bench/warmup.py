"""How good a day-1 drafter does the warm start make, and what limits it? Held-out acceptance against data.

Why: on this CPU the learned drafter pays only if it accepts clearly more than the free suffix drafter
(about 1.6-1.7 tokens per verification on chat, bench/online.py). This bench measures what ``onspec
warmup`` (``onspec/train/warmup.py``) gets from more answers to its generic prompts, and how well the head
fits the answers it trained on: a wide gap between the two says the head is data-bound, not
capacity- or optimiser-bound.

How: the engine answers the 100 warm-up prompts once with ``max(--samples)`` answers per training prompt
(the first greedy, the rest sampled at ``--temperature``; held-out prompts get their greedy answer only).
Then, for each ``s`` in ``--samples``, a fresh drafter (same seed) trains for ``--epochs`` passes on the
first ``s`` answers of each training prompt, and is scored by greedy chain acceptance (depth 3, the
gate's figure) on

* the held-out prompts' answers (prompts the head never saw), and
* up to 2000 positions of its training prompts' greedy answers (what it fits).

With ``--corpus N`` the engine first prefills N reference answers by other models (``onspec warmup
--corpus``), one head pretrains on them for ``--corpus-epochs``, and every answer count gets a second row
that starts from a copy of that head: what the cheap prefilled data adds.

    python bench/warmup.py                      # --samples 1,2,4: ~25 minutes on 2 cores
    python bench/warmup.py --samples 1,4 --corpus 1000      # ~35 minutes
    python bench/warmup.py --samples 1 --prompts 24 --max-tokens 64 --epochs 2   # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS_DIR, machine_info, print_table, set_threads, write_results  # noqa: E402

FIT_POSITIONS = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default="1,2,4", help="comma-separated answers per training prompt")
    p.add_argument("--prompts", type=int, default=100, help="warm-up prompts (at most 100)")
    p.add_argument("--max-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.8, help="of the sampled answers")
    p.add_argument("--epochs", type=float, default=6.0, help="passes over the training positions")
    p.add_argument("--corpus", type=int, default=0, help="reference answers to pretrain on (0: no corpus rows)")
    p.add_argument("--corpus-epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="warmup", help="results file stem under bench/results/")
    args = p.parse_args(argv)
    try:
        args.counts = sorted({int(s) for s in args.samples.split(",") if s.strip()})
    except ValueError:
        p.error(f"--samples: expected comma-separated integers, got {args.samples!r}")
    if not args.counts or args.counts[0] < 1:
        p.error("--samples: give at least one count >= 1")
    if not 1 <= args.prompts <= 100 or min(args.max_tokens, args.threads) < 1 or args.epochs <= 0:
        p.error("--prompts must be in [1, 100]; --max-tokens, --threads and --epochs must be positive")
    if args.temperature <= 0:
        p.error("--temperature must be > 0")
    if args.corpus < 0 or args.corpus_epochs <= 0:
        p.error("--corpus must be >= 0 and --corpus-epochs > 0")
    return args


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for corpus, style in ((False, "-"), (True, ":")):
        part = [r for r in rows if bool(r["corpus"]) == corpus]
        if not part:
            continue
        x = [r["train_positions"] for r in part]
        tag = f" + {part[0]['corpus']} reference answers first" if corpus else ""
        ax.plot(x, [r["fit_acceptance"] for r in part], "o" + style, color="#DD8452",
                label=f"its training prompts (greedy){tag}")
        ax.plot(x, [r["heldout_acceptance"] for r in part], "o" + style, color="#4C72B0",
                label=f"held-out prompts{tag}")
        for r in part:
            ax.annotate(f"{r['samples']} ans.", (r["train_positions"], r["heldout_acceptance"]),
                        textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training positions of the model's own answers (log)")
    ax.set_ylabel("simulated acceptance length (chain depth 3)")
    ax.set_title("day-1 drafter: acceptance against warm-up data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    import torch

    from onspec.config import EngineConfig, SpecConfig, TrainerConfig
    from onspec.engine.engine import Engine
    from onspec.speculation.eagle import EagleConfig, attach_learned, init_drafter
    from onspec.train.warmup import (WarmupSettings, pretrain_on_corpus, record_answers, train_offline,
                                     warmup_key_parts)

    t_all = time.perf_counter()
    spec = SpecConfig(mode="suffix")
    engine = Engine(EngineConfig(model="default", dtype="bfloat16", max_num_seqs=8, num_threads=args.threads,
                                 spec=spec, seed=args.seed))
    loaded = engine.loaded
    arch = EagleConfig.for_target(loaded.arch)
    attach_learned(engine, spec, init_drafter(loaded, arch, seed=args.seed).to_dtype(torch.bfloat16))
    cfg = TrainerConfig(seed=args.seed)
    pretrained, corpus_info = None, {}
    if args.corpus:  # before record_answers, which leaves its recorder attached
        crec, pre = pretrain_on_corpus(engine, init_drafter(loaded, arch, seed=args.seed), cfg, WarmupSettings(
            corpus=args.corpus, corpus_epochs=args.corpus_epochs, seed=args.seed))
        pretrained = {k: v.clone() for k, v in pre.trainer.drafter.state_dict().items()}
        corpus_info = {"texts": crec.prompts, "positions": crec.positions, "read_seconds": crec.seconds,
                       "steps": pre.steps, "train_seconds": pre.seconds}
        print(f"corpus: {crec.prompts} reference answers ({crec.positions} positions) read in {crec.seconds:.0f} s, "
              f"pretrained {pre.steps} steps in {pre.seconds:.0f} s", flush=True)
        del pre
    rec = record_answers(engine, cfg, WarmupSettings(prompts=args.prompts, samples=args.counts[-1],
                                                     temperature=args.temperature, max_tokens=args.max_tokens,
                                                     seed=args.seed))
    print(f"recorded {rec.answers} answers ({rec.positions} positions) in {rec.seconds:.0f} s", flush=True)
    del engine

    rows = []
    for s, corpus in [(s, c) for s in args.counts for c in ([False, True] if pretrained else [False])]:
        chunks = [c for c in rec.chunks if c.heldout or warmup_key_parts(c.key)[1] < s]
        drafter = init_drafter(loaded, arch, seed=args.seed)
        if corpus:
            drafter.load_state_dict(pretrained)
        res = train_offline(drafter, loaded, cfg, chunks, args.epochs, args.seed)
        tr = res.trainer
        greedy = [x for _, x in tr.buffer.items if warmup_key_parts(x.key)[1] == 0]
        fit, total = [], 0
        for x in greedy:
            if total >= FIT_POSITIONS:
                break
            fit.append(x)
            total += len(x)
        fit_acc, fit_pos = tr.evaluate(fit)
        rows.append({"samples": s, "corpus": corpus_info["texts"] if corpus else 0, "train_positions": tr.buffer.positions, "steps": res.steps,
                     "train_seconds": res.seconds, "heldout_before": res.before, "heldout_acceptance": res.after,
                     "heldout_positions": res.heldout_positions, "fit_acceptance": fit_acc, "fit_positions": fit_pos})
        print(f"  {'corpus + ' if corpus else ''}{s} answers/prompt: {tr.buffer.positions} positions, {res.steps} steps in {res.seconds:.0f} s: "
              f"held-out {res.after:.3f}, training prompts {fit_acc:.3f}", flush=True)
        del res, tr, greedy, fit, drafter   # the next trainer gets its own buffers

    print_table("warm-start drafter against warm-up data", ["answers/prompt", "corpus first", "train positions",
                                                            "steps", "held-out acc.", "training-prompt acc."],
                [[r["samples"], r["corpus"], r["train_positions"], r["steps"], r["heldout_acceptance"],
                  r["fit_acceptance"]] for r in rows],
                notes=[f"{args.prompts} warm-up prompts, {args.max_tokens} tokens, sampled answers at temperature "
                       f"{args.temperature}, {args.epochs:g} epochs; acceptance = greedy chain of depth 3 "
                       "(1 + accepted drafts), the gate's held-out figure"])
    payload = {"machine": machine_info(args.threads), "config": vars(args), "recording": {
        "answers": rec.answers, "positions": rec.positions, "seconds": rec.seconds}, "corpus": corpus_info,
        "rows": rows,
        "seconds": time.perf_counter() - t_all}
    jpath, _ = write_results(args.name, payload)
    ppath = RESULTS_DIR / f"{args.name}.png"
    plot(rows, ppath)
    print(f"wrote {jpath} and {ppath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
