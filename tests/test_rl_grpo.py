"""GRPO maths on hand-computed toy batches: advantages, clipping, token-level normalisation, KL, trainer."""

from __future__ import annotations

import math

import pytest
import torch

from onspec.rl.grpo import (GRPOConfig, GRPOTrainer, Sample, copy_weights, group_advantages, grpo_loss,
                            grpo_token_loss, k3_kl, trainable_copy)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    adv = group_advantages(r, scale_by_std=True, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s = math.sqrt(1 / 3)
    assert adv[0].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # identical rewards: no signal, no NaN
    centred = group_advantages(r, scale_by_std=False)
    assert centred[0].tolist() == [0.5, -0.5, -0.5, 0.5]


def test_group_advantages_rejects_bad_shape():
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(torch.zeros(4))


def test_clipping_positive_and_negative_advantage():
    old = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5]))
    # ratios 1.5, 0.5, 1.1, 0.9
    new = torch.log(torch.tensor([0.75, 0.25, 0.55, 0.45]))
    loss, clipped = grpo_token_loss(new, old, torch.tensor(2.0), clip_low=0.2)
    # A > 0: min(r A, clip(r) A) -> 1.2*2, 0.5*2 (unclipped below: min picks r A), 1.1*2, 0.9*2
    assert (-loss).tolist() == pytest.approx([2.4, 1.0, 2.2, 1.8])
    assert clipped.tolist() == [1.0, 0.0, 0.0, 0.0]
    loss, clipped = grpo_token_loss(new, old, torch.tensor(-1.0), clip_low=0.2)
    # A < 0: min(-r, -clip(r)) -> -1.5 (unclipped above), -0.8 (clipped at 1 - eps), -1.1, -0.9
    assert (-loss).tolist() == pytest.approx([-1.5, -0.8, -1.1, -0.9])
    assert clipped.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_clip_higher_is_asymmetric():
    old = torch.zeros(1)
    new = torch.log(torch.tensor([1.25]))
    loss, _ = grpo_token_loss(new, old, torch.tensor(1.0), clip_low=0.2, clip_high=0.28)
    assert float(-loss) == pytest.approx(1.25)   # inside the wider upper bound
    loss, _ = grpo_token_loss(new, old, torch.tensor(1.0), clip_low=0.2)
    assert float(-loss) == pytest.approx(1.2)


def test_token_level_normalisation_by_hand():
    # Two completions: 1 token with A = +1, 3 tokens with A = -1; ratio 1 everywhere.
    lp = [torch.zeros(1), torch.zeros(3)]
    loss, _ = grpo_loss(lp, [x.clone() for x in lp], [1.0, -1.0], num_tokens=4)
    # token-level: (-(1) + -(-1 * 3)) / 4 = (-1 + 3) / 4 = 0.5  (the paper's per-sequence mean would give 0)
    assert float(loss) == pytest.approx(0.5)
    # micro-batches summed with the batch's denominator equal the whole batch
    a, _ = grpo_loss(lp[:1], [lp[0].clone()], [1.0], num_tokens=4)
    b, _ = grpo_loss(lp[1:], [lp[1].clone()], [-1.0], num_tokens=4)
    assert float(a + b) == pytest.approx(float(loss))


def test_gradient_of_token_loss_is_policy_gradient():
    logits = torch.tensor([0.3, -0.2, 0.1], requires_grad=True)
    lp = torch.log_softmax(logits, -1)[torch.tensor([0, 2])]
    loss, _ = grpo_loss([lp], [lp.detach()], [2.0], num_tokens=2)
    loss.backward()
    # ratio = 1: d/dlogits of -(A/2) * sum(logp) = -(A/2) * sum(onehot - p)
    p = torch.softmax(logits.detach(), -1)
    expect = -(2.0 / 2) * (torch.tensor([1.0, 0, 0]) + torch.tensor([0, 0, 1.0]) - 2 * p)
    assert torch.allclose(logits.grad, expect, atol=1e-6)


def test_k3_kl_is_zero_at_reference_and_positive_elsewhere():
    lp = torch.log(torch.tensor([0.2, 0.5]))
    assert torch.allclose(k3_kl(lp, lp), torch.zeros(2))
    ref = torch.log(torch.tensor([0.4, 0.25]))
    kl = k3_kl(lp, ref)
    d = ref - lp
    assert torch.allclose(kl, torch.exp(d) - d - 1)
    assert bool((kl > 0).all())
    loss, info = grpo_loss([lp], [lp.clone()], [0.0], 2, ref_logps=[ref], kl_coef=0.5)
    assert float(loss) == pytest.approx(0.5 * float(kl.sum()) / 2)
    assert info["kl_sum"] == pytest.approx(float(kl.sum()))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="clip_low"):
        GRPOConfig(clip_low=1.5)
    with pytest.raises(ValueError, match="lr"):
        GRPOConfig(lr=0)


# ---- the trainer on a tiny model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    from onspec.models.loader import load_model

    return load_model(str(tiny_llama), dtype="float32").model


def _samples(rewards, G=2):
    toks = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [3]]
    return [Sample(prompt_ids=[1, 2, 3, 4], completion_ids=toks[i % 4], reward=r, group=i // G)
            for i, r in enumerate(rewards)]


def test_trainer_skips_zero_advantage_groups(tiny_model):
    trainer = GRPOTrainer(tiny_model, GRPOConfig(lr=1e-3))
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    stats = trainer.update(_samples([1.0, 1.0, 0.0, 0.0]), group_size=2)
    assert stats.trained_sequences == 0 and stats.optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.parameters()))


def test_trainer_raises_likelihood_of_rewarded_completion(tiny_model):
    trainer = GRPOTrainer(tiny_model, GRPOConfig(lr=3e-3, minibatches=2, epochs=2))
    samples = _samples([1.0, 0.0])
    good = samples[0]
    lp0 = float(trainer.logprobs(trainer.policy, [good])[0].sum())
    stats = trainer.update(samples, group_size=2)
    assert stats.trained_sequences == 2 and stats.optimizer_steps == 4  # 2 minibatches x 2 epochs
    lp1 = float(trainer.logprobs(trainer.policy, [good])[0].sum())
    assert lp1 > lp0
    assert 0.0 <= stats.clip_frac <= 1.0


def test_copy_weights_into_engine_model(tiny_model):
    import copy

    engine_model = copy.deepcopy(tiny_model)
    trainer = GRPOTrainer(tiny_model, GRPOConfig(lr=1e-2))
    trainer.update(_samples([1.0, 0.0]), group_size=2)
    assert not all(torch.equal(a, b) for a, b in zip(engine_model.parameters(), trainer.policy.parameters()))
    copy_weights(trainer.policy, engine_model)
    assert all(torch.equal(a, b) for a, b in zip(engine_model.parameters(), trainer.policy.parameters()))
    assert not any(p.requires_grad for p in engine_model.parameters())
    assert trainable_copy(engine_model).embed_tokens.weight.requires_grad
