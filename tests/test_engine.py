"""The engine without speculation: exact greedy decoding, batching, KV cache management, sampling
controls, stop conditions and clear errors for bad input.

Exactness tests run in float32 (tiny random models for the mechanics, the real default model against
transformers' ``generate``). Torch runs on one thread here: these models are small, and on a shared
2-core machine a second OpenMP thread can make every step 100x slower through spin-waiting.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from onspec import LLM, SamplingParams
from onspec.config import ConfigError, EngineConfig, SpecConfig
from onspec.engine.engine import Engine, PromptTooLongError
from onspec.engine.kv_cache import KVCache
from onspec.models.loader import DTYPES, ModelLoadError, load_model

CHAT = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the square of a number.",
    "List three colors.",
]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama), "float32")


def make_llm(loaded, **kw) -> LLM:
    kw.setdefault("max_model_len", 256)
    cfg = EngineConfig(model=str(loaded.path), dtype="float32", num_threads=1, **kw)
    return LLM(engine=Engine(cfg, loaded=loaded))


def token_prompts(vocab: int, lengths=(5, 17, 33, 9, 2, 24, 12, 40)) -> list[list[int]]:
    return [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lengths]


def chat_texts(loaded, msgs=CHAT) -> list[str]:
    return [loaded.tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                                 add_generation_prompt=True) for m in msgs]


GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def outputs(llm: LLM, prompts, params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def one_by_one(llm: LLM, prompts, params: SamplingParams) -> list[list[int]]:
    return [outputs(llm, [p], params)[0] for p in prompts]


# ---- exact greedy ----------------------------------------------------------------------------------


def test_greedy_matches_transformers_generate(default_model_f32) -> None:
    from transformers import AutoModelForCausalLM

    lm = default_model_f32
    hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    llm = make_llm(lm)
    n_new = 32
    for text in chat_texts(lm):
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False,
                              eos_token_id=list(lm.eos_token_ids), pad_token_id=lm.eos_token_ids[0])[0, len(ids):]
        ref = ref.tolist()
        ours = outputs(llm, [text], SamplingParams(temperature=0, max_tokens=n_new))[0]
        # transformers pads after EOS; ours stops at it (EOS included in both).
        if any(t in lm.eos_token_ids for t in ref):
            ref = ref[:next(i for i, t in enumerate(ref) if t in lm.eos_token_ids) + 1]
        assert ours == ref, text


def test_batched_equals_one_at_a_time_real_model(default_model_f32) -> None:
    llm = make_llm(default_model_f32)
    texts = chat_texts(default_model_f32, CHAT + ["Hi"])
    params = SamplingParams(temperature=0, max_tokens=24)
    assert outputs(llm, texts, params) == one_by_one(llm, texts, params)


@pytest.mark.parametrize("budget", [512, 16])
def test_batched_equals_one_at_a_time_tiny(tiny, budget: int) -> None:
    """A small token budget forces chunked prefill next to decoding rows in the same forward."""
    llm = make_llm(tiny, max_num_batched_tokens=budget)
    prompts = token_prompts(tiny.arch.vocab_size)
    batched = outputs(llm, prompts, GREEDY)
    assert batched == one_by_one(make_llm(tiny), prompts, GREEDY)
    assert all(len(b) == GREEDY.max_tokens for b in batched)


def test_priorities_do_not_change_greedy_outputs(tiny) -> None:
    llm = make_llm(tiny, max_num_seqs=2)
    prompts = token_prompts(tiny.arch.vocab_size)[:5]
    ref = one_by_one(llm, prompts, GREEDY)
    outs = llm.generate(prompts, GREEDY, priorities=[3, 0, 2, 1, 0])
    assert [o.outputs[0].token_ids for o in outs] == ref


# ---- KV cache: preemption, abort -----------------------------------------------------------------


def test_preemption_keeps_outputs(tiny) -> None:
    max_len = 64
    reserve = SpecConfig().max_draft_tokens + 1  # the engine adds it to every slot
    per_token = KVCache.bytes_per_token(tiny.arch, DTYPES["float32"])
    # Room for about 2.5 sequences of the full context, while 8 requests want 8 x 60 tokens.
    llm = make_llm(tiny, max_model_len=max_len, max_num_seqs=8,
                   kv_cache_memory=float(int(2.5 * (max_len + reserve)) * per_token))
    prompts = token_prompts(tiny.arch.vocab_size, lengths=(20, 14, 9, 25, 3, 17, 11, 6))
    params = SamplingParams(temperature=0, max_tokens=36, ignore_eos=True)
    got = outputs(llm, prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    ref = one_by_one(make_llm(tiny, max_model_len=max_len), prompts, params)
    assert got == ref
    assert llm.engine.kv.num_free == llm.engine.kv.num_slots  # every slot came back


def test_unseeded_sampling_follows_the_engine_seed_not_the_global_rng(tiny) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    prompts = token_prompts(tiny.arch.vocab_size)[:3]
    runs = []
    for seed, global_seed in ((3, 0), (3, 99), (4, 0)):
        torch.manual_seed(global_seed)
        runs.append(outputs(make_llm(tiny, seed=seed), prompts, params))
    assert runs[0] == runs[1]   # the same engine seed: the same text, whatever torch's global RNG holds
    assert runs[0] != runs[2]   # another engine seed: other draws


def test_kv_budget_smaller_than_one_sequence_is_rejected(tiny) -> None:
    with pytest.raises(ValueError, match="kv_cache_memory"):
        make_llm(tiny, max_model_len=64, kv_cache_memory=1000.0)


def test_abort_frees_the_slot(tiny) -> None:
    llm = make_llm(tiny, max_num_seqs=4)
    eng = llm.engine
    prompts = token_prompts(tiny.arch.vocab_size)[:3]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    for _ in range(5):
        eng.step()
    assert eng.kv.num_free == 1
    assert eng.abort("r1")
    assert eng.kv.num_free == 2
    assert "r1" not in eng.requests
    assert not eng.abort("r1")  # unknown now
    while eng.has_unfinished():
        eng.step()
    ref = one_by_one(make_llm(tiny), [prompts[0], prompts[2]], params)
    assert [eng.requests["r0"][0].output_ids, eng.requests["r2"][0].output_ids] == ref
    assert eng.kv.num_free == 4
    # A request aborted while still waiting never takes a slot.
    eng.add_request("w", prompts[0], params)
    assert eng.abort("w") and eng.kv.num_free == 4 and not eng.has_unfinished()


def test_release_request_forgets_bookkeeping(tiny) -> None:
    llm = make_llm(tiny)
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
    assert not llm.engine.requests and not llm.engine.seqs


# ---- bad input -> clear errors ------------------------------------------------------------------


def test_bad_request_inputs(tiny) -> None:
    eng = make_llm(tiny, max_model_len=32).engine
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("a", "", SamplingParams())
    with pytest.raises(ValueError, match="prompt"):
        eng.add_request("a", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("a", [1, tiny.arch.vocab_size], SamplingParams())
    for bad in ({"input_ids": [5, 6]}, [5, "6"], [5.0, 6.0], [[5, 6]], [True, 5]):  # e.g. a tokenizer's encoding
        with pytest.raises(ValueError, match="prompt: must be a string or a list of token ids"):
            eng.add_request("a", bad, SamplingParams())
    with pytest.raises(PromptTooLongError, match="context length"):
        eng.add_request("a", [5] * 40, SamplingParams())
    eng.add_request("dup", [5, 6], SamplingParams())
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("dup", [5, 6], SamplingParams())


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"), ({"stop": [""]}, "stop"), ({"logprobs": 50}, "logprobs"),
])
def test_bad_sampling_params(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"dtype": "int4"}, "dtype"), ({"max_model_len": 4}, "max_model_len"), ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"kv_cache_memory": -1.0}, "kv_cache_memory"),
])
def test_bad_engine_config(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        EngineConfig(**kwargs)


def test_unknown_model() -> None:
    with pytest.raises(ModelLoadError, match="unknown model"):
        load_model("definitely-not-a-model")
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("/nonexistent/model.gguf")


def test_corrupt_safetensors(tiny_llama, tmp_path) -> None:
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file" * 10)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(str(bad), "float32")


def test_missing_weights_and_config(tiny_llama, tmp_path) -> None:
    d = tmp_path / "noweights"
    shutil.copytree(tiny_llama, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(d), "float32")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(d), "float32")


def test_unsupported_architecture(tiny_llama, tmp_path) -> None:
    d = tmp_path / "gpt2"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        load_model(str(d), "float32")


def test_unsupported_rope_scaling(tiny_llama, tmp_path) -> None:
    d = tmp_path / "yarn"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="rope"):
        load_model(str(d), "float32")


# ---- sampling -------------------------------------------------------------------------------------


def sample_outputs(llm: LLM, prompts, **kw):
    kw.setdefault("max_tokens", 24)
    return llm.generate(prompts, SamplingParams(ignore_eos=True, **kw))


def test_same_seed_same_output(tiny) -> None:
    llm = make_llm(tiny)
    prompts = token_prompts(tiny.arch.vocab_size)[:3]
    a = [o.outputs[0].token_ids for o in sample_outputs(llm, prompts, temperature=1.0, seed=7)]
    # Alone or in another batch, a seeded request draws the same tokens (its own generator).
    b = [o.outputs[0].token_ids for o in sample_outputs(make_llm(tiny), prompts[::-1], temperature=1.0, seed=7)]
    assert a == b[::-1]
    c = [o.outputs[0].token_ids for o in sample_outputs(llm, prompts, temperature=1.0, seed=8)]
    assert a != c
    # n > 1 samples of one seeded request differ from each other but repeat across runs.
    n1 = [c.token_ids for c in sample_outputs(llm, prompts[:1], temperature=1.0, seed=3, n=4)[0].outputs]
    n2 = [c.token_ids for c in sample_outputs(llm, prompts[:1], temperature=1.0, seed=3, n=4)[0].outputs]
    assert n1 == n2 and len({tuple(x) for x in n1}) == 4


def test_top_k_one_and_tiny_temperature_are_greedy(tiny) -> None:
    llm = make_llm(tiny)
    prompts = token_prompts(tiny.arch.vocab_size)[:2]
    greedy = [o.outputs[0].token_ids for o in sample_outputs(llm, prompts, temperature=0)]
    assert [o.outputs[0].token_ids for o in sample_outputs(llm, prompts, temperature=1.0, top_k=1, seed=1)] == greedy
    assert [o.outputs[0].token_ids for o in sample_outputs(llm, prompts, temperature=1e-4, seed=1)] == greedy


def _ranks_and_probs(completion) -> list[tuple[int, list[float], float]]:
    """Per token: (rank of the chosen token among the returned alternatives, their probs, chosen prob)."""
    out = []
    for tok, (lp, alts) in zip(completion.token_ids, completion.logprobs):
        ids = [a for a, _ in alts]
        probs = [math.exp(b) for _, b in alts]
        out.append((ids.index(tok) if tok in ids else len(ids), probs, math.exp(lp)))
    return out


def test_top_k_respected(tiny) -> None:
    llm = make_llm(tiny)
    outs = sample_outputs(llm, token_prompts(tiny.arch.vocab_size), temperature=1.5, top_k=3, logprobs=5, seed=2,
                          max_tokens=30)
    ranks = [r for o in outs for r, _, _ in _ranks_and_probs(o.outputs[0])]
    assert max(ranks) <= 2
    assert len(set(ranks)) == 3  # all three allowed ranks occur (temperature 1.5 flattens)


def test_top_p_respected(tiny) -> None:
    llm = make_llm(tiny)
    top_p = 0.3
    outs = sample_outputs(llm, token_prompts(tiny.arch.vocab_size), temperature=1.0, top_p=top_p, logprobs=20,
                          seed=3, max_tokens=30)
    seen_rank = 0
    for o in outs:
        for rank, probs, _ in _ranks_and_probs(o.outputs[0]):
            # The chosen token is inside the smallest prefix reaching top_p: the mass strictly above it is
            # < top_p (rank 20 = beyond the returned alternatives: then all 20 of them hold < top_p).
            assert sum(probs[:rank]) < top_p + 1e-5
            seen_rank = max(seen_rank, rank)
    assert seen_rank >= 1  # not degenerate greedy


def test_min_p_respected(tiny) -> None:
    llm = make_llm(tiny)
    min_p = 0.2
    outs = sample_outputs(llm, token_prompts(tiny.arch.vocab_size), temperature=1.0, min_p=min_p, logprobs=3,
                          seed=4, max_tokens=30)
    ranks = []
    for o in outs:
        for rank, probs, chosen in _ranks_and_probs(o.outputs[0]):
            assert chosen >= min_p * probs[0] - 1e-6
            ranks.append(rank)
    assert max(ranks) >= 1


# ---- stop conditions and logprobs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_llm(default_model_f32):
    return make_llm(default_model_f32)


@pytest.fixture(scope="module")
def reference(real_llm, default_model_f32):
    """Greedy reference answer (40 tokens, EOS ignored) for one chat prompt."""
    text = chat_texts(default_model_f32, ["Describe the ocean in a few sentences."])[0]
    out = real_llm.generate([text], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 40
    return text, out


def test_max_tokens_cut(real_llm, reference) -> None:
    text, ref = reference
    out = real_llm.generate([text], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ref.token_ids[:7] and out.finish_reason == "length"
    assert ref.text.startswith(out.text)


def test_stop_string_cut(real_llm, reference) -> None:
    text, ref = reference
    words = ref.text.split()
    stop = next(w for w in words[4:] if len(w) >= 4 and ref.text.find(w) > 10)
    out = real_llm.generate([text], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                   stop=["@@never@@", stop]))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:ref.text.find(stop)]
    assert stop not in out.text
    # Token ids stop at the token that completed the stop string.
    assert out.token_ids == ref.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) < 40


def test_stop_token_ids_cut(real_llm, reference) -> None:
    text, ref = reference
    tok = ref.token_ids[12]
    first = ref.token_ids.index(tok)
    out = real_llm.generate([text], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True,
                                                   stop_token_ids=[tok]))[0].outputs[0]
    assert out.token_ids == ref.token_ids[:first + 1] and out.finish_reason == "stop"


def test_eos_stops_unless_ignored(real_llm, default_model_f32) -> None:
    text = chat_texts(default_model_f32, ["Say hi."])[0]
    out = real_llm.generate([text], SamplingParams(temperature=0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in default_model_f32.eos_token_ids
    assert len(out.token_ids) < 64


def test_context_length_cut(default_model_f32) -> None:
    llm = make_llm(default_model_f32, max_model_len=48)
    text = chat_texts(default_model_f32, ["Describe the ocean in a few sentences."])[0]
    n_prompt = len(default_model_f32.tokenizer(text, add_special_tokens=False)["input_ids"])
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and n_prompt + len(out.token_ids) == 48


def test_logprobs_returned(real_llm, reference) -> None:
    text, ref = reference
    out = real_llm.generate([text], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                   logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == 10
    for tok, (lp, alts) in zip(out.token_ids, out.logprobs):
        assert len(alts) == 3
        assert alts[0][0] == tok and lp == pytest.approx(alts[0][1])  # greedy: chosen = most likely
        assert lp <= 0 and alts[0][1] >= alts[1][1] >= alts[2][1]
        assert sum(math.exp(b) for _, b in alts) <= 1 + 1e-5
    plain = real_llm.generate([text], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0]
    assert plain.logprobs is None


def test_stream_matches_generate(real_llm, reference) -> None:
    text, ref = reference
    deltas = list(real_llm.stream(text, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)))
    assert "".join(d.new_text for d in deltas) == ref.text
    assert [t for d in deltas for t in d.new_token_ids] == ref.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "length"


# ---- streaming never shows the start of a stop string that is later cut ---------------------------


def _two_token_stop(tok, ref) -> tuple[int, str, str]:
    """(k, head, stop): ``stop`` is the text of output tokens k and k + 1 (both non-empty), ``head`` the text
    before it, and the stop string first occurs right there."""
    ids = ref.token_ids
    for k in range(4, len(ids) - 6):
        head = tok.decode(ids[:k], skip_special_tokens=True)
        one = tok.decode(ids[:k + 1], skip_special_tokens=True)
        two = tok.decode(ids[:k + 2], skip_special_tokens=True)
        if not (two.startswith(one) and one.startswith(head) and "\ufffd" not in two):
            continue
        stop = two[len(head):]
        if len(head) < len(one) < len(two) and len(stop) >= 3 and ref.text.find(stop) == len(head):
            return k, head, stop
    raise AssertionError("no two-token stop string in the reference output")


def test_stream_holds_back_a_multi_token_stop_string(real_llm, reference, default_model_f32) -> None:
    text, ref = reference
    k, head, stop = _two_token_stop(default_model_f32.tokenizer, ref)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=["@@never@@", stop])
    final = real_llm.generate([text], params)[0].outputs[0]
    assert final.finish_reason == "stop" and final.text == head and len(final.token_ids) == k + 2
    deltas = list(real_llm.stream(text, params))
    streamed = ""
    for d in deltas:
        streamed += d.new_text
        assert final.text.startswith(streamed), (streamed, final.text)  # never text the final text omits
    assert streamed == final.text
    assert [t for d in deltas for t in d.new_token_ids] == final.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == "stop"


def test_stream_releases_a_held_back_prefix_that_never_completes(real_llm, reference, default_model_f32) -> None:
    """The output contains the first two tokens' text of the stop string but never the whole: the held-back
    text is sent later (once it can no longer start the stop string, or at the end), nothing is lost."""
    text, ref = reference
    k, head, stop = _two_token_stop(default_model_f32.tokenizer, ref)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop + "\x00@@"])
    deltas = list(real_llm.stream(text, params))
    streamed, n_tokens, held_after_stop = "", 0, None
    for d in deltas:
        streamed += d.new_text
        n_tokens += len(d.new_token_ids)
        assert ref.text.startswith(streamed)
        if n_tokens == k + 2:  # the whole of ``stop`` was generated: all of it is held back
            held_after_stop = streamed
    assert held_after_stop == head
    assert streamed == ref.text and deltas[-1].finish_reason == "length"


# ---- n > 1: the siblings prefill the prompt once ----------------------------------------------------


def _siblings_alone(llm: LLM, prompt, params: SamplingParams) -> list[list[int]]:
    """Each sample of an n-sample request as its own n = 1 request (seed + i, as the engine seeds them)."""
    seed = params.seed
    return [outputs(llm, [prompt], replace(params, n=1, seed=None if seed is None else seed + i))[0]
            for i in range(params.n)]


@pytest.mark.parametrize("budget", [512, 16])
def test_n_samples_prefill_the_prompt_once_greedy(tiny, budget: int) -> None:
    """A 16-token budget chunks the first sample's prefill; the others wait for it, then copy its rows."""
    prompts = token_prompts(tiny.arch.vocab_size, lengths=(5, 33, 1, 12))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, n=4)
    llm = make_llm(tiny, max_num_batched_tokens=budget)
    outs = llm.generate(prompts, params)
    ref = one_by_one(make_llm(tiny), prompts, replace(params, n=1))
    for o, r in zip(outs, ref):
        assert [c.token_ids for c in o.outputs] == [r] * 4
    c = llm.engine.counters
    assert c.shared_prompt_tokens == sum(3 * (len(p) - 1) for p in prompts)
    if budget == 512:  # prompt prefilled once + the last prompt token of each other sample
        assert c.prompt_tokens == sum(len(p) + 3 if len(p) > 1 else 4 for p in prompts)
    assert llm.engine.kv.num_free == llm.engine.kv.num_slots


