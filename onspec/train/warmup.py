"""The day-1 warm start: record the model's answers to a generic prompt set, train the drafter on them offline.

Used by ``onspec warmup`` (``commands.py``: publishing and promotion) and by ``bench/online.py``'s day-1
scenario, so both run the same procedure.

* Prompts: ``warmup_prompts.txt`` (100 instructions written for onspec, distinct from any benchmark's
  traffic), chat-templated.
* Answers: each prompt's greedy answer, then ``samples - 1`` seeded sampled ones for training prompts. The
  head is data-bound (trained on 100 greedy answers it reaches 1.88 tokens per verification on its
  training prompts against 1.34 on held-out ones: bench/warmup.py), so more answers to the same prompts
  make a better head.
* Held-out: whole prompts (every ``heldout_every``-th), greedy answer only, so the published figure is
  read on greedy text of prompts the head never saw, as the gate reads live traffic.
* Training: every recorded position (``trainer.offline_config``: the live replay buffer's byte budget
  would evict a third of a 100-prompt recording), ``epochs`` passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainerConfig
from ..data import chat_texts
from ..engine.sampler import SamplingParams
from .traces import TraceRecorder, attach_recorder
from .trainer import Trainer, offline_config


def warmup_prompts(n: int | None = None) -> list[str]:
    path = Path(__file__).with_name("warmup_prompts.txt")
    rows = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if n is not None:
        if n < 1:
            raise ValueError("prompts: must be >= 1")
        rows = rows[:n]
    return rows


@dataclass
class WarmupSettings:
    prompts: int | None = None          # how many of the warm-up prompts (None: all)
    samples: int = 1                    # answers per training prompt (the first greedy)
    temperature: float = 0.8            # of the extra answers
    max_tokens: int = 192
    concurrency: int = 8
    epochs: float = 6.0                 # passes over the recorded positions
    seed: int = 0
    progress: bool = True               # tqdm bars

    def __post_init__(self) -> None:
        if self.prompts is not None and self.prompts < 1:
            raise ValueError("prompts: must be >= 1")
        if self.max_tokens < 1 or self.concurrency < 1 or self.epochs <= 0 or self.samples < 1:
            raise ValueError("max-tokens, concurrency, epochs and samples: must be positive")
        if self.temperature <= 0:
            raise ValueError("temperature: must be positive (the first answer of each prompt is the greedy one)")


def is_heldout_prompt(index: int, every: int) -> bool:
    """Every ``every``-th warm-up prompt is held out (the same rule as the live recorder's chunks)."""
    return index % every == every - 1


def warmup_request_id(prompt: int, answer: int) -> str:
    return f"warmup-{prompt}-{answer}"


def warmup_key_parts(key: str) -> tuple[int, int]:
    """(prompt index, answer number) of a warm-up trace chunk's key: the recorder names chunks
    ``<request id>/<seq id>`` and the request id is ``warmup_request_id``'s."""
    _, prompt, answer = key.split("/")[0].split("-")
    return int(prompt), int(answer)


def warmup_requests(texts: list[str], samples: int, temperature: float, max_tokens: int, heldout_every: int,
                    seed: int = 0) -> list[tuple[str, str, SamplingParams]]:
    """(request id, prompt, sampling) for the warm-up: each prompt's greedy answer, then ``samples - 1``
    sampled ones (seeded) for training prompts only. All first answers come first, so a cut-short run
    still covers every prompt."""
    out = []
    for s in range(samples):
        for i, text in enumerate(texts):
            if s and is_heldout_prompt(i, heldout_every):
                continue
            params = SamplingParams(temperature=0.0 if s == 0 else temperature, max_tokens=max_tokens,
                                    seed=None if s == 0 else seed * 1_000_003 + s * 1009 + i)
            out.append((warmup_request_id(i, s), text, params))
    return out


@dataclass
class Recording:
    chunks: list                        # TraceChunk s, held-out flags set by prompt
    prompts: int
    answers: int
    positions: int
    branches: int                       # rejected tree nodes recorded
    seconds: float


@dataclass
class Training:
    trainer: Trainer
    steps: int
    seconds: float
    before: float                       # held-out simulated acceptance length before training
    after: float
    heldout_positions: int


def record_answers(engine, cfg: TrainerConfig, settings: WarmupSettings) -> Recording:
    """Answer the warm-up prompts on ``engine`` (which has a learned drafter attached through
    ``attach_learned``, so it records aux states; suffix drafting makes the answers cheap) and return the
    verification traces. The engine is left with the recorder attached and no requests."""
    prompts = warmup_prompts(settings.prompts)
    chunks: list = []
    recorder = TraceRecorder(cfg, chunks.append)
    attach_recorder(engine, recorder)
    todo = warmup_requests(chat_texts(engine.tokenizer, prompts), settings.samples, settings.temperature,
                           settings.max_tokens, cfg.heldout_every, settings.seed)
    answers = len(todo)
    t0 = time.perf_counter()
    with tqdm(total=answers, desc="answering warm-up prompts", unit="answer", disable=not settings.progress) as bar:
        live: set[str] = set()
        while todo or live:
            while todo and len(live) < settings.concurrency:
                rid, text, params = todo.pop(0)
                engine.add_request(rid, text, params)
                live.add(rid)
            engine.step()
            done = {rid for rid in live if all(s.finished for s in engine.requests[rid])}
            for rid in done:
                engine.release_request(rid)
            live -= done
            bar.update(len(done))
    recorder.flush_all()
    for c in chunks:  # held out by prompt, not by chunk: no held-out answer has a sibling in training
        c.heldout = is_heldout_prompt(warmup_key_parts(c.key)[0], cfg.heldout_every)
    return Recording(chunks=chunks, prompts=len(prompts), answers=answers, positions=sum(len(c) for c in chunks),
                     branches=recorder.branches, seconds=time.perf_counter() - t0)


def train_offline(drafter, target, cfg: TrainerConfig, chunks: list, epochs: float, seed: int = 0,
                  progress: bool = True) -> Training:
    """Train ``drafter`` for ``epochs`` passes over every position of ``chunks`` (``offline_config``). Empties
    the list: the trainer's buffers hold the data from here on."""
    trainer = Trainer(drafter, target, offline_config(cfg, chunks))
    while chunks:
        trainer.add(chunks.pop(0))
    before, _ = trainer.evaluate()
    steps = max(1, int(epochs * trainer.buffer.positions / cfg.batch_positions))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with tqdm(total=steps, desc="training the drafter", unit="step", disable=not progress) as bar:
        for _ in range(steps):
            st = trainer.step()
            bar.set_postfix(loss=f"{st.get('loss', float('nan')):.3f}")
            bar.update(1)
    seconds = time.perf_counter() - t0
    after, held = trainer.evaluate()
    return Training(trainer=trainer, steps=steps, seconds=seconds, before=before, after=after,
                    heldout_positions=held)


def warm_start(engine, drafter, cfg: TrainerConfig, settings: WarmupSettings) -> tuple[Recording, Training]:
    """``record_answers`` then ``train_offline`` of ``drafter`` (the one attached to ``engine``)."""
    rec = record_answers(engine, cfg, settings)
    return rec, train_offline(drafter, engine.loaded, cfg, rec.chunks, settings.epochs, settings.seed,
                              settings.progress)
