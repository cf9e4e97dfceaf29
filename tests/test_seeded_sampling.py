"""Seeded sampling is reproducible whatever the speculation, and still exactly distributed.

A seeded request samples output position t as argmax p_t / E_t with E_t ~ Exp(1) keyed by (seed, t) only
(engine/sampler.py, speculation/verify.py). Checks:

* Reproducibility: one seed gives the same tokens with speculation "off", "suffix", "auto" and an oracle
  drafter with long accepted runs (trees, partial acceptance), alone or in a batch with other requests,
  with chunked prefill and preemption; the samples of an n > 1 request equal single requests with seeds
  seed, seed+1, ...; the same on the real default model.
* Different seeds (and positions) get different noise.
* Distribution: on an 8-token vocabulary the first two tokens of many seeds, verified from trees holding a
  fixed bad and a fixed good token, follow the target's exact distribution (chi-square at fixed seeds), and
  two deliberately lossy variants fail the same test; through the engine the seeded speculative output is
  request-for-request the plain seeded output; unseeded requests (rejection sampling) stay lossless.
* top-k / top-p: zero-probability tokens are never emitted.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import lossy_verify_tree
from onspec import LLM
from onspec.config import SpecConfig
from onspec.engine import sampler as sampler_mod
from onspec.engine.kv_cache import KVCache
from onspec.engine.sampler import SamplingParams, position_seed, race_noise, race_sample, seeded_sample
from onspec.models.loader import DTYPES, LoadedModel, load_model
from onspec.speculation.tree import DraftTree
from onspec.speculation.verify import verify_tree
from test_speculation import (FORCE, FREE, PROMPT, REPEAT_TEXT, SMALL_V, OracleProposer, TableDrafter,
                              chisq_pvalue, engine_for, exact_triples, generate, ids_of, oracle_spec,
                              sampled_triples, target_tables, triple_pvalues)
from test_speculation import small_vocab  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def tiny(tiny_llama) -> LoadedModel:
    return load_model(str(tiny_llama), "float32")


def repetitive_prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(k)] * r for k, r in ((7, 6), (13, 4), (5, 9))]


SEEDED = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, max_tokens=48, ignore_eos=True)


# ---- the noise --------------------------------------------------------------------------------------


def test_position_keys_are_distinct() -> None:
    # Injective in t for a fixed seed; seed S at t+1 is not seed S+1 at t (as seed + t would make it).
    for seed in (0, 1, 12345, 2**40 + 3, -7):
        assert len({position_seed(seed, t) for t in range(20_000)}) == 20_000
    assert all(position_seed(s, t + 1) != position_seed(s + 1, t) for s in range(500) for t in range(20))
    assert all(0 <= position_seed(s, t) < 2**32 for s in (-1, 0, 2**70) for t in (0, 5))
    a, b, c = race_noise(5, 0, 1000), race_noise(5, 1, 1000), race_noise(6, 0, 1000)
    assert torch.equal(a, race_noise(5, 0, 1000))
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a > 0).all()) and abs(float(race_noise(9, 3, 100_000).mean()) - 1.0) < 0.02


def test_race_sample_never_picks_a_zero_probability_token() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5])
    # A zero-probability token with tiny noise would win a plain argmax of p / E; an all-inf noise makes
    # every positive score 0, tied with the zero-probability tokens.
    assert race_sample(probs, torch.tensor([1e-30, 1.0, 1e-30, 2.0])) == 1
    assert race_sample(probs, torch.full((4,), math.inf)) in (1, 3)
    assert race_sample(probs, torch.tensor([0.0, 1.0, 0.0, 1.0])) in (1, 3)  # 0 / 0 is nan: masked too
    p = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(0)), -1)
    p[p < p.median()] = 0.0
    assert all(float(p[seeded_sample(p, s, t)]) > 0 for s in range(200) for t in range(3))


# ---- reproducibility through the engine ----------------------------------------------------------------


def test_same_seed_same_output_whatever_the_speculation(tiny) -> None:
    prompts = repetitive_prompts(tiny.arch.vocab_size)
    plain = ids_of(generate(engine_for(tiny), prompts, SEEDED))
    suffix = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False), FREE)
    assert ids_of(generate(suffix, prompts, SEEDED)) == plain
    assert suffix.counters.drafted > 0  # the suffix drafter proposed (the repetitive prompts)
    auto = engine_for(tiny, SpecConfig(mode="auto", profile_at_start=True))
    assert ids_of(generate(auto, prompts, SEEDED)) == plain
    # Long accepted runs through trees, with wrong siblings and wrong main-path tokens (partial acceptance):
    # the oracle drafts the plain seeded output and checks the engine against it at every step.
    refs = {tuple(p): o for p, o in zip(prompts, plain)}
    oracle = OracleProposer(refs, tiny.arch.vocab_size, depth=10)
    eng = engine_for(tiny, oracle_spec(), FORCE, {"learned": oracle})
    outs = generate(eng, prompts, SEEDED)
    assert ids_of(outs) == plain
    accepted = [a for _, a in oracle.verified]
    assert max(accepted) >= 8 and min(accepted) < max(accepted)
    assert sum(o.accepted for o in outs) > 0.5 * sum(len(o.token_ids) for o in outs)


def test_same_seed_alone_or_in_any_batch(tiny) -> None:
    """Alone, or batched with other seeded, unseeded and greedy requests under chunked prefill and a KV
    budget that forces preemption (recompute): the same tokens."""
    vocab = tiny.arch.vocab_size
    prompts = repetitive_prompts(vocab)
    target = prompts[1]
    alone = ids_of(generate(engine_for(tiny), [target], SEEDED))[0]

    spec = SpecConfig(mode="suffix", profile_at_start=False)
    max_len = 128  # room for the longest prompt (52 tokens) and 48 more
    per_token = KVCache.bytes_per_token(tiny.arch, DTYPES["float32"])
    eng = engine_for(tiny, spec, FREE, max_model_len=max_len, max_num_batched_tokens=24,
                     kv_cache_memory=float(int(2.5 * (max_len + spec.max_draft_tokens + 1)) * per_token))
    others = [(prompts[0], SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)),
              (prompts[2], SamplingParams(temperature=0.5, seed=1, max_tokens=40, ignore_eos=True)),
              (target[::-1], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))]
    for i, (p, params) in enumerate(others):
        eng.add_request(f"other{i}", p, params)
    eng.add_request("target", target, SEEDED)
    while eng.has_unfinished():
        eng.step()
    assert eng.requests["target"][0].output_ids == alone
    assert eng.scheduler.num_preemptions > 0

    # n > 1: sample i is the request with seed + i, whatever the speculation (group drafting here).
    params = SamplingParams(**{**SEEDED.__dict__, "n": 3})
    group = [c.token_ids for c in LLM(engine=engine_for(tiny, spec, FREE)).generate([target], params)[0].outputs]
    singles = [ids_of(generate(engine_for(tiny), [target],
                               SamplingParams(**{**SEEDED.__dict__, "seed": SEEDED.seed + i})))[0] for i in range(3)]
    assert group == singles and len({tuple(g) for g in group}) == 3


def test_different_seeds_differ(tiny) -> None:
    prompts = repetitive_prompts(tiny.arch.vocab_size)[:1] * 4
    llm = LLM(engine=engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False), FREE))
    outs = [llm.generate(prompts[:1], SamplingParams(**{**SEEDED.__dict__, "seed": s}))[0].outputs[0].token_ids
            for s in (1, 2, 3, 4)]
    assert len({tuple(o) for o in outs}) == 4


def test_real_model_same_seed_any_speculation(default_model_f32) -> None:
    lm = default_model_f32
    prompts = [lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Repeat the following text exactly, twice:\n\n{REPEAT_TEXT}"}],
        tokenize=False, add_generation_prompt=True)]
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=7, max_tokens=24)
    plain = generate(engine_for(lm, max_model_len=1024), prompts, params)
    suffix = engine_for(lm, SpecConfig(mode="suffix", profile_at_start=False), FREE, max_model_len=1024)
    outs = generate(suffix, prompts, params)
    assert ids_of(outs) == ids_of(plain) and outs[0].text == plain[0].text
    assert suffix.counters.accepted > 5  # the repeated text was drafted and accepted
    auto = engine_for(lm, SpecConfig(mode="auto", profile_at_start=True), max_model_len=1024)
    assert ids_of(generate(auto, prompts, params)) == ids_of(plain)
    other = generate(engine_for(lm, max_model_len=1024), prompts, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert ids_of(other) != ids_of(plain)


# ---- the distribution --------------------------------------------------------------------------------

N_TRIALS = 6000
SAMPLING = {"temp1": dict(temperature=1.0), "temp0.7-top_p0.8": dict(temperature=0.7, top_p=0.8)}


def bad_good_tree(tables: dict, ctx: tuple[int, ...], root: int) -> tuple[DraftTree, list[tuple[int, ...]]]:
    """root -> [bad, good], each -> [bad, good]: bad / good = the least / most likely token (point masses)."""
    def p(c):
        return tables.get(c, torch.full((SMALL_V,), 1.0 / SMALL_V, dtype=torch.float64))

    tokens, parents, ctxs = [root], [-1], [ctx]
    for parent in (0, 1, 2):
        q = p(ctxs[parent])
        for tok in (int(q.argmin()), int(q.argmax())):
            tokens.append(tok)
            parents.append(parent)
            ctxs.append(ctxs[parent] + (tok,))
    return DraftTree(tokens, parents, [1.0] * len(tokens), source="learned"), ctxs


def race_pairs(tables: dict, verify=verify_tree, n_trials: int = N_TRIALS) -> tuple[torch.Tensor, float]:
    """Counts [V, V] of the first two tokens over seeds 10_000 + i, every token verified from a bad/good
    tree with position-keyed noise (as the engine does), and the mean number of draft tokens accepted per tree."""
    counts = torch.zeros(SMALL_V, SMALL_V, dtype=torch.float64)
    accepted = trees = 0
    for seed in range(10_000, 10_000 + n_trials):
        ctx: tuple[int, ...] = ()
        while len(ctx) < 2:
            tree, ctxs = bad_good_tree(tables, ctx, ctx[-1] if ctx else PROMPT[-1])
            rows = torch.stack([tables.get(c, torch.full((SMALL_V,), 1.0 / SMALL_V, dtype=torch.float64))
                                for c in ctxs]).float()
            t0 = len(ctx)
            path, nxt = verify(tree, rows, greedy=False, noise=lambda d: race_noise(seed, t0 + d, SMALL_V))
            ctx += tuple(tree.tokens[i] for i in path[1:]) + (nxt,)
            accepted, trees = accepted + len(path) - 1, trees + 1
        counts[ctx[0], ctx[1]] += 1
    return counts, accepted / trees


def exact_pairs(tables: dict) -> torch.Tensor:
    return torch.stack([tables[()][a] * tables[(a,)] for a in range(SMALL_V)])


def pair_pvalues(counts: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    return {"t1": chisq_pvalue(counts.sum(1), exact.sum(1)), "t2": chisq_pvalue(counts.sum(0), exact.sum(0)),
            "t1t2": chisq_pvalue(counts, exact)}


@pytest.fixture(scope="module", params=list(SAMPLING))
def tables(request, small_vocab) -> dict:
    return target_tables(small_vocab, SamplingParams(**SAMPLING[request.param]))


def test_seeded_verification_is_lossless(tables) -> None:
    counts, acc = race_pairs(tables)
    assert acc > 0.2  # the good tokens were accepted, often (about p(good) + p(good) p(good') per tree)
    pv = pair_pvalues(counts, exact_pairs(tables))
    assert min(pv.values()) > 1e-3, pv


def test_lossy_race_variants_fail(tables, monkeypatch) -> None:
    """Power: accepting a drafted token whenever it is among the race's two best, or reusing position 0's
    noise for every position, fails the same test."""
    exact = exact_pairs(tables)
    counts, _ = race_pairs(tables, verify=lossy_verify_tree, n_trials=3000)
    assert min(pair_pvalues(counts, exact).values()) < 1e-6
    real = sampler_mod.position_seed
    monkeypatch.setattr(sampler_mod, "position_seed", lambda seed, t: real(seed, 0))
    counts, _ = race_pairs(tables, n_trials=3000)
    assert min(pair_pvalues(counts, exact).values()) < 1e-6


class BadGoodDrafter(TableDrafter):
    """Engine drafter proposing the bad/good tree of :func:`bad_good_tree` after the request's output."""

    def __init__(self, tables: dict) -> None:
        super().__init__("bad_points", tables)

    def propose(self, seqs, budgets) -> dict[int, DraftTree]:
        out = {}
        for s in seqs:
            tree, _ = bad_good_tree(self.tables, tuple(s.output_ids), s.tokens[-1])
            self.drafted += tree.num_draft
            out[s.seq_id] = tree
        return out


