"""Learning: GRPO on the default task with the default model raises the reward (slow; `make test-slow`)."""

from __future__ import annotations

import json

import pytest

from onspec.rl.config import RLConfig
from onspec.rl.grpo import GRPOConfig
from onspec.rl.loop import RLRunner
from onspec.rl.rollout import RolloutConfig


@pytest.mark.slow
def test_reward_rises_over_30_steps(tmp_path):
    # 8 prompts x 4 responses: more problems per step average out their difficulty (a step of 4 easy sums
    # scores high whatever the policy); lr 1e-5 learns over tens of steps instead of jumping in two.
    cfg = RLConfig(model="default", prompts_per_step=8, steps=30,
                   rollout=RolloutConfig(group_size=4, max_tokens=48, temperature=1.0),
                   grpo=GRPOConfig(lr=1e-5), speculation="suffix", threads=1, out=str(tmp_path / "run"), plot=True,
                   seed=0)
    history = RLRunner(cfg).run(progress_bar=False)
    curve = [round(m.reward, 3) for m in history]
    first = sum(curve[:5]) / 5
    last = sum(curve[-5:]) / 5
    print("reward curve:", json.dumps(curve), f"first5 {first:.3f} last5 {last:.3f}")
    # Rewards are in [0, 1.1]; at the start the model answers about a fifth correctly and rambles.
    assert last > first + 0.15, f"no clear learning: first five {first:.3f}, last five {last:.3f}"
    assert (tmp_path / "run" / "curves.png").is_file()
