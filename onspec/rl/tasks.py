"""Prompts with verifiable rewards, from the ``reasoning-gym`` package (seeded procedural tasks + scorers).

A ``Task`` wraps one reasoning-gym dataset: ``problems(step, n)`` gives the step's problems (deterministic
in the seed, so every run and every benchmark configuration sees the same prompts), ``messages`` turns a
problem into a chat conversation, and ``reward`` scores a completion:

    reward = task score (reasoning-gym's scorer, in [0, 1]) + format_reward * (reply is in the asked form)

The asked form is a bare answer: the instruction says "reply with only the final answer", and the format
bonus goes to a reply that is a single short line (or ends with an ``Answer: ...`` line). The score is
computed on the extracted answer, so a correct number buried in a paragraph still earns the task score;
the small bonus only tilts the policy towards replies that are unambiguous to grade.

Default task and why: ``basic_arithmetic`` restricted to two one-digit terms joined by ``+`` or ``-``
(preset below). SmolLM2-135M-Instruct starts at a task score of about 0.13-0.18 at temperature 1
(measured on 32-40 samples): it knows many of these sums but mostly rambles past them, so GRPO groups
are neither all wrong nor all right and carry a learning signal (concise, correct answers win). The
replies are short (tens of tokens), which keeps a CPU RL step affordable, and the scorer is exact. The
package's default difficulty (up to six terms of up to four digits) and word problems such as
gsm_symbolic are far beyond a 135M model: near-zero reward, zero advantages, nothing to learn from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Dataset config overrides applied when a task is named without explicit options. Only tasks whose default
# difficulty is out of reach of a 135M model need one.
PRESETS: dict[str, dict[str, Any]] = {
    "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"),
                             allow_parentheses=False, allow_negation=False),
    "chain_sum": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
}

DEFAULT_TASK = "basic_arithmetic"
INSTRUCTION = "Reply with only the final answer."
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_LINE = re.compile(r"answer\s*[:=]\s*(.+)", re.IGNORECASE)


@dataclass(frozen=True)
class TaskConfig:
    name: str = DEFAULT_TASK
    options: dict[str, Any] | None = None   # reasoning-gym dataset config overrides (None: the preset)
    size: int = 100_000                     # problems in the procedural dataset (indices wrap around)
    seed: int = 0
    format_reward: float = 0.1
    instruction: str = INSTRUCTION
    bare_max_chars: int = 32                # a "bare" reply: one line of at most this many characters

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("task: must be a reasoning-gym dataset name")
        if self.size < 1:
            raise ValueError("task size: must be >= 1")
        if not 0.0 <= self.format_reward <= 1.0:
            raise ValueError("format_reward: must be in [0, 1]")


@dataclass
class Problem:
    index: int
    question: str
    answer: str
    entry: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Reward:
    total: float
    score: float
    format: float
    extracted: str | None


def available_tasks() -> list[str]:
    import reasoning_gym

    return sorted(reasoning_gym.factory.DATASETS)


class Task:
    """One reasoning-gym dataset, turned into chat prompts and rewards."""

    def __init__(self, cfg: TaskConfig = TaskConfig()) -> None:
        try:
            import reasoning_gym
        except ImportError as exc:  # an optional dependency: say how to get it
            raise ValueError(f"task: the rl extra is not installed ({exc}); pip install reasoning-gym") from None
        names = sorted(reasoning_gym.factory.DATASETS)
        if cfg.name not in names:
            close = [n for n in names if cfg.name.split("_")[0] in n][:5]
            raise ValueError(f"task: unknown reasoning-gym task {cfg.name!r}"
                             + (f" (did you mean {', '.join(close)}?)" if close else ""))
        options = PRESETS.get(cfg.name, {}) if cfg.options is None else dict(cfg.options)
        try:
            self.dataset = reasoning_gym.create_dataset(cfg.name, size=cfg.size, seed=cfg.seed, **options)
        except (TypeError, ValueError, AssertionError) as exc:
            raise ValueError(f"task options for {cfg.name}: {exc}") from None
        self.cfg = cfg
        self.name = cfg.name

    # ---- prompts -----------------------------------------------------------------------------
    def problems(self, step: int, n: int) -> list[Problem]:
        """The ``n`` problems of RL step ``step`` (disjoint across steps until the dataset wraps)."""
        out = []
        for k in range(n):
            i = (step * n + k) % self.cfg.size
            e = self.dataset[i]
            out.append(Problem(index=i, question=str(e["question"]).strip(), answer=str(e["answer"]), entry=e))
        return out

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        text = problem.question
        if self.cfg.instruction:
            text = f"{text}\n{self.cfg.instruction}"
        return [{"role": "user", "content": text}]

    # ---- rewards -----------------------------------------------------------------------------
    def is_bare(self, completion: str) -> bool:
        """The reply is in the asked form: one short line, or its last line is ``Answer: ...``."""
        text = completion.strip()
        if not text:
            return False
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if _ANSWER_LINE.match(lines[-1].strip()):
            return True
        return len(lines) == 1 and len(text) <= self.cfg.bare_max_chars

    def extract(self, problem: Problem, completion: str) -> str | None:
        """The reply's final answer: an ``Answer:`` line, else the bare reply, else (numeric tasks) the last
        number, else the last line."""
        text = completion.strip()
        if not text:
            return None
        hits = _ANSWER_LINE.findall(text)
        if hits:
            return _clean(hits[-1])
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) == 1 and len(text) <= self.cfg.bare_max_chars and not _NUMBER.fullmatch(problem.answer):
            return _clean(text)
        if _NUMBER.fullmatch(problem.answer.strip()):
            nums = _NUMBER.findall(text)
            return nums[-1] if nums else None
        return _clean(lines[-1])

    def reward(self, problem: Problem, completion: str) -> Reward:
        ans = self.extract(problem, completion)
        try:
            score = float(self.dataset.score_answer(ans, problem.entry)) if ans is not None else 0.0
        except Exception:  # a scorer choking on a malformed answer is a wrong answer, not a crash
            score = 0.0
        fmt = self.cfg.format_reward if self.is_bare(completion) else 0.0
        return Reward(total=score + fmt, score=score, format=fmt, extracted=ans)


def _clean(s: str) -> str:
    s = s.strip().splitlines()[0].strip() if s.strip() else ""
    return s.rstrip(".").strip().strip("`*").strip()


def parse_options(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (values as JSON when they parse, else strings) -> dataset config overrides."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"task-option: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out
