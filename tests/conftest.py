"""Shared fixtures: tiny random models of each family (fast) and the real default model (loaded once)."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from onspec.models.loader import load_model, resolve_model_dir
from onspec.speculation.proposer import Proposer

# Tiny models gain nothing from a second thread, and on a busy 2-core machine (servers, trainer processes
# and pytest side by side) spinning OpenMP threads slow such work down many times over.
torch.set_num_threads(1)


def pytest_configure(config) -> None:
    """A run ended from outside (CI's time limit sends SIGTERM) first writes every thread's stack to the
    real stderr, so a hang anywhere (collection included, where the per-test timeout does not reach) says
    where it was. The descriptor is a copy taken now: during a test, fd 2 is pytest's capture file."""
    stderr_copy = os.fdopen(os.dup(2), "w")
    config.stash[STDERR_COPY] = stderr_copy    # kept open for the session: faulthandler holds only the fd
    faulthandler.register(signal.SIGTERM, file=stderr_copy, all_threads=True, chain=True)


STDERR_COPY = pytest.StashKey()


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever an engine it built set (``EngineConfig.num_threads``)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 16}),
}


class StubProposer(Proposer):
    """A learned-drafter stand-in for controller tests: the Proposer base's events do nothing and
    ``propose`` drafts nothing; tests override what they need."""

    name, wants_aux = "learned", False

    def propose(self, seqs, budgets):
        return {}


def make_tiny_model(out: Path, family: str = "llama", vocab_size: int = 512, seed: int = 0,
                    rope_scaling: dict | None = None, tie: bool = True) -> Path:
    """A random HF model directory of the given family, with the default model's tokenizer files
    (the tokenizer's ids above ``vocab_size`` are never produced by the tiny model itself)."""
    import transformers

    arch, cfg_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.25, **extra)
    if rope_scaling:
        cfg.rope_scaling = rope_scaling
    torch.manual_seed(seed)
    # A wide init (0.25, not 0.02) gives peaked, varied next-token distributions instead of near-uniform
    # ones, so greedy paths are diverse and argmax ties (which float noise could flip) do not occur.
    model = getattr(transformers, arch)(cfg).to(torch.float32)
    model.save_pretrained(out)
    cfg_json = json.loads((out / "config.json").read_text())
    cfg_json["architectures"] = [arch]
    (out / "config.json").write_text(json.dumps(cfg_json))
    default_dir = resolve_model_dir("default")
    for f in default_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny_model(base / fam, fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def default_model_f32():
    """The real default model in float32, loaded once per session (exactness tests)."""
    return load_model("default", dtype="float32")
