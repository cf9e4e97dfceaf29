"""Sampling controls: presence / frequency / repetition penalties, logit_bias and min_tokens.

* Semantics: engine/penalties.py's vectorised adjustment of a draft tree's rows equals a naive per-position
  reference applied to each node's own context (committed tokens + its path), float32 and bf16 logits.
* Lossless speculation: greedy and seeded outputs with speculation on (an oracle drafter with forced drafting,
  the suffix drafter with free verification) equal plain decoding under each control, float32 and bf16; the
  first three sampled tokens under penalties follow the penalised distribution (chi-square at a fixed seed),
  seeded and unseeded, and the same test fails when drafts are verified against unpenalised rows or against
  the root's penalties instead of their own path's (the test has power).
* Effect: each control changes what is generated (the default model's repeated answer included).
* Errors: a ValueError naming the field in the Python API; over HTTP a 400 naming it, on both routes, and
  the server goes on.
* The official ``openai`` client sends the new fields (extra_body for vLLM's ``repetition_penalty`` and
  ``min_tokens``) and gets what the offline engine generates.
"""

from __future__ import annotations

from dataclasses import replace

import httpx
import openai
import pytest
import torch

from onspec import LLM, SamplingParams
from onspec.config import SpecConfig
from onspec.engine import engine as engine_mod
from onspec.engine.penalties import LogitContext, adjust_logits
from onspec.models.loader import LoadedModel, load_model
from onspec.server.app import build_engine
from onspec.speculation.tree import DraftTree
from test_server_support import make_chat_model, running_server, tiny_config
from test_speculation import (FORCE, FREE, PROMPT, SMALL_V, OracleProposer, TableDrafter, engine_for,
                              exact_triples, generate, ids_of, oracle_spec, sampled_triples, small_vocab,
                              target_tables, token_prompts, triple_pvalues)

__all__ = ["small_vocab"]  # a fixture shared with test_speculation


# ---- the reference: one position at a time, straight from the definitions ---------------------------------


def reference_row(row: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int],
                  stops: list[int]) -> torch.Tensor:
    """The adjusted logits of the position after ``prompt + output``, token by token (float32)."""
    x = row.float().clone()
    for t, b in params.logit_bias.items():
        x[t] += b
    if len(output) < params.min_tokens:
        for t in stops:
            x[t] = float("-inf")
    r = params.repetition_penalty
    for t in set(prompt) | set(output):
        x[t] = x[t] / r if x[t] > 0 else x[t] * r
    for t in set(output):
        x[t] -= params.frequency_penalty * output.count(t) + params.presence_penalty * 1.0
    return x


ALL = dict(presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.5, logit_bias={4: 2.5, 9: -3.0},
           min_tokens=5)
UNIT_CASES = {"presence": dict(presence_penalty=-1.3), "frequency": dict(frequency_penalty=1.1),
              "repetition": dict(repetition_penalty=0.6), "logit_bias": dict(logit_bias={"3": 100.0, 7: -100.0}),
              "min_tokens": dict(min_tokens=6), "all": ALL}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", UNIT_CASES)
def test_each_tree_row_is_adjusted_for_its_own_path(case: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    vocab = 12
    # A branchy tree over a small vocabulary: repeated tokens within paths and across sibling branches.
    tree = DraftTree(tokens=[5, 3, 7, 3, 3, 9, 5, 3, 7], parents=[-1, 0, 0, 1, 2, 3, 3, 6, 4])
    logits = (3 * torch.randn(len(tree), vocab, generator=g)).to(dtype)
    prompt, output, stops = [1, 2, 3, 9], [5, 8, 3, 5], [2, 11]
    params = SamplingParams(temperature=0, **UNIT_CASES[case])
    got = adjust_logits(logits, params, LogitContext(prompt, output, stops, tree))
    assert got.dtype == torch.float32
    changed = 0
    for i in range(len(tree)):
        path = [tree.tokens[j] for j in tree.path(i)[1:]]  # the root is the last committed token
        want = reference_row(logits[i], params, prompt, output + path, stops)
        # (the reference rounds the penalties in float64, the engine in float32: equal up to the last bit)
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=1e-6, msg=f"{case}: row {i}")
        changed += int(not torch.equal(want, logits[i].float()))
    assert changed > 0
    # The input rows are untouched (the engine reads the model's own logprobs from them).
    assert torch.equal(logits, (3 * torch.randn(len(tree), vocab, generator=g.manual_seed(3))).to(dtype))
    # One row after the committed tokens (a prefill's last row) is the root's row of a tree.
    single = adjust_logits(logits[:1], params, LogitContext(prompt, output, stops))
    assert torch.equal(single[0], got[0])


