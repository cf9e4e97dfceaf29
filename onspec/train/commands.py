"""``onspec warmup`` (day-1 warm start) and ``onspec export-speculator`` (a version in the EAGLE-3 layout).

warmup: the procedure of ``warmup.py`` (the model answers a generic prompt set, the drafter trains on the
traces offline); the result is published as a version in the versions directory and marked promoted, so
``onspec serve --train online`` resumes from it (``--speculator <that version's directory>`` works too: it
is an EAGLE-3 checkpoint). ``--drafter parallel`` warms up the parallel drafter in its own lineage
(``<versions>/parallel``, train/heads.py), which ``--train-drafter parallel`` and ``--speculation parallel``
read.

export-speculator: copies a version (default: the latest promoted, else the first one; with no versions
at all, a fresh day-0 drafter for the model) to ``--out`` as ``config.json`` + ``model.safetensors`` (+ the
manifest), ready for SGLang / vLLM EAGLE-3 loaders. With ``--parallel DEPTHS`` it writes that head as a
parallel drafter instead (vLLM's P-EAGLE layout, speculation/parallel_checkpoint.py; ``load_parallel`` reads it);
with ``--drafter parallel`` it copies a version of the parallel drafter's own lineage (already in that layout).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..config import TrainerConfig


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--model", default="default", help="'default', a model directory, a .gguf file or a hub id")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--speculator-dir", default="", help="versions directory ('' = the model's default)")
    if name == "export-speculator":
        p.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
        p.add_argument("--version", type=int, default=None, help="version number (default: latest promoted)")
        p.add_argument("--parallel", type=int, default=0, metavar="DEPTHS",
                       help="write a parallel drafter (P-EAGLE layout: the EAGLE-3 tensors plus mask_hidden and "
                            "the parallel-drafting fields, for vLLM's parallel_drafting) drafting DEPTHS tokens "
                            "per forward, its layers copied from the version and its mask vector fresh; 0: the "
                            "version as it is")
        p.add_argument("--drafter", default="eagle", choices=["eagle", "parallel"],
                       help="which lineage to export from: the sequential head's, or the parallel drafter's "
                            "(<speculator-dir>/parallel, learned online or warmed up; written as it is)")
    if name == "warmup":
        p.add_argument("--prompts", type=int, default=100, help="how many warm-up prompts to answer (max 100)")
        p.add_argument("--samples", type=int, default=1,
                       help="answers per training prompt: the greedy one, then sampled ones at --temperature "
                            "(more data: 4 gave a better head than 1, see docs/results.md; generation and training "
                            "time grow with it)")
        p.add_argument("--temperature", type=float, default=0.8, help="temperature of the extra --samples answers")
        p.add_argument("--corpus", type=int, default=0, metavar="N",
                       help="first pretrain on N reference answers written by other models (prefill only: "
                            "cheap data; 0: none; 1060 have a short enough question). See docs/results.md for what it gains")
        p.add_argument("--corpus-epochs", type=float, default=1.0, help="passes over the --corpus positions")
        p.add_argument("--max-tokens", type=int, default=192)
        p.add_argument("--concurrency", type=int, default=8, help="sequences decoded at once")
        p.add_argument("--epochs", type=float, default=6.0, help="passes over the recorded positions")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--fresh", action="store_true", help="start from a random drafter, not the latest version")
        p.add_argument("--drafter", default="eagle", choices=["eagle", "parallel"],
                       help="which drafter to warm up: the sequential EAGLE-3 head, or the parallel drafter (its "
                            "versions in <speculator-dir>/parallel, what --train-drafter parallel resumes)")
        p.add_argument("--depths", type=int, default=TrainerConfig.parallel_depths,
                       help="depths per forward of a fresh parallel drafter (--drafter parallel)")
        p.add_argument("--no-promote", action="store_true", help="publish without making it the serving version")
        p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    return {"warmup": _warmup, "export-speculator": _export}[args.command](args)


def _root(args, loaded=None) -> Path:
    if args.speculator_dir:
        return Path(args.speculator_dir)
    from .online import default_versions_dir

    if loaded is None:
        from ..models.loader import load_model

        loaded = load_model(args.model, args.dtype)
    return default_versions_dir(loaded)


def _export(args: argparse.Namespace) -> int:
    from .publish import VersionError, export_version, list_versions

    out = Path(args.out)
    loaded = None
    root = Path(args.speculator_dir) if args.speculator_dir else None
    if root is None:
        from ..models.loader import load_model

        loaded = load_model(args.model, args.dtype)
        root = _root(args, loaded)
    if args.parallel:
        if args.drafter == "parallel":
            raise ValueError("parallel: --drafter parallel exports a parallel drafter as it is; --parallel DEPTHS "
                             "makes one from the sequential head")
        return _export_parallel(args, root, loaded)
    if args.drafter == "parallel":
        from .heads import head_for

        root = head_for("parallel").root(root)
        if not list_versions(root):
            raise ValueError(f"drafter: no parallel drafter versions in {root} (--parallel DEPTHS makes one from "
                             "the sequential head)")
    if list_versions(root):
        try:
            version, path = export_version(root, out, args.version)
        except VersionError as exc:
            raise ValueError(str(exc)) from None
        print(f"exported version {version} from {root} to {path}")
        return 0
    if args.version is not None:
        raise ValueError(f"version: no versions in {root}")
    # Nothing trained yet: the initial (day-0) drafter for this model.
    from ..speculation.eagle import EagleConfig, init_drafter, save_eagle3

    if loaded is None:
        from ..models.loader import load_model

        loaded = load_model(args.model, args.dtype)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} exists and is not empty")
    save_eagle3(out, init_drafter(loaded, EagleConfig.for_target(loaded.arch)))
    print(f"no versions in {root}: exported a fresh day-0 drafter to {out}")
    return 0


def _export_parallel(args: argparse.Namespace, root: Path, loaded) -> int:
    """``export-speculator --parallel DEPTHS``: the chosen version's (or a day-0) EAGLE-3 head as a parallel
    drafter (speculation/parallel_drafter.py ``from_eagle``) in the layout of speculation/parallel_checkpoint.py."""
    import tempfile

    import torch

    from ..speculation.eagle import EagleConfig, init_drafter, load_eagle3
    from ..speculation.parallel_checkpoint import save_parallel
    from ..speculation.parallel_drafter import ParallelConfig, from_eagle
    from .publish import VersionError, export_version, list_versions

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} exists and is not empty")
    parallel = ParallelConfig(depths=args.parallel)
    if loaded is None:
        from ..models.loader import load_model

        loaded = load_model(args.model, args.dtype)
    if list_versions(root):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                version, path = export_version(root, Path(tmp) / "v", args.version)   # chosen and verified
            except VersionError as exc:
                raise ValueError(str(exc)) from None
            head = load_eagle3(path, loaded, torch.float32)
        source = f"version {version} from {root}"
    elif args.version is not None:
        raise ValueError(f"version: no versions in {root}")
    else:
        head = init_drafter(loaded, EagleConfig.for_target(loaded.arch))
        source = f"a fresh day-0 head (no versions in {root})"
    save_parallel(out, from_eagle(head, parallel))
    print(f"exported a parallel drafter ({parallel.depths} depths per forward) built on {source} to {out}")
    return 0


def _warmup(args: argparse.Namespace) -> int:
    from ..config import EngineConfig, SpecConfig
    from ..engine.engine import Engine
    from .heads import Served, attach_head, head_for
    from .publish import Manifest, VersionState, latest_promoted, next_version, publish_version
    from .swap import CandidateError, load_candidate
    from .warmup import WarmupSettings, warm_start

    settings = WarmupSettings(prompts=args.prompts, samples=args.samples, temperature=args.temperature,
                              max_tokens=args.max_tokens, concurrency=args.concurrency, epochs=args.epochs,
                              seed=args.seed, corpus=args.corpus, corpus_epochs=args.corpus_epochs)
    spec = SpecConfig(mode="suffix")
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=args.concurrency,
                                 num_threads=args.threads, spec=spec, seed=args.seed))
    loaded = engine.loaded
    head = head_for(args.drafter)
    root = head.root(_root(args, loaded))
    cfg = TrainerConfig(versions_dir=str(root), seed=args.seed, drafter=args.drafter, parallel_depths=args.depths)
    parent = None if args.fresh else latest_promoted(root)
    drafter = None
    if parent is not None:
        try:
            drafter, _ = load_candidate(root, parent, loaded)
        except CandidateError as exc:
            print(f"warning: cannot continue from version {parent} ({exc}); starting fresh", file=sys.stderr)
            parent = None
    if drafter is None:
        drafter = head.day0(loaded, cfg)
    # Suffix drafting makes the answers cheap; the drafter's proposer makes the engine record aux states.
    attach_head(engine, spec, head, Served(drafter))
    ws = warm_start(engine, drafter, cfg, settings)
    rec, res = ws.recording, ws.training
    trainer = res.trainer
    corpus_note = ""
    if ws.corpus is not None:
        corpus_note = f", after pretraining on {ws.corpus.prompts} reference answers"
        print(f"read {ws.corpus.prompts} reference answers ({ws.corpus.positions} positions) in "
              f"{ws.corpus.seconds:.0f} s; pretrained {ws.corpus_training.steps} steps in "
              f"{ws.corpus_training.seconds:.0f} s")

    version = next_version(root)
    path = publish_version(root, trainer.drafter, Manifest(
        version=version, parent=parent, kind="warmup", step=trainer.steps, samples=trainer.samples,
        heldout_acceptance=res.after, heldout_positions=res.heldout_positions, loss=trainer.last.get("loss"),
        base_model=str(loaded.name), note=f"onspec warmup: {rec.prompts} generic prompts, {rec.answers} answers{corpus_note}"),
        trainer.opt.state_dict())
    if not args.no_promote:
        state = VersionState.load(root)
        state.promoted.append(version)
        state.current = version
        state.decisions.append({"t": time.time(), "kind": "warmup", "version": version,
                                "detail": f"held-out acceptance {res.before:.3f} -> {res.after:.3f}",
                                "heldout_before": res.before, "heldout_after": res.after})
        state.save(root)
    print(f"answered {rec.prompts} prompts ({rec.answers} answers, {rec.positions} positions, {rec.branches} "
          f"rejected nodes) in {rec.seconds:.0f} s; trained {res.steps} steps in {res.seconds:.0f} s")
    print(f"held-out simulated acceptance length {res.before:.3f} -> {res.after:.3f} over "
          f"{res.heldout_positions} positions")
    print(f"published version {version}: {path}" + ("" if args.no_promote else " (promoted: `onspec serve "
          "--train online` resumes from it)"))
    return 0
