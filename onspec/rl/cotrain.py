"""Drafter co-training during RL (the "TLT" design, arXiv 2511.16665): a learned drafter that keeps up with
the policy, trained in the idle tail of each rollout.

Why: the policy changes every RL step, so a drafter trained once goes stale; and every rollout ends in a
long tail where only a few responses are still running and most of the machine waits. TLT spends that
tail training the drafter on the hidden states the rollout just produced, stops when the rollout ends,
and hands the new drafter to the engine before the next rollout.

How, with the pieces of ``onspec/train`` and ``onspec/speculation/eagle.py``:

* ``attach(engine)``: a day-0 EAGLE-3 drafter (``init_drafter``) is attached with ``attach_learned`` (the
  controller then chooses per request between suffix, learned and hybrid drafting, or none), and a
  ``TraceRecorder`` turns every verification (accepted paths, rejected branches, target hidden states)
  into training chunks.
* During the rollout a background thread waits. Once the number of running chunks falls to
  ``tail`` or below, the thread ingests the recorded chunks and runs optimiser steps of the in-process
  ``Trainer`` (training-time-test unroll, forward KL to the target's distribution). PyTorch releases the
  GIL inside its kernels, so the drafter trains on the core the shrinking batch leaves idle; the thread
  runs at the lowest CPU priority (nice 19), so it never takes a core the engine wants.
* ``on_rollout_end``: training stops (the current step completes); remaining traces are flushed.
* ``between_steps``: after the GRPO update has copied the new policy into the engine, the trained
  drafter is swapped into the proposer (``EagleProposer.swap``), and the trainer's soft targets are
  rebuilt from the *new* policy's lm_head (the drafter's embeddings are the engine's, updated in place),
  so the drafter follows the policy as it changes.

Single-engine only: with Ray workers each engine would need its own recorder and the drafter would have
to be broadcast like the policy weights (the hook is the same ``between_steps``); not built yet.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

import torch


class DrafterCoTrainer:
    def __init__(self, trainer_cfg=None, seed: int = 0) -> None:
        from ..config import TrainerConfig

        self.tcfg = trainer_cfg or TrainerConfig(min_positions=64, batch_positions=512, autocast=False, seed=seed)
        self.seed = seed
        self.engine = None
        self.trainer = None
        self.proposer = None
        self.recorder = None
        self._detach = None
        self._chunks: deque = deque()
        self._go = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()        # held while the thread ingests or steps
        self._thread: threading.Thread | None = None
        self.version = 0
        self.tail_steps = 0                  # optimiser steps in the current rollout's tail
        self.tail_seconds = 0.0
        self.total_steps = 0
        self.last_loss: float | None = None
        self._tail_t0: float | None = None
        self.error: str | None = None

    # ---- wiring ----------------------------------------------------------------------------------
    def proposers(self) -> dict | None:
        return None  # the learned proposers are attached in ``attach`` (they need the engine's model)

    def attach(self, engine) -> None:
        from ..models.loader import DTYPES
        from ..speculation.eagle import EagleConfig, attach_learned, init_drafter
        from ..train.traces import TraceRecorder, attach_recorder
        from ..train.trainer import Trainer

        if engine.cfg.spec.mode in ("off", "suffix"):
            raise ValueError("cotrain: needs speculation 'auto', 'learned' or 'hybrid' (the learned drafter "
                             f"must be allowed to draft), got {engine.cfg.spec.mode!r}")
        self.engine = engine
        self.serve_dtype = DTYPES[engine.cfg.dtype]
        drafter = init_drafter(engine.loaded, EagleConfig.for_target(engine.loaded.arch), seed=self.seed)
        spec = attach_learned(engine, engine.cfg.spec, drafter.to_dtype(self.serve_dtype))
        self.proposer = spec.proposers["learned"]
        self.trainer = Trainer(drafter, engine.loaded, self.tcfg)
        self.recorder = TraceRecorder(self.tcfg, self._chunks.append)
        self._detach = attach_recorder(engine, self.recorder)
        self._thread = threading.Thread(target=self._run, name="onspec-cotrain", daemon=True)
        self._thread.start()

    # ---- the background thread -------------------------------------------------------------------
    def _run(self) -> None:
        # Idle time only: at the lowest CPU priority this thread gets a core only when the engine's thread
        # does not want it (Linux gives each thread its own nice value; elsewhere this is a no-op).
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        while not self._stop.is_set():
            if not self._go.wait(0.05):
                continue
            with self._lock:
                if self._stop.is_set() or not self._go.is_set():
                    continue
                try:
                    self._ingest()
                    if self.trainer.ready():
                        stats = self.trainer.step()
                        self.tail_steps += 1
                        self.total_steps += 1
                        if "loss" in stats:
                            self.last_loss = float(stats["loss"])
                    else:
                        time.sleep(0.01)
                except Exception as exc:  # never take the rollout down: stop co-training, say why
                    self.error = f"{exc.__class__.__name__}: {exc}"
                    self._go.clear()
                    self._stop.set()

    def _ingest(self) -> None:
        while self._chunks:
            self.trainer.add(self._chunks.popleft())

    # ---- the RL loop's hooks ---------------------------------------------------------------------
    def on_rollout_start(self, step: int) -> None:
        self._go.clear()
        self.tail_steps = 0
        self.tail_seconds = 0.0
        self._tail_t0 = None

    def idle(self, running: int, tail: int) -> None:
        """Called after every engine step with the number of running chunks."""
        if running <= tail and not self._go.is_set() and not self._stop.is_set():
            self._tail_t0 = time.perf_counter()
            self._go.set()

    def on_rollout_end(self, step: int) -> None:
        self._go.clear()
        with self._lock:  # the step in progress finishes
            if self._tail_t0 is not None:
                self.tail_seconds = time.perf_counter() - self._tail_t0
            if self.recorder is not None:
                self.recorder.flush_all()

    def between_steps(self, step: int) -> dict:
        """The policy was just updated: refresh the soft targets, swap the trained drafter in."""
        with self._lock:
            tr = self.trainer
            tr.set_target_head(self.engine.loaded.model.lm_head.weight)
            if self.tail_steps > 0:
                self.proposer.swap(tr.drafter.to_dtype(self.serve_dtype))
                self.version += 1
            return {"version": self.version, "tail_steps": self.tail_steps, "total_steps": self.total_steps,
                    "tail_train_seconds": self.tail_seconds, "buffer_positions": tr.buffer.positions,
                    "loss": self.last_loss, "error": self.error}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
        if self._detach is not None:
            self._detach()
            self._detach = None


def make_cotrainer(cfg) -> DrafterCoTrainer:
    if cfg.workers > 1:
        raise ValueError("cotrain: drafter co-training runs with one in-process worker for now (--workers 1)")
    torch.manual_seed(cfg.seed)
    return DrafterCoTrainer(seed=cfg.seed)
