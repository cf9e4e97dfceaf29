"""Frozen, validated configuration dataclasses. Config flows down from the entry points; no module globals.

Every invalid value raises ``ConfigError`` naming the field, so the CLI and the server can turn it into a
clear message (exit code 2 / HTTP 400) instead of a stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value is invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(field_name, message)


SPECULATION_MODES = ("auto", "off", "suffix", "learned", "hybrid")


@dataclass(frozen=True)
class SpecConfig:
    """Speculation: which strategy (or ``auto`` for the controller) and the draft budgets."""

    mode: str = "auto"
    max_draft_tokens: int = 16          # tree nodes per request per step (root excluded)
    max_batch_draft_tokens: int = 128   # nodes per step over the whole batch
    suffix_max_depth: int = 32          # deepest suffix kept in a suffix tree
    suffix_min_prob: float = 0.1        # stop expanding a path below this probability (SuffixDecoding)
    suffix_alpha: float = 4.0           # draft length cap = alpha * match length
    global_store_requests: int = 256    # recent responses kept in the global suffix store (FIFO)
    off_batch_size: int = 64            # speculation is never tried at or above this batch size
    profile_at_start: bool = True       # time target forwards at start-up to seed the cost model

    def __post_init__(self) -> None:
        _check(self.mode in SPECULATION_MODES, "speculation", f"must be one of {SPECULATION_MODES}, got {self.mode!r}")
        _check(0 <= self.max_draft_tokens <= 64, "max_draft_tokens", "must be in [0, 64]")
        _check(self.max_batch_draft_tokens >= 0, "max_batch_draft_tokens", "must be >= 0")
        _check(self.suffix_max_depth >= 2, "suffix_max_depth", "must be >= 2")
        _check(0.0 < self.suffix_min_prob < 1.0, "suffix_min_prob", "must be in (0, 1)")
        _check(self.suffix_alpha > 0, "suffix_alpha", "must be > 0")
        _check(self.global_store_requests >= 0, "global_store_requests", "must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    """What model to run and how the engine batches it."""

    model: str = "default"
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_model_len: int = 2048           # context length per sequence (capped by the model's)
    max_num_seqs: int = 64              # concurrent sequences (cache slots)
    max_num_batched_tokens: int = 512   # token budget per step (chunked prefill)
    kv_cache_memory: float = 0.0        # bytes (>1) or fraction of free memory (<=1); 0 = slots * max_model_len
    num_threads: int = 0                # torch intra-op threads; 0 leaves torch's default
    cache_dir: str = ""                 # where dequantized GGUF weights are cached ("" = ~/.cache/onspec)
    seed: int = 0
    spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self) -> None:
        _check(self.dtype in ("bfloat16", "float32", "float16"), "dtype", "must be bfloat16, float32 or float16")
        _check(self.max_model_len >= 16, "max_model_len", "must be >= 16")
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _check(self.max_num_batched_tokens >= 16, "max_num_batched_tokens", "must be >= 16")
        _check(self.kv_cache_memory >= 0, "kv_cache_memory", "must be >= 0")
        _check(self.num_threads >= 0, "num_threads", "must be >= 0")
