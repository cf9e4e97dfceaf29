"""Our model implementations against transformers' reference, and the runner's packing against one-shot.

* Logits of each family (llama, qwen2, qwen3; llama with llama3 and linear rope scaling) equal
  transformers' on tiny random models in float32, and on the real default model.
* The same logits come out however the tokens are packed: a prompt prefilled in chunks, a batch of
  rows of different lengths and cache lengths, and a draft tree (each node sees only its ancestors).
"""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_tiny_model
from onspec.engine.kv_cache import KVCache
from onspec.engine.runner import ModelRunner, RowSpec
from onspec.models.loader import LoadedModel, load_model
from onspec.speculation.tree import DraftTree

TOL = 2e-4  # float32; our maths matches transformers' op for op up to summation order


def hf_logits(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def runner_for(lm: LoadedModel, slots: int = 4, max_len: int = 320) -> ModelRunner:
    return ModelRunner(lm.model, KVCache(lm.arch, slots, max_len, torch.float32))


def prefill_logits(runner: ModelRunner, ids: list[int], chunk: int | None = None, slot: int = 0) -> torch.Tensor:
    """Logits at every position of ``ids``, prefilled in chunks of ``chunk`` tokens (None: one shot)."""
    chunk = chunk or len(ids)
    out = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        out.append(runner.run([RowSpec(slot, start, part, logits_from=0)]).logits[0])
    return torch.cat(out)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_logits_match_transformers(tiny_model_dirs, family: str) -> None:
    path = tiny_model_dirs[family]
    lm = load_model(str(path), "float32")
    assert lm.arch.family == family
    ids = random_ids(48, lm.arch.vocab_size, seed=1)
    ours = prefill_logits(runner_for(lm), ids)
    ref = hf_logits(path, ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)


ROPE_SCALINGS = {
    # A small original context (64) so that positions up to 300 cross llama3's low/high frequency bands.
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
}


@pytest.mark.parametrize("kind", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path, kind: str) -> None:
    path = make_tiny_model(tmp_path / kind, "llama", rope_scaling=ROPE_SCALINGS[kind], seed=3)
    lm = load_model(str(path), "float32")
    assert dict(lm.arch.rope_scaling or ()).get("rope_type") == kind
    ids = random_ids(300, lm.arch.vocab_size, seed=2)
    ours = prefill_logits(runner_for(lm), ids)
    ref = hf_logits(path, ids)
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=5e-4)


def test_untied_lm_head_matches_transformers(tmp_path) -> None:
    path = make_tiny_model(tmp_path / "untied", "qwen2", tie=False, seed=4)
    lm = load_model(str(path), "float32")
    assert not lm.arch.tie_word_embeddings
    ids = random_ids(20, lm.arch.vocab_size, seed=5)
    torch.testing.assert_close(prefill_logits(runner_for(lm), ids), hf_logits(path, ids), atol=TOL, rtol=TOL)


def test_default_model_logits_match_transformers(default_model_f32) -> None:
    lm = default_model_f32
    text = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        tokenize=False, add_generation_prompt=True)
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = prefill_logits(runner_for(lm, max_len=128), ids)
    ref = hf_logits(lm.path, ids)
    # Logits of the real model reach about 40 in magnitude; 1e-3 absolute is ~1e-5 relative.
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-4)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


# ---- packing: chunks, mixed batches, trees --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dirs) -> LoadedModel:
    return load_model(str(tiny_model_dirs["qwen3"]), "float32")


@pytest.mark.parametrize("chunk", [1, 7, 16])
def test_chunked_prefill_equals_one_shot(tiny_lm, chunk: int) -> None:
    ids = random_ids(45, tiny_lm.arch.vocab_size, seed=6)
    runner = runner_for(tiny_lm)
    one_shot = prefill_logits(runner, ids, slot=0)
    chunked = prefill_logits(runner, ids, chunk=chunk, slot=1)
    torch.testing.assert_close(chunked, one_shot, atol=1e-5, rtol=1e-5)


def test_mixed_batch_equals_one_shot(tiny_lm) -> None:
    """One forward holding a decode token, a first prefill chunk, a middle chunk and a whole prompt,
    on non-contiguous slots with different cache lengths, gives each row its one-shot logits."""
    vocab = tiny_lm.arch.vocab_size
    prompts = [random_ids(n, vocab, seed=10 + n) for n in (30, 12, 25, 9)]
    runner = runner_for(tiny_lm, slots=8)
    refs = [prefill_logits(runner_for(tiny_lm), p) for p in prompts]
    slots = [6, 1, 3, 0]
    cached = [29, 0, 10, 0]  # rows 0 and 2 have part of their prompt in the cache already
    for p, s, c in zip(prompts, slots, cached):
        if c:
            runner.run([RowSpec(s, 0, p[:c])])
    # Row 1 gets only its first 5 tokens this step (a chunk that leaves the rest pending).
    takes = [1, 5, 15, 9]
    rows = [RowSpec(s, c, p[c:c + t], logits_from=0) for p, s, c, t in zip(prompts, slots, cached, takes)]
    out = runner.run(rows)
    for i, (ref, c, t) in enumerate(zip(refs, cached, takes)):
        torch.testing.assert_close(out.logits[i], ref[c:c + t], atol=1e-5, rtol=1e-5, msg=f"row {i}")