def test_min_tokens_masks_only_the_positions_before_it() -> None:
    tree = DraftTree.chain(5, [6, 7, 8])  # rows at positions 3, 4, 5, 6 for 3 committed tokens
    params = SamplingParams(min_tokens=5)
    got = adjust_logits(torch.zeros(4, 10), params, LogitContext([1], [4, 4, 5], [2, 9], tree))
    masked = torch.isinf(got[:, [2, 9]]).all(-1).tolist()
    assert masked == [True, True, False, False]
    assert not torch.isinf(got[:, [0, 1, 3, 4, 5, 6, 7, 8]]).any()


# ---- lossless speculation: greedy and seeded equal plain decoding -----------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_model_dirs) -> LoadedModel:
    return load_model(str(tiny_model_dirs[request.param]), "float32")


# min_tokens: EOS (token 2 in the tiny models) is boosted so that greedy decoding would stop early without it.
CONTROLS = {
    "presence-frequency": dict(presence_penalty=1.2, frequency_penalty=0.8),
    "repetition": dict(repetition_penalty=1.6),
    "logit_bias": dict(logit_bias={48: 3.0, 131: -100.0, 7: 2.0, 59: 4.0}),
    "min_tokens": dict(min_tokens=12, logit_bias={2: 4.0}, ignore_eos=False, stop_token_ids=[77]),
    "all": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={2: 4.0, 59: 2.0},
                min_tokens=9, ignore_eos=False),
}
SAMPLING = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.9, top_p=0.95, seed=11)}


def controlled(sampling: str, control: str, max_tokens: int = 40) -> SamplingParams:
    kw = {"ignore_eos": True, **CONTROLS[control]}
    return SamplingParams(max_tokens=max_tokens, **SAMPLING[sampling], **kw)


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("control", CONTROLS)
def test_oracle_speculation_equals_plain(tiny, control: str, sampling: str) -> None:
    """Long accepted runs through branchy trees (wrong siblings first, a mutated main path every third
    step): every accepted node was judged with its own path's penalties, or the output would diverge."""
    params = controlled(sampling, control)
    prompts = token_prompts(tiny.arch.vocab_size)
    plain = ids_of(generate(engine_for(tiny), prompts, params))
    oracle = OracleProposer({tuple(p): o for p, o in zip(prompts, plain)}, tiny.arch.vocab_size)
    eng = engine_for(tiny, oracle_spec(), FORCE, {"learned": oracle})
    assert ids_of(generate(eng, prompts, params)) == plain
    assert eng.counters.accepted > len(prompts) * 10


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("control", CONTROLS)
def test_suffix_speculation_equals_plain(tiny_llama, control: str, sampling: str) -> None:
    lm = load_model(str(tiny_llama), "float32")
    prompts = [[5, 9, 14, 9, 5, 9, 14, 9, 5, 9, 14, 9], [17, 3, 3, 8, 120, 7, 7, 17, 3, 3, 8, 120], list(range(3, 40))]
    params = controlled(sampling, control, max_tokens=32)
    plain = ids_of(generate(engine_for(lm), prompts, params))
    eng = engine_for(lm, SpecConfig(mode="suffix", profile_at_start=False), FREE)
    # Penalised outputs avoid repeating their prompt; the second pass drafts from the first pass's outputs.
    assert ids_of(generate(eng, prompts, params)) == plain
    assert ids_of(generate(eng, prompts, params)) == plain
    assert eng.counters.accepted > 0


