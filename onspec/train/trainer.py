"""The drafter trainer: an optimizer loop over recorded traces, run in its own process beside the engine.

``Trainer`` is the in-process core (used by the process, by ``onspec warmup`` and by tests): it turns
arriving :class:`TraceChunk` s into training samples (soft targets through the frozen lm_head), keeps them in
a byte-bounded, recency-weighted buffer (held-out chunks apart), and makes one AdamW step per call on the
objective of :mod:`onspec.train.objective` (training-time-test unroll, forward KL weighted ``0.8^i``,
discard term on rejected branches).

``trainer_main`` is the process: it loads the target (for the lm_head and the embeddings) and the version
it starts from, then loops: drain traces, train, publish a version every ``publish_every_steps`` steps or
``publish_every_seconds`` seconds (with its held-out simulated acceptance length), report status. On a
shared 2-core CPU it must not starve serving (the "TLT" design's idle-time training, arXiv 2511.16665):
while the engine is busy the process runs one thread (at ``trainer_nice``), computes only on a core the
engine has lent it between two steps (``channel.ThreadLender``: the engine drops a thread rather than have its
OpenMP threads wait for a core the trainer took), and sleeps so that it computes only ``busy_share`` of
the wall time (ingesting traces included); when the engine has been idle for ``idle_after`` seconds it
trains flat out on every core.

``TrainerProcess`` is the engine-side handle: spawn, queues, liveness, stop.
"""

from __future__ import annotations

import os
import queue
import random
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import TrainerConfig
from ..server.memory import MemoryTrimmer
from .objective import (Sample, SoftTargets, collate, make_optimizer, objective, simulated_acceptance,
                        trainable_parameters)
from .recompute import PromptHidden
from .channel import NOT_STEPPING_AFTER, CpuLease, EngineClock
from .traces import TraceBuffer, TraceChunk


# Trace chunks turned into samples per round of the loop at most (a round is one lease of the engine's cores).
INGEST_PER_ROUND = 8

# Seconds between two malloc_trim calls of the trainer process after optimizer steps (see _TrainerLoop.run).
TRIM_EVERY_SECONDS = 2.0


