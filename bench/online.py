"""Online drafter learning benchmark: does a drafter that learns from live traffic make serving faster?

Every figure is a ratio against the same engine with speculation off, on the same prompts in the same
order, measured in this run (default model, bfloat16, 2 threads; the engine is driven in-process, steps
round-robin over the requests in flight, new requests admitted as old ones finish: a closed loop at a
fixed concurrency).

Scenarios
  day0     AlpacaEval instructions (``onspec.data.chat_prompts``) as live traffic, starting from a random
           drafter, per strategy: ``off`` (baseline), ``suffix`` (model-free only), ``learned`` and
           ``hybrid`` (forced, learning online), ``auto`` (the controller chooses; learning online).
           Acceptance length and speedup over ``off`` against requests served and wall time, drafter
           versions marked. ``parallel`` and ``auto-parallel`` learn the parallel drafter instead of the
           sequential head (``--train-drafter parallel``).
  day1     the same from a warm start (``onspec warmup``'s procedure on its generic prompt set, which is
           disjoint from AlpacaEval).
  shift    chat, then code (HumanEval), then math (gsm_symbolic): the online drafter against a copy frozen
           after the chat phase.
  cost     serving throughput with the trainer running (gate closed: the serving drafter never changes)
           against the same drafter with no trainer.

Targets (from the issue): never below 1.0x off; >= 1.3x within the first 100 requests; by the end learned
or hybrid >= 1.2x suffix-only and >= 1.7x off; learning costs <= 10% throughput.

Writes bench/results/online.json and bench/results/online.png (and online-shift.png, online-cost.png).

    python bench/online.py --quick               # a few minutes: small prompt counts, short answers
    python bench/online.py                       # the full run (long: ~1-2 h on a shared 2-core CPU)
    python bench/online.py --scenarios day0 --requests 60 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

import torch  # noqa: E402

from onspec.config import EngineConfig, SpecConfig, TrainerConfig  # noqa: E402
from onspec.engine.engine import Engine  # noqa: E402
from onspec.engine.sampler import SamplingParams  # noqa: E402
from onspec.models.loader import load_model  # noqa: E402
from onspec.data import chat_texts  # noqa: E402


@dataclass
class Req:
    index: int
    phase: str
    tokens: int
    steps: int
    accepted: int
    t_done: float
    version: int | None
    by_strategy: dict


def acceptance_length(reqs) -> float:
    """Tokens committed per target forward over ``reqs``: accepted drafts plus one per step."""
    steps = sum(r.steps for r in reqs)
    return (sum(r.accepted for r in reqs) + steps) / steps if steps else 0.0


@dataclass
class Run:
    name: str
    strategy: str
    concurrency: int
    reqs: list[Req] = field(default_factory=list)
    wall: float = 0.0
    versions: list[tuple[float, int, int]] = field(default_factory=list)   # (t, requests done, version)
    by_strategy: dict = field(default_factory=dict)
    learner: dict = field(default_factory=dict)
    drafting: dict = field(default_factory=dict)   # who was asked for drafts, and the learned drafter's work
    repeat: int = 0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.reqs)

    @property
    def tps(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    @property
    def acceptance(self) -> float:
        return acceptance_length(self.reqs)


# ---- driving an engine --------------------------------------------------------------------------------
def make_engine(loaded, mode: str, threads: int, concurrency: int, attach: bool = True) -> Engine:
    """An engine over the shared model; ``attach=False`` leaves speculation to the online learner, which
    attaches suffix + learned + hybrid with this ``mode``."""
    spec = SpecConfig(mode=mode)
    engine = Engine(EngineConfig(model=str(loaded.path), dtype="bfloat16", num_threads=threads,
                                 max_num_seqs=max(4, concurrency), spec=spec), loaded=loaded)
    if mode != "off" and attach:
        from onspec.speculation.controller import attach_speculation

        attach_speculation(engine, spec)
    return engine


def drive(engine, texts: list[str], phases: list[str], concurrency: int, max_tokens: int, run: Run,
          learner=None, t0: float | None = None, offset: int = 0) -> None:
    """Closed loop: keep ``concurrency`` requests in flight until all ``texts`` are served."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter() if t0 is None else t0
    todo = list(range(len(texts)))
    live: dict[str, int] = {}
    last_version = learner.manager.current if learner is not None else None
    if learner is not None and not run.versions:
        run.versions.append((0.0, 0, last_version))
    while todo or live:
        while todo and len(live) < concurrency:
            i = todo.pop(0)
            rid = f"{run.name}-{offset + i}"
            engine.add_request(rid, texts[i], params)
            live[rid] = i
        engine.step()
        if learner is not None and learner.manager.current != last_version:
            last_version = learner.manager.current
            run.versions.append((time.perf_counter() - t0, len(run.reqs), last_version))
        for rid in [r for r in live if all(s.finished for s in engine.requests[r])]:
            seq = engine.requests[rid][0]
            i = live.pop(rid)
            run.reqs.append(Req(offset + i, phases[i], seq.num_output, seq.stats.steps, seq.stats.accepted,
                                time.perf_counter() - t0, last_version,
                                {k: list(v) for k, v in seq.stats.by_strategy.items()}))
            engine.release_request(rid)
    run.wall = time.perf_counter() - t0


