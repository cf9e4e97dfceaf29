"""Frozen, validated configuration dataclasses. Config flows down from the entry points; no module globals.

Every invalid value raises ``ConfigError`` naming the field, so the CLI and the server can turn it into a
clear message (exit code 2 / HTTP 400) instead of a stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cpu import native_bf16_product


class ConfigError(ValueError):
    """A configuration value is invalid; ``field`` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(field_name, message)


# "parallel": the parallel drafter (speculation/parallel_proposer.py), where ``attach_parallel`` gave the engine one
SPECULATION_MODES = ("auto", "off", "suffix", "learned", "hybrid", "parallel")
SPECULATION_OBJECTIVES = ("auto", "throughput", "makespan")


@dataclass(frozen=True)
class SpecConfig:
    """Speculation: which strategy (or ``auto`` for the controller) and the draft budgets."""

    mode: str = "auto"
    max_draft_tokens: int = 16          # tree nodes per request per step (root excluded); see bench/speculation.py --budgets
    max_batch_draft_tokens: int = 128   # nodes per step over the whole batch
    suffix_max_depth: int = 32          # deepest suffix kept in a suffix tree
    suffix_min_prob: float = 0.1        # stop expanding a path below this probability (SuffixDecoding)
    suffix_alpha: float = 4.0           # draft length cap = alpha * match length
    suffix_calibrate: bool = True       # learn acceptance by match length online (speculation/suffix_calibration.py)
    global_store_requests: int = 256    # recent responses kept in the global suffix store (FIFO)
    # The draft policy's gates (speculation/policy.py):
    off_batch_size: int = 64            # gate ``batch_size``: never drafted at or above this batch size
    unpaid_backoff_max: int = 8         # gate ``unpaid``: steps skipped after drafts the plan kept none of
                                        # (1, 2, 4 ... up to this)
    record_explore_steps: int = 20      # gate ``record``: verified steps before a strategy's record can close it
    record_backoff_first: int = 16      # ... a strategy it closed is retried after this many steps, the wait
    record_backoff_max: int = 512       # ... doubling after every retry that still loses, up to this
    cheap_share: float = 0.05           # ... and one whose proposals cost under this share of a plain step
                                        # always passes it (plan() then keeps only the nodes that pay)
    hybrid_suffix_confident: float = 1.0  # hybrid: rows whose suffix tree expects >= this many accepted
                                          # drafts skip the learned drafter (0: always ask it)
    profile_at_start: bool = True       # time target forwards at start-up to seed the cost model
    grammar_drafts: bool = True         # structured outputs: propose the tokens the grammar forces
                                        # (speculation/grammar_drafter.py), in every mode but off
    # What a committed token is worth to the controller (speculation/controller.py, ``MakespanValue``):
    # "throughput": every token alike (a server: each request is someone's stream); "makespan": by how much
    # it shortens the time until every running request is done, whenever no request waits (a closed batch);
    # "auto": makespan inside ``LLM.generate`` (the call returns when the whole batch is done), else throughput.
    objective: str = "auto"

    def __post_init__(self) -> None:
        _check(self.mode in SPECULATION_MODES, "speculation", f"must be one of {SPECULATION_MODES}, got {self.mode!r}")
        _check(0 <= self.max_draft_tokens <= 64, "max_draft_tokens", "must be in [0, 64]")
        _check(self.max_batch_draft_tokens >= 0, "max_batch_draft_tokens", "must be >= 0")
        _check(self.suffix_max_depth >= 2, "suffix_max_depth", "must be >= 2")
        _check(0.0 < self.suffix_min_prob < 1.0, "suffix_min_prob", "must be in (0, 1)")
        _check(self.suffix_alpha > 0, "suffix_alpha", "must be > 0")
        _check(self.global_store_requests >= 0, "global_store_requests", "must be >= 0")
        _check(self.unpaid_backoff_max >= 1, "unpaid_backoff_max", "must be >= 1")
        _check(1 <= self.record_backoff_first <= self.record_backoff_max, "record_backoff_first",
               "must be in [1, record_backoff_max]")
        _check(self.cheap_share >= 0, "cheap_share", "must be >= 0")
        _check(self.hybrid_suffix_confident >= 0, "hybrid_suffix_confident", "must be >= 0")
        _check(self.objective in SPECULATION_OBJECTIVES, "objective",
               f"must be one of {SPECULATION_OBJECTIVES}, got {self.objective!r}")


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
    seed: int = 0                       # of the generator unseeded requests draw from (a request's seed wins)
    prefix_reuse: bool = True           # a prompt starts from the cache rows a freed slot holds (scheduler.py)
    spec: SpecConfig = field(default_factory=SpecConfig)

    def __post_init__(self) -> None:
        _check(self.dtype in ("bfloat16", "float32", "float16"), "dtype", "must be bfloat16, float32 or float16")
        _check(self.max_model_len >= 16, "max_model_len", "must be >= 16")
        _check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        _check(self.max_num_batched_tokens >= 16, "max_num_batched_tokens", "must be >= 16")
        _check(self.kv_cache_memory >= 0, "kv_cache_memory", "must be >= 0")
        _check(self.num_threads >= 0, "num_threads", "must be >= 0")


