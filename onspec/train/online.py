"""Online drafter learning for a running engine: ``start_online_learning(engine, cfg) -> OnlineLearning``.

``build_online_learning`` assembles the parts in one place; ``OnlineLearning`` runs them.

What it wires together (docs/design.md, the learning loop):

1. the starting drafter of the kind it learns (``TrainerConfig.drafter``, train/heads.py: the sequential
   EAGLE-3 head, or the parallel drafter with its versions in ``<versions>/parallel``): ``--speculator PATH``
   (a checkpoint: day-1; an EAGLE-3 one becomes a parallel drafter when that is what is learned), else the
   latest promoted version of its lineage (a restart resumes), else a fresh random one (day-0); it is
   published as a version if it is not one yet, and attached to the engine (suffix + learned + hybrid
   strategies, or suffix + parallel; in auto, the other kind's latest promoted version too, frozen, so the
   draft policy measures both; the controller chooses per request);
2. a :class:`~onspec.train.traces.TraceRecorder` on the engine's verdicts and prefills, feeding the
   trainer process through a bounded drop-oldest queue, held-out chunks also kept here for the gate;
3. the trainer process (:mod:`onspec.train.trainer`), which publishes candidate versions;
4. a background thread that reads the trainer's messages, notices new version directories, and validates
   and gates candidates, posting its judgements to the :class:`~onspec.train.versions.VersionManager`;
5. an engine ``on_step`` subscriber, which runs between two steps on the engine thread, the manager's
   owner: it records the posted judgements and applies approved swaps,
   feeds the live-utility monitor (and rolls back on a regression), tells the trainer whether the engine
   is busy, sweeps traces of aborted requests, and when the trainer has died, falls back to suffix
   drafting (``on_trainer_exit="suffix"``) so serving goes on unchanged.

The handle's methods (``status``, ``promote``, ``rollback``, ``stop``) are what the server's admin routes
call (onspec/server/online.py), on the engine thread between two steps.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import re
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..config import TrainerConfig
from ..engine.events import EngineObserver
from ..engine.step import StepResult
from ..speculation.checkpoints import EAGLE, PARALLEL
from .heads import Served, attach_drafters, companion, head_for, mode_serves
from .publish import Manifest, latest_promoted, list_versions, next_version, publish_version
from .share import ShareConfig, TrainerShare

log = logging.getLogger("onspec.train")


def default_versions_dir(loaded) -> Path:
    """``<cache>/speculators/<model>``: one lineage of versions per target model."""
    from ..models.loader import default_cache_dir

    name = re.sub(r"[^A-Za-z0-9._-]+", "-", str(loaded.name)).strip("-") or "model"
    if name != "SmolLM2-135M-Instruct":  # paths and hub ids: keep distinct models apart
        name = f"{Path(name).name[:40]}-{hashlib.sha256(str(loaded.path).encode()).hexdigest()[:8]}"
    return default_cache_dir() / "speculators" / name


def trainer_config_from(obj) -> TrainerConfig:
    """A ``TrainerConfig`` from itself, a dict, an argparse namespace or a server config.

    Attributes with a ``TrainerConfig`` field's name are taken as they are; ``speculator_dir`` means
    ``versions_dir`` and ``train_*`` attributes map to the field without the prefix."""
    if isinstance(obj, TrainerConfig):
        return obj
    if obj is None:
        return TrainerConfig()
    get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
    base = get("trainer")
    if isinstance(base, TrainerConfig):
        return base
    values = {}
    for f in fields(TrainerConfig):
        for key in (f.name, f"train_{f.name}"):
            v = get(key)
            if v is not None and not callable(v):
                values[f.name] = v
                break
    if get("speculator_dir"):
        values["versions_dir"] = get("speculator_dir")
    defaults = TrainerConfig()

    def cast(name: str, v):
        kind = type(getattr(defaults, name))
        if kind is bool and isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "on")
        return kind(v)

    return TrainerConfig(**{k: cast(k, v) for k, v in values.items()})


@dataclass
class StartingDrafter:
    """The drafter serving starts with, and where it came from."""

    drafter: object          # fp32 EagleDrafter or ParallelDrafter
    version: int
    origin: str
    estimate: float | None   # held-out acceptance length it is expected to reach (None: unknown, explored)


class EventLog:
    """The online learner's own events (start, published, fallback ...), newest 200."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, kind: str, version, detail: str) -> None:
        self.items.append({"t": time.time(), "kind": kind, "version": version, "detail": detail})
        self.items = self.items[-200:]
        log.info("online learning: %s v%s %s", kind, version, detail)


