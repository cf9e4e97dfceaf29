"""onspec: LLM serving and RL rollouts with speculative decoding whose drafter learns while it works."""
__version__ = "0.1.0"

from .engine.sampler import SamplingParams
from .llm import LLM, CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