def test_n_samples_prefill_once_real_model(default_model_f32) -> None:
    llm = make_llm(default_model_f32, prefix_reuse=False)  # counts copies alone (reuse: its own tests)
    text = chat_texts(default_model_f32, ["List three colors."])[0]
    n_prompt = len(llm.engine.encode(text))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=3)
    out = llm.generate([text], params)[0]
    ref = outputs(llm, [text], replace(params, n=1))[0]
    assert [c.token_ids for c in out.outputs] == [ref] * 3
    c = llm.engine.counters
    assert c.prompt_tokens == 2 * n_prompt + 2 and c.shared_prompt_tokens == 2 * (n_prompt - 1)


def test_n_samples_sampled_equal_separate_seeded_requests(tiny) -> None:
    prompts = token_prompts(tiny.arch.vocab_size, lengths=(9, 24))
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=5, n=4, max_tokens=20, ignore_eos=True)
    llm = make_llm(tiny)
    outs = llm.generate(prompts, params)
    assert llm.engine.counters.prompt_tokens == sum(len(p) + 3 for p in prompts)
    alone = make_llm(tiny)
    for o, p in zip(outs, prompts):
        got = [c.token_ids for c in o.outputs]
        assert got == _siblings_alone(alone, p, params)
        assert len({tuple(g) for g in got}) == 4  # independent draws, first token included in the lottery


