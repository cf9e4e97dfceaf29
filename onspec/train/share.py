"""The trainer's share of the CPU while the engine is busy, following measured utility.

Rule (the "utility feedback" of the Aurora design, arXiv 2602.06932: spend on training while it improves
serving): the trainer computes ``share`` of the wall time on a core the engine
lends it (train/trainer.py, ``busy_share``). Each version decision moves the share:

* a promoted version whose held-out acceptance beat the serving version's by at least ``min_gain``
  (relative) shows that learning is still improving serving: the share grows by ``grow``;
* a promoted version that gained less, or a rejected one, shows that it has stopped improving: the share
  shrinks by ``shrink``;
* a rollback (the live speed regressed) or an invalid version drops it to ``floor``.

It stays in ``[floor, ceiling]``. The ceiling bounds what learning costs serving: the trainer at a 0.05
share cost 5.1% of serving throughput (bench/online.py, scenario cost), so the default ceiling of 0.08 keeps
the cost near the 10% the design allows (docs/decisions.md, 'Trainer share').
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShareConfig:
    floor: float = 0.02
    ceiling: float = 0.08
    min_gain: float = 0.02   # relative held-out acceptance gain of a promoted version that counts as improving
    grow: float = 1.5
    shrink: float = 0.5


@dataclass
class ShareChange:
    """What one decision did to the share (for the event log)."""

    share: float
    previous: float
    reason: str


class TrainerShare:
    """See the module docstring. ``update`` takes a version decision's kind and figures."""

    def __init__(self, start: float, cfg: ShareConfig = ShareConfig()) -> None:
        self.cfg = cfg
        self.share = min(cfg.ceiling, max(cfg.floor, start))

    def update(self, kind: str, figures: dict) -> ShareChange | None:
        """The share after a decision of ``kind`` (a DecisionKind value); None when it did not move."""
        cfg, before = self.cfg, self.share
        if kind == "promote":
            cand, serving = figures.get("candidate_acceptance"), figures.get("serving_acceptance")
            gain = (cand - serving) / serving if cand is not None and serving else 0.0
            if gain >= cfg.min_gain:
                share, reason = before * cfg.grow, f"promoted with {gain:+.1%} held-out acceptance: learning pays"
            else:
                share, reason = before * cfg.shrink, f"promoted with only {gain:+.1%}: learning has levelled off"
        elif kind == "reject":
            share, reason = before * cfg.shrink, "rejected: learning did not improve the drafter"
        elif kind in ("rollback", "invalid"):
            share, reason = cfg.floor, f"{kind}: learning cost serving"
        else:
            return None
        self.share = min(cfg.ceiling, max(cfg.floor, share))
        if abs(self.share - before) < 1e-12:
            return None
        return ShareChange(self.share, before, reason)
