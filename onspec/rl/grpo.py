"""GRPO policy update (Group Relative Policy Optimization, Shao et al. 2024, "DeepSeekMath", arXiv 2402.03300).

For a prompt q the rollout draws a group of G completions o_1..o_G from pi_old and scores them r_1..r_G.
Each completion's advantage is its group-normalised reward, shared by all of its tokens:

    A_i = (r_i - mean(r)) / (std(r) + eps)

and the policy maximises the clipped surrogate with token-level ratios rho_{i,t} = pi(o_{i,t}|.) / pi_old(.):

    J = sum_{i,t} min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i) / sum_i |o_i|
        - beta * KL_k3(pi || pi_ref)

Departures from the GRPO paper, all deliberate:

1. Token-level normalisation (from DAPO, arXiv 2503.14476): the loss is summed over every completion token
   of the batch and divided by the batch's token count, instead of averaging each completion over its own
   length and then over completions. The paper's form gives a token of a short completion more weight than
   one of a long completion, which biases length (long wrong answers are punished less per token).
2. No KL penalty by default (``kl_coef = 0``; the paper uses beta = 0.04). With outcome rewards on short
   tasks and few steps, the reference anchor mostly slows learning and costs a second model's forward;
   when enabled it is the paper's k3 estimator, exp(ref - logp) - (ref - logp) - 1, per token, inside the
   token-level normalisation.
3. One policy-gradient pass per rollout by default (``minibatches = 1``, ``epochs = 1``): then
   pi_old == pi exactly, the ratio is 1 and clipping never triggers (the paper allows several inner
   iterations mu). With ``minibatches > 1`` or ``epochs > 1``, pi_old's log-probabilities are recomputed
   by the trainer before the first update and the clipped ratio does its job.
4. Optional asymmetric clipping (``clip_high``, "clip-higher" from DAPO); equal to ``clip_low`` by
   default, i.e. the paper's symmetric eps = 0.2.
5. Completions whose advantage is exactly zero (every sibling got the same reward) are not run through
   the trainer when the KL term is off: their gradient is exactly zero. Their tokens still count in the
   denominator, so the loss and gradient are identical to running them.
6. Rewards are outcome rewards: the task's score plus a small format bonus (see ``rl/tasks.py``); no
   process supervision.
7. The surrogate uses the distribution the rollout sampled from: logits divided by the sampling
   temperature (the paper samples at temperature 1).
8. AdamW with global gradient-norm clipping (``max_grad_norm``); the paper does not specify clipping.
9. Mixed precision: float32 master weights and optimiser, bfloat16 matrix products (``autocast``, about
   2x faster on this CPU). The rollout engine holds float32 weights by default; with a bfloat16 engine
   (``RLConfig.dtype``) it samples from the bfloat16 rounding of the policy the trainer scores.

The optimiser trains a float32 copy of the policy (full fine-tuning, every parameter); after each update
``copy_weights`` writes the new weights into the rollout engine's model in place, so the next rollout
samples from exactly the updated policy.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from ..cpu import native_bf16_product
from ..models.llama import CausalLM
from .forward import completion_logprobs


@dataclass(frozen=True)
class GRPOConfig:
    lr: float = 3e-5
    clip_low: float = 0.2
    clip_high: float | None = None      # None: symmetric (= clip_low)
    kl_coef: float = 0.0
    scale_by_std: bool = True           # divide advantages by the group's reward std (the paper's form)
    adv_eps: float = 1e-4
    minibatches: int = 1                # optimizer steps per rollout batch
    epochs: int = 1                     # passes over the rollout batch
    micro_batch: int = 8                # sequences per forward/backward (memory, not maths)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    # bfloat16 matrix products in the trainer's forward/backward, where the CPU has them natively (cpu.py)
    autocast: bool = field(default_factory=native_bf16_product)

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr", "must be > 0"),
            (0 < self.clip_low < 1, "clip_low", "must be in (0, 1)"),
            (self.clip_high is None or self.clip_high > 0, "clip_high", "must be > 0"),
            (self.kl_coef >= 0, "kl_coef", "must be >= 0"),
            (self.minibatches >= 1, "minibatches", "must be >= 1"),
            (self.epochs >= 1, "epochs", "must be >= 1"),
            (self.micro_batch >= 1, "micro_batch", "must be >= 1"),
            (self.max_grad_norm > 0, "max_grad_norm", "must be > 0"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"{name}: {msg}")


# ---- the maths (pure tensor functions; the toy-batch tests check them by hand) ---------------------
def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [num_groups, G] -> advantages [num_groups, G]: reward minus the group mean, divided by
    the group's (unbiased, as torch.std) standard deviation + eps when ``scale_by_std``; exactly 0 for a
    group whose rewards are all equal."""
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError("rewards: expected [num_groups, group_size]")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    # A group whose rewards are all equal carries no signal: exactly zero (not 0/0, not rounding noise).
    flat = (rewards.amax(dim=1, keepdim=True) == rewards.amin(dim=1, keepdim=True))
    centred = centred.masked_fill(flat, 0.0)
    if not scale_by_std or rewards.shape[1] == 1:
        return centred
    std = rewards.std(dim=1, keepdim=True).masked_fill(flat, 1.0)
    return centred / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token unbiased, non-negative KL(pi || pi_ref) estimator (Schulman's k3, as in the paper)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                    clip_low: float = 0.2, clip_high: float | None = None, ref_logp: torch.Tensor | None = None,
                    kl_coef: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss (to be summed and divided by the batch token count) and a clipped-token indicator.

    logp, old_logp, ref_logp: [T] log-probabilities of the completion's tokens; adv: scalar or [T].
    """
    ratio = torch.exp(logp - old_logp)
    high = clip_low if clip_high is None else clip_high
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + high)
    surr = torch.minimum(ratio * adv, clipped_ratio * adv)
    loss = -surr
    if kl_coef > 0 and ref_logp is not None:
        loss = loss + kl_coef * k3_kl(logp, ref_logp)
    clipped = (ratio * adv > clipped_ratio * adv).float()  # the clip bound is the active term
    return loss, clipped


def grpo_loss(logps: list[torch.Tensor], old_logps: list[torch.Tensor], advs: list[float],
              num_tokens: int, clip_low: float = 0.2, clip_high: float | None = None,
              ref_logps: list[torch.Tensor] | None = None, kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Token-level-normalised GRPO loss over completions: sum of per-token losses / ``num_tokens``.

    ``num_tokens`` is the token count of the whole (mini-)batch, so summing this over micro-batches gives
    the same value and gradient as one pass over the batch."""
    if num_tokens <= 0:
        raise ValueError("num_tokens: must be > 0")
    total = torch.zeros(())
    clipped = 0.0
    kl = 0.0
    for i, (lp, old, a) in enumerate(zip(logps, old_logps, advs)):
        ref = ref_logps[i] if ref_logps is not None else None
        loss, clip = grpo_token_loss(lp, old, torch.tensor(float(a)), clip_low, clip_high, ref, kl_coef)
        total = total + loss.sum()
        clipped += float(clip.sum())
        if ref is not None:
            kl += float(k3_kl(lp.detach(), ref).sum())
    return total / num_tokens, {"clipped_tokens": clipped, "kl_sum": kl}


# ---- the trainer ---------------------------------------------------------------------------------
@dataclass
class Sample:
    """One completion to learn from."""

    prompt_ids: list[int]
    completion_ids: list[int]
    reward: float
    group: int
    advantage: float = 0.0
    old_logp: torch.Tensor | None = field(default=None, repr=False)
    ref_logp: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class UpdateStats:
    loss: float = 0.0
    grad_norm: float = 0.0
    clip_frac: float = 0.0
    kl: float = 0.0
    tokens: int = 0
    trained_sequences: int = 0          # sequences that went through the trainer (non-zero advantage or KL)
    optimizer_steps: int = 0
    seconds: float = 0.0


def trainable_copy(model: CausalLM, dtype: torch.dtype = torch.float32) -> CausalLM:
    """A deep copy of the engine's model with float parameters that require grad (tied weights stay tied)."""
    train = copy.deepcopy(model).to(dtype)
    train.requires_grad_(True)
    train.train()
    return train


@torch.no_grad()
def copy_weights(src: CausalLM, dst: CausalLM) -> None:
    """Write ``src``'s parameters into ``dst`` in place (dtype converted), e.g. trainer -> engine."""
    dst_params = dict(dst.named_parameters())
    src_params = dict(src.named_parameters())
    if dst_params.keys() != src_params.keys():
        raise ValueError("copy_weights: the two models have different parameters")
    for name, p in dst_params.items():
        p.copy_(src_params[name])


def state_for_broadcast(model: CausalLM) -> dict[str, torch.Tensor]:
    """Detached parameter tensors, e.g. to ``ray.put`` for the rollout workers."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def load_broadcast(dst: CausalLM, state: dict[str, torch.Tensor]) -> None:
    params = dict(dst.named_parameters())
    if params.keys() != state.keys():
        raise ValueError("load_broadcast: parameter names differ")
    for name, p in params.items():
        p.copy_(state[name])


class GRPOTrainer:
    """Owns the trainable policy copy, its optimiser and (with KL on) a frozen reference."""

    def __init__(self, model: CausalLM, cfg: GRPOConfig = GRPOConfig(), temperature: float = 1.0) -> None:
        self.cfg = cfg
        self.temperature = temperature
        self.policy = trainable_copy(model)
        self.reference = None
        if cfg.kl_coef > 0:
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)

    def _forward(self, model: CausalLM, part: list[Sample]) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.autocast):
            return completion_logprobs(model, [s.prompt_ids for s in part], [s.completion_ids for s in part],
                                       self.temperature)

    @torch.no_grad()
    def logprobs(self, model: CausalLM, samples: list[Sample]) -> list[torch.Tensor]:
        """Completion log-probabilities without gradient (pi_old, the reference, evaluation)."""
        out: list[torch.Tensor] = []
        mb = self.cfg.micro_batch
        for k in range(0, len(samples), mb):
            out.extend(self._forward(model, samples[k:k + mb]))
        return out

    def update(self, samples: list[Sample], group_size: int) -> UpdateStats:
        """One GRPO update from a rollout batch (samples ordered group by group, ``group_size`` each)."""
        t0 = time.perf_counter()
        cfg = self.cfg
        if not samples or len(samples) % group_size:
            raise ValueError("samples: need whole groups")
        rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).view(-1, group_size)
        adv = group_advantages(rewards, cfg.scale_by_std, cfg.adv_eps).view(-1)
        for s, a in zip(samples, adv.tolist()):
            s.advantage = a
        stats = UpdateStats()
        # Zero-advantage completions have exactly zero gradient without the KL term (departure 5).
        active = [s for s in samples if s.completion_ids and (s.advantage != 0.0 or self.reference is not None)]
        stats.tokens = sum(len(s.completion_ids) for s in samples)
        stats.trained_sequences = len(active)
        if not active or stats.tokens == 0:
            stats.seconds = time.perf_counter() - t0
            return stats
        off_policy = cfg.minibatches > 1 or cfg.epochs > 1
        with torch.no_grad():
            if off_policy:
                for s, lp in zip(active, self.logprobs(self.policy, active)):
                    s.old_logp = lp.detach()
            if self.reference is not None:
                for s, lp in zip(active, self.logprobs(self.reference, active)):
                    s.ref_logp = lp.detach()
        # Mini-batches split the *whole* batch (zero-advantage samples included) so each optimiser step's
        # denominator is its own share of tokens; only active samples are run.
        order = list(range(len(samples)))
        chunks = [order[i::cfg.minibatches] for i in range(cfg.minibatches)]
        loss_sum, clipped, kl_sum = 0.0, 0.0, 0.0
        active_ids = {id(s) for s in active}
        for _ in range(cfg.epochs):
            for chunk in chunks:
                mb_samples = [samples[i] for i in chunk]
                denom = sum(len(s.completion_ids) for s in mb_samples)
                run = [s for s in mb_samples if id(s) in active_ids]
                if not run or denom == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                for k in range(0, len(run), cfg.micro_batch):
                    part = run[k:k + cfg.micro_batch]
                    lps = self._forward(self.policy, part)
                    olds = [s.old_logp if s.old_logp is not None else lp.detach() for s, lp in zip(part, lps)]
                    refs = [s.ref_logp for s in part] if self.reference is not None else None
                    loss, info = grpo_loss(lps, olds, [s.advantage for s in part], denom, cfg.clip_low,
                                           cfg.clip_high, refs, cfg.kl_coef)
                    loss.backward()
                    loss_sum += float(loss.detach())
                    clipped += info["clipped_tokens"]
                    kl_sum += info["kl_sum"]
                norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                stats.grad_norm = max(stats.grad_norm, float(norm))
                stats.optimizer_steps += 1
        stats.loss = loss_sum / max(1, stats.optimizer_steps)
        run_tokens = sum(len(s.completion_ids) for s in active) * cfg.epochs
        stats.clip_frac = clipped / run_tokens if run_tokens else 0.0
        stats.kl = kl_sum / run_tokens if run_tokens else 0.0
        stats.seconds = time.perf_counter() - t0
        return stats