def test_n_samples_with_preemption(tiny) -> None:
    max_len = 64
    reserve = 17
    per_token = KVCache.bytes_per_token(tiny.arch, DTYPES["float32"])
    llm = make_llm(tiny, max_model_len=max_len, max_num_seqs=8,
                   kv_cache_memory=float(int(2.5 * (max_len + reserve)) * per_token))
    prompts = token_prompts(tiny.arch.vocab_size, lengths=(20, 14, 25))
    params = SamplingParams(temperature=0.8, seed=11, n=3, max_tokens=36, ignore_eos=True)
    outs = llm.generate(prompts, params)
    eng = llm.engine
    assert eng.scheduler.num_preemptions > 0 and eng.counters.shared_prompt_tokens > 0
    alone = make_llm(tiny, max_model_len=max_len)
    for o, p in zip(outs, prompts):
        assert [c.token_ids for c in o.outputs] == _siblings_alone(alone, p, params)
    assert eng.kv.num_free == eng.kv.num_slots


def test_n_samples_priorities_and_abort(tiny) -> None:
    llm = make_llm(tiny, max_num_seqs=4, max_num_batched_tokens=16)
    eng = llm.engine
    prompts = token_prompts(tiny.arch.vocab_size, lengths=(30, 7, 11))
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    eng.add_request("late", prompts[1], params, priority=5)
    eng.add_request("group", prompts[0], replace(params, n=3), priority=0)
    group = eng.requests["group"]
    eng.step()  # the first sample prefills a 16-token chunk; its siblings wait without a slot
    assert group[0].slot >= 0 and all(s.slot < 0 for s in group[1:])
    eng.step()  # the rest of the prompt; the budget left over goes to "late", behind the waiting siblings
    assert all(s.slot < 0 for s in group[1:]) and eng.requests["late"][0].slot >= 0
    while not all(s.finished for s in group):
        eng.step()
    ref = one_by_one(make_llm(tiny), prompts[:2], params)
    assert [s.output_ids for s in group] == [ref[0]] * 3
    # Abort while the siblings still wait for the first sample's prefill: nothing leaks.
    eng.add_request("gone", prompts[2], replace(params, n=4))
    eng.step()
    assert eng.abort("gone")
    while eng.has_unfinished():
        eng.step()
    assert eng.requests["late"][0].output_ids == ref[1]
    assert eng.kv.num_free == eng.kv.num_slots and not eng.scheduler.waiting


