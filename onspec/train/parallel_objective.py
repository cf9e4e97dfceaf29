"""The parallel drafter's training loss and optimizer step, on the traces the trainer already records.

Loss (P-EAGLE, arXiv 2602.01469, with the soft labels and weighting of EAGLE-3 / Aurora used for the
sequential head, train/objective.py):

    L = sum_{d=1..k} decay^(d-1) * mean_t w_t KL(p_{t+d-1} || q_d(t))  +  lambda * mean_r w_r KL(p_r || q_1(r))

* ``q_d(t)``: the parallel drafter's depth-d distribution for root t, from ONE forward over all depths
  (``ParallelDrafter.forward_train`` with ``depths`` unroll steps: depth d's row reads the placeholders, see
  speculation/parallel_drafter.py); ``p_{t+d-1}``: the target's distribution of token ``t + d`` recorded by
  verification (soft labels over the draft vocabulary, top-K, ``objective.SoftTargets``). Every depth is
  trained at every position at once: forward KL per depth, weights falling with depth (``ttt_decay``).
* the rejected-branch term (``objective.discard_loss``): rejected tree nodes give the target's
  distribution after a token the drafter proposed and the target refused; the drafter's depth-1 row (the
  EAGLE-3 row: the parent's aux state and the refused token) is fitted to it, so the head also learns the
  states its trees visit off the committed path.

Both parts are ``objective.objective`` with the unroll set to the drafter's depths: the same batches,
labels, masks and padding rules as the sequential head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import TrainerConfig
from ..speculation.parallel_drafter import ParallelDrafter
from .objective import Batch, clip, objective


@dataclass
class StepReport:
    """What one optimizer step of the parallel drafter did."""

    loss: float
    kl_depths: list[float]        # weighted mean KL of each depth (depth 1 first), before the step
    discard: float                # the rejected-branch term
    branches: int                 # rejected-node rows in it
    grad_norm: float              # before clipping


def parallel_objective(drafter: ParallelDrafter, batch: Batch, cfg: TrainerConfig,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of the module docstring for one batch, and its parts (``objective``'s dict)."""
    return objective(drafter, batch, replace(cfg, ttt_steps=drafter.depths), generator)


def train_step(drafter: ParallelDrafter, batch: Batch, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter],
               cfg: TrainerConfig, generator: torch.Generator | None = None) -> StepReport:
    """One optimizer step on ``batch`` (``params``: ``objective.trainable_parameters(drafter, ...)``, which
    include ``mask_hidden``; gradients clipped to ``cfg.grad_clip``)."""
    loss, parts = parallel_objective(drafter, batch, cfg, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = clip(params, cfg.grad_clip)
    opt.step()
    return StepReport(loss=parts["loss"], kl_depths=parts["kl_steps"], discard=parts["discard"],
                      branches=parts["branches"], grad_norm=norm)


__all__ = ["StepReport", "parallel_objective", "train_step"]
