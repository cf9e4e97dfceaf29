"""Parallel drafter checkpoints: the EAGLE-3 layout plus the parallel-drafting fields and the mask vector.

What the loaders read (the field names are checked against their code):

* vLLM, ``vllm/model_executor/models/llama_eagle3.py`` (``Eagle3LlamaForCausalLM``): with the speculative
  config's ``parallel_drafting`` on, it keeps a buffer ``mask_hidden`` of ``[1, 3 * hidden_size]`` (aux
  states on) and its ``load_weights`` copies the tensor named ``mask_hidden`` into it (and refuses a
  checkpoint without one); every other tensor is the EAGLE-3 layout (``d2t`` becomes
  ``draft_id_to_target_id``, ``t2d`` is skipped).
* vLLM's EAGLE proposer, ``vllm/v1/spec_decode/eagle.py`` (in later versions ``llm_base_proposer.py``),
  ``_init_parallel_drafting_params``: the token fed at the masked positions is ``config.json``'s
  ``pard_token`` or ``ptd_token_id`` (or ``dflash_config.mask_token_id``); newer vLLM also reads a
  top-level ``mask_token_id``.
* the ``speculators`` package's P-EAGLE, ``src/speculators/models/peagle/config.py``
  (``PEagleSpeculatorConfig.mask_token_id``) and ``core.py`` (``para_depths``, ``ptd_token_id``,
  ``mask_hidden`` of ``3 * hidden_size`` values).

So ``config.json`` is ``eagle3_config_dict`` (architectures ``LlamaForCausalLMEagle3``) plus
``PARALLEL_CONFIG_KEYS``; ``model.safetensors`` holds the EAGLE-3 tensors plus ``mask_hidden`` [1, 3 Ht].
"""

from __future__ import annotations

from pathlib import Path

import torch

from .eagle_model import (
    DrafterLoadError,
    eagle3_config_dict,
    expected_shapes,
    fill_drafter,
    read_eagle3,
    write_checkpoint,
)
from .parallel_drafter import ParallelConfig, ParallelDrafter

MASK_HIDDEN = "mask_hidden"
# Token-id keys in the order vLLM's proposer tries them (``mask_token_id``: speculators and newer vLLM).
MASK_TOKEN_KEYS = ("pard_token", "ptd_token_id", "mask_token_id")
PARALLEL_CONFIG_KEYS = ("parallel_drafting", "para_depths", *MASK_TOKEN_KEYS)


def parallel_config_dict(drafter: ParallelDrafter, layer_id_convention: str = "vllm") -> dict:
    """config.json of a parallel drafter (see the module docstring)."""
    out = eagle3_config_dict(drafter.cfg, drafter.dtype, layer_id_convention)
    p = drafter.parallel
    out["parallel_drafting"] = True
    out["para_depths"] = p.depths
    for key in MASK_TOKEN_KEYS:
        out[key] = p.mask_token_id
    return out


def save_parallel(directory: str | Path, drafter: ParallelDrafter, layer_id_convention: str = "vllm") -> Path:
    """Write ``config.json`` + ``model.safetensors`` (each replaced atomically); embeddings are not written
    (loaders share the target's)."""
    state = {k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}
    mask = state.pop(MASK_HIDDEN)
    drift = set(expected_shapes(drafter.cfg)) ^ set(state)
    if drift:  # a guard against the module and the format drifting apart
        raise RuntimeError(f"drafter state does not match the EAGLE-3 layout: {sorted(drift)}")
    state[MASK_HIDDEN] = mask.reshape(1, -1)             # vLLM's buffer shape
    return write_checkpoint(directory, state, parallel_config_dict(drafter, layer_id_convention))


def load_parallel(directory: str | Path, target, dtype: torch.dtype | None = None) -> ParallelDrafter:
    """Load a parallel drafter for ``target`` (a ``LoadedModel``). Everything ``load_eagle3`` checks, plus:
    a ``mask_hidden`` tensor of ``3 * target_hidden_size`` finite values and a mask token id inside the
    vocabulary; ``para_depths`` when given (else ``ParallelConfig``'s default: vLLM takes the depth from
    its own ``num_speculative_tokens``). Raises ``DrafterLoadError`` naming the file and the problem."""
    ckpt = read_eagle3(directory, target, extra=(MASK_HIDDEN,))
    raw, where = ckpt.raw, ckpt.config_path
    token = next((raw[k] for k in MASK_TOKEN_KEYS if raw.get(k) is not None), None)
    if token is None:
        raise DrafterLoadError(f"{where}: names no mask token ({' / '.join(MASK_TOKEN_KEYS)}): not a parallel "
                               "drafter")
    depths = raw.get("para_depths", ParallelConfig.depths)
    if isinstance(token, bool) or not isinstance(token, int) or isinstance(depths, bool) or not isinstance(depths, int):
        raise DrafterLoadError(f"{where}: mask token {token!r} and para_depths {depths!r} must be integers")
    mask = ckpt.extras.get(MASK_HIDDEN)
    if mask is None:
        raise DrafterLoadError(f"{ckpt.weights_path}: no {MASK_HIDDEN} tensor: not a parallel drafter")
    n = 3 * ckpt.cfg.target_hidden_size
    if mask.numel() != n or not mask.is_floating_point():
        raise DrafterLoadError(f"{ckpt.weights_path}: {MASK_HIDDEN} has shape {tuple(mask.shape)} and dtype "
                               f"{mask.dtype}, expected {n} floating-point values")
    if not bool(torch.isfinite(mask).all()):
        raise DrafterLoadError(f"{ckpt.weights_path}: {MASK_HIDDEN} holds NaN or infinite values")
    try:
        drafter = ParallelDrafter(ckpt.cfg, ParallelConfig(depths=depths, mask_token_id=token))
    except ValueError as exc:  # ConfigError names the field
        raise DrafterLoadError(f"{where}: invalid parallel-drafting config: {exc}") from None
    return fill_drafter(drafter, {**ckpt.state, MASK_HIDDEN: mask.reshape(-1)}, target, dtype)


__all__ = ["MASK_HIDDEN", "MASK_TOKEN_KEYS", "PARALLEL_CONFIG_KEYS", "load_parallel", "parallel_config_dict",
           "save_parallel"]
