"""End to end: one RL step on a tiny model (rollout -> reward -> GRPO -> weights back in the engine)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from onspec.rl.config import RLConfig
from onspec.rl.grpo import GRPOConfig
from onspec.rl.loop import RLRunner, render_chat
from onspec.rl.rollout import RolloutConfig
from onspec.rl.tasks import Reward, Task, TaskConfig


@pytest.fixture(scope="module")
def chat_tiny(tmp_path_factory):
    """A tiny llama with the default model's full vocabulary and chat template (real prompts fit)."""
    from conftest import make_tiny_model
    from onspec.models.loader import resolve_model_dir

    out = make_tiny_model(tmp_path_factory.mktemp("rl") / "m", "llama", vocab_size=49152, seed=5)
    tpl = resolve_model_dir("default") / "chat_template.jinja"
    if tpl.is_file():
        shutil.copy(tpl, out / tpl.name)
    return out


class ParityTask(Task):
    """A reward a random model earns about half the time, so groups have signal."""

    def reward(self, problem, completion: str) -> Reward:
        score = float(len(completion) % 2 == 0)
        return Reward(total=score, score=score, format=0.0, extracted=None)


def _cfg(path, tmp_path, **kw) -> RLConfig:
    rollout = kw.pop("rollout", RolloutConfig(group_size=4, max_tokens=12, temperature=1.0, chunk_tokens=5))
    kw.setdefault("dtype", "float32")
    return RLConfig(model=str(path), task=TaskConfig(), prompts_per_step=2, steps=1, rollout=rollout,
                    grpo=GRPOConfig(lr=1e-2), max_num_seqs=4, max_model_len=256, threads=1,
                    out=str(tmp_path / "out"), **kw)


def test_one_rl_step_updates_engine_weights(chat_tiny, tmp_path):
    cfg = _cfg(chat_tiny, tmp_path, plot=True)
    runner = RLRunner(cfg, task=ParityTask(cfg.task))
    engine_model = runner.backend.engine.loaded.model
    before = [p.detach().clone() for p in engine_model.parameters()]
    history = runner.run(progress_bar=False)
    m = history[0]
    assert m.trained_sequences > 0 and m.generated_tokens > 0
    # 4 slots, 2 groups of 4: each group's responses prefill the prompt once (share_prefill)
    assert m.shared_prompt_tokens > 0 and 0.0 <= m.truncated <= 1.0
    after = list(engine_model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(before, after)), "the engine still has the old weights"
    assert all(torch.equal(a, b) for a, b in zip(after, runner.trainer.policy.parameters()))
    assert not any(p.requires_grad for p in engine_model.parameters())
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    for key in ("reward", "rollout_seconds", "tail_seconds", "tokens_per_second", "acceptance_length",
                "acceptance_by_strategy", "train_seconds", "shared_prompt_tokens", "truncated"):
        assert key in rows[0]
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    # the simulator replays the recorded lengths, group by group
    from onspec.rl.simulate.workload import load_recorded

    assert len(rows[0]["response_lengths"]) == 8 and sum(rows[0]["response_lengths"]) / 8 == m.response_tokens
    groups = load_recorded(str(tmp_path / "out" / "metrics.jsonl")).groups
    assert [list(g) for g in groups] == [rows[0]["response_lengths"][:4], rows[0]["response_lengths"][4:]]


def test_bfloat16_engine_holds_the_rounded_trained_weights(chat_tiny, tmp_path):
    cfg = _cfg(chat_tiny, tmp_path, dtype="bfloat16")
    runner = RLRunner(cfg, task=ParityTask(cfg.task))
    runner.run(progress_bar=False)
    engine_model = runner.backend.engine.loaded.model
    for a, b in zip(engine_model.parameters(), runner.trainer.policy.parameters()):
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
        assert torch.equal(a, b.detach().to(torch.bfloat16))


def test_trainer_logprobs_match_the_engine(chat_tiny):
    """The training forward scores a rollout exactly as the engine sampled it (temperature 1)."""
    from onspec import LLM, SamplingParams
    from onspec.rl.forward import completion_logprobs

    llm = LLM(model=str(chat_tiny), dtype="float32", speculation="off", max_model_len=256)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=10, seed=1, logprobs=0))
    comps = [o.outputs[0].token_ids for o in outs]
    lps = completion_logprobs(llm.engine.loaded.model, prompts, comps)
    for o, lp in zip(outs, lps):
        expect = torch.tensor([x[0] for x in o.outputs[0].logprobs])
        assert torch.allclose(lp, expect, atol=1e-4)


def test_render_chat_falls_back_without_template():
    class NoTemplate:
        chat_template = None

    assert render_chat(NoTemplate(), [{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="plot"):
        RLConfig(plot=True)
    with pytest.raises(ValueError, match="speculation"):
        RLConfig(speculation="magic")
    with pytest.raises(ValueError, match="workers"):
        RLConfig(workers=0)


def test_cli_rejects_bad_task(capsys):
    from onspec.cli import main

    assert main(["rl", "--task", "no_such_task", "--steps", "1"]) == 2
    assert "unknown reasoning-gym task" in capsys.readouterr().err