def test_bf16_speculation_equals_plain_alone(tiny_llama) -> None:
    """bf16 on this CPU's default path (batch-invariant kernels where it has them): suffix and batched
    equal plain decoding of each prompt alone, greedy and seeded, with every control at once."""
    from onspec.models.bf16_linear import path_for_dtype
    from test_exact_bf16 import bf16_engine, outputs

    if not path_for_dtype(torch.bfloat16).exact:
        pytest.skip("this CPU's default bf16 path is not bit-exact (it says so)")
    lm = load_model(str(tiny_llama), "bfloat16")
    prompts = [[5, 9, 14, 9, 5, 9, 14, 9, 5, 9], [17, 3, 3, 8, 120, 7, 7], list(range(3, 40))]
    for sampling in SAMPLING:
        params = controlled(sampling, "all", max_tokens=24)
        plain = outputs(bf16_engine(lm, "off", prefix_reuse=False), prompts, params, batched=False)
        eng = bf16_engine(lm, "suffix")
        for _ in range(2):  # the second pass drafts from the first one's outputs
            assert outputs(eng, prompts, params, batched=True) == plain
        assert eng.counters.accepted > 0


# ---- the sampling distribution under penalties --------------------------------------------------------------

# Strong controls on the 8-token model: every position's distribution depends on the tokens before it;
# token 6 is a stop token masked at positions 0 and 1 (min_tokens=2), allowed at position 2.
PENALISED = SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0, presence_penalty=1.5,
                           frequency_penalty=0.7, repetition_penalty=1.8, logit_bias={0: 1.0},
                           min_tokens=2, stop_token_ids=[6])
N_TRIALS = 6000


def penalised_tables(lm: LoadedModel, params: SamplingParams) -> dict[tuple[int, ...], torch.Tensor]:
    """The exact penalised distribution after PROMPT + ctx, from the per-position reference."""
    return target_tables(lm, params, lambda logits, ctx: reference_row(
        logits[0], params, PROMPT, list(ctx), params.stop_token_ids)[None])


@pytest.fixture(scope="module")
def tables(small_vocab) -> dict[tuple[int, ...], torch.Tensor]:
    return penalised_tables(small_vocab, PENALISED)


def test_penalties_change_the_small_model_distribution(small_vocab, tables) -> None:
    """Sanity of the setup: the penalised triples differ a lot from the unpenalised ones, token 6 never comes
    before position 2, and plain decoding samples the penalised tables."""
    plain = exact_triples(target_tables(small_vocab, replace(PENALISED, presence_penalty=0.0, frequency_penalty=0.0,
                                                             repetition_penalty=1.0, logit_bias={}, min_tokens=0)))
    exact = exact_triples(tables)
    assert float((plain - exact).abs().sum()) / 2 > 0.2
    assert float(exact[6].sum() + exact[:, 6].sum()) == 0.0 and float(exact[:, :, 6].sum()) > 0.01
    counts, _ = sampled_triples(small_vocab, PENALISED, None, N_TRIALS)
    assert min(triple_pvalues(counts, exact).values()) > 1e-3


# 6000 requests a case (10-20 s on a shared 2-core machine): three by default, the rest with `-m slow`.
@pytest.mark.parametrize("kind, seeded", [("good_chain", True), ("bad_points", True), ("iid_bad", False),
                                          pytest.param("good_chain", False, marks=pytest.mark.slow)])
def test_speculative_sampling_under_penalties_is_lossless(small_vocab, tables, kind: str, seeded: bool) -> None:
    counts, eng = sampled_triples(small_vocab, PENALISED, TableDrafter(kind, tables), N_TRIALS, seeded=seeded)
    assert eng.counters.drafted >= 2 * N_TRIALS
    if kind == "good_chain":
        assert eng.counters.accepted > N_TRIALS // 2
    pv = triple_pvalues(counts, exact_triples(tables))
    assert min(pv.values()) > 1e-3, pv


