"""One request's state: tokens, cache placement, stop conditions, streaming offsets and speculation stats.

Invariant: the first ``cache_len`` tokens of ``tokens`` are in the KV cache; the rest are pending. During
prefill more than one token is pending; while decoding exactly one is (the last sampled token, which is the
root of the next draft tree). Preemption just frees the slot and sets ``cache_len = 0``: the whole context
becomes pending again and is recomputed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .grammar import GrammarState
from .sampler import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SpecStats:
    steps: int = 0            # target forwards that advanced this sequence while decoding
    drafted: int = 0          # draft nodes sent to verification
    accepted: int = 0         # draft tokens accepted
    by_strategy: dict[str, list[int]] = field(default_factory=dict)  # strategy -> [steps, committed]

    @property
    def acceptance_length(self) -> float:
        """Tokens committed per target forward, bonus token included."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    request_id: str = ""
    priority: int = 0                   # lower runs first
    group: str | None = None            # siblings sharing a suffix tree (n > 1, RL groups)
    seq_id: int = -1                    # assigned by the engine
    arrival: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    slot: int = -1
    cache_len: int = 0
    finish_reason: str | None = None
    text: str = ""                      # detokenized output (stop strings already cut)
    emitted_text: int = 0               # chars of ``text`` already streamed
    emitted_tokens: int = 0
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    # Unseeded sampling's generator (the engine's, seeded by EngineConfig.seed). Seeded requests do not use one: they draw
    # noise keyed by (seed, output position) so the same seed gives the same text whatever the speculation.
    generator: torch.Generator | None = None
    stats: SpecStats = field(default_factory=SpecStats)
    first_token_time: float | None = None
    preemptions: int = 0
    # n > 1 (or Engine.add_siblings): every sample with this prompt in order (one list shared by all of them).
    # Samples after the first unfinished one do not prefill the prompt themselves: they wait for a sibling's
    # cache to hold the prompt's first ``num_prompt - 1`` rows, copy them, and prefill only the last prompt
    # token (see Scheduler.schedule).
    siblings: list["Sequence"] | None = field(default=None, repr=False)
    # Structured output: the grammar's matcher at the committed output (engine/grammar.py); None without one.
    grammar: GrammarState | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.cache_len

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