def publish_drafter(root: Path, base_model: str, drafter, kind: str, parent: int | None, note: str = "") -> int:
    """Publish ``drafter`` as the next version in ``root`` (retrying if another writer took the number)."""
    from .publish import VersionError

    for _ in range(5):
        v = next_version(root)
        try:
            publish_version(root, drafter, Manifest(version=v, parent=parent, kind=kind, note=note,
                                                    base_model=base_model))
            return v
        except VersionError:
            continue
    raise RuntimeError(f"could not publish a version in {root}")


def starting_drafter(loaded, cfg: TrainerConfig, root: Path, events: EventLog) -> StartingDrafter:
    """``--speculator PATH`` (imported: day 1), else the latest promoted version of ``root`` (a restart
    resumes), else a fresh random drafter (day 0), of the kind ``cfg.drafter`` names; published as a version
    if it is not one yet."""
    from ..speculation.checkpoints import load_drafter
    from .swap import CandidateError, load_candidate

    name = str(loaded.name)
    head = head_for(cfg.drafter)
    if cfg.speculator:
        drafter = load_drafter(cfg.speculator, loaded, dtype=torch.float32)  # DrafterLoadError: a ValueError
        drafter = head.from_checkpoint(drafter, cfg, cfg.speculator)
        version = publish_drafter(root, name, drafter, "imported", None, note=f"imported from {cfg.speculator}")
        return StartingDrafter(drafter, version, f"imported {cfg.speculator}", None)
    if cfg.resume and (v := latest_promoted(root)) is not None:
        try:
            drafter, manifest = load_candidate(root, v, loaded)
            # Its trainer's (or `onspec warmup`'s) held-out figure: until a gate measures it on this traffic,
            # it decides whether the drafter can pay for its proposals at all.
            return StartingDrafter(drafter, v, f"resumed version {v}", manifest.heldout_acceptance)
        except CandidateError as exc:
            events.add("invalid", v, f"cannot resume: {exc}")
    drafter = head.day0(loaded, cfg)
    version = publish_drafter(root, name, drafter, "initial", None, note="day-0 random drafter")
    return StartingDrafter(drafter, version, "day-0 random drafter", 1.0)  # random: nothing to expect yet


def lineage_head(root: Path, state_decisions: list[dict], serving: int) -> int:
    """Where the trainer continues: the newest version at or after the serving one that no gate or rollback
    refused (its weights and optimizer state carry the most training)."""
    refused = {d.get("version") for d in state_decisions if d.get("kind") in ("reject", "invalid", "rollback")}
    newer = [v for v in list_versions(root) if v >= serving and v not in refused]
    return max(newer, default=serving)


@dataclass
class OnlineParts:
    """What ``build_online_learning`` assembles and ``OnlineLearning`` runs."""

    engine: object
    cfg: TrainerConfig
    root: Path
    events: EventLog
    start: StartingDrafter
    spec: object                         # the engine's Speculation, with the drafter being learned
    manager: object                      # VersionManager
    trainer: object | None               # TrainerProcess (None: no trainer process)
    sender: object | None                # TraceSender into the trainer's queue
    lender: object                       # ThreadLender
    poll_lease: object                   # CpuLease of the poller's gate evaluations