def test_engine_seeded_speculation_equals_plain_seeded(small_vocab) -> None:
    """Through Engine.step: the first three tokens of 3000 seeded requests, drafted by the bad/good drafter,
    are exactly the plain engine's tokens (same counts cell by cell), and follow the exact distribution."""
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0)
    tables = target_tables(small_vocab, params)
    n = 3000
    spec_counts, eng = sampled_triples(small_vocab, params, BadGoodDrafter(tables), n)
    assert eng.counters.drafted >= 4 * n and eng.counters.accepted > n // 2
    plain_counts, _ = sampled_triples(small_vocab, params, None, n)
    assert torch.equal(spec_counts, plain_counts)
    pv = triple_pvalues(spec_counts, exact_triples(tables))
    assert min(pv.values()) > 1e-3, pv


def test_engine_unseeded_rejection_sampling_still_lossless(small_vocab) -> None:
    """Unseeded requests keep recursive rejection sampling (torch's global RNG); i.i.d. children from a bad q."""
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.7, top_p=0.8)
    tables = target_tables(small_vocab, params)
    drafter = TableDrafter("iid_bad", tables)
    spec = SpecConfig(mode="learned", profile_at_start=False, off_batch_size=10_000,
                      max_batch_draft_tokens=100_000, max_draft_tokens=16)
    eng = engine_for(small_vocab, spec, FORCE, {"learned": drafter}, max_model_len=32, max_num_seqs=200,
                     max_num_batched_tokens=2048)
    torch.manual_seed(0)
    n = 4000
    counts = torch.zeros(SMALL_V, SMALL_V, SMALL_V, dtype=torch.float64)
    for start in range(0, n, 200):
        rids = [f"u{i}" for i in range(start, start + 200)]
        for rid in rids:
            eng.add_request(rid, PROMPT, params)
        while eng.has_unfinished():
            eng.step()
        for rid in rids:
            a, b, c = eng.requests[rid][0].output_ids
            counts[a, b, c] += 1
            eng.release_request(rid)
    assert eng.counters.drafted >= 3 * n
    pv = triple_pvalues(counts, exact_triples(tables))
    assert min(pv.values()) > 1e-3, pv


