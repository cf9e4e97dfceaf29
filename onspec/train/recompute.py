"""Final hidden states of prompt positions, recomputed from their recorded aux states (trainer side).

The engine reports the final hidden state only where it computes logits (tree nodes, the last prompt
token), but it records the aux states of every prompt position. The highest aux state is the residual
stream entering target layer ``hi`` (EAGLE-3's convention, ``hi = n - 3`` for most targets), so running
the target's last ``n - hi`` layers causally over the prompt's residuals and the final norm gives exactly
the final hidden state, hence the target's distribution at every prompt position: soft targets where
the trainer would otherwise have only the one token that followed. Cost: ``(n - hi) / n`` of a prefill
(10% for a 30-layer target), once per chunk, in the trainer process.

Only chunks that start at position 0 qualify (a continued chunk lacks the residuals of earlier positions).
If the model internals this relies on ever change, :meth:`PromptHidden.fill` fails closed: the chunk
keeps its hard targets.
"""

from __future__ import annotations

import torch

from .traces import TraceChunk


class PromptHidden:
    def __init__(self, target, aux_layers: tuple[int, ...]) -> None:
        self.model = target.model
        self.arch = target.arch
        self.hi = int(aux_layers[-1])
        self.failed = 0

    @torch.no_grad()
    def fill(self, chunk: TraceChunk) -> bool:
        """Fill the missing hidden rows of ``chunk`` in place; True when it did."""
        missing = ~chunk.has_hidden
        if chunk.start != 0 or not bool(missing.any()):
            return False
        m = int(missing.nonzero()[-1]) + 1
        H = self.arch.hidden_size
        try:
            x = chunk.aux[:m, 2 * H:3 * H].to(self.model.embed_tokens.weight.dtype)
            h = self._top_layers(x)
        except Exception:
            self.failed += 1
            return False
        rows = missing.clone()
        rows[m:] = False
        chunk.hidden[rows] = h[rows[:m]].to(chunk.hidden.dtype)
        chunk.has_hidden = chunk.has_hidden | rows
        return True

    def _top_layers(self, x: torch.Tensor) -> torch.Tensor:
        """The final hidden states of ``x`` [m, H] (residuals entering layer ``hi``), computed over ``m``
        padded up to ``bucket_tokens(m)`` rows: prompts come in every length, and on a CPU each new row
        count would leave a compiled oneDNN primitive per weight shape in this process (~0.7 MB each,
        onspec/server/memory.py). The padding rows come last and attention is causal, so they change no
        real row; they are dropped."""
        from ..engine.runner import bucket_tokens
        from ..models.llama import AttnBatch

        model, a = self.model, self.arch
        m = x.shape[0]
        n = bucket_tokens(m)
        if n > m:
            x = torch.cat((x, x.new_zeros(n - m, x.shape[1])))
        if self.hi < a.num_layers:
            positions = torch.arange(n)
            cos, sin = model.rope(positions, x.dtype)
            batch = AttnBatch(B=1, T=n, token_index=None, slots=torch.zeros(1, dtype=torch.long), slot_range=(0, 1),
                              key_len=n, mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None],
                              write_slot=torch.zeros(n, dtype=torch.long), write_pos=torch.arange(n))
            for layer in model.layers[self.hi:]:
                k = torch.zeros(1, a.num_kv_heads, n, a.head_dim, dtype=x.dtype)
                v = torch.zeros_like(k)
                x = layer(x, cos, sin, k, v, batch)
        return model.norm(x)[:m]
