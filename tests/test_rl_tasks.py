"""Tasks: deterministic problems, chat messages, answer extraction, score + format reward, clear errors."""

from __future__ import annotations

import pytest

from onspec.rl.tasks import Task, TaskConfig, parse_options


@pytest.fixture(scope="module")
def task() -> Task:
    return Task(TaskConfig())


def test_problems_are_deterministic_and_differ_by_step(task):
    a = task.problems(0, 4)
    b = Task(TaskConfig()).problems(0, 4)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in task.problems(1, 4)] != [p.question for p in a]
    # the default preset: two one-digit terms
    for p in a:
        assert p.question.startswith("Calculate")


def test_messages_carry_the_instruction(task):
    p = task.problems(0, 1)[0]
    msgs = task.messages(p)
    assert msgs[0]["role"] == "user" and p.question in msgs[0]["content"]
    assert task.cfg.instruction in msgs[0]["content"]


def test_reward_score_and_format(task):
    p = task.problems(0, 1)[0]
    ans = p.answer
    bare = task.reward(p, f" {ans}.")
    assert bare.score == 1.0 and bare.format == pytest.approx(0.1) and bare.total == pytest.approx(1.1)
    verbose = task.reward(p, f"Let me think.\nThe sum is computed step by step and equals {ans}")
    assert verbose.score == 1.0 and verbose.format == 0.0
    tagged = task.reward(p, f"Some working\nAnswer: {ans}")
    assert tagged.score == 1.0 and tagged.format == pytest.approx(0.1)
    wrong = task.reward(p, str(int(ans) + 1))
    assert wrong.score == 0.0 and wrong.format == pytest.approx(0.1)
    empty = task.reward(p, "")
    assert empty.total == 0.0 and empty.extracted is None


def test_unknown_task_and_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown reasoning-gym task"):
        Task(TaskConfig(name="no_such_task"))
    with pytest.raises(ValueError, match="task options"):
        Task(TaskConfig(name="basic_arithmetic", options={"bogus_option": 1}))
    with pytest.raises(ValueError, match="format_reward"):
        TaskConfig(format_reward=2.0)


def test_parse_options():
    assert parse_options(["min_terms=2", "operators=[\"+\"]", "style=natural"]) == {
        "min_terms": 2, "operators": ["+"], "style": "natural"}
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["oops"])


def test_other_tasks_work(task):
    t = Task(TaskConfig(name="spell_backward"))
    p = t.problems(0, 1)[0]
    assert t.reward(p, p.answer).score == 1.0