@dataclass(frozen=True)
class TrainerConfig:
    """Online drafter learning: trace recording, the trainer process, publishing, the promotion gate.

    Defaults follow the "Aurora" recipe (arXiv 2602.06932: training-time-test unroll weighted 0.8^i,
    forward KL to the target, a "discard" term on rejected branches) scaled down for a shared 2-core CPU.
    """

    versions_dir: str = ""              # where versions live ("" = <cache>/speculators/<model name>)
    speculator: str = ""                # start from this checkpoint (day-1) instead of random (day-0)
    # Which drafter the online learner trains (train/heads.py): "eagle", the sequential EAGLE-3 head (strategies
    # learned and hybrid), or "parallel", the parallel drafter (strategy parallel; its versions in <versions>/parallel)
    drafter: str = "eagle"
    parallel_depths: int = 5            # depths per forward of a parallel drafter made from scratch or an EAGLE-3 head
    resume: bool = True                 # restart from the latest promoted version found in versions_dir
    # --- traces ---
    chunk_positions: int = 256          # a sequence's trace is cut into chunks of this many positions
    chunk_context: int = 32             # positions repeated at the head of a continued chunk (context only)
    queue_chunks: int = 64              # engine-side send queue (oldest dropped when full; never blocks)
    buffer_bytes: int = 128 * 2**20     # trainer replay buffer budget (oldest chunks evicted): ~30k positions,
                                        # ~3.7 recency half-lives, so what it drops had < 8% of a fresh chunk's
                                        # sampling weight; bounds server + trainer under 3 GiB (bench/serve.py)
    heldout_every: int = 8              # every n-th chunk is held out (gate and manifest figures)
    heldout_positions: int = 1024       # held-out window: the most recent positions kept for the gate
    recency_half_life: int = 8192       # positions: a chunk's sampling weight halves per this many newer ones
    target_topk: int = 32               # soft targets kept per position (draft-vocab probabilities)
    # --- training ---
    ttt_steps: int = 3                  # training-time-test unroll depth
    ttt_decay: float = 0.8              # weight of unroll step i is decay^i
    discard_weight: float = 0.3         # lambda: KL at rejected tree nodes
    max_branches: int = 256             # rejected-node rows per optimizer step (a random subset beyond)
    train_head: bool = False            # also train lm_head and the final norm (initialised from the target's)
    prompt_weight: float = 0.5          # weight of prompt positions relative to generated ones
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # bfloat16 matrix products with float32 weights and optimizer: default on only where the CPU multiplies
    # bf16 natively (AMX, avx512_bf16); elsewhere PyTorch's bf16 product is far slower than float32's (cpu.py)
    autocast: bool = field(default_factory=native_bf16_product)
    aux_noise: float = 0.2              # Gaussian noise on the aux inputs, relative to their RMS (regulariser)
    batch_positions: int = 512          # positions per optimizer step
    min_positions: int = 256            # train only once the buffer holds this many positions
    trainer_threads: int = 1            # torch threads of the trainer process while the engine is busy
    idle_threads: int = 0               # ... while it is idle (0 = every core)
    # Fraction of wall time the trainer may compute while the engine is busy (it computes on a thread the
    # engine lends it between two steps: channel.ThreadLender). Before the lend a 0.1 share made the
    # engine's 2-thread forwards 28% slower (39 -> 50 ms per step: OpenMP threads waited at every barrier
    # for the core the trainer took); with it, 0.05 costs ~5% of serving throughput (bench/online.py cost).
    busy_share: float = 0.05
    # ... where it starts: each version decision then moves it within [share_floor, share_ceiling] (more while
    # versions improve serving by share_min_gain or more, less when they stop; train/share.py)
    share_floor: float = 0.02
    share_ceiling: float = 0.08
    share_min_gain: float = 0.02
    trainer_nice: int = 0               # niceness of the trainer process (see trainer.py: why not 19)
    idle_after: float = 2.0             # seconds without an engine step after which the engine counts as idle
    seed: int = 0
    # --- publishing and the gate ---
    publish_every_steps: int = 50
    publish_every_seconds: float = 60.0
    keep_versions: int = 12             # versions kept on disk (the promoted and its predecessor always)
    gate_margin: float = 0.0            # promote when candidate >= current + margin (simulated acceptance)
    gate_min_positions: int = 64        # held-out positions needed before the gate decides
    live_window_steps: int = 200        # decode steps watched after a promotion
    rollback_threshold: float = 0.15    # relative live-throughput regression that triggers a rollback
    poll_seconds: float = 0.5           # how often new versions and trainer messages are looked for
    on_trainer_exit: str = "suffix"     # "suffix": drop the learned drafter when the trainer dies; "keep"

    def __post_init__(self) -> None:
        _check(self.drafter in ("eagle", "parallel"), "drafter", f"must be 'eagle' or 'parallel', got {self.drafter!r}")
        _check(1 <= self.parallel_depths <= 16, "parallel_depths", "must be in [1, 16]")
        _check(self.chunk_positions >= 8, "chunk_positions", "must be >= 8")
        _check(0 <= self.chunk_context < self.chunk_positions, "chunk_context", "must be in [0, chunk_positions)")
        _check(self.queue_chunks >= 1, "queue_chunks", "must be >= 1")
        _check(self.buffer_bytes >= 2**20, "buffer_bytes", "must be >= 1 MiB")
        _check(self.heldout_every >= 2, "heldout_every", "must be >= 2")
        _check(self.heldout_positions >= 16, "heldout_positions", "must be >= 16")
        _check(self.recency_half_life >= 1, "recency_half_life", "must be >= 1")
        _check(1 <= self.target_topk <= 1024, "target_topk", "must be in [1, 1024]")
        _check(1 <= self.ttt_steps <= 16, "ttt_steps", "must be in [1, 16]")
        _check(0.0 < self.ttt_decay <= 1.0, "ttt_decay", "must be in (0, 1]")
        _check(self.discard_weight >= 0, "discard_weight", "must be >= 0")
        _check(self.prompt_weight >= 0, "prompt_weight", "must be >= 0")
        _check(self.lr > 0, "lr", "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(self.grad_clip > 0, "grad_clip", "must be > 0")
        _check(self.aux_noise >= 0, "aux_noise", "must be >= 0")
        _check(self.batch_positions >= 16, "batch_positions", "must be >= 16")
        _check(self.min_positions >= 1, "min_positions", "must be >= 1")
        _check(self.trainer_threads >= 1, "trainer_threads", "must be >= 1")
        _check(self.idle_threads >= 0, "idle_threads", "must be >= 0")
        _check(self.max_branches >= 0, "max_branches", "must be >= 0")
        _check(0.0 < self.busy_share <= 1.0, "busy_share", "must be in (0, 1]")
        _check(0.0 < self.share_floor <= self.share_ceiling <= 1.0, "share_floor",
               "must satisfy 0 < share_floor <= share_ceiling <= 1")
        _check(self.share_min_gain >= 0, "share_min_gain", "must be >= 0")
        _check(0 <= self.trainer_nice <= 19, "trainer_nice", "must be in [0, 19]")
        _check(self.idle_after > 0, "idle_after", "must be > 0")
        _check(self.publish_every_steps >= 1, "publish_every_steps", "must be >= 1")
        _check(self.publish_every_seconds > 0, "publish_every_seconds", "must be > 0")
        _check(self.keep_versions >= 2, "keep_versions", "must be >= 2")
        _check(self.gate_min_positions >= 1, "gate_min_positions", "must be >= 1")
        _check(self.live_window_steps >= 1, "live_window_steps", "must be >= 1")
        _check(0.0 < self.rollback_threshold < 1.0, "rollback_threshold", "must be in (0, 1)")
        _check(self.poll_seconds > 0, "poll_seconds", "must be > 0")
        _check(self.on_trainer_exit in ("suffix", "keep"), "on_trainer_exit", "must be 'suffix' or 'keep'")