def build_online_learning(engine, cfg: TrainerConfig, start_trainer: bool = True) -> OnlineLearning:
    """Assemble online drafter learning for ``engine`` and start it (see the module docstring)."""
    from .channel import CpuLease, ThreadLender, TraceSender
    from .trainer import TrainerLaunch, TrainerProcess
    from .versions import VersionManager

    # Refuse before anything is loaded or published (a day-0 start would write a version first).
    spec_cfg = engine.spec.cfg if engine.spec is not None else engine.cfg.spec
    if spec_cfg.mode == "off":
        raise ValueError("speculation: online drafter learning needs speculation on (not 'off')")
    head = head_for(cfg.drafter)
    if not mode_serves(spec_cfg.mode, head.kind):
        raise ValueError(f"speculation: {spec_cfg.mode!r} does not draft with the {head.kind} drafter the online "
                         "learner trains (--train-drafter)")
    base = Path(cfg.versions_dir) if cfg.versions_dir else default_versions_dir(engine.loaded)
    root = head.root(base)
    root.mkdir(parents=True, exist_ok=True)
    loaded = engine.loaded
    events = EventLog()
    start = starting_drafter(loaded, cfg, root, events)
    events.add("start", start.version, start.origin)
    # the engine's other event subscribers stay subscribed; estimate None (imported): unknown, so explored
    serve_dtype = loaded.model.embed_tokens.weight.dtype
    served = {head.kind: Served(start.drafter, start.estimate, start.origin)}
    if spec_cfg.mode == "auto" and (other := companion(base, head.kind, loaded)) is not None:
        served[other[0]] = other[1]   # frozen: judged beside the learned one by the draft policy
        events.add("companion", None, f"{other[0]} drafter {other[1].origin} served beside it (frozen)")
    spec = attach_drafters(engine, spec_cfg, served.get(EAGLE), served.get(PARALLEL))
    manager = VersionManager(root, cfg, loaded, spec.proposers[head.strategy], start.version, start.drafter,
                             serve_dtype)
    trainer = sender = None
    if start_trainer:
        launch = TrainerLaunch(cfg=cfg, model_path=str(loaded.path), model_dtype=engine.cfg.dtype,
                               versions_dir=str(root),
                               start_version=lineage_head(root, manager.state.decisions, start.version),
                               base_model=str(loaded.name))
        trainer = TrainerProcess(launch)
        sender = TraceSender(trainer.traces_q, cfg.queue_chunks)
    # Cores for work beside the engine's steps (the trainer process; this process's gate evaluations):
    # lent between two steps rather than fought over (channel.ThreadLender says why).
    lender = ThreadLender(lend=cfg.trainer_threads)
    if trainer is not None:
        lender.add(trainer.lease)
    poll_lease = lender.add(CpuLease(multiprocessing.get_context("spawn")))
    return OnlineLearning(OnlineParts(engine, cfg, root, events, start, spec, manager, trainer, sender, lender,
                                      poll_lease))