def verify_unpenalised(logits: torch.Tensor, params: SamplingParams, ctx: LogitContext) -> torch.Tensor:
    """Wrong: a drafted tree's rows are judged without the penalties (bias and min_tokens mask kept)."""
    if ctx.tree is not None and len(ctx.tree) > 1:
        params = replace(params, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
    return adjust_logits(logits, params, ctx)


def verify_with_root_penalties(logits: torch.Tensor, params: SamplingParams, ctx: LogitContext) -> torch.Tensor:
    """Wrong: every row gets the root's context (committed tokens only), ignoring the drafted path above it."""
    root = replace(ctx, tree=None)
    return torch.cat([adjust_logits(logits[i:i + 1], params, root) for i in range(logits.shape[0])])


WRONG = [pytest.param(verify_unpenalised, True, id="unpenalised-seeded", marks=pytest.mark.slow),
         pytest.param(verify_unpenalised, False, id="unpenalised-unseeded"),
         pytest.param(verify_with_root_penalties, True, id="root-seeded"),
         pytest.param(verify_with_root_penalties, False, id="root-unseeded", marks=pytest.mark.slow)]


@pytest.mark.parametrize("wrong, seeded", WRONG)
def test_wrong_penalties_fail_the_distribution_test(small_vocab, tables, monkeypatch, wrong, seeded: bool) -> None:
    """Power check: the same test with drafts judged against the wrong rows fails."""
    monkeypatch.setattr(engine_mod, "adjust_logits", wrong)
    counts, _ = sampled_triples(small_vocab, PENALISED, TableDrafter("good_chain", tables), 3000, seeded=seeded)
    assert min(triple_pvalues(counts, exact_triples(tables)).values()) < 1e-6


# ---- the controls change what is generated --------------------------------------------------------------


def test_controls_change_greedy_output(tiny_llama) -> None:
    lm = load_model(str(tiny_llama), "float32")
    eng = engine_for(lm)
    prompts = token_prompts(lm.arch.vocab_size)

    def run(**kw) -> list[list[int]]:
        kw.setdefault("ignore_eos", True)
        return ids_of(generate(eng, prompts, SamplingParams(temperature=0, max_tokens=48, **kw)))

    def repeats(outs: list[list[int]]) -> int:
        return sum(len(o) - len(set(o)) for o in outs)

    base = run()
    assert repeats(base) > 20  # the random model repeats itself
    for kw in (dict(presence_penalty=1.2), dict(frequency_penalty=1.0), dict(repetition_penalty=1.6)):
        outs = run(**kw)
        assert repeats(outs) < repeats(base) / 2, kw
    assert all(o == [77] * 48 for o in run(logit_bias={77: 100}))
    banned = {o[0]: -100.0 for o in base}
    assert all(o[0] not in banned for o in run(logit_bias=banned))
    # EOS made the favourite: one token without min_tokens, exactly min_tokens and then EOS with it.
    assert all(o == [2] for o in run(logit_bias={2: 100}, ignore_eos=False))
    with_min = generate(eng, prompts, SamplingParams(temperature=0, max_tokens=48, logit_bias={2: 100}, min_tokens=7))
    assert all(len(o.token_ids) == 8 and o.token_ids[-1] == 2 and 2 not in o.token_ids[:-1] for o in with_min)
    assert all(o.finish_reason == "stop" for o in with_min)


def test_min_tokens_defers_stop_strings(tiny_llama) -> None:
    lm = load_model(str(tiny_llama), "float32")
    eng = engine_for(lm)
    prompt = token_prompts(lm.arch.vocab_size)[0]
    base = generate(eng, [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    stop = lm.tokenizer.decode(base.token_ids[1:2])  # completes at output token 2
    assert stop.strip()
    early = generate(eng, [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    late = generate(eng, [prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                  min_tokens=20))[0]
    assert len(early.token_ids) <= 2 and early.finish_reason == "stop"
    assert len(late.token_ids) >= 20


def answer_items(text: str) -> list[str]:
    """The non-empty lines of a numbered answer, numbering ("1." or "1)") removed."""
    return [ln.strip().lstrip("0123456789").lstrip(".)").strip() for ln in text.splitlines() if ln.strip()]


def test_penalties_stop_the_default_model_repeating_its_answer(default_model_f32) -> None:
    """The issue's case: greedy, the default model answers the paperclip question with one line three times."""
    llm = LLM(engine=engine_for(default_model_f32, max_model_len=512))
    prompt = llm.apply_chat_template([{"role": "user", "content": "List three uses of a paperclip."}])
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=80))[0].outputs[0].text
    items = answer_items(base)
    assert len(items) == 3 and len(set(items)) == 1, base  # the repeated answer
    for kw in (dict(presence_penalty=1.0), dict(repetition_penalty=1.2)):
        text = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=80, **kw))[0].outputs[0].text
        items = answer_items(text)
        assert len(items) >= 2 and len(set(items)) == len(items), (kw, text)


# ---- errors in the Python API ------------------------------------------------------------------------------

BAD_PARAMS = [
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(logit_bias={"abc": 1.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"1.5": 1.0}), "logit_bias"), (dict(logit_bias={5: 100.5}), "logit_bias"),
    (dict(logit_bias={5: "x"}), "logit_bias"), (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=1.5), "min_tokens"),
    (dict(min_tokens=9, max_tokens=8), "min_tokens"),
]