def share_override(args) -> dict:
    """``--busy-share`` as a TrainerConfig override (none: the config's default)."""
    return {} if args.busy_share is None else {"busy_share": args.busy_share}


def start_learner(engine, root: Path, args, **overrides):
    from onspec.train.online import build_online_learning

    cfg = dict(versions_dir=str(root), publish_every_steps=20 if args.quick else 40,
               publish_every_seconds=20.0 if args.quick else 45.0, poll_seconds=0.5, heldout_every=6,
               gate_min_positions=32, batch_positions=512, live_window_steps=300, **share_override(args))
    cfg.update(overrides)
    return build_online_learning(engine, TrainerConfig(**cfg))


def wait_trainer(learner, timeout: float = 180.0) -> None:
    """Let the trainer process start (imports, model load) before traffic is timed."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        learner.poll_now()
        if learner.trainer_info or any(e["kind"] == "trainer-started" for e in learner.events):
            return
        if learner.trainer is not None and not learner.trainer.alive():
            return
        time.sleep(0.5)


def finish_run(run: Run, engine, learner) -> None:
    run.by_strategy = {k: list(v) for k, v in engine.counters.by_strategy.items()}
    spec = engine.spec
    if spec is not None:
        run.drafting = {"rows_asked": dict(spec.policy.rows_asked), "policy": spec.policy.counts.summary(),
                        "decisions": dict(spec.controller.decisions)}
        learned, hybrid = spec.proposers.get("learned"), spec.proposers.get("hybrid")
        if learned is not None:
            run.drafting.update(proposals=learned.stats.proposals, forwards=learned.stats.forwards,
                                depth_stops=learned.depth_stops,
                                depth_ms=round(1e3 * (learned.depth_seconds or 0.0), 3))
        if hybrid is not None:
            run.drafting["hybrid_suffix_only"] = hybrid.suffix_only
    if learner is not None:
        st = learner.status()
        run.learner = {k: st[k] for k in ("version", "promotions", "rejections", "invalid", "rollbacks", "swaps",
                                          "trainer_steps", "samples", "traces")}
        run.learner["gates"] = st["gates"][-20:]
        learner.stop(save=False)


# ---- scenarios ----------------------------------------------------------------------------------------
# Strategies that learn online, and the engine mode of the names that are not modes: auto-suffix is the
# controller with no learned drafter; parallel / auto-parallel learn the parallel drafter (--train-drafter
# parallel) instead of the sequential head.
LEARNING_STRATEGIES = ("learned", "hybrid", "auto", "parallel", "auto-parallel")
STRATEGY_MODES = {"auto-suffix": "auto", "auto-parallel": "auto"}


def scenario_strategies(loaded, texts, args, tag: str, start_dir: Path | None) -> dict[str, Run]:
    """One run per strategy over the same traffic; learning strategies start from ``start_dir``'s latest
    promoted version (a warm start) or from a random drafter."""
    runs: dict[str, Run] = {}
    # Repeats run interleaved (every strategy once, then again), so a slow stretch of this shared machine
    # hits each strategy alike; each repeat's runs are compared with that repeat's "off" run.
    for rep, c, strategy in [(r, c, s) for r in range(args.strategy_repeats) for c in args.concurrency
                             for s in args.strategies]:
        name = f"{tag}-{strategy}-c{c}" + (f"-r{rep}" if rep else "")
        print(f"[{name}] {len(texts)} requests, {args.max_tokens} tokens max", flush=True)
        learning = strategy in LEARNING_STRATEGIES
        mode = STRATEGY_MODES.get(strategy, strategy)
        engine = make_engine(loaded, mode, args.threads, c, attach=not learning)
        learner = None
        tmp = Path(tempfile.mkdtemp(prefix=f"onspec-bench-{name}-"))
        try:
            if learning:
                if start_dir is not None:
                    shutil.copytree(start_dir, tmp / "v")
                drafter = {"drafter": "parallel"} if strategy in ("parallel", "auto-parallel") else {}
                learner = start_learner(engine, tmp / "v", args, **drafter)
                wait_trainer(learner)
            run = Run(name, strategy, c, repeat=rep)
            drive(engine, texts, ["chat"] * len(texts), c, args.max_tokens, run, learner)
            finish_run(run, engine, learner)
            runs[name] = run
            print(f"    {run.tps:6.1f} tok/s  acceptance {run.acceptance:.2f}  "
                  f"versions {[v for _, _, v in run.versions]}  {run.by_strategy}", flush=True)
            print(f"    drafting: {run.drafting}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return runs


def warm_start_dir(loaded, args) -> Path:
    """A versions directory holding a warm-started drafter (``onspec warmup``'s procedure, ``train/warmup.py``)."""
    from onspec.speculation.eagle import EagleConfig, attach_learned, init_drafter
    from onspec.train.publish import Manifest, VersionState, publish_version
    from onspec.train.warmup import WarmupSettings, warm_start

    root = Path(tempfile.mkdtemp(prefix="onspec-bench-warm-")) / "v"
    engine = make_engine(loaded, "suffix", args.threads, 8, attach=False)
    drafter = init_drafter(loaded, EagleConfig.for_target(loaded.arch))
    attach_learned(engine, engine.cfg.spec, drafter.to_dtype(torch.bfloat16))
    ws = warm_start(engine, drafter, TrainerConfig(versions_dir=str(root)), WarmupSettings(
        prompts=24 if args.quick else 100, samples=args.warmup_samples, max_tokens=args.max_tokens,
        epochs=3 if args.quick else 6, corpus=args.warmup_corpus, progress=False))
    rec, res = ws.recording, ws.training
    trainer = res.trainer
    if ws.corpus is not None:
        print(f"[warmup] corpus: {ws.corpus.prompts} reference answers ({ws.corpus.positions} positions) read in "
              f"{ws.corpus.seconds:.0f} s, {ws.corpus_training.steps} steps in {ws.corpus_training.seconds:.0f} s",
              flush=True)
    publish_version(root, trainer.drafter, Manifest(version=0, parent=None, kind="warmup", step=trainer.steps,
                                                    samples=trainer.samples, heldout_acceptance=res.after,
                                                    heldout_positions=res.heldout_positions), trainer.opt.state_dict())
    VersionState(current=0, promoted=[0]).save(root)
    print(f"[warmup] {rec.prompts} prompts, {rec.answers} answers ({rec.positions} positions) in "
          f"{rec.seconds:.0f} s, {res.steps} steps in {res.seconds:.0f} s: held-out acceptance "
          f"{res.before:.3f} -> {res.after:.3f} over {res.heldout_positions} positions", flush=True)
    return root


def scenario_shift(loaded, args) -> dict:
    from onspec.data import chat_prompts, humaneval_prompts, math_prompts

    n = args.shift_requests
    phases = [("chat", chat_prompts(n)), ("code", humaneval_prompts(n)), ("math", math_prompts(n))]
    c = args.concurrency[-1]
    out: dict = {"concurrency": c, "phases": [p for p, _ in phases]}
    tok = loaded.tokenizer
    # speculation off, per phase
    off = Run("shift-off", "off", c)
    engine = make_engine(loaded, "off", args.threads, c)
    t0 = time.perf_counter()
    for k, (name, ps) in enumerate(phases):
        drive(engine, chat_texts(tok, ps), [name] * n, c, args.max_tokens, off, t0=t0, offset=k * n)
    # online: learning through all phases; remember the version serving at the end of the chat phase
    tmp = Path(tempfile.mkdtemp(prefix="onspec-bench-shift-"))
    online = Run("shift-online", args.shift_strategy, c)
    engine = make_engine(loaded, args.shift_strategy, args.threads, c, attach=False)
    learner = start_learner(engine, tmp / "v", args)
    wait_trainer(learner)
    t0 = time.perf_counter()
    frozen_version = None
    for k, (name, ps) in enumerate(phases):
        drive(engine, chat_texts(tok, ps), [name] * n, c, args.max_tokens, online, learner, t0=t0, offset=k * n)
        if name == "chat":
            frozen_version = learner.manager.current
    finish_run(online, engine, learner)
    # frozen: the chat-phase version, no trainer, code and math phases
    from onspec.train.online import build_online_learning
    from onspec.train.publish import VersionState

    frozen = Run("shift-frozen", args.shift_strategy, c)
    st = VersionState.load(tmp / "v")
    st.current = frozen_version
    st.save(tmp / "v")
    engine = make_engine(loaded, args.shift_strategy, args.threads, c, attach=False)
    learner = build_online_learning(engine, TrainerConfig(versions_dir=str(tmp / "v"), live_window_steps=10**9),
                             start_trainer=False)
    t0 = time.perf_counter()
    for k, (name, ps) in enumerate(phases[1:], start=1):
        drive(engine, chat_texts(tok, ps), [name] * n, c, args.max_tokens, frozen, learner, t0=t0, offset=k * n)
    finish_run(frozen, engine, learner)
    shutil.rmtree(tmp, ignore_errors=True)
    table = {}
    for name, _ in phases:
        row = {}
        base = _phase_tps(off, name)
        for run in (online, frozen):
            tps = _phase_tps(run, name)
            if tps:
                row[run.name] = {"tok_per_s": round(tps, 2), "speedup": round(tps / base, 3) if base else None,
                                 "acceptance": round(_phase_acc(run, name), 3)}
        row["shift-off"] = {"tok_per_s": round(base, 2)}
        table[name] = row
    # Recovery after each shift: requests (in completion order) until a window of ``width`` requests of the
    # new phase is back within 10% of the online run's chat-phase acceptance length.
    width = max(2, min(args.window, n // 4))
    target = 0.9 * _phase_acc(online, "chat")
    out["recovery"] = {"window": width, "target_acceptance": round(target, 3),
                       "requests": {run.name: {name: recover_requests(run, name, target, width)
                                               for name, _ in phases[1:]} for run in (online, frozen)}}
    out.update({"table": table, "frozen_version": frozen_version,
                "runs": {r.name: _run_json(r) for r in (off, online, frozen)}})
    return out


def _phase_tps(run: Run, phase: str) -> float:
    rs = [r for r in run.reqs if r.phase == phase]
    if len(rs) < 2:
        return 0.0
    rs.sort(key=lambda r: r.t_done)
    prev = [r for r in run.reqs if r.t_done < rs[0].t_done]
    start = max((r.t_done for r in prev), default=0.0)
    return sum(r.tokens for r in rs) / max(1e-9, rs[-1].t_done - start)


def recover_requests(run: Run, phase: str, target: float, width: int) -> int | None:
    """Requests of ``phase`` served (in completion order) when a window of the last ``width`` of them first
    reaches ``target`` acceptance length; None if it never does within the phase."""
    rs = sorted((r for r in run.reqs if r.phase == phase), key=lambda r: r.t_done)
    for k in range(width, len(rs) + 1):
        if acceptance_length(rs[k - width:k]) >= target:
            return k
    return None


def _phase_acc(run: Run, phase: str) -> float:
    return acceptance_length([r for r in run.reqs if r.phase == phase])


def scenario_cost(loaded, texts, args) -> dict:
    """Trainer running (gate closed) against no trainer, the same serving drafter, twice each, alternating."""
    from onspec.train.online import build_online_learning

    c = args.concurrency[-1]
    results: dict[str, list[float]] = {"trainer": [], "frozen": []}
    for rep in range(args.repeats):
        for kind in ("trainer", "frozen"):
            tmp = Path(tempfile.mkdtemp(prefix="onspec-bench-cost-"))
            engine = make_engine(loaded, "auto", args.threads, c, attach=False)
            cfg = TrainerConfig(versions_dir=str(tmp / "v"), gate_margin=1e9, live_window_steps=10**9,
                                publish_every_steps=10**6, publish_every_seconds=1e9, **share_override(args))
            learner = build_online_learning(engine, cfg, start_trainer=kind == "trainer")
            if kind == "trainer":
                wait_trainer(learner)
            run = Run(f"cost-{kind}-{rep}", "auto", c)
            drive(engine, texts, ["chat"] * len(texts), c, args.max_tokens, run, learner)
            info = dict(learner.trainer_info)
            learner.stop(save=False)
            shutil.rmtree(tmp, ignore_errors=True)
            results[kind].append(run.tps)
            print(f"[cost-{kind}-{rep}] {run.tps:.1f} tok/s (trainer steps {info.get('step', 0)})", flush=True)
    tr, fr = statistics.median(results["trainer"]), statistics.median(results["frozen"])
    return {"concurrency": c, "tok_per_s": results, "median_trainer": tr, "median_frozen": fr,
            "cost": round(1 - tr / fr, 4) if fr else None}


# ---- reporting ----------------------------------------------------------------------------------------
def windows(run: Run, base: Run | None, width: int) -> list[dict]:
    """Per window of ``width`` requests (in completion order): acceptance, tok/s and speedup vs ``base``."""
    rs = sorted(run.reqs, key=lambda r: r.t_done)
    bs = sorted(base.reqs, key=lambda r: r.t_done) if base is not None else None
    out = []
    for k in range(0, len(rs), width):
        w = rs[k:k + width]
        t_start = rs[k - 1].t_done if k else 0.0
        tps = sum(r.tokens for r in w) / max(1e-9, w[-1].t_done - t_start)
        acc = acceptance_length(w)
        row = {"requests": k + len(w), "t": round(w[-1].t_done, 2), "tok_per_s": round(tps, 2),
               "acceptance": round(acc, 3), "version": w[-1].version}
        if bs is not None and len(bs) >= k + len(w):
            bw = bs[k:k + len(w)]
            b_start = bs[k - 1].t_done if k else 0.0
            btps = sum(r.tokens for r in bw) / max(1e-9, bw[-1].t_done - b_start)
            row["speedup"] = round(tps / btps, 3) if btps else None
        out.append(row)
    return out


def _run_json(run: Run) -> dict:
    return {"strategy": run.strategy, "concurrency": run.concurrency, "requests": len(run.reqs),
            "tokens": run.tokens, "wall": round(run.wall, 2), "tok_per_s": round(run.tps, 2),
            "acceptance": round(run.acceptance, 3), "versions": run.versions, "by_strategy": run.by_strategy,
            "learner": run.learner, "drafting": run.drafting}


def report(scen: dict[str, dict[str, Run]], width: int) -> dict:
    out: dict = {}
    for tag, runs in scen.items():
        section = {}
        for name, run in runs.items():
            base = runs.get(f"{tag}-off-c{run.concurrency}" + (f"-r{run.repeat}" if run.repeat else ""))
            d = _run_json(run)
            d["repeat"] = run.repeat
            d["windows"] = windows(run, base, width)
            if base is not None and base.tps:
                d["speedup"] = round(run.tps / base.tps, 3)
            section[name] = d
        out[tag] = section
    return out


def medians(rep: dict) -> dict:
    """Per scenario, strategy and concurrency: the median over repeats of tok/s, of the speedup over the
    same repeat's "off" run, and of the acceptance length (with every repeat's speedup listed)."""
    out: dict = {}
    for tag, section in rep.items():
        groups: dict[str, list[dict]] = {}
        for d in section.values():
            groups.setdefault(f"{d['strategy']}-c{d['concurrency']}", []).append(d)
        out[tag] = {key: {"repeats": len(ds),
                          "tok_per_s": round(statistics.median(d["tok_per_s"] for d in ds), 2),
                          "acceptance": round(statistics.median(d["acceptance"] for d in ds), 3),
                          "speedups": [d.get("speedup") for d in ds],
                          "speedup": (round(statistics.median(d["speedup"] for d in ds), 3)
                                      if all("speedup" in d for d in ds) else None)}
                    for key, ds in groups.items()}
    return out


def print_table(rep: dict, med: dict) -> None:
    print(f"\n{'run':<26}{'tok/s':>8}{'speedup':>9}{'accept':>8}{'first-window':>14}{'last-window':>13}  versions")
    for tag, section in rep.items():
        for name, d in section.items():
            ws = d["windows"]
            f = ws[0].get("speedup") if ws else None
            last = ws[-1].get("speedup") if ws else None
            print(f"{name:<26}{d['tok_per_s']:>8.1f}{d.get('speedup', 1.0):>9.2f}{d['acceptance']:>8.2f}"
                  f"{(f or 0):>14.2f}{(last or 0):>13.2f}  {[v for _, _, v in d['versions']]}")
    if any(m["repeats"] > 1 for section in med.values() for m in section.values()):
        print("\nmedians over repeats (speedup: against the same repeat's off run):")
        for tag, section in med.items():
            for key, m in section.items():
                print(f"  {tag}-{key:<22}{m['tok_per_s']:>8.1f} tok/s  speedup {m['speedup']}  "
                      f"acceptance {m['acceptance']}  (repeats: {m['speedups']})")


def plot_cost(cost: dict, path: Path) -> None:
    """Serving throughput per repeat, trainer running against frozen, with the medians."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    repeats = range(len(cost["tok_per_s"]["frozen"]))
    for k, kind in enumerate(("frozen", "trainer")):
        vals = cost["tok_per_s"][kind]
        ax.bar([i + 0.38 * k for i in repeats], vals, width=0.38,
               label=f"{kind} (median {statistics.median(vals):.1f})")
    ax.set_xticks([i + 0.19 for i in repeats], [f"repeat {i + 1}" for i in repeats])
    ax.set_ylabel("tokens / s")
    ax.set_title(f"cost of learning at concurrency {cost['concurrency']}: {100 * (cost['cost'] or 0):.1f}%")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rep: dict, shift: dict | None, cost: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cost:
        plot_cost(cost, path.with_name(path.stem + "-cost.png"))
    tags = list(rep)
    if not tags:
        return
    fig, axes = plt.subplots(len(tags) * 2, 2, figsize=(13, 4.2 * 2 * len(tags)), squeeze=False)
    for ti, tag in enumerate(tags):
        for name, d in rep[tag].items():
            ws = d["windows"]
            if not ws or d["strategy"] == "off":
                continue
            label = f"{d['strategy']} c{d['concurrency']}" + (f" r{d['repeat']}" if d.get("repeat") else "")
            for col, xkey in enumerate(("requests", "t")):
                xs = [w[xkey] for w in ws]
                axes[2 * ti][col].plot(xs, [w["acceptance"] for w in ws], marker="o", ms=3, label=label)
                axes[2 * ti + 1][col].plot(xs, [w.get("speedup") or 0 for w in ws], marker="o", ms=3, label=label)
                for t, nreq, v in d["versions"][1:]:
                    x = nreq if xkey == "requests" else t
                    for r in (0, 1):
                        axes[2 * ti + r][col].axvline(x, color="grey", alpha=0.25, lw=0.8)
        for col, xl in enumerate(("requests served", "wall time (s)")):
            axes[2 * ti][col].set_title(f"{tag}: acceptance length (tokens per target forward)")
            axes[2 * ti + 1][col].set_title(f"{tag}: speedup over speculation off (grey: new drafter version)")
            axes[2 * ti + 1][col].axhline(1.0, color="black", lw=0.8)
            for r in (0, 1):
                axes[2 * ti + r][col].set_xlabel(xl)
                axes[2 * ti + r][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if shift:
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        phases = shift["phases"]
        for k, run in enumerate(("shift-online", "shift-frozen")):
            sp = [shift["table"][p].get(run, {}).get("speedup") or 0 for p in phases]
            ac = [shift["table"][p].get(run, {}).get("acceptance") or 0 for p in phases]
            xs = [i + 0.38 * k for i in range(len(phases))]
            ax[0].bar(xs, ac, width=0.38, label=run)
            ax[1].bar(xs, sp, width=0.38, label=run)
        for a, t in zip(ax, ("acceptance length", "speedup over off")):
            a.set_xticks([i + 0.19 for i in range(len(phases))], phases)
            a.set_title(f"shift: {t}")
            a.legend(fontsize=8)
        ax[1].axhline(1.0, color="black", lw=0.8)
        fig.tight_layout()
        fig.savefig(path.with_name(path.stem + "-shift.png"), dpi=110)
        plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small prompt counts and short answers (a few minutes)")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default 120, quick 16)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 128, quick 64")
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,4; quick 2)")
    ap.add_argument("--strategies", default="off,suffix,learned,hybrid,auto",
                    help="comma list: off, suffix, learned, hybrid, auto, auto-suffix (no learned drafter), "
                         "parallel, auto-parallel (learning the parallel drafter)")
    ap.add_argument("--scenarios", default=None, help="comma list of day0,day1,shift,cost (default all; quick: "
                                                      "day0,cost)")
    ap.add_argument("--shift-requests", type=int, default=None, help="requests per shift phase (default 40)")
    ap.add_argument("--shift-strategy", default="hybrid")
    ap.add_argument("--repeats", type=int, default=2, help="repeats of the cost scenario (median reported)")
    ap.add_argument("--strategy-repeats", type=int, default=1,
                    help="day0/day1: run every strategy this many times, interleaved (medians reported)")
    ap.add_argument("--window", type=int, default=None, help="requests per plotted window (default 10, quick 4)")
    ap.add_argument("--warmup-samples", type=int, default=1,
                    help="day1: answers per warm-up prompt (onspec warmup --samples)")
    ap.add_argument("--warmup-corpus", type=int, default=0,
                    help="day1: reference answers to pretrain on first (onspec warmup --corpus)")
    ap.add_argument("--warm-from", default="",
                    help="day1: start from this versions directory's latest promoted version (e.g. one "
                         "`onspec warmup --speculator-dir DIR` wrote) instead of building a warm start")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy-share", type=float, default=None,
                    help="the trainer's share of wall time while the engine is busy (default: TrainerConfig's)")
    ap.add_argument("--out", default=str(RESULTS / "online.json"))
    args = ap.parse_args()
    q = args.quick
    args.requests = args.requests or (16 if q else 120)
    args.max_tokens = args.max_tokens or (64 if q else 128)
    args.concurrency = [int(x) for x in (args.concurrency or ("2" if q else "1,4")).split(",")]
    args.strategies = args.strategies.split(",")
    if "off" not in args.strategies:
        args.strategies.insert(0, "off")
    scenarios = (args.scenarios or ("day0,cost" if q else "day0,day1,shift,cost")).split(",")
    args.shift_requests = args.shift_requests or (8 if q else 40)
    args.window = args.window or (4 if q else 10)
    torch.set_num_threads(args.threads)

    from onspec.data import chat_prompts

    loaded = load_model("default", "bfloat16")
    texts = chat_texts(loaded.tokenizer, chat_prompts(args.requests))
    t_all = time.perf_counter()
    scen: dict[str, dict[str, Run]] = {}
    if "day0" in scenarios:
        scen["day0"] = scenario_strategies(loaded, texts, args, "day0", None)
    if "day1" in scenarios:
        # Every learning run copies its start into its own directory (scenario_strategies), so --warm-from is
        # read in place and never written.
        if args.warm_from:
            warm = Path(args.warm_from)
            print(f"[warmup] from {warm}", flush=True)
        else:
            warm = warm_start_dir(loaded, args)
        # The baseline and suffix-only runs do not depend on the start, but they are run again rather than
        # reused from day 0: a ratio holds only against a baseline from the same run (docs/decisions.md,
        # "Baselines in the same run").
        scen["day1"] = scenario_strategies(loaded, texts, args, "day1", warm)
        if not args.warm_from:
            shutil.rmtree(warm.parent, ignore_errors=True)
    rep = report(scen, args.window)
    shift = scenario_shift(loaded, args) if "shift" in scenarios else None
    cost = scenario_cost(loaded, texts[: max(8, args.requests // 2)], args) if "cost" in scenarios else None
    med = medians(rep)
    print_table(rep, med)
    if shift:
        print("\nshift (speedup over off / acceptance):")
        for phase, row in shift["table"].items():
            print(f"  {phase:<6}" + "".join(f"  {k}: {v.get('speedup')}x / {v.get('acceptance')}"
                                            for k, v in row.items() if k != "shift-off"))
        rec = shift["recovery"]
        print(f"  requests to recover to {rec['target_acceptance']} (90% of chat acceptance, windows of "
              f"{rec['window']}): {rec['requests']}")
    if cost:
        print(f"\ncost of learning: {cost['median_trainer']:.1f} tok/s with the trainer vs "
              f"{cost['median_frozen']:.1f} frozen: {100 * (cost['cost'] or 0):.1f}% slower")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": loaded.name, "dtype": "bfloat16", "threads": args.threads, "requests": args.requests,
            "warm_from": args.warm_from or None,
            "max_tokens": args.max_tokens, "concurrency": args.concurrency, "quick": q,
            "seconds": round(time.perf_counter() - t_all, 1), "torch": torch.__version__}
    out.write_text(json.dumps({"meta": meta, "scenarios": rep, "medians": med, "shift": shift,
                               "cost": cost}, indent=1))
    plot(rep, shift, cost, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')} ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