def test_n_samples_with_suffix_speculation(tiny) -> None:
    from onspec.config import SpecConfig
    from onspec.speculation.controller import attach_speculation

    prompts = token_prompts(tiny.arch.vocab_size, lengths=(17, 40))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=4)
    spec = SpecConfig(mode="suffix", profile_at_start=False)
    cfg = EngineConfig(model=str(tiny.path), dtype="float32", num_threads=1, max_model_len=256,
                       max_num_batched_tokens=16, spec=spec)
    eng = Engine(cfg, loaded=tiny)
    attach_speculation(eng, spec)
    outs = LLM(engine=eng).generate(prompts, params)
    ref = one_by_one(make_llm(tiny), prompts, replace(params, n=1))
    for o, r in zip(outs, ref):
        assert [c.token_ids for c in o.outputs] == [r] * 4
    assert eng.counters.shared_prompt_tokens == sum(3 * (len(p) - 1) for p in prompts)


def test_n_samples_share_the_learned_drafters_prompt_aux(tiny) -> None:
    """Samples that copy the prompt's cache rows get the first sample's aux rows for them, so the learned
    drafter can draft for every sample (it needs the aux of every processed token)."""
    from onspec.config import SpecConfig
    from onspec.speculation.eagle import EagleConfig, attach_learned, init_drafter

    prompt = token_prompts(tiny.arch.vocab_size, lengths=(21,))[0]
    spec = SpecConfig(mode="learned", max_draft_tokens=4, profile_at_start=False)
    cfg = EngineConfig(model=str(tiny.path), dtype="float32", num_threads=1, max_model_len=256,
                       max_num_batched_tokens=16, spec=spec)
    eng = Engine(cfg, loaded=tiny)
    s = attach_learned(eng, spec, init_drafter(tiny, EagleConfig.for_target(tiny.arch, draft_vocab_size=200)))
    learned = s.proposers["learned"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=3)
    seqs = eng.add_request("r", prompt, params)
    while any(len(sq.tokens) == len(prompt) for sq in seqs):
        eng.step()
    lead = learned.states[seqs[0].seq_id]
    for sq in seqs[1:]:
        st = learned.states[sq.seq_id]
        assert st.n_aux == len(prompt)
        torch.testing.assert_close(st.aux[:len(prompt)], lead.aux[:len(prompt)], rtol=1e-4, atol=1e-4)
    while eng.has_unfinished():
        eng.step()
    ref = outputs(make_llm(tiny), [prompt], replace(params, n=1))[0]
    assert [sq.output_ids for sq in seqs] == [ref] * 3
    assert all(sq.stats.by_strategy.get("learned", [0])[0] > 0 for sq in seqs)
    assert eng.counters.shared_prompt_tokens == 2 * (len(prompt) - 1) and learned.shared_prompts_kept == 0


