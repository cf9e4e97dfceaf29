"""Sampling parameters and the logits -> probabilities -> token path.

``process_logits`` turns raw logits into the distribution a request samples from (temperature, top-k,
top-p, min-p). Verification needs exactly this processed distribution: speculative sampling is lossless
with respect to whatever distribution the verifier compares against, so it must be the one plain decoding
would have sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """Per-request generation settings, in the spirit of vLLM's ``SamplingParams``."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # number of top alternatives to return per token (0 = only the chosen)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.n, int) and 1 <= self.n <= 128, "n", "must be an integer in [1, 128]"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= -1, "top_k", "must be -1, 0 or a positive integer"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ValueError(f"{name}: {msg}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of logits [R, V] -> the probabilities this request samples from (float32)."""
    x = logits.float() / max(params.temperature, 1e-5)
    if params.top_k and params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), 0.0)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token crossing the threshold is kept).
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        drop_sorted[..., 0] = False  # the most likely token always stays (a tiny top_p rounds to 0 in fp32)
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    return probs / probs.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One draw from ``probs`` [V] by inverse CDF: a float64 cumulative sum, one uniform, a binary search.

    Exact like ``torch.multinomial`` (``searchsorted(right=True)`` never lands on a zero-probability token)
    but about 25x cheaper on a 49k vocabulary on CPU (0.04 ms against 1.1 ms), which matters when a step
    samples for 64 sequences."""
    c = probs.double().cumsum(-1)
    u = torch.rand(1, generator=generator, dtype=torch.float64, device=c.device)
    return min(int(torch.searchsorted(c, c[-1:] * u, right=True)), probs.shape[-1] - 1)


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """Log-probability of ``token`` under the model (temperature 1) and the ``top`` most likely alternatives."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    alts: list[tuple[int, float]] = []
    if top:
        v, i = lp.topk(top)
        alts = [(int(a), float(b)) for a, b in zip(i, v)]
    return float(lp[token]), alts
