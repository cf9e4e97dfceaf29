"""Requests -> tensors -> model. The only place that builds input tensors for the target model.

A step is a list of ``RowSpec``s, one per sequence: a prefill chunk (causal), a plain decode token, or a
draft tree to verify (root = last committed token, nodes attend to their ancestors). All rows go through
one packed forward; logits are computed only for the positions that need them (the last prompt token of a
finishing prefill, every node of a draft tree), because the lm_head over a 49k vocabulary is not cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.llama import AttnBatch, CausalLM
from .kv_cache import KVCache


@dataclass
class RowSpec:
    slot: int
    cache_len: int
    tokens: list[int]
    depths: list[int] | None = None          # tree depth per token (None: a causal chain)
    tree_mask: torch.Tensor | None = None    # bool [n, n] ancestor mask (None: causal)
    logits_from: int = -1                    # compute logits for tokens[logits_from:]; -1: none


@dataclass
class StepOutput:
    logits: list[torch.Tensor | None]        # per row: [n_logits, V] float32 or None
    hidden: list[torch.Tensor | None]        # per row: final hidden of the logits rows
    aux: list[torch.Tensor | None]           # per row: concatenated aux hidden states of ALL its tokens


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, device: str = "cpu") -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.aux_layers: tuple[int, ...] = ()

    def build(self, rows: list[RowSpec]) -> tuple[torch.Tensor, torch.Tensor, AttnBatch]:
        B = len(rows)
        lens = [len(r.tokens) for r in rows]
        T = max(lens)
        P = max(r.cache_len for r in rows)
        ids: list[int] = []
        pos: list[int] = []
        index: list[int] = []
        wslot: list[int] = []
        wpos: list[int] = []
        for b, r in enumerate(rows):
            n = len(r.tokens)
            ids.extend(r.tokens)
            offs = r.depths if r.depths is not None else range(n)
            pos.extend(r.cache_len + d for d in offs)
            index.extend(b * T + t for t in range(n))
            wslot.extend([r.slot] * n)
            wpos.extend(range(r.cache_len, r.cache_len + n))
        dense = all(n == T for n in lens)
        L = max(r.cache_len + n for r, n in zip(rows, lens))
        uniform = dense and T == 1 and all(r.cache_len == P for r in rows)
        mask = None
        if not uniform:
            mask = torch.zeros(B, 1, T, L, dtype=torch.bool)
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            for b, r in enumerate(rows):
                n, c = len(r.tokens), r.cache_len
                mask[b, 0, :, :c] = True
                mask[b, 0, :n, c:c + n] = r.tree_mask if r.tree_mask is not None else causal[:n, :n]
                if n < T:  # padding rows attend to one real key only, so softmax never sees an empty row
                    mask[b, 0, n:, 0] = True
        slots = [r.slot for r in rows]
        contiguous = slots == list(range(slots[0], slots[0] + B))
        dev = self.device
        batch = AttnBatch(
            B=B, T=T,
            token_index=None if dense else torch.tensor(index, device=dev),
            slots=torch.tensor(slots, device=dev),
            slot_range=(slots[0], slots[0] + B) if contiguous else None,
            key_len=L,
            mask=mask.to(dev) if mask is not None else None,
            write_slot=torch.tensor(wslot, device=dev),
            write_pos=torch.tensor(wpos, device=dev),
        )
        return torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), batch

    @torch.inference_mode()
    def run(self, rows: list[RowSpec], want_aux: bool = False) -> StepOutput:
        ids, pos, batch = self.build(rows)
        aux_layers = self.aux_layers if want_aux else ()
        hidden, aux = self.model(ids, pos, self.kv.k, self.kv.v, batch, aux_layers)
        # Select the rows that need logits and run the lm_head once over all of them.
        starts, offset, pick = [], 0, []
        for r in rows:
            n = len(r.tokens)
            starts.append(offset)
            if r.logits_from >= 0:
                pick.extend(range(offset + r.logits_from, offset + n))
            offset += n
        logits_all = self.model.logits(hidden[pick]).float() if pick else None
        hid_all = hidden[pick] if pick else None
        aux_cat = torch.cat(aux, dim=-1) if aux else None
        out = StepOutput([], [], [])
        cursor = 0
        for r, s in zip(rows, starts):
            n = len(r.tokens)
            if r.logits_from >= 0:
                k = n - r.logits_from
                out.logits.append(logits_all[cursor:cursor + k])
                out.hidden.append(hid_all[cursor:cursor + k])
                cursor += k
            else:
                out.logits.append(None)
                out.hidden.append(None)
            out.aux.append(aux_cat[s:s + n] if aux_cat is not None else None)
        return out
