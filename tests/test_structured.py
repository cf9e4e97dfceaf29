"""Structured outputs in the engine: grammars (JSON schema, JSON object, regex, EBNF, choice) with speculation.

* The tree walk: ``GrammarState.constrain`` keeps exactly the nodes whose path the grammar allows, gives
  each its own path's mask, and restricts the q of i.i.d. children to the tokens the grammar allows there
  (without that the distribution test below fails: p < 1e-4).
* Lossless: greedy and seeded outputs with speculation (suffix drafting, an oracle drafter whose wrong
  branches the grammar prunes, jump-forward drafting) equal plain constrained decoding, float32 and the
  default bf16 path; the first three sampled tokens under a grammar follow the constrained distribution
  (chi-square at a fixed seed), and the same test fails when drafts are judged against unmasked rows.
* Outputs obey the grammar: regex outputs match it; the default model's answers for a set of schemas parse
  and validate (jsonschema).
* Jump-forward drafting proposes exactly the forced tokens and they are accepted.
* Bad grammars are ValueErrors naming the field, before anything is added.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import jsonschema
import pytest
import torch

from onspec import SamplingParams
from onspec.config import SpecConfig
from onspec.engine import engine as engine_mod
from onspec.engine.grammar import GrammarCompiler, GrammarError, GrammarSpec
from onspec.models.loader import LoadedModel, load_model
from onspec.speculation.grammar_drafter import GRAMMAR, GrammarProposer, with_forced_tokens
from onspec.speculation.tree import DraftTree
from test_speculation import (FORCE, FREE, PROMPT, SMALL_V, OracleProposer, TableDrafter, engine_for, generate,
                              ids_of, small_vocab, target_tables)

__all__ = ["small_vocab"]  # a fixture shared with test_speculation

DIGITS = GrammarSpec("regex", r"[a-f]{2,6}( [0-9]{1,3}){2,4}\.", "guided_regex")
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs) -> LoadedModel:
    return load_model(str(tiny_model_dirs["llama"]), "float32")


def prompts_of(vocab: int) -> list[list[int]]:
    return [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 9)]


# ---- the tree walk ------------------------------------------------------------------------------------

ABC = ["a", "b", "c", "d", "e", "f", "g", "</s>"]  # the 8-token model's vocabulary, for grammars over it
# Each first token allows a different set next, so every position's mask depends on the path before it.
PATHS = GrammarSpec("ebnf", 'root ::= "a" [a-c] [d-g] | "b" [d-g] [a-c] | "c" [a-g] "a" | [d-g] [a-g] [a-g]',
                    "guided_grammar")


def small_compiler() -> GrammarCompiler:
    return GrammarCompiler.for_vocabulary(ABC, stop_ids=[7])


def allowed_after(compiler: GrammarCompiler, spec: GrammarSpec, tokens: list[int]) -> set[int] | None:
    """The reference: a fresh matcher stepped token by token; None if the path leaves the grammar."""
    st = compiler.state(spec)
    if not st.accept(tokens):
        return None
    m = int(st.next_mask()[0, 0])
    return {t for t in range(len(ABC)) if (m >> t) & 1}


def test_constrain_keeps_the_allowed_paths_with_their_own_masks() -> None:
    comp = small_compiler()
    # root -> a (-> b (-> d, a), g), b (-> d), h(forbidden, -> a)
    tree = DraftTree([0, 0, 1, 3, 0, 6, 1, 3, 7, 0], [-1, 0, 1, 2, 2, 1, 0, 6, 0, 8],
                     child_dists={0: torch.full((8,), 0.125)})
    st = comp.state(PATHS)
    st.accept([2])  # committed "c": next any of a-g, then "a"
    out = st.constrain(tree)
    kept_paths = []
    for i in range(len(out.tree)):
        path = [out.tree.tokens[j] for j in out.tree.path(i)[1:]]
        kept_paths.append(path)
        want = allowed_after(comp, PATHS, [2] + path)
        got = {t for t in range(8) if (int(out.mask[i, 0]) >> t) & 1}
        assert got == want, (path, got, want)
    every = [[out_t for out_t in (tree.tokens[j] for j in tree.path(i)[1:])] for i in range(len(tree))]
    expected = [p for p in every if allowed_after(comp, PATHS, [2] + p) is not None]
    assert sorted(map(tuple, kept_paths)) == sorted(map(tuple, expected))
    assert len(out.tree) < len(tree)
    # the root's i.i.d. children: q restricted to what the grammar allows after "c" (a-g), renormalised
    assert torch.allclose(out.tree.child_dists[0], torch.tensor([1 / 7] * 7 + [0.0]))
    # the matcher is where it was: the committed output
    assert st.accept([0, 0]) and st.matcher.is_completed()


def test_a_tree_the_grammar_allows_whole_is_kept_as_is() -> None:
    st = small_compiler().state(PATHS)
    tree = DraftTree([5, 0, 1], [-1, 0, 0])
    out = st.constrain(tree)
    assert out.tree is tree and out.mask.shape == (3, 1)


# ---- greedy and seeded: speculation equals plain constrained decoding -----------------------------------

SAMPLING = {"greedy": dict(temperature=0.0), "seeded": dict(temperature=0.9, top_p=0.95, seed=5)}
GRAMMARS = {"regex": DIGITS, "json_schema": GrammarSpec.json_schema(PERSON), "json_object": GrammarSpec.json_schema(None)}


def constrained(sampling: str, grammar: str, max_tokens: int = 40) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, grammar=GRAMMARS[grammar], **SAMPLING[sampling])


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("grammar", GRAMMARS)
def test_speculation_equals_plain_under_a_grammar(tiny, grammar: str, sampling: str) -> None:
    """An oracle drafter (the plain constrained output hidden among wrong branches, which the grammar mostly
    prunes), suffix drafting and jump-forward drafting all reproduce plain constrained decoding."""
    params = constrained(sampling, grammar)
    prompts = prompts_of(tiny.arch.vocab_size)
    plain = ids_of(generate(engine_for(tiny), prompts, params))
    oracle = OracleProposer({tuple(p): o for p, o in zip(prompts, plain)}, tiny.arch.vocab_size)
    eng = engine_for(tiny, SpecConfig(mode="learned", profile_at_start=False, max_batch_draft_tokens=1024,
                                      max_draft_tokens=24), FORCE, {"learned": oracle})
    assert ids_of(generate(eng, prompts, params)) == plain
    assert eng.counters.accepted >= sum(map(len, plain)) // 3  # most tokens came from accepted drafts
    eng = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False), FREE)
    for _ in range(2):  # the second pass drafts from the first one's outputs
        assert ids_of(generate(eng, prompts, params)) == plain
    assert eng.counters.accepted > 0


def test_regex_outputs_match_and_forced_tokens_are_drafted_and_accepted(tiny) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=60, grammar=DIGITS)
    prompts = prompts_of(tiny.arch.vocab_size)
    plain = generate(engine_for(tiny), prompts, params)
    for out in plain:
        assert re.fullmatch(DIGITS.source, out.text) or (out.finish_reason == "length"
                                                        and re.fullmatch(r"[a-f]{2,6}( [0-9]{1,3})*( [0-9]*)?\.?",
                                                                         out.text)), out.text
    assert any(out.finish_reason == "stop" for out in plain)
    choice = SamplingParams(temperature=0.0, max_tokens=30, grammar=GrammarSpec.choice(
        ["the quick brown fox jumps", "a", "zebra"]))
    plain = ids_of(generate(engine_for(tiny), prompts, choice))
    eng = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False), FREE)
    outs = generate(eng, prompts, choice)
    assert ids_of(outs) == plain
    assert all(o.text in ("the quick brown fox jumps", "a", "zebra") and o.finish_reason == "stop" for o in outs)
    grammar_steps = eng.counters.by_strategy.get(GRAMMAR)
    assert grammar_steps is not None and grammar_steps[1] > grammar_steps[0]  # forced runs were accepted


def test_bf16_speculation_equals_plain_under_a_grammar(tiny_llama) -> None:
    from onspec.models.bf16_linear import path_for_dtype
    from test_exact_bf16 import bf16_engine, outputs

    if not path_for_dtype(torch.bfloat16).exact:
        pytest.skip("this CPU's default bf16 path is not bit-exact (it says so)")
    lm = load_model(str(tiny_llama), "bfloat16")
    prompts = prompts_of(lm.arch.vocab_size)
    for sampling, grammar in [("greedy", "json_schema"), ("seeded", "json_schema"), ("greedy", "regex"),
                              ("seeded", "regex")]:
        params = constrained(sampling, grammar, max_tokens=24)
        plain = outputs(bf16_engine(lm, "off", prefix_reuse=False), prompts, params, batched=False)
        eng = bf16_engine(lm, "suffix")
        for _ in range(2):
            assert outputs(eng, prompts, params, batched=True) == plain


# ---- the sampling distribution under a grammar ------------------------------------------------------------

N_TRIALS = 4000
SAMPLED = SamplingParams(max_tokens=3, temperature=1.0, grammar=PATHS, ignore_eos=True)


def masked_tables(lm: LoadedModel) -> dict[tuple[int, ...], torch.Tensor]:
    """The exact constrained distribution after PROMPT + ctx: the model's, renormalised over the tokens the
    grammar allows after ctx (zero where ctx already left the grammar)."""
    comp = small_compiler()

    def mask(logits: torch.Tensor, ctx: tuple[int, ...]) -> torch.Tensor:
        allowed = allowed_after(comp, PATHS, list(ctx)) or set()
        keep = torch.tensor([t in allowed for t in range(SMALL_V)])
        return logits.masked_fill(~keep, float("-inf")) if allowed else logits
    return target_tables(lm, replace(SAMPLED, grammar=None), mask)


def constrained_triples(lm: LoadedModel, drafter, seeded: bool, n_trials: int = N_TRIALS) -> tuple[torch.Tensor, int]:
    """Counts [V, V, V] of the first three tokens of n_trials requests, and how many outputs ended early."""
    spec = SpecConfig(mode="learned", profile_at_start=False, off_batch_size=10_000, max_batch_draft_tokens=100_000,
                      max_draft_tokens=16, grammar_drafts=False)
    eng = engine_for(lm, spec, FORCE, {"learned": drafter}, grammars=small_compiler(), max_model_len=32,
                     max_num_seqs=200, max_num_batched_tokens=2048)
    counts = torch.zeros(SMALL_V ** 3, dtype=torch.float64)
    short = 0
    for start in range(0, n_trials, 200):
        rids = []
        for i in range(start, min(n_trials, start + 200)):
            eng.add_request(f"t{i}", PROMPT, replace(SAMPLED, seed=10_000 + i if seeded else None))
            rids.append(f"t{i}")
        while eng.has_unfinished():
            eng.step()
        for rid in rids:
            out = eng.requests[rid][0].output_ids
            if len(out) == 3:
                counts[(out[0] * SMALL_V + out[1]) * SMALL_V + out[2]] += 1
            else:
                short += 1
            eng.release_request(rid)
    assert eng.counters.drafted > n_trials // 2  # nodes left after the grammar pruned the rest
    return counts.view(SMALL_V, SMALL_V, SMALL_V), short


def exact(tables) -> torch.Tensor:
    out = torch.zeros(SMALL_V, SMALL_V, SMALL_V, dtype=torch.float64)
    for a in range(SMALL_V):
        for b in range(SMALL_V):
            out[a, b] = tables[()][a] * tables[(a,)][b] * tables[(a, b)]
    return out


def pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from helpers import chisq_pvalue

    return min(chisq_pvalue(counts.sum((1, 2)), probs.sum((1, 2))), chisq_pvalue(counts, probs))


@pytest.fixture(scope="module")
def grammar_tables(small_vocab):
    return masked_tables(small_vocab)


# drafters built from the *unmasked* tables: their drafts often leave the grammar and are pruned
@pytest.mark.parametrize("kind, seeded", [("good_chain", False), ("iid_bad", False), ("bad_points", True)])
def test_speculative_sampling_under_a_grammar_is_lossless(small_vocab, grammar_tables, kind: str, seeded: bool):
    plain_tables = target_tables(small_vocab, replace(SAMPLED, grammar=None))
    counts, short = constrained_triples(small_vocab, TableDrafter(kind, plain_tables), seeded)
    assert short == 0
    assert pvalue(counts, exact(grammar_tables)) > 1e-3


def test_drafts_judged_against_unmasked_rows_fail_the_distribution_test(small_vocab, grammar_tables, monkeypatch):
    """Power check: drafted rows verified without their grammar mask (the root's row keeps it) give another
    distribution, and the same test catches it."""
    real = engine_mod.apply_mask

    def root_only(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = logits.to(torch.float32, copy=True)
        out[:1] = real(logits[:1], mask[:1])
        return out
    monkeypatch.setattr(engine_mod, "apply_mask", root_only)
    counts, short = constrained_triples(small_vocab, TableDrafter("good_chain", grammar_tables), False, 2000)
    assert short > 0 or pvalue(counts, exact(grammar_tables)) < 1e-6


# ---- real model: every answer parses and validates ---------------------------------------------------------

SCHEMAS = [
    PERSON,
    {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                      "population": {"type": "integer", "minimum": 0}},
     "required": ["city", "country", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                      "confidence": {"type": "number"}},
     "required": ["sentiment", "confidence"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}},
        "required": ["name", "qty"], "additionalProperties": False}, "minItems": 1, "maxItems": 3}},
     "required": ["items"], "additionalProperties": False},
]
TEXTS = ["Alice is 31, lives in Paris and likes chess and tennis.",
         "Lyon is a city in France with about 520000 people.",
         "I loved this film, the best I have seen in years!",
         "Buy 2 apples and 3 pears."]


def test_default_model_answers_validate_and_speculation_changes_nothing() -> None:
    """The default model in its default dtype: each schema's answer finishes, parses and validates, and
    suffix + grammar drafting (every draft verified: costs injected) gives the same tokens, batched."""
    from onspec import LLM
    from test_exact_bf16 import bf16_engine

    lm = load_model("default", dtype="bfloat16")
    plain, spec = LLM(engine=bf16_engine(lm, "off")), LLM(engine=bf16_engine(lm, "suffix"))
    convs = [[{"role": "user", "content": f"Extract as JSON: {text}"}] for text in TEXTS]
    outs = []
    for schema, conv in zip(SCHEMAS, convs):
        params = SamplingParams(temperature=0.0, max_tokens=80, grammar=GrammarSpec.json_schema(schema))
        out = plain.chat([conv], params)[0].outputs[0]
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
        outs.append(out.token_ids)
    params = [SamplingParams(temperature=0.0, max_tokens=80, grammar=GrammarSpec.json_schema(s)) for s in SCHEMAS]
    llm_spec = spec
    for conv, p, want in zip(convs, params, outs):
        assert llm_spec.chat([conv], p)[0].outputs[0].token_ids == want
    assert spec.engine.counters.accepted > 0


# ---- jump-forward drafting ------------------------------------------------------------------------------


def test_forced_tokens_are_proposed_and_merged_into_the_chosen_tree(tiny) -> None:
    eng = engine_for(tiny)
    eng.add_request("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20,
                                                   grammar=GrammarSpec.json_schema(PERSON)))
    seq = eng.requests["r"][0]
    forced = seq.grammar.forced_tokens()
    assert forced and eng.tokenizer.decode(forced).startswith('{"')
    trees = GrammarProposer().propose([seq], {seq.seq_id: 16})
    assert trees[seq.seq_id].tokens[1:] == forced and trees[seq.seq_id].source == GRAMMAR
    other = DraftTree.chain(seq.tokens[-1], [9, 9], source="suffix")
    merged = with_forced_tokens({seq.seq_id: other}, {seq.seq_id: [trees[seq.seq_id], other]}, 16)[seq.seq_id]
    assert merged.source == GRAMMAR and merged.num_draft == len(forced) + 2
    assert with_forced_tokens({}, {seq.seq_id: [trees[seq.seq_id]]}, 16)[seq.seq_id] is trees[seq.seq_id]
    assert GrammarProposer().propose([replace(seq, grammar=None)], {seq.seq_id: 16}) == {}


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, field", [
    (GrammarSpec("regex", "(unclosed", "guided_regex"), "guided_regex"),
    (GrammarSpec("ebnf", "root ::= ", "guided_grammar"), "guided_grammar"),
    (GrammarSpec("json", '{"type": "object", "properties": {"a": {"type": "nonsense"}}}', "response_format"),
     "response_format"),
])
def test_bad_grammars_are_value_errors_naming_the_field_and_nothing_is_added(tiny, spec, field) -> None:
    eng = engine_for(tiny)
    with pytest.raises(GrammarError) as e:
        eng.add_request("bad", [5, 6], SamplingParams(max_tokens=4, grammar=spec))
    assert e.value.field == field and str(e.value).startswith(field + ":")
    assert not eng.has_unfinished() and "bad" not in eng.requests
    eng.add_request("good", [5, 6], SamplingParams(max_tokens=4, temperature=0.0, grammar=DIGITS))
    while eng.has_unfinished():
        eng.step()
    assert eng.requests["good"][0].num_output == 4


def test_unknown_grammar_kind_is_refused() -> None:
    with pytest.raises(GrammarError, match="unknown grammar kind"):
        GrammarSpec("yaml", "x")  # type: ignore[arg-type]


# ---- the CLI ---------------------------------------------------------------------------------------------


def test_cli_structured_output_flags(tiny_llama, capsys, tmp_path) -> None:
    from onspec import cli

    base = ["generate", "Q:", "--raw", "--model", str(tiny_llama), "--dtype", "float32", "--max-tokens", "30"]
    assert cli.main([*base, "--regex", "[ab]{3}-[0-9]{2}"]) == 0
    assert re.fullmatch(r"[ab]{3}-[0-9]{2}", capsys.readouterr().out.strip())
    assert cli.main([*base, "--choice", "yes", "--choice", "no"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                  "additionalProperties": False}))
    assert cli.main([*base, "--json-schema", f"@{schema}"]) == 0
    assert json.loads(capsys.readouterr().out) in ({"ok": True}, {"ok": False})


@pytest.mark.parametrize("args, field", [
    (["--regex", "(unclosed"], "regex"),
    (["--json-schema", "{not json"], "json_schema"),
    (["--json-schema", '{"type": "objekt"}'], "json_schema"),
    (["--json-schema", "@/nonexistent/schema.json"], "json_schema"),
    (["--grammar", "root ::= "], "grammar"),
])
def test_cli_bad_grammars_are_one_line_exit_2(tiny_llama, capsys, args: list[str], field: str) -> None:
    from onspec import cli

    assert cli.main(["generate", "Q:", "--raw", "--model", str(tiny_llama), "--dtype", "float32", *args]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "compute path" not in ln]
    assert len(lines) == 1 and lines[0].startswith(f"onspec generate: error: {field}:"), lines


def test_samples_of_one_request_each_follow_the_grammar_with_their_own_matcher(tiny) -> None:
    """n > 1: the samples share the prompt's prefill but each has its own matcher; seeded, speculation changes
    no sample, and every finished one matches the regex."""
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=60, grammar=DIGITS)
    prompts = prompts_of(tiny.arch.vocab_size)[:2]
    from onspec import LLM

    plain = LLM(engine=engine_for(tiny)).generate(prompts, params)
    spec = LLM(engine=engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False), FREE)).generate(prompts, params)
    for a, b in zip(plain, spec):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert len({tuple(o.token_ids) for o in a.outputs}) > 1  # the samples differ
        for o in a.outputs:
            assert o.finish_reason == "length" or re.fullmatch(DIGITS.source, o.text), o.text