class OnlineLearning(EngineObserver):
    """The running online learner of one engine (see the module docstring); ``build_online_learning``
    assembles it. Subscribed to the engine's ``on_step`` event."""

    def __init__(self, parts: OnlineParts) -> None:
        from .traces import TraceRecorder, attach_recorder

        engine = self.engine = parts.engine
        self.cfg = cfg = parts.cfg
        self.root = parts.root
        self.log = parts.events
        self.spec = parts.spec
        self.head = head_for(cfg.drafter)
        self.proposer = parts.spec.proposers[self.head.strategy]
        self.manager = parts.manager
        self.trainer = parts.trainer
        self.sender = parts.sender
        self.lender = parts.lender
        self.poll_lease = parts.poll_lease
        self.trainer_info: dict = {}
        self.trainer_error: str | None = None
        self.fallback = False
        self._stopped = False
        self._last_step_t = 0.0
        # the trainer's CPU share while serving, moved by each version decision (train/share.py)
        self.share = TrainerShare(cfg.busy_share, ShareConfig(cfg.share_floor, cfg.share_ceiling, cfg.share_min_gain))
        self._decisions_seen = len(self.manager.decisions)
        self.recorder = TraceRecorder(cfg, self._sink)
        self._detach_recorder = attach_recorder(engine, self.recorder)
        if self.trainer is not None:
            self.trainer.start()
        # the poller and the step subscriber; versions newer than the serving one (e.g. a final candidate
        # saved at the last shutdown) are judged like fresh candidates
        self._seen = {v for v in list_versions(self.root) if v <= parts.start.version}
        self._todo: list[int] = []
        self._stop = threading.Event()
        self._last_generated = engine.counters.generated_tokens
        self._last_draft = self.spec.draft_seconds
        self._steps = 0
        engine.events.subscribe(self)
        self._thread = threading.Thread(target=self._poll, name="onspec-online", daemon=True)
        self._thread.start()

    @property
    def events(self) -> list[dict]:
        return self.log.items

    # ---- plumbing ----------------------------------------------------------------------------------
    def _sink(self, chunk) -> None:
        if chunk.heldout:
            self.manager.window.add(chunk)
        if self.sender is not None:
            self.sender(chunk)

    def _event(self, kind: str, version, detail: str) -> None:
        self.log.add(kind, version, detail)

    def on_step(self, result: StepResult) -> None:
        """Engine thread, between two steps."""
        engine = self.engine
        now_gen = engine.counters.generated_tokens
        tokens = now_gen - self._last_generated
        self._last_generated = now_gen
        draft = self.spec.draft_seconds - self._last_draft
        self._last_draft = self.spec.draft_seconds
        if self.trainer is not None:
            self.trainer.clock.tick()
        self._last_step_t = time.monotonic()
        self.lender.between_steps()
        self.spec.set_threads_lent(self.lender.lent)  # the next step runs with fewer threads: not a cost sample
        self._steps += 1
        if self._stopped:
            return
        learning = self.head.strategy in self.spec.proposers
        if self.fallback and learning:
            self._fall_back_to_suffix()
            return
        # The step that just ran used the serving version: account for it before any swap.
        if result.num_prefill == 0 and result.num_decode > 0 and learning:
            batch = result.num_decode
            off = self.spec.controller.cost.cost(batch, "plain") if self.spec.controller.cost.table else None
            self.manager.observe_step(batch, tokens, result.seconds + draft, off)
        self.manager.take_results()  # what the poller judged since the last step
        if self.manager.apply_pending():
            self._event("swap", self.manager.current, "swapped between two steps")
        self._follow_utility()
        if self._steps % 64 == 0:
            self.recorder.sweep({sid for sid, s in engine.seqs.items() if not s.finished})

    def _follow_utility(self) -> None:
        """Move the trainer's CPU share by the version decisions made since the last step (train/share.py)
        and tell the trainer process."""
        decisions = self.manager.decisions
        for d in decisions[self._decisions_seen:]:
            change = self.share.update(d.kind, d.figures)
            if change is None:
                continue
            if self.trainer is not None:
                self.trainer.send({"type": "share", "busy_share": change.share})
            self._event("share", d.version, f"trainer share {change.previous:.3f} -> {change.share:.3f}: "
                                            f"{change.reason}")
        self._decisions_seen = len(decisions)

    def _fall_back_to_suffix(self) -> None:
        """Serve on with suffix drafting only (the trainer is gone; nothing would improve the drafter)."""
        if self.trainer is not None:
            self.lender.remove(self.trainer.lease)  # threads the dead process had borrowed come back
        self.spec.remove_strategies(*self.head.strategies)
        self._detach_recorder()
        self._event("fallback", self.manager.current, "trainer process exited: speculation falls back to suffix "
                    "drafting")

    def _poll(self) -> None:
        while not self._stop.wait(self.cfg.poll_seconds):
            try:
                self._poll_once()
            except Exception as exc:  # never let the poller die silently
                log.exception("online learning poller: %s", exc)
                self._event("error", None, f"poller: {exc.__class__.__name__}: {exc}")

    def _poll_once(self) -> None:
        if self.trainer is not None:
            for msg in self.trainer.events():
                kind = msg.get("type")
                if kind == "status":
                    self.trainer_info = msg
                elif kind == "published":
                    self.trainer_info.update({"step": msg.get("step"), "samples": msg.get("samples")})
                    self._event("published", msg.get("version"),
                                f"step {msg.get('step')}, held-out acceptance {msg.get('heldout_acceptance'):.3f}"
                                if msg.get("heldout_acceptance") is not None else f"step {msg.get('step')}")
                elif kind == "error":
                    self.trainer_error = msg.get("message")
                    self._event("trainer-error", None, msg.get("message", ""))
                elif kind == "started":
                    self._event("trainer-started", msg.get("version"), f"pid {msg.get('pid')}")
            if not self.trainer.alive() and not self.fallback and not self._stopped:
                code = self.trainer.process.exitcode
                self._event("trainer-exit", None, f"trainer process exited (code {code})")
                if self.cfg.on_trainer_exit == "suffix":
                    self.fallback = True
        for v in list_versions(self.root):
            if v not in self._seen:
                self._seen.add(v)
                self._todo.append(v)
        if (self._todo or self.manager.has_retry()) and not self._stopped:
            # Loading, checksumming and judging a candidate is CPU work beside the engine's steps.
            # It only judges: the engine thread records the judgements (VersionManager.take_results).
            with self.poll_lease.borrow(self._engine_idle, stop=self._stop):
                torch.set_num_threads(torch.get_num_threads())  # this thread's OpenMP count = the lowered one
                while self._todo and not self._stopped:
                    v = self._todo.pop(0)
                    if not self.manager.is_decided(v):
                        self.manager.post(self.manager.judge(v))
                if self.manager.has_retry() and not self._stopped:
                    self.manager.post(self.manager.judge(self.manager.newest_waiting()))

    def _engine_idle(self) -> bool:
        from .channel import NOT_STEPPING_AFTER

        return time.monotonic() - self._last_step_t > NOT_STEPPING_AFTER

    # ---- the handle ----------------------------------------------------------------------------------
    def status(self) -> dict:
        m = self.manager
        m.take_results()
        live = m.monitor.summary()
        gates = [{"t": d.t, "kind": d.kind, "version": d.version, "detail": d.detail, **d.figures}
                 for d in m.decisions if d.kind in ("promote", "reject", "invalid", "rollback", "manual-promote",
                                                    "live-ok")][-50:]
        events = [{"t": d.t, "kind": d.kind, "version": d.version, "detail": d.detail} for d in m.decisions][-50:]
        events = sorted(events + self.events[-50:], key=lambda e: e["t"])[-100:]
        trainer = dict(self.trainer_info)
        trainer.update({"busy_share": round(self.share.share, 4),
                        "alive": self.trainer.alive() if self.trainer is not None else False,
                        "pid": self.trainer.pid if self.trainer is not None else None,
                        "error": self.trainer_error})
        rec = self.recorder
        return {
            "version": m.current, "previous": m.previous, "versions": m.versions(), "gates": gates,
            "live": live, "promotions": m.counts["promotions"], "rejections": m.counts["rejections"],
            "invalid": m.counts["invalid"], "rollbacks": m.counts["rollbacks"], "swaps": m.counts["swaps"],
            "trainer_steps": trainer.get("step", 0), "samples": trainer.get("samples", 0), "trainer": trainer,
            "traces": {"chunks": rec.chunks, "positions": rec.positions, "branches": rec.branches,
                       "dropped": self.sender.dropped if self.sender else 0,
                       "sent": self.sender.sent if self.sender else 0},
            "fallback": self.fallback or self.head.strategy not in self.spec.proposers, "versions_dir": str(self.root),
            "drafter": self.head.kind,
            "events": events,
        }

    def promote(self, version) -> dict:
        out = self.manager.promote(int(version))
        if out.get("status") != "already serving":
            self._event("manual-promote", int(version), "promoted by an operator")
        return out

    def rollback(self) -> dict:
        return self.manager.rollback()

    def poll_now(self) -> None:
        """Run one poller pass on the calling thread, the engine's (tests, benchmarks), and record its
        judgements."""
        self._poll_once()
        self.manager.take_results()

    def stop(self, save: bool = True) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._thread.join(10.0)
        if self.trainer is not None:
            self.trainer.stop(save=save)
            if save:  # a final candidate: recorded, judged on restart like any other
                try:
                    for msg in self.trainer.events():
                        if msg.get("type") == "published":
                            self._event("published", msg.get("version"), "final save")
                except Exception:
                    pass
        if self.sender is not None:
            self.sender.close()
        self._detach_recorder()
        self.engine.events.unsubscribe(self)
        self.lender.release()
        self.spec.set_threads_lent(False)
        self.manager.state.save(self.root)


def start_online_learning(engine, args_or_config=None, start_trainer: bool = True) -> OnlineLearning:
    """Start online drafter learning on ``engine`` (before its serving loop starts, or between steps)."""
    return build_online_learning(engine, trainer_config_from(args_or_config), start_trainer=start_trainer)