# ---- top-k / top-p --------------------------------------------------------------------------------


def test_seeded_speculation_respects_top_k_and_top_p(tiny) -> None:
    prompts = repetitive_prompts(tiny.arch.vocab_size)
    for extra in (dict(top_k=3), dict(top_p=0.3)):
        params = SamplingParams(temperature=1.0, seed=11, max_tokens=40, ignore_eos=True, logprobs=20, **extra)
        plain = ids_of(generate(engine_for(tiny), prompts, params))
        refs = {tuple(p): o for p, o in zip(prompts, plain)}
        eng = engine_for(tiny, oracle_spec(), FORCE, {"learned": OracleProposer(refs, tiny.arch.vocab_size)})
        outs = generate(eng, prompts, params)
        assert ids_of(outs) == plain and eng.counters.accepted > 0
        for o in outs:
            for tok, (_, alts) in zip(o.token_ids, o.logprobs):
                ranked = [a for a, _ in alts]
                r = ranked.index(tok) if tok in ranked else len(ranked)  # len: beyond the 20 most likely
                if "top_k" in extra:
                    assert r < 3
                else:  # kept: the smallest prefix of the ranking whose mass reaches top_p (temperature 1)
                    assert sum(math.exp(lp) for _, lp in alts[:r]) < 0.3 + 1e-4