class Trainer:
    """Drafter + optimizer + buffers; ``step()`` is one optimizer step."""

    def __init__(self, drafter, target, cfg: TrainerConfig, step: int = 0, samples: int = 0,
                 optimizer_state: dict | None = None) -> None:
        self.cfg = cfg
        self.drafter = drafter.float().train()
        self.targets = SoftTargets(target.model.lm_head.weight, drafter.draft_ids, cfg.target_topk)
        self.prompt_hidden = PromptHidden(target, drafter.cfg.aux_layers)
        self.params = trainable_parameters(self.drafter, cfg.train_head)
        self.opt = make_optimizer(self.params, cfg)
        if optimizer_state:
            try:
                self.opt.load_state_dict(optimizer_state)
            except (ValueError, KeyError, RuntimeError):
                pass  # a state for other shapes: start the moments afresh
        self.buffer = TraceBuffer(cfg.buffer_bytes, cfg.recency_half_life)
        self.heldout = TraceBuffer(max(2**20, cfg.buffer_bytes // cfg.heldout_every), cfg.recency_half_life)
        self.steps = step
        self.samples = samples
        self.last: dict = {}
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def set_target_head(self, lm_head_weight: torch.Tensor) -> None:
        """The target's lm_head changed (an RL policy update): soft targets come through this one from now on."""
        self.targets = SoftTargets(lm_head_weight, self.drafter.draft_ids, self.cfg.target_topk)

    # ---- data ------------------------------------------------------------------------------------
    def add(self, chunk: TraceChunk) -> Sample:
        self.prompt_hidden.fill(chunk)  # soft targets at prompt positions too
        sample = self.targets.prepare(chunk, self.cfg.prompt_weight)
        (self.heldout if chunk.heldout else self.buffer).add(sample)
        return sample

    def ready(self) -> bool:
        return self.buffer.positions >= self.cfg.min_positions

    def heldout_window(self) -> list[Sample]:
        return self.heldout.recent(self.cfg.heldout_positions)

    # ---- optimisation ----------------------------------------------------------------------------
    @property
    def batch_cells(self) -> int:
        """Bound on an optimizer step's padded batch (``traces.padded_cells``): twice its positions, room
        for three chunks of full length or for many short ones, and a bounded step working set (see
        ``TraceBuffer.sample``)."""
        return 2 * self.cfg.batch_positions

    def step(self, batch_samples: list[Sample] | None = None) -> dict:
        samples = batch_samples or self.buffer.sample(self.cfg.batch_positions, self.rng, self.batch_cells)
        if not samples:
            return {}
        batch = collate(samples)
        if self.cfg.aux_noise > 0:  # a regulariser against memorising the few sequences seen so far
            aux = batch.aux.float()
            rms = aux.pow(2).mean(-1, keepdim=True).sqrt()
            noise = torch.randn(aux.shape, generator=self.gen) * rms * self.cfg.aux_noise
            batch.aux = (aux + noise).to(batch.aux.dtype)
        self.drafter.train()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.autocast):
            loss, stats = objective(self.drafter, batch, self.cfg, self.gen)
        loss.backward()
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        self.opt.step()
        self.steps += 1
        self.samples += int(batch.lengths.sum())
        stats["step"] = self.steps
        self.last = stats
        return stats

    @torch.no_grad()
    def evaluate(self, samples: list[Sample] | None = None) -> tuple[float, int]:
        samples = self.heldout_window() if samples is None else samples
        self.drafter.eval()
        try:
            return simulated_acceptance(self.drafter, samples, self.drafter.unroll_steps(self.cfg.ttt_steps),
                                        autocast=self.cfg.autocast)
        finally:
            self.drafter.train()

    def load_state(self, drafter_state: dict, optimizer_state: dict | None) -> None:
        """Continue from another version's weights (after a rollback)."""
        self.drafter.load_state_dict({k: v.to(self.drafter.state_dict()[k].dtype) for k, v in drafter_state.items()})
        self.opt = make_optimizer(self.params, self.cfg)
        if optimizer_state:
            try:
                self.opt.load_state_dict(optimizer_state)
            except (ValueError, KeyError, RuntimeError):
                pass


def offline_config(cfg: TrainerConfig, chunks: list[TraceChunk]) -> TrainerConfig:
    """``cfg`` for training on a fixed set of recorded chunks (``onspec warmup``): keep every one of them.

    A live trainer's replay buffer is bounded in bytes (``buffer_bytes``: the server's memory bound) and
    favours recent traces. Offline, neither applies: the data is fixed and already in memory, and with the
    live budget the buffer evicted about a third of a 100-prompt warm-up's positions (and of its held-out
    ones) before the first step. So the budget covers all of it, every chunk weighs the same, and the
    held-out figure is taken over every held-out position. A prepared sample drops the chunk's recorded
    final states and adds soft targets (``target_topk`` ids and probabilities) plus a few per-position
    scalars, so the chunk's own size plus those bounds it (with the arena's per-tensor alignment); the
    held-out buffer gets ``buffer_bytes // heldout_every`` (``Trainer``), hence the factor on its share."""
    per_row = 12 * cfg.target_topk + 32

    def need(held: bool) -> int:
        return sum(c.nbytes() + (len(c) + c.num_branches) * per_row + 64 * 16 for c in chunks if c.heldout == held)

    return replace(cfg, buffer_bytes=max(cfg.buffer_bytes, need(False), need(True) * cfg.heldout_every),
                   recency_half_life=max(cfg.recency_half_life, 1 << 40),
                   heldout_positions=max(cfg.heldout_positions, sum(len(c) for c in chunks if c.heldout)))


# ---- the process ------------------------------------------------------------------------------------
@dataclass
class TrainerLaunch:
    """Everything the trainer process needs (picklable: it crosses a spawn)."""

    cfg: TrainerConfig
    model_path: str                 # the target's Hugging Face directory (engine.loaded.path)
    model_dtype: str
    versions_dir: str
    start_version: int
    base_model: str = ""


def load_target_light(model_path: str, dtype: str):
    """The target model without its tokenizer (the trainer only needs embeddings and the lm_head)."""
    import json

    from ..models.llama import ArchConfig
    from ..models.loader import DTYPES, LoadedModel, build_model, read_hf_state

    path = Path(model_path)
    hf_cfg = json.loads((path / "config.json").read_text())
    arch = ArchConfig.from_hf(hf_cfg)
    net = build_model(arch, read_hf_state(path), DTYPES[dtype])
    return LoadedModel(model=net, tokenizer=None, arch=arch, path=path, name=path.name, eos_token_ids=())


def drop_layers_below(target, keep_from: int) -> int:
    """Replace the target's decoder layers below ``keep_from`` with empty modules; returns the bytes freed.

    Why: the trainer process reads only the target's embeddings and lm_head (soft targets, the drafter's
    shared embeddings) and its layers from the highest aux layer up (``PromptHidden`` recomputes prompt
    hidden states from there). The layers below are most of the model, ~190 MiB of the default model in
    bfloat16 that this process held for nothing (server + trainer stay under 3 GiB)."""
    layers = target.model.layers
    freed = 0
    for i in range(min(keep_from, len(layers))):
        freed += sum(p.numel() * p.element_size() for p in layers[i].parameters())
        freed += sum(b.numel() * b.element_size() for b in layers[i].buffers())
        layers[i] = torch.nn.Identity()
    return freed


def load_version_for_training(root: Path, version: int, target):
    """(fp32 drafter, optimizer state or None, manifest) of a published version."""
    from ..speculation.checkpoints import load_drafter
    from .publish import OPTIMIZER_FILE, read_manifest, verify_checksums, version_dir

    d = version_dir(root, version)
    manifest = verify_checksums(d, read_manifest(d))
    drafter = load_drafter(d, target, dtype=torch.float32)
    opt_state = None
    if (d / OPTIMIZER_FILE).is_file():
        try:
            opt_state = torch.load(d / OPTIMIZER_FILE, weights_only=True)
        except Exception:  # a damaged optimizer file only costs the moments
            opt_state = None
    return drafter, opt_state, manifest


def trainer_main(launch: TrainerLaunch, traces_q, events_q, control_q, clock, stop_event, lease) -> None:
    """Entry point of the trainer process (see the module docstring); ``lease`` is a :class:`CpuLease`."""
    try:
        _TrainerLoop(launch, traces_q, events_q, control_q, clock, stop_event, lease).run()
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report, then die: the engine keeps serving without us
        try:
            events_q.put({"type": "error", "message": f"{exc.__class__.__name__}: {exc}",
                          "traceback": traceback.format_exc()}, timeout=1.0)
        except Exception:
            pass
        raise


class _TrainerLoop:
    def __init__(self, launch: TrainerLaunch, traces_q, events_q, control_q, clock, stop_event,
                 lease: CpuLease) -> None:
        self.launch = launch
        self.lease = lease
        self.cfg = launch.cfg
        self.traces_q, self.events_q, self.control_q = traces_q, events_q, control_q
        self.clock, self.stop_event = clock, stop_event
        self.root = Path(launch.versions_dir)

    def run(self) -> None:
        cfg = self.cfg
        try:
            # Why not nice 19 by default: the engine's OpenMP threads spin between parallel regions, so
            # under continuous traffic a nice-19 trainer got no CPU at all (0 optimizer steps over 100
            # requests at concurrency 2 on 2 cores). At nice 0 the duty cycle below (``busy_share``) is
            # what bounds its cost to serving; raise ``trainer_nice`` to train only in the engine's gaps.
            os.nice(cfg.trainer_nice)
        except OSError:
            pass
        # oneDNN keeps a compiled primitive per (rows, weight) shape in two caches, ~0.7 MB each (see
        # onspec/server/memory.py). Training batches come in many row counts, and a primitive costs only
        # 0.5-1 ms to rebuild against a step of a second or more, so this process keeps few: with the
        # server's 256 the trainer grew by ~0.5 GiB over 1000 requests and server + trainer passed 3 GiB.
        # Read when the first primitive is created, i.e. below, so setting them here still takes effect.
        for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
            os.environ[name] = "32"
        threads = cfg.trainer_threads
        torch.set_num_threads(threads)
        torch.manual_seed(cfg.seed)
        # Every step allocates and frees a working set of tens to hundreds of MiB (logits over the draft
        # vocabulary, their softmaxes and gradients, attention scores) in tensors of many sizes; glibc keeps
        # what sits in its heaps (everything under its adaptive mmap threshold, up to 32 MiB), so without a
        # trim the process stays at its largest step's footprint plus fragmentation. A trim costs a few
        # milliseconds against a step of about a second.
        trimmer = MemoryTrimmer(min_interval=TRIM_EVERY_SECONDS)
        target = load_target_light(self.launch.model_path, self.launch.model_dtype)
        drafter, opt_state, manifest = load_version_for_training(self.root, self.launch.start_version, target)
        trainer = Trainer(drafter, target, cfg, step=manifest.step, samples=manifest.samples,
                          optimizer_state=opt_state)
        drop_layers_below(target, trainer.prompt_hidden.hi)
        del drafter, opt_state
        trimmer.trim()  # the dropped layers and the loading's transients
        parent = self.launch.start_version
        self._emit({"type": "started", "version": parent, "step": trainer.steps, "pid": os.getpid()})
        last_pub_t, last_pub_step = time.monotonic(), trainer.steps
        last_status = 0.0
        received = 0
        compute = 0.0
        pending: list[bytes] = []   # trace chunks received, not yet turned into samples
        busy_share = cfg.busy_share  # moved by the engine's "share" messages (train/share.py)

        def publish_due(now: float) -> bool:
            return (trainer.steps - last_pub_step >= cfg.publish_every_steps
                    or (now - last_pub_t >= cfg.publish_every_seconds and trainer.steps > last_pub_step))

        while not self.stop_event.is_set():
            if not pending and not trainer.ready():
                pending += self._receive(block=True, limit=1)  # wait for data outside any CPU lease
            force = False
            for msg in self._control():
                if msg.get("type") == "reset":
                    d, o, m = load_version_for_training(self.root, int(msg["version"]), target)
                    trainer.load_state(d.state_dict(), o)
                    trainer.steps, trainer.samples = max(trainer.steps, m.step), max(trainer.samples, m.samples)
                    parent = int(msg["version"])
                    last_pub_t, last_pub_step = time.monotonic(), trainer.steps
                elif msg.get("type") == "publish":
                    force = True
                elif msg.get("type") == "share":  # the engine moved the share by measured utility (share.py)
                    busy_share = min(1.0, max(1e-3, float(msg["busy_share"])))
                elif msg.get("type") == "stop":
                    force = bool(msg.get("save")) and trainer.steps > last_pub_step
                    self.stop_event.set()
            if self.stop_event.is_set() and not force:
                break
            busy = EngineClock.busy(self.clock, cfg.idle_after)
            want = cfg.trainer_threads if busy else (cfg.idle_threads or os.cpu_count() or 1)
            if want != threads:
                threads = want
                torch.set_num_threads(threads)
            stats: dict = {}
            dt = 0.0
            now = time.monotonic()
            work = bool(pending) or self._has_traces() or (trainer.ready() and not self.stop_event.is_set()) \
                or ((force or publish_due(now)) and trainer.steps > last_pub_step)
            if work:
                # Everything below is CPU work: ingesting traces (prompt recompute, soft targets), the optimizer
                # step, evaluation and publishing. It runs only on cores the engine lent (ThreadLender), and all of
                # it counts towards the duty cycle.
                with self.lease.borrow(self._engine_idle, stop=self.stop_event):
                    t0 = time.perf_counter()
                    pending += self._receive(block=False, limit=INGEST_PER_ROUND - len(pending))
                    for data in pending:
                        trainer.add(TraceChunk.from_bytes(data))
                    received += len(pending)
                    pending = []
                    if trainer.ready() and not self.stop_event.is_set():
                        stats = trainer.step()
                        trimmer.maybe_trim()
                    now = time.monotonic()
                    if (force or publish_due(now)) and trainer.steps > last_pub_step:
                        parent = self._publish(trainer, parent)
                        last_pub_t, last_pub_step = time.monotonic(), trainer.steps
                        trimmer.trim()  # the evaluation's batches and the serialised weights and optimizer state
                    dt = time.perf_counter() - t0
                compute += dt
            if now - last_status >= 1.0:
                last_status = now
                self._emit({"type": "status", "step": trainer.steps, "samples": trainer.samples,
                            "chunks": received, "buffer_positions": trainer.buffer.positions,
                            "buffer_bytes": trainer.buffer.bytes, "heldout_positions": trainer.heldout.positions,
                            "evicted": trainer.buffer.evicted, "busy": busy, "threads": threads,
                            "busy_share": busy_share,
                            "compute_seconds": compute, "loss": stats.get("loss", trainer.last.get("loss")),
                            "kl_steps": trainer.last.get("kl_steps"), "discard": trainer.last.get("discard")})
            if force and self.stop_event.is_set():
                break
            # Throttle: while the engine is busy, compute only busy_share of the wall time.
            if busy and dt > 0 and busy_share < 1.0:
                self.stop_event.wait(dt * (1.0 - busy_share) / busy_share)
        self._emit({"type": "stopped", "step": trainer.steps})

    def _emit(self, msg: dict) -> None:
        msg["t"] = time.time()
        try:
            self.events_q.put(msg, timeout=1.0)
        except Exception:
            pass

    def _publish(self, trainer: Trainer, parent: int) -> int:
        """Evaluate on the held-out window, publish a version, announce it; returns its number."""
        from .publish import Manifest, VersionError, next_version, publish_version

        al, roots = trainer.evaluate()
        for _ in range(5):
            v = next_version(self.root)
            try:
                publish_version(self.root, trainer.drafter, Manifest(
                    version=v, parent=parent, kind="trained", step=trainer.steps, samples=trainer.samples,
                    heldout_acceptance=al, heldout_positions=roots, loss=trainer.last.get("loss"),
                    base_model=self.launch.base_model), trainer.opt.state_dict())
                break
            except VersionError:
                continue  # someone else took the number: try the next one
        self._emit({"type": "published", "version": v, "parent": parent, "step": trainer.steps,
                    "samples": trainer.samples, "heldout_acceptance": al, "heldout_roots": roots})
        return v

    def _engine_idle(self) -> bool:
        return not EngineClock.busy(self.clock, NOT_STEPPING_AFTER)

    def _has_traces(self) -> bool:
        try:
            return not self.traces_q.empty()
        except (OSError, ValueError):
            return False

    def _receive(self, block: bool, limit: int) -> list[bytes]:
        """Up to ``limit`` serialised trace chunks from the queue (waiting up to 0.2 s for the first when
        ``block``); turning them into samples is CPU work, done inside a lease."""
        out: list[bytes] = []
        while len(out) < limit:
            try:
                out.append(self.traces_q.get(timeout=0.2) if (block and not out) else self.traces_q.get_nowait())
            except (queue.Empty, OSError, EOFError):
                break
        return out

    def _control(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.control_q.get_nowait())
            except (queue.Empty, OSError, EOFError):
                return out


class TrainerProcess:
    """Engine-side handle of the trainer process: spawn it, talk to it, watch it, stop it."""

    def __init__(self, launch: TrainerLaunch) -> None:
        import multiprocessing as mp

        self.ctx = mp.get_context("spawn")
        self.launch = launch
        self.traces_q = self.ctx.Queue(maxsize=8)
        self.events_q = self.ctx.Queue()
        self.control_q = self.ctx.Queue()
        self.stop_event = self.ctx.Event()
        self.clock = EngineClock(self.ctx)
        self.lease = CpuLease(self.ctx)
        self.process = self.ctx.Process(
            target=trainer_main, name="onspec-trainer", daemon=True,
            args=(launch, self.traces_q, self.events_q, self.control_q, self.clock.value, self.stop_event,
                  self.lease))

    def start(self) -> None:
        self.process.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, msg: dict) -> None:
        try:
            self.control_q.put_nowait(msg)
        except Exception:
            pass

    def events(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.events_q.get_nowait())
            except (queue.Empty, OSError, EOFError, ValueError):
                return out

    def stop(self, save: bool = True, timeout: float = 30.0) -> None:
        if self.process.is_alive():
            self.send({"type": "stop", "save": save})
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5.0)
        for q in (self.traces_q, self.events_q, self.control_q):
            q.cancel_join_thread()
            q.close()
