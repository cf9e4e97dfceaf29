"""A differentiable causal forward of the engine's model class over a padded batch of whole sequences.

The engine's ``CausalLM`` is written for serving: packed tokens, a slot KV cache it writes into, and an
``AttnBatch`` saying where each sequence lives. Training needs a plain causal pass over (prompt +
completion) with gradients. Rather than a second model implementation (two codes that could drift
apart), this module drives the same ``CausalLM.forward`` with an ``AttnBatch`` that has no cached prefix (every
sequence starts at position 0 of its own scratch slot), a causal mask over each row, and a throw-away
KV cache sized for the batch: the layers write their K/V rows into it and attend over it as usual, and
autograd follows the writes (the cache is a plain tensor that does not require grad itself).

Only the positions that predict completion tokens go through the lm_head (a 49k-vocabulary projection is
a large share of the cost, and prompt tokens earn no loss).
"""

from __future__ import annotations

import torch

from ..models.llama import AttnBatch, CausalLM


def causal_batch(seqs: list[list[int]], device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, AttnBatch]:
    """Packed ids [N], positions [N] and an ``AttnBatch`` for full causal attention within each sequence."""
    if not seqs or any(not s for s in seqs):
        raise ValueError("sequences: need at least one non-empty sequence")
    B = len(seqs)
    lens = [len(s) for s in seqs]
    T = max(lens)
    ids: list[int] = []
    pos: list[int] = []
    index: list[int] = []
    wslot: list[int] = []
    for b, s in enumerate(seqs):
        ids.extend(s)
        pos.extend(range(len(s)))
        index.extend(b * T + t for t in range(len(s)))
        wslot.extend([b] * len(s))
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for b, n in enumerate(lens):
        mask[b, 0, :n, :n] = causal[:n, :n]
        if n < T:  # padding rows attend to themselves only, so no softmax row is empty
            mask[b, 0, torch.arange(n, T), torch.arange(n, T)] = True
    dense = all(n == T for n in lens)
    batch = AttnBatch(
        B=B, T=T,
        token_index=None if dense else torch.tensor(index, device=device),
        slots=torch.arange(B, device=device),
        slot_range=(0, B),
        key_len=T,
        mask=mask.to(device),
        write_slot=torch.tensor(wslot, device=device),
        write_pos=torch.tensor(pos, device=device),
    )
    return torch.tensor(ids, device=device), torch.tensor(pos, device=device), batch


def scratch_kv(model: CausalLM, batch: AttnBatch, dtype: torch.dtype,
               device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    a = model.arch
    shape = (batch.B, a.num_kv_heads, batch.T, a.head_dim)
    return ([torch.zeros(shape, dtype=dtype, device=device) for _ in range(a.num_layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(a.num_layers)])


def completion_logprobs(model: CausalLM, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float = 1.0) -> list[torch.Tensor]:
    """Per sequence: log pi(completion token | prefix) for each completion token, [len(completion)].

    The distribution is the one the rollout sampled from: logits / temperature (temperature 0, greedy
    rollouts, is scored at temperature 1). Differentiable when the model's parameters require grad.
    """
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions must pair up")
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device.type
    v_dtype = dtype
    if torch.is_autocast_enabled(device):
        # Under autocast V leaves its projection in the autocast dtype, while K goes through the rotary
        # embedding, whose float32 cos/sin promote it back to the parameters' dtype.
        v_dtype = torch.get_autocast_dtype(device)
    ids, pos, batch = causal_batch(seqs, device)
    kv_k, _ = scratch_kv(model, batch, dtype, device)
    _, kv_v = scratch_kv(model, batch, v_dtype, device)
    hidden, _ = model(ids, pos, kv_k, kv_v, batch)
    # Row j of a sequence predicts token j + 1: the completion's tokens are predicted by rows
    # len(prompt) - 1 ... len(seq) - 2.
    pick: list[int] = []
    targets: list[int] = []
    offset = 0
    for p, c, s in zip(prompts, completions, seqs):
        pick.extend(range(offset + len(p) - 1, offset + len(s) - 1))
        targets.extend(c)
        offset += len(s)
    if not pick:
        return [hidden.new_zeros(0) for _ in seqs]
    logits = model.logits(hidden[torch.tensor(pick, device=device)]).float()
    if temperature > 0:
        logits = logits / temperature
    lp = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
    return list(lp.split([len(c) for c in completions]))