# ---- add_siblings: separate requests (RL responses) that prefill one prompt once --------------------------


def _run_all(eng: Engine) -> None:
    while eng.has_unfinished():
        eng.step()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_add_siblings_equals_separate_requests(tiny, temperature: float) -> None:
    """Per-sample seeds and priorities; the tokens are those of each request added on its own."""
    prompt = token_prompts(tiny.arch.vocab_size, lengths=(27,))[0]
    seeds = [None, None, None] if temperature == 0 else [101, 7, 55]
    params = [SamplingParams(temperature=temperature, seed=s, max_tokens=14 + i, ignore_eos=True)
              for i, s in enumerate(seeds)]
    eng = make_llm(tiny, max_num_batched_tokens=16).engine  # the first sample's prefill takes two chunks
    seqs = eng.add_siblings(["a", "b", "c"], prompt, params, priorities=[0, 1, 2], group="g")
    eng.step()
    assert seqs[0].slot >= 0 and all(s.slot < 0 for s in seqs[1:])  # the others wait for its rows
    _run_all(eng)
    assert eng.counters.shared_prompt_tokens == 2 * (len(prompt) - 1)
    assert eng.counters.prompt_tokens == len(prompt) + 2
    alone = make_llm(tiny)
    ref = [outputs(alone, [prompt], p)[0] for p in params]
    assert [s.output_ids for s in seqs] == ref
    if temperature:
        assert len({tuple(r) for r in ref}) == 3
    for rid in "abc":
        eng.release_request(rid)
    assert not eng.requests and not eng.seqs
    assert eng.kv.num_free == eng.kv.num_slots


