"""The day-1 warm start: record the model's answers to a generic prompt set, train the drafter on them offline.

Used by ``onspec warmup`` (``commands.py``: publishing and promotion) and by ``bench/online.py``'s day-1
scenario, so both run the same procedure.

* Prompts: ``warmup_prompts.txt`` (100 instructions written for onspec, distinct from any benchmark's
  traffic), chat-templated.
* Answers: each prompt's greedy answer, then ``samples - 1`` seeded sampled ones for training prompts. The
  head is data-bound (on 100 greedy answers it reaches 1.72 tokens per verification on its training
  answers against 1.34 on held-out ones), so more answers to the same prompts make a better head.
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
        if self.max_tokens < 1 or self.concurrency < 1 or self.epochs <= 0 or self.samples < 1:
            raise ValueError("max-tokens, concurrency, epochs and samples: must be positive")
        if self.temperature <= 0:
            raise ValueError("temperature: must be positive (the first answer of each prompt is the greedy one)")


@dataclass
class WarmupResult:
    trainer: Trainer
    prompts: int
    answers: int
    positions: int                      # recorded positions (all trained on or held out)
    branches: int                       # rejected tree nodes recorded
    generate_seconds: float
    steps: int
    train_seconds: float
    before: float                       # held-out simulated acceptance length before training
    after: float
    heldout_positions: int


def is_heldout_prompt(index: int, every: int) -> bool:
    """Every ``every``-th warm-up prompt is held out (the same rule as the live recorder's chunks)."""
    return index % every == every - 1


def warmup_prompt_index(key: str) -> int:
    """The prompt index of a trace chunk's key (``warmup-<prompt>-<answer>/<seq id>``)."""
    return int(key.split("/")[0].split("-")[1])


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
            out.append((f"warmup-{i}-{s}", text, params))
    return out


def chat_texts(tokenizer, prompts: list[str]) -> list[str]:
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return [f"{p}\n" for p in prompts]   # a base model without a chat template: the instruction as plain text


def warm_start(engine, drafter, cfg: TrainerConfig, settings: WarmupSettings) -> WarmupResult:
    """Answer the warm-up prompts on ``engine`` (which has ``drafter`` attached through ``attach_learned``,
    so it records aux states; suffix drafting makes the answers cheap) and train ``drafter`` on the traces.
    The engine is left with its recorder attached and no requests."""
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
    gen_s = time.perf_counter() - t0
    for c in chunks:  # held out by prompt, not by chunk: no held-out answer has a sibling in training
        c.heldout = is_heldout_prompt(warmup_prompt_index(c.key), cfg.heldout_every)
    positions = sum(len(c) for c in chunks)

    trainer = Trainer(drafter, engine.loaded, offline_config(cfg, chunks))
    while chunks:
        trainer.add(chunks.pop(0))
    before, _ = trainer.evaluate()
    steps = max(1, int(settings.epochs * trainer.buffer.positions / cfg.batch_positions))
    torch.manual_seed(settings.seed)
    t1 = time.perf_counter()
    with tqdm(total=steps, desc="training the drafter", unit="step", disable=not settings.progress) as bar:
        for _ in range(steps):
            st = trainer.step()
            bar.set_postfix(loss=f"{st.get('loss', float('nan')):.3f}")
            bar.update(1)
    train_s = time.perf_counter() - t1
    after, held = trainer.evaluate()
    return WarmupResult(trainer=trainer, prompts=len(prompts), answers=answers, positions=positions,
                        branches=recorder.branches, generate_seconds=gen_s, steps=steps, train_seconds=train_s,
                        before=before, after=after, heldout_positions=held)
