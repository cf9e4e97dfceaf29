"""Drafter co-training (TLT): traces from the rollout train the drafter in the tail; it is swapped in."""

from __future__ import annotations

import pytest
import torch

from onspec.config import TrainerConfig
from onspec.rl.config import RLConfig
from onspec.rl.cotrain import DrafterCoTrainer, make_cotrainer
from onspec.rl.grpo import GRPOConfig
from onspec.rl.loop import RLRunner
from onspec.rl.rollout import RolloutConfig
from test_rl_loop import ParityTask, chat_tiny  # noqa: F401  (fixture)


def _cfg(path, **kw) -> RLConfig:
    return RLConfig(model=str(path), steps=2, prompts_per_step=2,
                    rollout=RolloutConfig(group_size=3, max_tokens=24, temperature=1.0),
                    grpo=GRPOConfig(lr=1e-3), max_num_seqs=6, max_model_len=256, threads=1, cotrain=True, **kw)


def test_cotrained_drafter_is_swapped_in_between_steps(chat_tiny):  # noqa: F811
    cfg = _cfg(chat_tiny, speculation="auto", cotrain_tail=6)  # the whole rollout counts as tail
    ct = DrafterCoTrainer(TrainerConfig(min_positions=16, batch_positions=128, autocast=False))
    runner = RLRunner(cfg, cotrainer=ct, task=ParityTask(cfg.task))
    history = runner.run(progress_bar=False)
    assert ct.error is None
    assert ct.total_steps > 0 and ct.version >= 1
    assert history[-1].drafter["version"] == ct.version
    serving = ct.proposer.drafter
    trained = ct.trainer.drafter
    assert serving is not trained  # a copy: training never touches the drafter the engine is using
    for (n, a), (_, b) in zip(serving.named_parameters(), trained.named_parameters()):
        assert torch.equal(a, b.to(a.dtype)), n
    assert "learned" in runner.backend.engine.spec.proposers


def test_cotrain_needs_a_speculation_mode_that_lets_it_draft(chat_tiny):  # noqa: F811
    cfg = _cfg(chat_tiny, speculation="suffix")
    with pytest.raises(ValueError, match="cotrain"):
        RLRunner(cfg, cotrainer=make_cotrainer(cfg), task=ParityTask(cfg.task))
    with pytest.raises(ValueError, match="cotrain"):
        make_cotrainer(_cfg(chat_tiny, speculation="auto", workers=2))