@pytest.mark.parametrize("kw, field", BAD_PARAMS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_PARAMS)])
def test_bad_controls_are_value_errors_naming_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kw)


def test_logit_bias_outside_the_vocabulary_is_refused_and_nothing_is_added(tiny_llama) -> None:
    lm = load_model(str(tiny_llama), "float32")
    llm = LLM(engine=engine_for(lm))
    with pytest.raises(ValueError, match="^logit_bias: token id 512 is outside the vocabulary"):
        llm.generate([[5, 6, 7]], SamplingParams(logit_bias={3: 1.0, 512: 1.0}))
    with pytest.raises(ValueError, match="^logit_bias:"):
        llm.engine.add_siblings(["a", "b"], [5, 6, 7], [SamplingParams(), SamplingParams(logit_bias={10**6: 1.0})])
    assert not llm.engine.requests and not llm.engine.has_unfinished()
    assert len(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids) == 3


def test_no_control_is_the_zero_cost_path(monkeypatch, tiny_llama) -> None:
    """A request that sets none of the controls never reaches the adjustment."""
    def boom(*a, **k):
        raise AssertionError("adjust_logits called without a control set")

    monkeypatch.setattr(engine_mod, "adjust_logits", boom)
    lm = load_model(str(tiny_llama), "float32")
    eng = engine_for(lm, SpecConfig(mode="suffix", profile_at_start=False), FREE)
    for sampling in SAMPLING.values():
        generate(eng, token_prompts(lm.arch.vocab_size)[:2], SamplingParams(max_tokens=8, **sampling))
    assert not SamplingParams(presence_penalty=0.0, repetition_penalty=1.0, logit_bias={}).adjusts_logits
    assert SamplingParams(logit_bias={1: 0.0}).adjusts_logits and SamplingParams(min_tokens=1).adjusts_logits


