"""Logit adjustments that depend on the request and on the tokens before a position: logit bias, min_tokens,
and the repetition, frequency and presence penalties.

Per position, on the raw logits ``x`` (vLLM's order), before ``sampler.process_logits`` (temperature, top-k,
min-p, top-p):

    bias:        x[t] += logit_bias[t]
    min_tokens:  x[t] = -inf for t in EOS (unless ignore_eos) and stop_token_ids, while fewer than
                 min_tokens tokens were generated before this position
    repetition:  for t in the prompt or the output so far: x[t] = x[t] / r if x[t] > 0 else x[t] * r
    OpenAI:      x[t] -= frequency * count[t] + presence * [count[t] > 0]  (count: occurrences in the output)

Speculation. A verification step holds one row of logits per node of a draft tree; row ``i`` is the
distribution of the token after node ``i``, whose context is the committed tokens plus the drafted tokens on
the path from the root down to ``i``. Plain decoding would have committed exactly those tokens before sampling
there, so row ``i`` is adjusted with

    count_i[t] = count_committed[t] + #{nodes j on the root->i path, j != root, tokens[j] = t}
    position_i = len(committed output) + depth(i)

and nothing from other branches (a sibling is a different future, not context). Each row is then exactly
what plain decoding would have sampled from at that point, so verifying against the adjusted rows is lossless
for the penalised distribution, and greedy / seeded verification reproduce plain decoding token for token.
The root is the last committed token (already in the output), so the path counts leave it out.

Cost: only the columns of tokens that occur (the prompt's for the repetition penalty, the output's, the
tree's) are gathered, adjusted and written back, so a step costs O(context + tree paths), not O(vocabulary)
per row; a request with nothing set never comes here (``SamplingParams.adjusts_logits``).
"""

from __future__ import annotations

import array
from dataclasses import dataclass

import torch

from ..speculation.tree import DraftTree
from .sampler import SamplingParams


@dataclass
class LogitContext:
    """What one sequence's rows of logits follow.

    ``output_ids``: the committed output tokens (while decoding, the tree's root is the last of them);
    ``stop_ids``: the tokens ``min_tokens`` masks; ``tree``: the draft tree whose node ``i`` row ``i`` follows,
    or None for a single row right after the committed tokens (a prefill's last row, plain decoding)."""

    prompt_ids: list[int]
    output_ids: list[int]
    stop_ids: list[int]
    tree: DraftTree | None = None

    def depths(self) -> list[int]:
        return self.tree.depths() if self.tree is not None else [0]

    def path_pairs(self) -> tuple[list[int], list[int]]:
        """(row, node) for every drafted node on every row's path: row i's path is node i and its ancestors,
        the root excluded. Built from the parents in one pass (parents come before children)."""
        rows: list[int] = []
        nodes: list[int] = []
        if self.tree is None:
            return rows, nodes
        paths: list[list[int]] = [[]]
        for i in range(1, len(self.tree)):
            path = paths[self.tree.parents[i]] + [i]
            paths.append(path)
            rows += [i] * len(path)
            nodes += path
        return rows, nodes


def adjust_logits(logits: torch.Tensor, params: SamplingParams, ctx: LogitContext) -> torch.Tensor:
    """Rows [n, V] of raw logits -> a float32 copy with the request's bias, min_tokens mask and penalties
    applied, row ``i`` for the context of ``ctx``'s node ``i`` (module docstring). ``logits`` is not changed
    (its rows still give the model's own logprobs)."""
    x = logits.to(torch.float32, copy=True)
    n = x.shape[0]
    depths = ctx.depths()
    if len(depths) != n:
        raise ValueError(f"adjust_logits: {n} rows of logits for a tree of {len(depths)} nodes")
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=x.device)
        x[:, ids] += torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=x.device)
    if params.min_tokens:
        _mask_stops(x, params.min_tokens, len(ctx.output_ids), depths, ctx.stop_ids)
    if params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0:
        _penalise(x, params, ctx)
    return x


def _mask_stops(x: torch.Tensor, min_tokens: int, generated: int, depths: list[int], stop_ids: list[int]) -> None:
    """-inf on the stop tokens of every row whose position (tokens generated before it) is < min_tokens."""
    vocab = x.shape[1]
    stops = sorted({t for t in stop_ids if 0 <= t < vocab})
    early = [i for i, d in enumerate(depths) if generated + d < min_tokens]
    if stops and early:
        rows = torch.tensor(early, dtype=torch.long, device=x.device)
        cols = torch.tensor(stops, dtype=torch.long, device=x.device)
        x[rows.unsqueeze(1), cols] = float("-inf")


def _ids(device: torch.device, ids: list[int]) -> torch.Tensor:
    """A list of token ids as an int64 tensor (through an array: several times cheaper than torch.tensor)."""
    if not ids:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.frombuffer(array.array("q", ids), dtype=torch.int64).to(device)


def _penalise(x: torch.Tensor, params: SamplingParams, ctx: LogitContext) -> None:
    """The repetition, frequency and presence penalties, in place, on the columns of the tokens that occur."""
    dev = x.device
    n = x.shape[0]
    rep = params.repetition_penalty != 1.0
    prompt = ctx.prompt_ids if rep else []
    drafted = ctx.tree.tokens[1:] if ctx.tree is not None else []
    n_prompt, n_out = len(prompt), len(ctx.output_ids)
    if n_prompt + n_out + len(drafted) == 0:
        return
    # cols: sorted ids of every token that occurs; col_of[k]: the column of the k-th id of prompt + output +
    # drafted (one sort for everything, no per-list lookups).
    cols, col_of = torch.unique(_ids(dev, prompt + ctx.output_ids + drafted), return_inverse=True)
    # counts[i, u]: occurrences of token cols[u] in the committed output plus on row i's path (exact small
    # integers in float32, so every row's arithmetic below is bit for bit what plain decoding does there).
    counts = torch.bincount(col_of[n_prompt:n_prompt + n_out], minlength=cols.numel()).to(torch.float32)
    counts = counts.unsqueeze(0).repeat(n, 1)
    rows, nodes = ctx.path_pairs()
    if rows:
        node_col = col_of[n_prompt + n_out:]  # column of node j's token is node_col[j - 1]
        counts.index_put_((_ids(dev, rows), node_col[_ids(dev, nodes) - 1]),
                          torch.ones(len(rows), dtype=torch.float32, device=dev), accumulate=True)
    sub = x[:, cols]
    if rep:
        # HF / vLLM: dividing a positive logit and multiplying a negative one both lower it for r > 1.
        in_prompt = torch.zeros(cols.numel(), dtype=torch.bool, device=dev)
        in_prompt[col_of[:n_prompt]] = True
        seen = (counts > 0) | in_prompt.unsqueeze(0)
        r = params.repetition_penalty
        sub = torch.where(seen, torch.where(sub > 0, sub / r, sub * r), sub)
    if params.presence_penalty or params.frequency_penalty:
        sub = sub - (params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(torch.float32))
    x[:, cols] = sub
