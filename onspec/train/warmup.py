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
* Corpus pretraining (``corpus > 0``), before all that: the engine prefills ``corpus`` reference answers
  written by other models (``data.reference_answers``, chat-templated, first ``corpus_tokens`` tokens),
  and the head trains on the target's distribution at every one of their positions for ``corpus_epochs``.
  Why: generating is the warm start's cost (~270 positions/s batched on 2 cores) while prefilling runs at
  ~1500/s, and the soft targets are the target model's own distribution whoever wrote the text (EAGLE-1
  trained on fixed ShareGPT text the same way). Text by other writers is not what the model says, so the
  head still fine-tunes on the model's own answers afterwards. ``bench/warmup.py --corpus 2000``
  (bench/results/warmup.json; 1060 references, 377k positions, one epoch): held-out acceptance 1.36 -> 1.44
  with one answer per warm-up prompt, 1.47 -> 1.54 with four.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import TrainerConfig
from ..data import chat_texts, reference_answers
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
    corpus: int = 0                     # reference answers to pretrain on first (0: none)
    corpus_tokens: int = 384            # tokens read of each (system prompt, question, start of the answer)
    corpus_epochs: float = 1.0
    corpus_max_question: int = 160      # skip references whose templated question alone is longer (tokens)

    def __post_init__(self) -> None:
        if self.corpus < 0 or self.corpus_epochs <= 0 or self.corpus_tokens < 16:
            raise ValueError("corpus: must be >= 0, with corpus-epochs > 0 and corpus-tokens >= 16")
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


def run_requests(engine, todo: list[tuple[str, str | list[int], SamplingParams]], concurrency: int, desc: str,
                 unit: str, progress: bool) -> None:
    """Serve ``todo`` (request id, prompt, sampling) on ``engine`` with at most ``concurrency`` requests in
    flight, releasing each when it finishes."""
    todo = list(todo)
    with tqdm(total=len(todo), desc=desc, unit=unit, disable=not progress) as bar:
        live: set[str] = set()
        while todo or live:
            while todo and len(live) < concurrency:
                rid, prompt, params = todo.pop(0)
                engine.add_request(rid, prompt, params)
                live.add(rid)
            engine.step()
            done = {rid for rid in live if all(s.finished for s in engine.requests[rid])}
            for rid in done:
                engine.release_request(rid)
            live -= done
            bar.update(len(done))


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
    run_requests(engine, todo, settings.concurrency, "answering warm-up prompts", "answer", settings.progress)
    recorder.flush_all()
    for c in chunks:  # held out by prompt, not by chunk: no held-out answer has a sibling in training
        c.heldout = is_heldout_prompt(warmup_key_parts(c.key)[0], cfg.heldout_every)
    return Recording(chunks=chunks, prompts=len(prompts), answers=answers, positions=sum(len(c) for c in chunks),
                     branches=recorder.branches, seconds=time.perf_counter() - t0)


def corpus_token_ids(tokenizer, settings: WarmupSettings) -> list[list[int]]:
    """The first ``settings.corpus`` reference answers whose question fits ``corpus_max_question`` tokens,
    chat-templated as a (user, assistant) exchange and cut to ``corpus_tokens`` tokens."""
    def ids(messages: list[dict], generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)

    texts: list[list[int]] = []
    for question, answer in reference_answers():
        if len(texts) >= settings.corpus:
            break
        user = {"role": "user", "content": question}
        if getattr(tokenizer, "chat_template", None) is None:
            full = tokenizer.encode(f"{question}\n{answer}")
            if len(tokenizer.encode(question)) <= settings.corpus_max_question:
                texts.append(full[:settings.corpus_tokens])
            continue
        if len(ids([user], True)) > settings.corpus_max_question:
            continue
        texts.append(ids([user, {"role": "assistant", "content": answer}], False)[:settings.corpus_tokens])
    return texts


def record_corpus(engine, cfg: TrainerConfig, settings: WarmupSettings) -> Recording:
    """Prefill ``settings.corpus`` reference answers on ``engine`` (learned drafter attached, so it records
    aux states) and return their traces: every position a prompt position, one chunk per text (so the
    trainer recomputes soft targets at all of them, ``recompute.PromptHidden``), none held out. The
    recorder is detached afterwards."""
    texts = corpus_token_ids(engine.tokenizer, settings)
    chunks: list = []
    recorder = TraceRecorder(replace(cfg, chunk_positions=max(cfg.chunk_positions, settings.corpus_tokens + 1)),
                             chunks.append)
    detach = attach_recorder(engine, recorder)
    once = SamplingParams(temperature=0.0, max_tokens=1)
    t0 = time.perf_counter()
    try:
        run_requests(engine, [(f"corpus-{i}", ids, once) for i, ids in enumerate(texts)], settings.concurrency,
                     "reading reference answers", "text", settings.progress)
        recorder.flush_all()
    finally:
        detach()
    for c in chunks:
        c.heldout = False  # the held-out figure is read on the model's own answers
    return Recording(chunks=chunks, prompts=len(texts), answers=len(texts), positions=sum(len(c) for c in chunks),
                     branches=0, seconds=time.perf_counter() - t0)


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


def pretrain_on_corpus(engine, drafter, cfg: TrainerConfig, settings: WarmupSettings) -> tuple[Recording, Training]:
    """``record_corpus`` then ``corpus_epochs`` of training of ``drafter`` on it, every position weighing
    as much as a generated one (they are all prompt positions). Its ``Training.after`` is 1.0: the corpus
    has no held-out part; the own answers' held-out figure follows in ``warm_start``."""
    rec = record_corpus(engine, cfg, settings)
    return rec, train_offline(drafter, engine.loaded, replace(cfg, prompt_weight=1.0), rec.chunks,
                              settings.corpus_epochs, settings.seed, settings.progress)


@dataclass
class WarmStart:
    recording: Recording                # the model's own answers
    training: Training                  # on them (its ``before``: after any corpus pretraining)
    corpus: Recording | None = None     # corpus pretraining, when settings.corpus > 0
    corpus_training: Training | None = None


def warm_start(engine, drafter, cfg: TrainerConfig, settings: WarmupSettings) -> WarmStart:
    """[``pretrain_on_corpus``], ``record_answers``, then ``train_offline`` of ``drafter`` (the one attached
    to ``engine``; trained in place)."""
    corpus = corpus_training = None
    if settings.corpus:
        corpus, corpus_training = pretrain_on_corpus(engine, drafter, cfg, settings)
    rec = record_answers(engine, cfg, settings)
    res = train_offline(drafter, engine.loaded, cfg, rec.chunks, settings.epochs, settings.seed, settings.progress)
    return WarmStart(rec, res, corpus, corpus_training)