# ---- the server -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server on a tiny chat model with suffix speculation drafting whatever it can (free verification)."""
    model = make_chat_model(tmp_path_factory.mktemp("controls") / "tiny-chat")
    cfg = tiny_config(model, speculation="suffix")
    engine = build_engine(cfg)
    engine.spec.controller.cost = FREE
    with running_server(cfg, engine=engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def engine_of(srv):
    return srv.app.state.onspec.engine


def test_server_chat_with_controls_equals_the_offline_engine(served, client) -> None:
    messages = [{"role": "user", "content": "Say something, then say it again."}]
    # Twice: the second request drafts from the first one's output (suffix) and must not change a token.
    first, r = (client.chat.completions.create(
        model="default", messages=messages, max_tokens=24, temperature=0, presence_penalty=0.8,
        frequency_penalty=0.6, logit_bias={"2": -100, "28": 5},
        extra_body={"repetition_penalty": 1.4, "min_tokens": 10, "ignore_eos": True}) for _ in range(2))
    params = SamplingParams(temperature=0, max_tokens=24, presence_penalty=0.8, frequency_penalty=0.6,
                            logit_bias={2: -100.0, 28: 5.0}, repetition_penalty=1.4, min_tokens=10, ignore_eos=True)
    lm = engine_of(served).loaded
    offline = LLM(engine=engine_for(lm))
    text = offline.apply_chat_template(messages)
    want = offline.generate([text], params)[0].outputs[0]
    assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids) == 24
    assert first.choices[0].message.content == want.text
    unpenalised = offline.generate([text], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert unpenalised.outputs[0].token_ids != want.token_ids
    assert engine_of(served).counters.accepted > 0


def test_server_completion_logit_bias_and_min_tokens(served, client) -> None:
    tok = engine_of(served).tokenizer
    tid = tok("hello", add_special_tokens=False)["input_ids"][0]
    r = client.completions.create(model="default", prompt="one two three", max_tokens=6, temperature=0.7, seed=5,
                                  logit_bias={str(tid): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([tid] * 6)
    eos = sorted(engine_of(served).eos_ids)[0]
    stream = client.completions.create(model="default", prompt="one two three", max_tokens=20, temperature=0,
                                       logit_bias={str(eos): 100}, stream=True, stream_options={"include_usage": True},
                                       extra_body={"min_tokens": 5})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    quick = client.completions.create(model="default", prompt="one two three", max_tokens=20, temperature=0,
                                      logit_bias={str(eos): 100})
    assert quick.usage.completion_tokens == 1


SERVER_ERRORS = [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"presence_penalty": "high"}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"), ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "x"}}, "logit_bias"), ({"logit_bias": [5]}, "logit_bias"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 2.5}, "min_tokens"), ({"min_tokens": 9}, "min_tokens"),
]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_server_bad_controls_are_400_naming_the_field(served, client, route: str) -> None:
    for patch, field in SERVER_ERRORS:
        body = {"model": "default", "max_tokens": 8, **patch}
        body.update({"prompt": "hello"} if route == "completions" else
                    {"messages": [{"role": "user", "content": "hello"}]})
        r = httpx.post(f"{served.url}/v1/{route}", json=body, timeout=30)
        assert r.status_code == 400, (patch, r.text)
        err = r.json()["error"]
        assert err["param"] == field and field in err["message"] and err["type"] == "invalid_request_error", patch
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                       logit_bias={"99999999": 3})
    assert e.value.body["param"] == "logit_bias" and "vocabulary" in e.value.body["message"]
    # Nothing is lost: the server goes on serving, and no request is left behind.
    ok = client.completions.create(model="default", prompt="hello", max_tokens=4, presence_penalty=1.0,
                                   extra_body={"ignore_eos": True})
    assert ok.usage.completion_tokens == 4
    st = served.app.state.onspec
    assert st.bridge.outstanding == 0 and not engine_of(served).requests


# ---- the CLI ------------------------------------------------------------------------------------------------

CLI_ERRORS = [(["--presence-penalty", "3"], "presence_penalty"), (["--repetition-penalty", "0"], "repetition_penalty"),
              (["--logit-bias", "5"], "logit_bias"), (["--logit-bias", "x=1"], "logit_bias"),
              (["--logit-bias", "5=300"], "logit_bias"), (["--min-tokens", "-2"], "min_tokens")]


@pytest.mark.parametrize("args, field", CLI_ERRORS)
def test_cli_bad_controls_are_one_line_exit_2(capsys, args: list[str], field: str) -> None:
    from onspec import cli

    assert cli.main(["generate", "hi", *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"onspec generate: error: {field}:"), lines


def test_cli_passes_the_controls() -> None:
    from onspec import cli, commands

    args = cli.build_parser().parse_args([
        "generate", "hi", "--presence-penalty", "0.5", "--frequency-penalty", "-0.25", "--repetition-penalty", "1.2",
        "--logit-bias", "5=-100", "--logit-bias", "7=2.5", "--min-tokens", "3"])
    p = commands._params(args)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logit_bias, p.min_tokens) == (
        0.5, -0.25, 1.2, {5: -100.0, 7: 2.5}, 3)