def test_add_siblings_join_a_running_sibling(tiny) -> None:
    """A request joining later copies the rows from a sibling that is decoding (the first one finished)."""
    prompt = token_prompts(tiny.arch.vocab_size, lengths=(19,))[0]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=m, ignore_eos=True)
              for s, m in ((1, 3), (2, 30), (3, 12))]
    eng = make_llm(tiny, prefix_reuse=False).engine   # the freed slot of "a" would give "c" its rows
    first = eng.add_siblings(["a", "b"], prompt, params[:2])
    while not first[0].finished:
        eng.step()
    eng.release_request("a")
    late = eng.add_siblings(["c"], prompt, params[2:], join=first[1])[0]
    eng.step()
    assert late.cache_len == len(prompt) and late.num_output == 1  # copied P - 1 rows, prefilled one token
    _run_all(eng)
    assert eng.counters.shared_prompt_tokens == 2 * (len(prompt) - 1)
    alone = make_llm(tiny)
    assert [first[1].output_ids, late.output_ids] == [outputs(alone, [prompt], p)[0] for p in params[1:]]
    with pytest.raises(ValueError, match="join"):
        eng.add_siblings(["d"], prompt[:-1], params[:1], join=first[1])
    with pytest.raises(ValueError, match="already in use"):
        eng.add_siblings(["e", "e"], prompt, params[:2])
    with pytest.raises(ValueError, match="n = 1"):
        eng.add_siblings(["f"], prompt, [replace(params[0], n=2)])


