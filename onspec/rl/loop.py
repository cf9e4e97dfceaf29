"""The RL loop: prompts -> grouped rollouts through the engine -> rewards -> GRPO update -> weights back.

One RL step:
  1. the task gives ``prompts_per_step`` problems; each becomes a chat-templated prompt;
  2. the rollout backend (one in-process engine, or Ray workers) generates ``group_size`` responses per
     prompt with lossless speculation, Seer-style scheduling and divided rollout (``rl/rollout.py``);
  3. each response is scored (task score + format bonus);
  4. ``GRPOTrainer`` updates its float32 copy of the policy;
  5. the new weights are copied into the engine(s) in place, so the next rollout samples from them;
  6. (co-training) the drafter trained during the rollout's idle tail is swapped in between steps.

Each step appends one JSON line of metrics to ``OUT/metrics.jsonl``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from ..config import EngineConfig, SpecConfig
from .config import RLConfig
from .grpo import GRPOTrainer, Sample, copy_weights
from .rollout import ChunkRunner, RolloutResult, run_rollout
from .tasks import Task


class RolloutBackend(Protocol):
    """Where rollouts run: ``LocalBackend`` (one engine) or ``onspec.distributed.RayBackend`` (N workers)."""

    def rollout(self, prompts: list[list[int]], step: int, progress=None) -> RolloutResult: ...

    def sync_weights(self, policy) -> None: ...

    def close(self) -> None: ...


def engine_config(cfg: RLConfig, spec_mode: str | None = None) -> EngineConfig:
    mode = spec_mode or cfg.speculation
    return EngineConfig(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                        max_num_seqs=cfg.max_num_seqs, num_threads=cfg.threads, seed=cfg.seed,
                        spec=SpecConfig(mode=mode))


def build_engine(cfg: RLConfig, loaded=None, extra_proposers: dict | None = None):
    """An engine for rollouts, with speculation attached unless ``cfg.speculation == 'off'``."""
    from ..engine.engine import Engine

    ecfg = engine_config(cfg)
    engine = Engine(ecfg, loaded)
    if ecfg.spec.mode != "off":
        from ..speculation.controller import attach_speculation

        attach_speculation(engine, ecfg.spec, extra_proposers)
    return engine


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """The model's chat template with the assistant turn opened; a plain transcript for a tokenizer
    without a template (base models, test models)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class LocalBackend:
    """Rollouts on one in-process engine; weights are copied into its model after each update."""

    def __init__(self, engine, cfg: RLConfig, cotrainer=None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.runner = ChunkRunner(engine, cfg.rollout)
        self.cotrainer = cotrainer

    def rollout(self, prompts: list[list[int]], step: int, progress=None) -> RolloutResult:
        hook = self.cotrainer.observe if self.cotrainer is not None else None
        return run_rollout(self.runner, prompts, self.cfg.rollout, step, progress, hook)

    def sync_weights(self, policy) -> None:
        copy_weights(policy, self.engine.loaded.model)

    def close(self) -> None:
        pass


@dataclass
class StepMetrics:
    step: int
    reward: float
    score: float
    format: float
    reward_std: float
    response_tokens: float
    rollout_seconds: float
    tail_seconds: float
    tokens_per_second: float
    generated_tokens: int
    acceptance_length: float
    acceptance_by_strategy: dict[str, float]
    prefill_tokens: int
    reprefill_tokens: int
    chunks: int
    moves: int
    train_seconds: float
    loss: float
    grad_norm: float
    clip_frac: float
    kl: float
    trained_sequences: int
    step_seconds: float
    drafter: dict = field(default_factory=dict)
    shared_prompt_tokens: int = 0        # prompt cache rows copied between siblings instead of prefilled
    reused_prefix_tokens: int = 0        # context cache rows found in a freed slot instead of prefilled
    truncated: float = 0.0               # fraction of responses cut at max_tokens (a cap flattens the tail)
    response_lengths: list[int] = field(default_factory=list)   # tokens per response, group by group (what
    group_size: int = 0                  # ``onspec simulate-rollout --lengths recorded:metrics.jsonl`` replays)


class RLRunner:
    """Owns the task, the rollout backend and the trainer; ``run`` loops over RL steps."""

    def __init__(self, cfg: RLConfig, backend: RolloutBackend | None = None, loaded=None,
                 cotrainer=None, task: Task | None = None) -> None:
        import torch

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.task = task or Task(cfg.task)
        self.cotrainer = cotrainer
        if backend is None:
            if cfg.workers > 1:
                from ..distributed.backend import RayBackend

                from ..models.loader import load_model

                loaded = loaded or load_model(cfg.model, cfg.dtype)
                backend = RayBackend(cfg)
            else:
                engine = build_engine(cfg, loaded, extra_proposers=cotrainer.proposers() if cotrainer else None)
                loaded = engine.loaded
                if cotrainer is not None:
                    cotrainer.attach(engine)
                backend = LocalBackend(engine, cfg, cotrainer)
        if loaded is None:
            raise ValueError("RLRunner: pass the loaded model together with a custom backend")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.backend = backend
        self.trainer = GRPOTrainer(loaded.model, cfg.grpo, temperature=cfg.rollout.temperature)
        self.history: list[StepMetrics] = []
        self._metrics_file = None
        if cfg.out:
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            self._metrics_file = out / "metrics.jsonl"
            self._metrics_file.write_text("")
            (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str))

    def prompt_ids(self, step: int) -> tuple[list, list[list[int]]]:
        problems = self.task.problems(step, self.cfg.prompts_per_step)
        prompts = []
        for p in problems:
            prompts.append(self.tokenizer(render_chat(self.tokenizer, self.task.messages(p)),
                                          add_special_tokens=False)["input_ids"])
        return problems, prompts

    def step(self, i: int, progress_bar: bool = False) -> StepMetrics:
        t0 = time.perf_counter()
        problems, prompts = self.prompt_ids(i)
        G = self.cfg.rollout.group_size
        bar = None
        progress = None
        if progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=len(prompts) * G, desc=f"step {i + 1}/{self.cfg.steps} rollout", unit="resp",
                       leave=True, dynamic_ncols=True)

            def advance(done: int, total: int) -> None:
                bar.update(done - bar.n)

            progress = advance

        if self.cotrainer is not None:
            self.cotrainer.on_rollout_start(i)
        result = self.backend.rollout(prompts, i, progress)
        if self.cotrainer is not None:
            self.cotrainer.on_rollout_end(i)
        samples: list[Sample] = []
        rewards = []
        for it in result.items:  # ordered group by group
            text = self.tokenizer.decode(it.generated, skip_special_tokens=True)
            r = self.task.reward(problems[it.group], text)
            rewards.append(r)
            samples.append(Sample(prompt_ids=it.prompt_ids, completion_ids=it.generated, reward=r.total,
                                  group=it.group))
        if bar is not None:
            mean = sum(r.total for r in rewards) / len(rewards)
            bar.set_description(f"step {i + 1}/{self.cfg.steps} train")
            bar.set_postfix(reward=f"{mean:.3f}")
        upd = self.trainer.update(samples, G)
        self.backend.sync_weights(self.trainer.policy)
        drafter = {}
        if self.cotrainer is not None:
            drafter = self.cotrainer.between_steps(i)
        m = self._metrics(i, rewards, result, upd, time.perf_counter() - t0, drafter)
        if bar is not None:
            bar.set_postfix(reward=f"{m.reward:.3f}", accept=f"{m.acceptance_length:.2f}",
                            tail=f"{m.tail_seconds:.1f}s", train=f"{m.train_seconds:.1f}s")
            bar.close()
        self.history.append(m)
        if self._metrics_file is not None:
            with self._metrics_file.open("a") as f:
                f.write(json.dumps(asdict(m)) + "\n")
        return m

    def _metrics(self, i: int, rewards, result: RolloutResult, upd, seconds: float, drafter: dict) -> StepMetrics:
        n = len(rewards)
        mean = sum(r.total for r in rewards) / n
        std = (sum((r.total - mean) ** 2 for r in rewards) / n) ** 0.5
        return StepMetrics(
            step=i, reward=mean, score=sum(r.score for r in rewards) / n,
            format=sum(r.format for r in rewards) / n, reward_std=std,
            response_tokens=sum(len(it.generated) for it in result.items) / n,
            rollout_seconds=result.seconds, tail_seconds=result.tail_seconds,
            tokens_per_second=result.tokens_per_second, generated_tokens=result.generated_tokens,
            acceptance_length=result.acceptance_length(),
            acceptance_by_strategy={k: v[1] / v[0] for k, v in result.by_strategy.items() if v[0]},
            prefill_tokens=result.prefill_tokens, reprefill_tokens=result.reprefill_tokens,
            chunks=result.chunks, moves=result.moves,
            train_seconds=upd.seconds, loss=upd.loss, grad_norm=upd.grad_norm, clip_frac=upd.clip_frac,
            kl=upd.kl, trained_sequences=upd.trained_sequences, step_seconds=seconds, drafter=drafter,
            shared_prompt_tokens=result.shared_prompt_tokens, reused_prefix_tokens=result.reused_prefix_tokens,
            truncated=sum(it.finish_reason == "length" for it in result.items) / n,
            response_lengths=[len(it.generated) for it in result.items], group_size=self.cfg.rollout.group_size)

    def run(self, progress_bar: bool = True) -> list[StepMetrics]:
        try:
            for i in range(self.cfg.steps):
                self.step(i, progress_bar)
        finally:
            self.close()
        if self.cfg.plot and self.cfg.out:
            from .plots import plot_metrics

            plot_metrics([asdict(m) for m in self.history], Path(self.cfg.out) / "curves.png")
        return self.history

    def close(self) -> None:
        self.backend.close()
        if self.cotrainer is not None:
            self.cotrainer.close()