def test_uniform_decode_batch_equals_one_shot(tiny_lm) -> None:
    """The mask-free fast path: one token per row, equal cache lengths, contiguous slots."""
    vocab = tiny_lm.arch.vocab_size
    prompts = [random_ids(17, vocab, seed=20 + i) for i in range(3)]
    runner = runner_for(tiny_lm)
    for s, p in enumerate(prompts):
        runner.run([RowSpec(s, 0, p[:-1])])
    out = runner.run([RowSpec(s, 16, p[-1:], logits_from=0) for s, p in enumerate(prompts)])
    for s, p in enumerate(prompts):
        ref = prefill_logits(runner_for(tiny_lm), p)[-1:]
        torch.testing.assert_close(out.logits[s], ref, atol=1e-5, rtol=1e-5)


def test_tree_rows_see_only_their_ancestors(tiny_lm) -> None:
    """Every node of a verified draft tree gets the logits of the chain from the root to it."""
    vocab = tiny_lm.arch.vocab_size
    prompt = random_ids(20, vocab, seed=30)
    tree = DraftTree(tokens=[prompt[-1], 5, 9, 7, 5, 11, 3], parents=[-1, 0, 0, 1, 1, 2, 4])
    runner = runner_for(tiny_lm)
    runner.run([RowSpec(0, 0, prompt[:-1])])
    row = RowSpec(0, len(prompt) - 1, tree.tokens, depths=tree.depths(), tree_mask=tree.ancestor_mask(),
                  logits_from=0)
    # A second, plain row in the same forward keeps the batch mixed.
    runner.run([RowSpec(1, 0, prompt[:-1])])
    out = runner.run([row, RowSpec(1, len(prompt) - 1, [prompt[-1]], logits_from=0)])
    for i in range(len(tree)):
        chain = prompt[:-1] + [tree.tokens[j] for j in tree.path(i)]
        ref = prefill_logits(runner_for(tiny_lm), chain)[-1]
        torch.testing.assert_close(out.logits[0][i], ref, atol=1e-5, rtol=1e-5, msg=f"node {i}")
    torch.testing.assert_close(out.logits[1][0], prefill_logits(runner_for(tiny_lm), prompt)[-1],
                               atol=1e-5, rtol=1e-5)


def test_compact_moves_accepted_rows(tiny_lm) -> None:
    """After a tree forward, compacting the accepted path leaves the cache as if the path was prefilled."""
    vocab = tiny_lm.arch.vocab_size
    prompt = random_ids(12, vocab, seed=40)
    tree = DraftTree(tokens=[prompt[-1], 5, 9, 7, 4], parents=[-1, 0, 0, 2, 3])
    runner = runner_for(tiny_lm)
    base = len(prompt) - 1
    runner.run([RowSpec(0, 0, prompt[:-1])])
    runner.run([RowSpec(0, base, tree.tokens, depths=tree.depths(), tree_mask=tree.ancestor_mask())])
    accepted = [0, 2, 3]
    runner.kv.compact(0, base, accepted)
    # Continue from the compacted cache and compare the next logits with a clean prefill.
    path_tokens = [tree.tokens[i] for i in accepted]
    nxt = 21
    got = runner.run([RowSpec(0, base + len(accepted), [nxt], logits_from=0)]).logits[0][0]
    ref = prefill_logits(runner_for(tiny_lm), prompt[:-1] + path_tokens + [nxt])[-1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_aux_layers_are_layer_inputs(tiny_lm) -> None:
    """``aux_layers`` return the residual stream entering the chosen layers (EAGLE-3 convention)."""
    ids = random_ids(6, tiny_lm.arch.vocab_size, seed=50)
    runner = runner_for(tiny_lm)
    runner.aux_layers = (0, tiny_lm.arch.num_layers)
    out = runner.run([RowSpec(0, 0, ids, logits_from=0)], want_aux=True)
    H = tiny_lm.arch.hidden_size
    aux = out.aux[0]
    assert aux.shape == (len(ids), 2 * H)
    torch.testing.assert_close(aux[:, :H], tiny_lm.model.embed_tokens.weight[ids])
    # The last aux is the final residual before the norm: normalising it gives the final hidden state.
    torch.testing.assert_close(tiny_lm.model.norm(aux[-1:, H:]), out.hidden[0][-1:], atol=1e-5, rtol=1e-5)


def test_gguf_cache_key_follows_content_not_path_or_mtime(tmp_path) -> None:
    import os

    from onspec.models.loader import gguf_fingerprint

    data = bytes(range(256)) * 20_000                      # 5 MB: header and tail windows apart
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    os.utime(b, (1, 1))
    assert gguf_fingerprint(a) == gguf_fingerprint(b)      # a reinstall elsewhere reuses the conversion
    changed = bytearray(data)
    changed[-10] ^= 1                                      # a different model (its last tensor differs)
    b.write_bytes(bytes(changed))
    assert gguf_fingerprint(a) != gguf_fingerprint(b)