def test_add_siblings_abort_the_prefilling_sibling(tiny) -> None:
    """Aborting the sample that prefills for the others: the next one prefills and the rest share its rows."""
    prompt = token_prompts(tiny.arch.vocab_size, lengths=(30,))[0]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eng = make_llm(tiny, max_num_batched_tokens=16).engine
    seqs = eng.add_siblings(["a", "b", "c", "d"], prompt, [params] * 4)
    eng.step()
    assert eng.abort("a")
    eng.step()
    assert seqs[1].slot >= 0 and seqs[2].slot < 0 and seqs[3].slot < 0
    _run_all(eng)
    ref = outputs(make_llm(tiny), [prompt], params)[0]
    assert [s.output_ids for s in seqs[1:]] == [ref] * 3
    assert eng.counters.shared_prompt_tokens == 2 * (len(prompt) - 1)
    assert eng.kv.num_free == eng.kv.num_slots and not eng.scheduler.waiting


def test_prefill_seconds_count_only_steps_with_prompt_rows(tiny) -> None:
    """``prefill_seconds`` (what the benches subtract to report the decoding phase alone) grows on steps
    with prompt rows and stays put on decoding-only steps."""
    llm = make_llm(tiny, max_num_batched_tokens=16)        # a 40-token prompt takes 3 chunked prefill steps
    eng = llm.engine
    eng.add_request("r", token_prompts(tiny.arch.vocab_size, lengths=(40,))[0],
                    SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    seen = []
    while eng.has_unfinished():
        before = eng.counters.prefill_seconds
        eng.step()
        seen.append(eng.counters.prefill_seconds > before)
    assert seen == [True, True, True] + [False] * 5        # 3 prefill steps (the last yields token 1), 5 decodes
    assert 0 < eng.counters.prefill_seconds < eng.counters.forward_seconds


# ---- prefix reuse: a prompt starts from the rows a freed slot still holds -----------------------------


def test_prefix_reuse_starts_from_a_freed_slots_rows_and_changes_no_token(tiny) -> None:
    vocab = tiny.arch.vocab_size
    sys_a, sys_b, sys_c = token_prompts(vocab, lengths=(30, 26, 21))
    tails = token_prompts(vocab, lengths=(5, 9, 3, 7, 4, 6))
    # two system prompts on two slots; a third one that matches nothing; then A's and B's again
    prompts = [sys_a + tails[0], sys_b + tails[1], sys_a + tails[2], sys_b + tails[3], sys_c + tails[4],
               sys_b + tails[5], sys_a[:12] + [7, 8, 9]]
    llm = make_llm(tiny, max_num_seqs=2)
    got, reused = [], []
    for p in prompts:
        before = llm.engine.counters.reused_prefix_tokens
        got.append(outputs(llm, [p], GREEDY)[0])
        reused.append(llm.engine.counters.reused_prefix_tokens - before)
    # sys_c matches nothing and takes the slot released longest ago (A's), so B's rows survive it
    assert reused == [0, 0, 30, 26, 0, 26, 0]
    assert got == [outputs(make_llm(tiny, prefix_reuse=False), [p], GREEDY)[0] for p in prompts]
    c = llm.engine.counters
    assert c.prompt_tokens == sum(map(len, prompts)) - sum(reused)
    # the same prompt again reuses all but its last token, which must run to give the first logits
    again = outputs(llm, [prompts[-1]], GREEDY)[0]
    assert again == got[-1] and c.reused_prefix_tokens - sum(reused) == len(prompts[-1]) - 1
    assert llm.engine.kv.num_free == llm.engine.kv.num_slots


def test_prefix_reuse_forgets_rows_computed_with_other_weights(tiny) -> None:
    """RL copies the trained policy into the engine in place: rows from before are not the policy's any more."""
    prompt = token_prompts(tiny.arch.vocab_size, lengths=(40,))[0]
    llm = make_llm(tiny)
    first = outputs(llm, [prompt], GREEDY)[0]
    with torch.no_grad():
        llm.engine.loaded.model.norm.weight.mul_(1.0)   # an in-place write (same values): a weight sync
    assert outputs(llm, [prompt], GREEDY)[0] == first
    assert llm.engine.counters.reused_prefix_tokens == 0
    outputs(llm, [prompt], GREEDY)                      # unchanged since: reused
    assert llm.engine.counters.reused_prefix_tokens == len(prompt) - 1


def test_prefix_reuse_never_retains_rows_computed_across_a_weight_change(tiny) -> None:
    """A sequence running when the weights change holds rows of both: its slot is not retained."""
    a, b = token_prompts(tiny.arch.vocab_size, lengths=(24, 18))
    llm = make_llm(tiny, max_num_seqs=2)
    eng = llm.engine
    outputs(llm, [a], GREEDY)                               # a's rows retained in slot 0
    eng.add_request("b", b, GREEDY)                         # b runs on the other slot
    eng.step()
    with torch.no_grad():
        eng.loaded.model.norm.weight.mul_(1.0)             # the weights change while b runs
    eng.add_request("c", a, GREEDY)                         # a waiting sequence: the change is noticed
    while eng.has_unfinished():
        eng.step()
    assert eng.counters.reused_prefix_tokens == 0          # c recomputed a's prompt
    outputs(llm, [b], GREEDY)                               # b's slot held rows of both weights: not reused
    assert eng.counters.reused_prefix_tokens == 0
    outputs(llm, [a], GREEDY)                               # c's rows are all new: reused
    assert eng.counters.reused_prefix_tokens == len(a) - 1


def test_prefix_reuse_is_off_where_a_drafter_reads_aux_states_it_cannot_recall(tiny) -> None:
    """A drafter that reads every processed position's aux hidden states must get them for reused rows too."""
    from conftest import StubProposer
    from onspec.speculation.controller import attach_speculation

    class AuxReader(StubProposer):   # reads aux states, keeps none for rows it did not see computed
        wants_aux = True

    llm = make_llm(tiny)
    eng = llm.engine
    outputs(llm, [[5, 6, 7]], GREEDY)
    assert eng.scheduler.reuse_prefixes
    attach_speculation(eng, SpecConfig(mode="auto", profile_at_start=False), {"learned": AuxReader()})
    outputs(llm, [[5, 6, 7]], GREEDY)
    assert not eng.scheduler.reuse_prefixes and eng.counters.reused_prefix_tokens == 0
    attach_speculation(eng, SpecConfig(mode="auto", profile_at_start=False))   # model-free drafters only
    outputs(llm, [[5, 6, 7]], GREEDY)
    assert eng.scheduler.reuse_prefixes
    llm = make_llm(tiny, prefix_reuse=False)
    outputs(llm, [[5, 6, 7]], GREEDY)
    assert not llm.engine.scheduler.reuse_prefixes


def test_prefix_reuse_gives_the_learned_drafter_the_reused_rows_aux_states(tiny) -> None:
    """A prompt that starts from a freed slot's rows gets their aux rows from the learned proposer, which kept
    them with the slot (including the finishing step's rows: a conversation's next turn reuses the whole
    previous sequence), so it drafts for that prompt; tokens and aux rows equal a run that prefills all."""
    from onspec.config import SpecConfig
    from onspec.speculation.eagle import EagleConfig, attach_learned, init_drafter

    vocab = tiny.arch.vocab_size
    system = token_prompts(vocab, lengths=(30,))[0]
    tails = token_prompts(vocab, lengths=(5, 9, 3))
    drafter = init_drafter(tiny, EagleConfig.for_target(tiny.arch, draft_vocab_size=200))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = {}
    for reuse in (True, False):
        spec = SpecConfig(mode="learned", max_draft_tokens=4, profile_at_start=False)
        eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32", num_threads=1, max_model_len=256,
                                  max_num_seqs=2, spec=spec, prefix_reuse=reuse), loaded=tiny)
        s = attach_learned(eng, spec, drafter)
        learned = s.proposers["learned"]
        s.controller.worth_drafting = lambda *args, **kwargs: True   # a random head's drafts are not worth it
        got, aux, reused, drafted = [], [], [], []
        for i in range(4):
            # the first chat, the same chat's next turn, then two others sharing the system prompt
            prompt = system + tails[0] if i == 0 else (got[0][0] + got[0][1] + tails[1] if i == 1 else
                                                        system + tails[i - 1])
            before = eng.counters.reused_prefix_tokens
            seq = eng.add_request(str(i), prompt, params)[0]
            while len(seq.tokens) == len(prompt):
                eng.step()
            aux.append(learned.states[seq.seq_id].aux[:len(prompt)].clone())
            while eng.has_unfinished():
                eng.step()
            got.append((prompt, seq.output_ids))
            reused.append(eng.counters.reused_prefix_tokens - before)
            drafted.append(seq.stats.by_strategy.get("learned", [0])[0])
        runs[reuse] = got, aux, reused, drafted
    (got, aux, reused, drafted), (ref, ref_aux, none, _) = runs[True], runs[False]
    assert got == ref and none == [0, 0, 0, 0]
    first = len(system) + len(tails[0])
    assert reused == [0, first + params.max_tokens - 1, len(system), len(system)]
    for a, b in zip(aux, ref_aux):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # rows of other batch shapes
    assert all(d > 0 for d in drafted)
