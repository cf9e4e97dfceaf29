"""The RL run's configuration: one frozen dataclass that composes the task, rollout and GRPO settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import SPECULATION_MODES
from .grpo import GRPOConfig
from .rollout import RolloutConfig
from .tasks import TaskConfig


@dataclass(frozen=True)
class RLConfig:
    model: str = "default"
    # The rollout engine's weights. float32 by default: the trainer's weights are copied in bit for bit. A
    # bfloat16 engine rolls out about 2x faster here, but it holds the bfloat16 rounding of the policy, and
    # an Adam step at lr 1e-5 changes a weight by ~1e-4 of its size, under bfloat16's resolution (~4e-3):
    # most updates vanish in the copy, the rollouts lag the policy, and learning slowed markedly (measured:
    # mean reward ~0.3 after 17 steps with a bfloat16 engine against ~0.55 after 5 with float32).
    dtype: str = "float32"
    task: TaskConfig = field(default_factory=TaskConfig)
    prompts_per_step: int = 4
    steps: int = 20
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    speculation: str = "auto"            # rollout speculation (lossless either way); auto: the controller
                                         # drafts (grouped suffix; + learned with cotrain) only where it pays
    max_num_seqs: int = 64               # engine slots per worker
    max_model_len: int = 1024
    threads: int = 0                     # torch threads (0: torch's default)
    workers: int = 1                     # >1: Ray rollout workers, each with its own engine
    ray_address: str = ""                # "" starts Ray locally; else connect to this cluster
    cotrain: bool = False                # co-train a learned drafter on rollout traces (TLT)
    cotrain_share: float = 0.25          # co-train only while active rows <= this share of the rollout's peak
                                         # rows, and a core is free (rl/cotrain.py, ``IdleRule``)
    cotrain_keep_up: bool = False        # also score a copy of the drafter frozen at step 0, every step
    cotrain_from: str = ""               # EAGLE-3 checkpoint to co-train from ("": a day-0 head)
    out: str = ""                        # directory for metrics.jsonl (+ PNG curves with plot)
    plot: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1"),
            (self.steps >= 1, "steps", "must be >= 1"),
            (self.speculation in SPECULATION_MODES, "speculation", f"must be one of {SPECULATION_MODES}"),
            (self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1"),
            (self.max_model_len >= 16, "max_model_len", "must be >= 16"),
            (self.threads >= 0, "threads", "must be >= 0"),
            (self.workers >= 1, "workers", "must be >= 1"),
            (0 <= self.cotrain_share <= 1, "cotrain_share", "must be in [0, 1]"),
            (self.dtype in ("float32", "bfloat16", "float16"), "dtype", "must be float32, bfloat16 or float16"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"{name}: {msg}")
        if self.speculation in ("learned", "hybrid") and not self.cotrain:
            raise ValueError(f"speculation: {self.speculation!r} in RL needs --cotrain (a drafter that trains "
                             "on the rollouts: the policy changes every step)")
        if self.cotrain_from and not self.cotrain:
            raise ValueError("cotrain_from: the drafter to co-train from needs --cotrain")
        if self.cotrain_keep_up and not self.cotrain:
            raise ValueError("cotrain_keep_up: compares the co-trained drafter with a frozen copy; needs --cotrain")
        if self.plot and not self.out:
            raise ValueError("plot: needs --out DIR to write the PNG into")
