"""``ServerConfig``: everything ``onspec serve`` is started with, validated once.

A frozen dataclass like the engine's configs (onspec/config.py), so the app, the bridge and the online
learning hook all read the same values, and a bad option is one ``ConfigError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SPECULATION_MODES, ConfigError


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(field_name, message)


@dataclass(frozen=True)
class ServerConfig:
    model: str = "default"
    dtype: str = "bfloat16"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = ""                 # "" = no key needed on /v1 routes
    admin_key: str = ""               # "" = admin routes use api_key (open if that is empty too)
    speculation: str = "auto"
    train: str = "off"                # "online": start the online drafter trainer (if installed)
    speculator_dir: str = ""          # where drafter versions are written / read ("" = trainer's default)
    speculator: str = ""              # an EAGLE-3 or parallel drafter checkpoint: imported as the first version
                                      # (train online) or served frozen (train off)
    train_drafter: str = "eagle"      # which drafter train online learns: "eagle" (sequential) or "parallel"
    max_concurrency: int = 32         # sequences decoded at once (= engine cache slots)
    max_queue: int = 128              # sequences admitted beyond max_concurrency before answering 503
    max_model_len: int = 2048
    max_num_batched_tokens: int = 512
    prefix_reuse: bool = True         # prompts start from the rows freed slots still hold (engine/scheduler.py)
    served_model_name: str = ""       # "" = the loaded model's name; "default" is always accepted too
    shutdown_timeout: float = 30.0    # seconds in-flight requests get to finish on SIGTERM
    retry_after: int = 1              # seconds, sent with 503 when the queue is full
    num_threads: int = 0              # torch threads (0: torch's default)
    series_seconds: int = 900         # length of the dashboard's per-second ring buffer
    online_hook: str = "onspec.train.online:start_online_learning"
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check(self.speculation in SPECULATION_MODES, "speculation", f"must be one of {SPECULATION_MODES}")
        _check(self.train in ("online", "off"), "train", "must be 'online' or 'off'")
        _check(not (self.train == "online" and self.speculation == "off"), "train",
               "online drafter learning needs speculation on (not 'off')")
        _check(self.train_drafter in ("eagle", "parallel"), "train_drafter", "must be 'eagle' or 'parallel'")
        # a forced mode must draft with the drafter being learned (learned, hybrid: eagle; parallel: parallel)
        forced = {"learned": "eagle", "hybrid": "eagle", "parallel": "parallel"}.get(self.speculation)
        _check(self.train != "online" or forced in (None, self.train_drafter), "train_drafter",
               f"speculation {self.speculation!r} does not draft with the {self.train_drafter} drafter that "
               "--train online would learn")
        _check(0 <= self.port <= 65535, "port", "must be in [0, 65535]")
        _check(self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        _check(self.max_queue >= 0, "max_queue", "must be >= 0")
        _check(self.shutdown_timeout >= 0, "shutdown_timeout", "must be >= 0")
        _check(self.retry_after >= 1, "retry_after", "must be >= 1")
        _check(self.series_seconds >= 10, "series_seconds", "must be >= 10")
        _check(":" in self.online_hook, "online_hook", "must look like 'package.module:function'")

    @property
    def capacity(self) -> int:
        """Sequences the server holds at once (running + queued); one more is answered 503."""
        return self.max_concurrency + self.max_queue

    @property
    def effective_admin_key(self) -> str:
        return self.admin_key or self.api_key
