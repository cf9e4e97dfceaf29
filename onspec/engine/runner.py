"""Requests -> tensors -> model. The only place that builds input tensors for the target model.

A step is a list of ``RowSpec``s, one per sequence: a prefill chunk (causal), a plain decode token, or a
draft tree to verify (root = last committed token, nodes attend to their ancestors). All rows go through
one packed forward; logits are computed only for the positions that need them (the last prompt token of a
finishing prefill, every node of a draft tree), because the lm_head over a 49k vocabulary is not cheap.

Shape buckets (why a forward may carry a few padding tokens): on a CPU the bf16 matrix products run on
oneDNN, which compiles a primitive for every distinct input shape and keeps it in two caches (oneDNN's own
and ideep's, 1024 entries each by default), about 0.7 MB per (rows, weight shape) pair whatever the weight's
size. With speculation nearly every step has a different token count (rows + draft nodes + prefill
chunk), so a server's resident memory crept up for thousands of requests and every new count also paid
the compilation (0.5-1 ms per weight shape). bench/serve.py --modes auto, default model, resident memory
after 100 / 500 / 1000 requests: 1263 / 1574 / 1822 MiB exact-size, 1126 / 1146 / 1154 MiB bucketed (with
the server's cache caps, server/memory.py). The engine alone, no caps, 100 -> 400 requests: 1009 -> 1234
MiB over 127 distinct sizes exact-size, 916 -> 932 MiB over 20 sizes bucketed. ``build`` therefore pads
the packed token count of a multi-token forward up to ``bucket_tokens(n)`` (exact up to 8, then steps of
1/8 of the next power of two: 27 sizes up to 512), and ``run`` pads the lm_head rows the same way.
Padding tokens (id 0) occupy grid cells after a row's real tokens, write their K/V into that row's own slot
past its live positions (never read: later writes overwrite them before any mask lets a query see them)
and attend to key 0 only, so real tokens' results are unchanged. Single-token steps (plain decoding) are
never padded: their count is the batch size, already bounded by the slot count, and padding would cost them
the mask-free attention path.

Attention grids: the packed tokens are unpacked into padded ``[rows, width]`` grids for attention. One grid
for the whole step made every row as wide as the longest (a prefill chunk, a deep draft tree), so rows are
grouped by width (``attention_groups``) and each group gets its own grid; ``bench/decode.py`` measures
1.73x the throughput of one grid at batch 64.
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


def bucket_tokens(n: int) -> int:
    """The padded size of a forward of ``n`` tokens: exact up to 8, then steps of 1/8 of the next power of
    two (16, 24, ..., 64, 80, ..., 128, 160, ..., 256, 320, ...): fewer than max(8, n / 4) padding tokens."""
    if n <= 8:
        return n
    step = max(8, (1 << (n - 1).bit_length()) // 8)
    return -(-n // step) * step


# Attention cost of a grid, in query-key cells (rows x grid width x keys read): SDPA on a CPU runs close to
# proportional to it (bf16, 2 threads, default model's 3 K/V heads: 0.04 ms for 1 row x 400 keys, 0.15 ms for
# 8 x 300, 2.2 ms for 64 x 300: about 30 ns a cell). A separate grid also costs a fixed amount per layer
# (gathering its queries, one more SDPA call, scattering the output back): 8 decoding rows at 300 keys took
# 27.4 ms a step in one grid and 29.3 ms in two, about 60 us a layer or 2000 cells. Twice that leans towards
# fewer grids.
GROUP_OVERHEAD_CELLS = 4096


def attention_groups(width: list[int], key_len: list[int]) -> list[list[int]]:
    """Rows split into attention grids of similar length.

    One padded grid makes every row as long as the longest one: a step with 61 decoding rows and one 178-token
    prefill chunk ran 62 x 178 query rows against the cache (49 ms per layer, timing each attention call on
    the batch-64 prompts of bench/speculation.py (e)),
    and one 16-node draft tree made every row of a batch pay for 17. So rows are classed by the power of two
    that bounds their width (1, 2, 3-4, 5-8, ...), which wastes less than half of any grid, and neighbouring
    classes are merged back while the merged grid costs less than running them apart."""
    classes: dict[int, list[int]] = {}
    for b, n in enumerate(width):
        classes.setdefault((n - 1).bit_length(), []).append(b)

    def cells(rows: list[int]) -> int:
        return len(rows) * max(width[b] for b in rows) * max(key_len[b] for b in rows)

    groups: list[list[int]] = []
    for c in sorted(classes):
        rows = classes[c]
        if groups and cells(groups[-1] + rows) <= cells(groups[-1]) + cells(rows) + GROUP_OVERHEAD_CELLS:
            groups[-1] = groups[-1] + rows
        else:
            groups.append(rows)
    return [sorted(g) for g in groups]  # in slot order where possible: contiguous slots read as a view


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, device: str = "cpu") -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.aux_layers: tuple[int, ...] = ()
        # Pad multi-token forwards to ``bucket_tokens`` sizes (see the module docstring). Only on a CPU, where
        # oneDNN caches a compiled primitive per shape; False runs every forward at its exact size.
        self.bucket_shapes = str(device).startswith("cpu")
        # Attend rows of very different widths in separate grids (``attention_groups``); False runs every
        # step in one padded grid (for benchmarks: bench/decode.py measures the difference).
        self.group_attention = True

    def _padding(self, rows: list[RowSpec], lens: list[int]) -> list[int] | None:
        """Padding tokens per row that bring the step to its bucket size; None when it needs none."""
        if not self.bucket_shapes or max(lens) == 1:
            return None
        n = sum(lens)
        extra = bucket_tokens(n) - n
        if extra == 0:
            return None
        # a row's padding K/V goes into its own slot past its live rows, so it needs room there
        room = [max(0, self.kv.max_len - r.cache_len - k) for r, k in zip(rows, lens)]
        if sum(room) < extra:
            return None  # sequences at the very end of their slots: run this step at its exact size
        # The longest rows take the padding: attention groups rows by length (``attention_groups``), so a
        # few more tokens on the longest row widen only its own grid, while padding on a decoding row would
        # move it out of the single-token grid.
        pads = [0] * len(rows)
        for b in sorted(range(len(rows)), key=lambda b: -lens[b]):
            pads[b] = min(extra, room[b])
            extra -= pads[b]
            if not extra:
                break
        return pads

    def build(self, rows: list[RowSpec]) -> tuple[torch.Tensor, torch.Tensor, AttnBatch]:
        lens = [len(r.tokens) for r in rows]
        pads = self._padding(rows, lens) or [0] * len(rows)
        ids: list[int] = []
        pos: list[int] = []
        wslot: list[int] = []
        wpos: list[int] = []
        where: list[tuple[int, int]] = []  # (row, index within the row) of every packed token
        for b, r in enumerate(rows):
            n = len(r.tokens)
            ids.extend(r.tokens)
            offs = r.depths if r.depths is not None else range(n)
            pos.extend(r.cache_len + d for d in offs)
            where.extend((b, t) for t in range(n))
            wslot.extend([r.slot] * n)
            wpos.extend(range(r.cache_len, r.cache_len + n))
        for b, (r, n, p) in enumerate(zip(rows, lens, pads)):  # padding after all real tokens, so real
            ids.extend([0] * p)                                 # tokens keep their packed order
            pos.extend(range(r.cache_len + n, r.cache_len + n + p))
            where.extend((b, t) for t in range(n, n + p))
            wslot.extend([r.slot] * p)
            wpos.extend(range(r.cache_len + n, r.cache_len + n + p))
        width = [n + p for n, p in zip(lens, pads)]
        groups = (attention_groups(width, [r.cache_len + n for r, n in zip(rows, lens)]) if self.group_attention
                  else [list(range(len(rows)))])
        dev = self.device
        if len(groups) == 1:
            batch = self._grid(rows, lens, width, groups[0], where)
        else:
            member = [0] * len(rows)
            for g, rows_g in enumerate(groups):
                for b in rows_g:
                    member[b] = g
            sels: list[list[int]] = [[] for _ in groups]
            for i, (b, _) in enumerate(where):
                sels[member[b]].append(i)
            parts = [(torch.tensor(sel, device=dev), self._grid(rows, lens, width, rows_g, [where[i] for i in sel]))
                     for sel, rows_g in zip(sels, groups)]
            batch = AttnBatch(B=len(rows), T=max(width), token_index=None,
                              slots=torch.tensor([r.slot for r in rows], device=dev), slot_range=None,
                              key_len=max(p.key_len for _, p in parts), mask=None,
                              write_slot=torch.empty(0), write_pos=torch.empty(0), groups=parts)
        batch.write_slot = torch.tensor(wslot, device=dev)
        batch.write_pos = torch.tensor(wpos, device=dev)
        return torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), batch

    def _grid(self, rows: list[RowSpec], lens: list[int], width: list[int], members: list[int],
              where: list[tuple[int, int]]) -> AttnBatch:
        """The padded [B, T] attention grid of rows ``members``, whose packed tokens are ``where`` (row,
        index within the row), in packed order. write_slot/write_pos are left for ``build`` to fill."""
        local = {b: i for i, b in enumerate(members)}
        B, T = len(members), max(width[b] for b in members)
        cells = [local[b] * T + t for b, t in where]
        dense = cells == list(range(B * T))
        L = max(rows[b].cache_len + lens[b] for b in members)
        uniform = dense and T == 1 and len({rows[b].cache_len for b in members}) == 1
        mask = None
        if not uniform:
            mask = torch.zeros(B, 1, T, L, dtype=torch.bool)
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            for i, b in enumerate(members):
                r, n = rows[b], lens[b]
                c = r.cache_len
                mask[i, 0, :, :c] = True
                mask[i, 0, :n, c:c + n] = r.tree_mask if r.tree_mask is not None else causal[:n, :n]
                if n < T:  # grid padding (and padding tokens) attend to key 0 only: softmax never sees an empty row
                    mask[i, 0, n:, 0] = True
        slots = [rows[b].slot for b in members]
        contiguous = slots == list(range(slots[0], slots[0] + B))
        dev = self.device
        empty = torch.empty(0, dtype=torch.long, device=dev)
        return AttnBatch(
            B=B, T=T,
            token_index=None if dense else torch.tensor(cells, device=dev),
            slots=torch.tensor(slots, device=dev),
            slot_range=(slots[0], slots[0] + B) if contiguous else None,
            key_len=L,
            mask=mask.to(dev) if mask is not None else None,
            write_slot=empty, write_pos=empty,
        )

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
        if pick and self.bucket_shapes and max(len(r.tokens) for r in rows) > 1:
            pick = pick + [pick[-1]] * (bucket_tokens(len(pick)) - len(pick))  # lm_head rows: same buckets
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
