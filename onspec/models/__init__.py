"""Model implementations (llama, qwen2, qwen3 families) and their loader."""

from .llama import ArchConfig, AttnBatch, CausalLM, UnsupportedModelError
from .loader import LoadedModel, ModelLoadError, load_model

__all__ = ["ArchConfig", "AttnBatch", "CausalLM", "LoadedModel", "ModelLoadError", "UnsupportedModelError",
           "load_model"]
