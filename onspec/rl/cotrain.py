"""Drafter co-training during RL (the "TLT" design, arXiv 2511.16665): a learned drafter that keeps up with
the policy, trained only in time the rollout leaves idle, and used only where the controller measures that
it pays.

Why: the policy changes every RL step, so a drafter trained once goes stale; and every rollout ends in a
long tail where only a few responses are still running and most of the machine waits. TLT spends that
tail training the drafter on the hidden states the rollout just produced, stops when the rollout ends,
and hands the new drafter to the engine before the next rollout.

How, with the pieces of ``onspec/train`` and ``onspec/speculation/eagle.py``:

* ``attach(engine)``: a day-0 EAGLE-3 drafter (``init_drafter``) is attached with ``attach_learned`` as one
  more strategy of the draft policy, with a held-out estimate of 1.0 (a random head: in ``auto`` the
  policy's estimate gate keeps it out, speculation/policy.py); a ``TraceRecorder`` turns every
  verification (accepted paths, rejected branches, target hidden states) into training chunks.
* During the rollout the engine thread reports a ``RolloutLoad`` after every step (``observe``); a
  background thread trains only while ``IdleRule`` says the rollout is idle (few rows left AND a core
  free), one unit at a time (ingest one chunk, or one optimiser step) and re-reads the rule before each
  unit. Within that, it trains in a duty cycle that ``InterferenceGuard`` sizes from measured engine step
  times, loaded against clean (rl/interference.py): a free core on a CPU can still slow the rollout.
* ``on_rollout_end``: the gate closes; the unit in progress completes; remaining traces are flushed.
* ``between_steps``: after the GRPO update has copied the new policy into the engine, the trainer's soft
  targets are rebuilt from the *new* policy's lm_head, and a drafter that trained is measured on the
  held-out chunks of the rollouts (simulated acceptance length) and swapped into the proposer *with that
  figure* (``EagleProposer.swap``). The controller then judges it like any drafter: in ``auto`` the
  estimate gate, the records and the measured utility decide whether it is asked at all, so where it does
  not pay it is not used. A drafter with no held-out figure is not swapped in (unmeasured, it would be
  explored everywhere).

Single-engine only: with Ray workers each engine would need its own recorder and the drafter would have
to be broadcast like the policy weights (the hook is the same ``between_steps``); not built yet.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .interference import InterferenceConfig, InterferenceGuard
from .rollout import RolloutLoad

log = logging.getLogger("onspec.rl")

# Held-out acceptance length a random day-0 head is credited with (it accepts nothing): in ``auto`` the draft
# policy's estimate gate does not ask it until a trained version measures more (docs/decisions.md, 'Drafter
# acceptance gate').
DAY0_ACCEPTANCE = 1.0


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class IdleRule:
    """When the rollout leaves the machine idle enough to co-train the drafter (docs/decisions.md,
    'Co-training only in idle time').

    The rollout is idle when both hold:

    * few rows: the rows the next engine step runs are at most ``share`` of the most the rollout runs at
      once (``RolloutLoad.active <= share * RolloutLoad.peak``): the tail, where a step's cost is mostly
      fixed overhead and the batch no longer fills the engine;
    * a core free: ``engine_threads + trainer_threads <= cpus``. The trainer thread runs in the engine's
      process, whose torch intra-op thread count is one setting for every thread, so ``trainer_threads`` is
      the engine's count; ``cpus`` is the process's affinity mask (``available_cpus``).

    On a 2-core CPU that means: the engine runs one torch thread (``--threads 1``), the trainer the other
    core, and only in the tail. With ``--threads 2`` (or 0, torch's default of one per core) no core is
    free and co-training never runs: two OpenMP teams on two cores would take cores from the rollout.
    ``share`` 0 opens the gate only at the step that finished the last response.
    """

    share: float = 0.25
    engine_threads: int = 1
    trainer_threads: int = 1
    cpus: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.share <= 1:
            raise ValueError("share: must be in [0, 1]")
        if min(self.engine_threads, self.trainer_threads, self.cpus) < 1:
            raise ValueError("engine_threads, trainer_threads, cpus: must be >= 1")

    @classmethod
    def measure(cls, share: float) -> IdleRule:
        """The rule for this process now: torch's thread count (the engine's and the trainer's), its CPUs."""
        threads = torch.get_num_threads()
        return cls(share=share, engine_threads=threads, trainer_threads=threads, cpus=available_cpus())

    @property
    def core_free(self) -> bool:
        return self.engine_threads + self.trainer_threads <= self.cpus

    def max_active(self, peak: int) -> int:
        """The most active rows that still count as few, for a rollout of ``peak`` rows."""
        return math.floor(self.share * peak + 1e-9)

    def idle(self, load: RolloutLoad) -> bool:
        return self.core_free and load.active <= self.max_active(load.peak)


@dataclass(frozen=True)
class TrainSlice:
    """One unit of co-training work (an optimiser step), by the co-trainer's clock."""

    start: float
    end: float


@dataclass
class RolloutTraining:
    """What co-training did during one rollout."""

    slices: list[TrainSlice] = field(default_factory=list)   # optimiser steps
    idle_seconds: float = 0.0                                 # time the rule held (the gate was open)

    @property
    def steps(self) -> int:
        return len(self.slices)

    @property
    def train_seconds(self) -> float:
        return sum(s.end - s.start for s in self.slices)


class DrafterCoTrainer:
    """Co-trains a learned drafter on the rollouts' traces in their idle tail (module docstring).

    ``rule``: the idle rule; None measures it at ``attach`` (``IdleRule.measure(share)``, after the RL runner
    has set torch's thread count). ``clock``: seconds, for the training slices and idle time (tests inject a
    logical clock). ``keep_up``: also score a copy of the drafter frozen at attach (step 0) on the same
    held-out traces after every step, next to the co-trained one (TLT's claim that a co-trained drafter keeps
    up with the policy while a frozen one goes stale); it costs one more held-out evaluation per step.
    ``start_from``: an EAGLE-3 checkpoint directory (``onspec warmup``, ``export-speculator``) to start from
    instead of a day-0 head; unmeasured on the policy's rollouts, it is explored until the first step's
    held-out figure is taken. ``interference``: the duty cycle's settings (rl/interference.py)."""

    def __init__(self, trainer_cfg=None, seed: int = 0, share: float = 0.25, rule: IdleRule | None = None,
                 clock: Callable[[], float] = time.perf_counter, keep_up: bool = False,
                 start_from: str = "", interference: InterferenceConfig | None = None) -> None:
        from ..config import TrainerConfig

        self.tcfg = trainer_cfg or TrainerConfig(min_positions=64, batch_positions=512, autocast=False, seed=seed)
        self.seed = seed
        self.share = share
        self.rule = rule
        self.clock = clock
        self.engine = None
        self.trainer = None
        self.proposer = None
        self.recorder = None
        self._detach = None
        self._chunks: deque = deque(maxlen=self.tcfg.queue_chunks)  # drop-oldest: idle time may not keep up
        self._go = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()        # held while the thread ingests or steps
        self._thread: threading.Thread | None = None
        self._idle_since: float | None = None
        self.version = 0
        self.estimate: float | None = DAY0_ACCEPTANCE   # the serving drafter's held-out acceptance length
        self.rollout = RolloutTraining()
        self.total_steps = 0
        self.last_loss: float | None = None
        self.error: str | None = None
        self.keep_up = keep_up
        self.frozen: torch.nn.Module | None = None   # the step-0 copy scored beside it when keep_up
        self.start_from = start_from
        self.guard = InterferenceGuard(interference or InterferenceConfig())
        self._busy = False                   # a unit of work is running (read by the engine thread)
        self._units = 0                      # units of work done so far (a look that found none is not one)
        self._units_seen = 0                 # ... as of the previous engine step

    # ---- wiring ----------------------------------------------------------------------------------
    def proposers(self) -> dict | None:
        return None  # the learned proposers are attached in ``attach`` (they need the engine's model)

    def attach(self, engine) -> None:
        from ..models.loader import DTYPES
        from ..speculation.eagle import EagleConfig, attach_learned, init_drafter
        from ..speculation.eagle_model import load_eagle3
        from ..train.traces import TraceRecorder, attach_recorder
        from ..train.trainer import Trainer

        if engine.cfg.spec.mode in ("off", "suffix"):
            raise ValueError("cotrain: needs speculation 'auto', 'learned' or 'hybrid' (the learned drafter "
                             f"must be allowed to draft), got {engine.cfg.spec.mode!r}")
        if self.rule is None:
            self.rule = IdleRule.measure(self.share)
        if not self.rule.core_free:
            log.warning("cotrain: no core free (engine %d + trainer %d threads > %d CPUs): the drafter will not "
                        "train; run with fewer --threads", self.rule.engine_threads, self.rule.trainer_threads,
                        self.rule.cpus)
        self.engine = engine
        self.serve_dtype = DTYPES[engine.cfg.dtype]
        if self.start_from:
            drafter = load_eagle3(self.start_from, engine.loaded, dtype=torch.float32)
            self.estimate = None
        else:
            drafter = init_drafter(engine.loaded, EagleConfig.for_target(engine.loaded.arch), seed=self.seed)
        spec = attach_learned(engine, engine.cfg.spec, drafter.to_dtype(self.serve_dtype),
                              expected_acceptance=self.estimate)
        self.proposer = spec.proposers["learned"]
        self.trainer = Trainer(drafter, engine.loaded, self.tcfg)
        if self.keep_up:
            self.frozen = drafter.to_dtype(drafter.dtype)
        self.recorder = TraceRecorder(self.tcfg, self._chunks.append)
        self._detach = attach_recorder(engine, self.recorder)
        self._thread = threading.Thread(target=self._run, name="onspec-cotrain", daemon=True)
        self._thread.start()

    # ---- the background thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._go.wait(0.05):
                continue
            pause = 0.0
            with self._lock:
                if self._stop.is_set() or not self._go.is_set():
                    continue
                self._busy = True
                t0 = time.perf_counter()
                try:
                    worked = self._work_once()
                except Exception as exc:  # never take the rollout down: stop co-training, say why
                    self.error = f"{exc.__class__.__name__}: {exc}"
                    self._go.clear()
                    self._stop.set()
                    continue
                finally:
                    self._busy = False
                if worked:       # ingesting a chunk computes the policy's soft labels: as costly as a step
                    self._units += 1
                    pause = self.guard.pause_after(time.perf_counter() - t0)
            if not worked:
                time.sleep(0.01)
            elif pause > 0:
                self._stop.wait(pause)       # the duty cycle's pause: clean engine steps to compare with

    def _work_once(self) -> bool:
        """One unit of work: ingest one recorded chunk, else one optimiser step; False when there was none."""
        if self._chunks:
            self.trainer.add(self._chunks.popleft())
            return True
        if not self.trainer.ready():
            return False
        start = self.clock()
        stats = self.trainer.step()
        self.rollout.slices.append(TrainSlice(start, self.clock()))
        self.total_steps += 1
        if "loss" in stats:
            self.last_loss = float(stats["loss"])
        return True

    # ---- the RL loop's hooks ---------------------------------------------------------------------
    @property
    def training_allowed(self) -> bool:
        """The gate: the rule held at the last engine step (the thread may start a unit of work)."""
        return self._go.is_set()

    @property
    def backlog(self) -> int:
        """Recorded trace chunks the thread has not ingested yet."""
        return len(self._chunks)

    def on_rollout_start(self, step: int) -> None:
        self._close_gate()
        self.rollout = RolloutTraining()

    def observe(self, load: RolloutLoad) -> None:
        """After every engine step, on the engine thread: open the gate while the rule says idle, close it
        otherwise (the unit of work in progress completes; none starts until the rule holds again). A step
        of the idle tail is also recorded for the interference guard, as loaded if a unit of work ran
        during it."""
        loaded = self._busy or self._units != self._units_seen
        self._units_seen = self._units
        if self._go.is_set() and load.step_seconds > 0:
            self.guard.record(load.active, load.step_seconds, loaded)
        if self.rule is not None and self.rule.idle(load) and not self._stop.is_set():
            if not self._go.is_set():
                self._idle_since = self.clock()
                self._go.set()
        else:
            self._close_gate()

    def _close_gate(self) -> None:
        self._go.clear()
        if self._idle_since is not None:
            self.rollout.idle_seconds += self.clock() - self._idle_since
            self._idle_since = None

    def on_rollout_end(self, step: int) -> None:
        self._close_gate()
        with self._lock:  # the unit in progress finishes
            if self.recorder is not None:
                self.recorder.flush_all()

    def between_steps(self, step: int) -> dict:
        """The policy was just updated: refresh the soft targets; a drafter that trained is measured on the
        held-out traces and swapped in with that figure, for the controller to judge."""
        with self._lock:
            tr = self.trainer
            self._take_heldout()
            tr.set_target_head(self.engine.loaded.model.lm_head.weight)
            heldout = None
            samples = tr.heldout_window()
            swap = self.rollout.steps > 0 or self.estimate is None    # trained, or a warm start not yet measured
            acceptance, roots = tr.evaluate(samples) if swap or self.frozen is not None else (None, 0)
            if swap and roots:
                heldout = acceptance
                self.estimate = acceptance
                self.proposer.swap(tr.drafter.to_dtype(self.serve_dtype), expected_acceptance=acceptance)
                self.version += 1
            out = {"version": self.version, "tail_steps": self.rollout.steps, "total_steps": self.total_steps,
                   "tail_train_seconds": self.rollout.train_seconds, "idle_seconds": self.rollout.idle_seconds,
                   "heldout_acceptance": heldout, "estimate": self.estimate, "core_free": self.rule.core_free,
                   "buffer_positions": tr.buffer.positions, "backlog": self.backlog, "loss": self.last_loss,
                   "duty": self.guard.duty, "slowdown": self.guard.last_ratio, "error": self.error}
            if self.frozen is not None:
                out["keep_up"] = self._keep_up(samples, acceptance, roots)
            return out

    def _take_heldout(self) -> None:
        """Ingest the held-out chunks still waiting: between steps the rollout is not running, so this costs
        it nothing, and the held-out figures are then taken on the newest rollouts even when the rollout left
        no idle time to ingest them (training chunks still wait for idle time)."""
        held = [c for c in self._chunks if c.heldout]
        for c in held:
            self._chunks.remove(c)
            self.trainer.add(c)

    def _keep_up(self, samples: list, cotrained: float, roots: int) -> dict:
        """The co-trained drafter's simulated acceptance length on the held-out window (the newest rollouts'
        traces, soft labels from the policy that produced them; scored by the caller) and the step-0 copy's
        on the same samples."""
        from ..train.objective import simulated_acceptance

        frozen, _ = simulated_acceptance(self.frozen, samples, self.frozen.unroll_steps(self.tcfg.ttt_steps),
                                         autocast=self.tcfg.autocast)
        return {"cotrained": cotrained, "frozen": frozen, "roots": roots}

    def close(self) -> None:
        self._stop.set()
        self._go.clear()
        if self._thread is not None:
            self._thread.join(10.0)
        if self._detach is not None:
            self._detach()
            self._detach = None


def make_cotrainer(cfg) -> DrafterCoTrainer:
    if cfg.workers > 1:
        raise ValueError("cotrain: drafter co-training runs with one in-process worker for now (--workers 1)")
    torch.manual_seed(cfg.seed)
    return DrafterCoTrainer(seed=cfg.seed, share=cfg.cotrain_share, keep_up=cfg.cotrain_keep_up,
                            start_from=cfg.cotrain_from)
