"""Speculative decoding through the whole engine is lossless, and the controller turns it off where
it does not pay.

* Greedy: speculative output equals plain greedy output token for token (float32), with the suffix
  drafter on repetitive prompts and with an *oracle* proposer that drafts the true greedy continuation
  among wrong branches (long accepted runs through the engine's verify / compact / commit path), for
  chains and trees, batch 1 and mixed batches, with stop strings, stop tokens and max_tokens cutting
  inside an accepted run, with n > 1 groups and with preemption.
* Sampling: on a tiny model with an 8-token vocabulary the first three sampled tokens of many seeded
  requests are distributed as the plain engine's target distribution (chi-square at a fixed seed), with
  bad and good drafters, point-mass and i.i.d. children, chains and trees, temperature and top-p; a
  deliberately lossy verifier plugged into the same engine fails the same test (the test has power).
* Controller: "off" when measured costs make verification expensive, drafting when it is nearly free.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch

from conftest import StubProposer, make_tiny_model
from helpers import FakeClock, chisq_pvalue, lossy_verify_tree
from onspec import LLM, SamplingParams
from onspec.config import ConfigError, EngineConfig, SpecConfig
from onspec.engine.engine import Engine
from onspec.engine.kv_cache import KVCache
from onspec.engine.runner import RowSpec
from onspec.engine.step import DraftInput
from onspec.engine.sampler import process_logits
from onspec.models.loader import DTYPES, LoadedModel, load_model
from onspec.speculation.controller import Controller, StepCostModel, attach_speculation
from onspec.speculation.proposer import Proposer
from onspec.speculation.utility import MeasuredUtility
from onspec.speculation.tree import DraftTree


# ---- helpers --------------------------------------------------------------------------------------


class FixedCost(StepCostModel):
    """A cost model that ignores measurements: seconds per forward = ``fn(tokens)``."""

    def __init__(self, fn: Callable[[int], float]) -> None:
        super().__init__()
        self.fn = fn

    def observe(self, tokens: int, seconds: float, kind: str = "masked") -> None:
        pass

    def cost(self, tokens: int, kind: str = "masked") -> float:
        return self.fn(tokens)


FREE = FixedCost(lambda n: 1.0)                      # verification costs nothing extra: draft everything
# Bigger forwards get *cheaper*, and a forward costs far more than drafting: the controller then drafts
# and keeps every node, even of a drafter whose record it has learned to distrust (the statistical tests
# need every tree verified).
FORCE = FixedCost(lambda n: 1e6 / n)
STEEP = FixedCost(lambda n: 0.001 + 0.01 * n)        # every verified token costs 10x the fixed cost


class OracleProposer(Proposer):
    """Drafts the reference greedy continuation of each request, hidden among wrong branches.

    ``refs`` maps a prompt (tuple of ids) to its plain greedy output. Each step the tree holds the next
    ``depth`` reference tokens as its main path; with ``branchy``, every main-path node gets a wrong
    sibling *before* it (so the accepted child is not the first) with a child of its own; every third
    step one main-path token is replaced by a wrong one (the correct token then only on a side branch),
    so partial acceptance happens too. It also checks, step by step, that the engine's output so far is
    still the reference (the first divergence fails loudly, at the step that caused it)."""

    name = "learned"
    wants_aux = False

    def __init__(self, refs: dict[tuple[int, ...], list[int]], vocab: int, depth: int = 8,
                 branchy: bool = True, mutate: bool = True) -> None:
        self.refs, self.vocab, self.depth, self.branchy, self.mutate = refs, vocab, depth, branchy, mutate
        self.calls = 0
        self.verified: list[tuple[int, int]] = []  # (drafted nodes, accepted) per tree

    def on_step(self, result) -> None:
        for v in result.verdicts:
            self.verified.append((v.tree.num_draft, v.num_accepted))

    def wrong(self, tok: int, salt: int) -> int:
        return (tok + 1 + salt) % self.vocab

    def propose(self, seqs, budgets: dict[int, int]) -> dict[int, DraftTree]:
        out = {}
        for s in seqs:
            ref = self.refs[tuple(s.prompt_ids)]
            n = s.num_output
            assert s.output_ids == ref[:n], f"engine diverged from the reference at output token {n}"
            main = list(ref[n:n + self.depth])
            self.calls += 1
            if self.mutate and main and self.calls % 3 == 0:
                j = self.calls % len(main)
                side_true = main[j]
                main[j] = self.wrong(main[j], 7)
            else:
                j, side_true = -1, None
            tokens, parents, scores = [s.tokens[-1]], [-1], [1.0]
            budget = budgets[s.seq_id]
            prev = 0
            for d, tok in enumerate(main):
                if len(tokens) + (3 if self.branchy else 1) > budget + 1:
                    break
                if self.branchy:
                    # A wrong sibling (the true token when this depth was mutated) and its child.
                    sib = side_true if d == j else self.wrong(tok, d)
                    tokens += [sib, tok]
                    parents += [prev, len(tokens) - 2]
                    scores += [0.3, 0.3]
                tokens.append(tok)
                parents.append(prev)
                scores.append(0.9)
                prev = len(tokens) - 1
            out[s.seq_id] = DraftTree(tokens, parents, scores, source=self.name)
        return out


def engine_for(loaded: LoadedModel, spec: SpecConfig | None = None, cost: StepCostModel | None = None,
               extra: dict | None = None, grammars=None, **kw) -> Engine:
    """An engine over ``loaded`` (float32, one thread); ``grammars``: its grammar compiler, where the
    tokenizer's would not do (engine/grammar.py)."""
    kw.setdefault("max_model_len", 256)
    cfg = EngineConfig(model=str(loaded.path), dtype="float32", num_threads=1,
                       spec=spec or SpecConfig(mode="off"), **kw)
    if cost is not None and cfg.spec.objective == "auto":
        # Injected costs say what drafting costs, and the tests that inject them want every paying node
        # drafted: value tokens per step (LLM.generate would otherwise value them by the batch's makespan).
        cfg = replace(cfg, spec=replace(cfg.spec, objective="throughput"))
    eng = Engine(cfg, loaded=loaded, grammars=grammars)
    if cfg.spec.mode != "off":
        attach_speculation(eng, cfg.spec, extra)
        if cost is not None:
            eng.spec.controller.cost = cost
    return eng


def generate(eng: Engine, prompts, params: SamplingParams):
    return [o.outputs[0] for o in LLM(engine=eng).generate(prompts, params)]


def ids_of(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


def token_prompts(vocab: int, lengths=(5, 17, 33, 9, 2, 24)) -> list[list[int]]:
    return [torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(100 + n)).tolist()
            for n in lengths]


def oracle_spec(**kw) -> SpecConfig:
    kw.setdefault("max_draft_tokens", 24)
    return SpecConfig(mode="learned", profile_at_start=False, max_batch_draft_tokens=1024, **kw)


# ---- greedy, tiny models ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tiny_model_dirs) -> LoadedModel:
    return load_model(str(tiny_model_dirs[request.param]), "float32")


GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_refs(tiny) -> dict[tuple[int, ...], list[int]]:
    prompts = token_prompts(tiny.arch.vocab_size)
    outs = generate(engine_for(tiny), prompts, GREEDY)
    return {tuple(p): o.token_ids for p, o in zip(prompts, outs)}


@pytest.mark.parametrize("branchy", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("batch", [1, 6])
def test_oracle_greedy_equals_plain(tiny, tiny_refs, branchy: bool, batch: int) -> None:
    prompts = [list(p) for p in tiny_refs][:batch]
    oracle = OracleProposer(tiny_refs, tiny.arch.vocab_size, depth=10, branchy=branchy)
    eng = engine_for(tiny, oracle_spec(), FORCE, {"learned": oracle})
    outs = generate(eng, prompts, GREEDY)
    assert ids_of(outs) == [tiny_refs[tuple(p)] for p in prompts]
    # Long accepted runs really went through the engine: full 10-token runs and partial ones.
    accepted = [a for _, a in oracle.verified]
    assert max(accepted) >= 8 and min(accepted) < max(accepted)
    assert sum(o.accepted for o in outs) > 0.6 * sum(len(o.token_ids) for o in outs)
    assert all(o.acceptance_length > 3 for o in outs)


def test_oracle_mixed_batch_with_chunked_prefill_and_preemption(tiny, tiny_refs) -> None:
    """Draft trees verified next to prefill chunks, under a KV budget that forces preemption."""
    prompts = [list(p) for p in tiny_refs]
    oracle = OracleProposer(tiny_refs, tiny.arch.vocab_size, depth=12)
    spec = oracle_spec()
    max_len = 96
    per_token = KVCache.bytes_per_token(tiny.arch, DTYPES["float32"])
    eng = engine_for(tiny, spec, FORCE, {"learned": oracle}, max_model_len=max_len, max_num_batched_tokens=24,
                     kv_cache_memory=float(int(2.5 * (max_len + spec.max_draft_tokens + 1)) * per_token))
    outs = generate(eng, prompts, GREEDY)
    assert ids_of(outs) == [tiny_refs[tuple(p)] for p in prompts]
    assert eng.scheduler.num_preemptions > 0
    assert eng.kv.num_free == eng.kv.num_slots


def test_oracle_max_tokens_and_stop_token_cut_inside_accepted_run(tiny, tiny_refs) -> None:
    prompts = [list(p) for p in tiny_refs][:3]
    oracle = OracleProposer(tiny_refs, tiny.arch.vocab_size, depth=16, mutate=False)
    eng = engine_for(tiny, oracle_spec(), FORCE, {"learned": oracle})
    # max_tokens = 7: the first decode step (after the prefill's token) accepts 16 drafted tokens.
    outs = generate(eng, prompts, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert ids_of(outs) == [tiny_refs[tuple(p)][:7] for p in prompts]
    assert all(o.finish_reason == "length" for o in outs)
    # Stop token: the 10th reference token of the first prompt (cut at its first occurrence).
    ref = tiny_refs[tuple(prompts[0])]
    stop_tok = ref[9]
    out = generate(eng, prompts[:1], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True,
                                                    stop_token_ids=[stop_tok]))[0]
    assert out.token_ids == ref[:ref.index(stop_tok) + 1] and out.finish_reason == "stop"


def test_greedy_n_samples_group(tiny, tiny_refs) -> None:
    """n = 3 greedy samples share a group (group suffix drafting): all three equal the plain output.
    A 16-token step budget staggers the siblings' prefills, so the leader's output drafts for the others."""
    prompt = [list(p) for p in tiny_refs][1]
    assert len(prompt) > 16
    eng = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False), FREE, max_num_batched_tokens=16)
    out = LLM(engine=eng).generate([prompt], SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, n=3))
    assert [c.token_ids for c in out[0].outputs] == [tiny_refs[tuple(prompt)]] * 3
    assert sum(c.accepted for c in out[0].outputs) > 0


def test_suffix_greedy_equals_plain_on_repetitive_tiny_prompts(tiny) -> None:
    """Prompts that repeat a pattern: the suffix drafter proposes long runs of it."""
    vocab = tiny.arch.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(k)] * r for k, r in ((7, 6), (13, 4), (5, 9))]
    plain = ids_of(generate(engine_for(tiny), prompts, GREEDY))
    eng = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False), FREE)
    outs = generate(eng, prompts, GREEDY)
    assert ids_of(outs) == plain
    assert eng.counters.drafted > 0


# ---- greedy, the real default model ---------------------------------------------------------------

REPEAT_TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
               "step. All that glitters is not gold.")


def real_prompts(lm: LoadedModel) -> list[str]:
    from onspec.data import code_edit_prompts

    msgs = [f"Repeat the following text exactly, twice:\n\n{REPEAT_TEXT}",
            *code_edit_prompts(2),
            "Count from 1 to 30, separated by commas."]
    return [lm.tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                             add_generation_prompt=True) for m in msgs]


@pytest.fixture(scope="module")
def real_refs(default_model_f32):
    prompts = real_prompts(default_model_f32)
    outs = generate(engine_for(default_model_f32, max_model_len=1024), prompts,
                    SamplingParams(temperature=0, max_tokens=64))
    return prompts, outs


@pytest.mark.parametrize("mode, cost", [("suffix", FREE), ("auto", None)], ids=["suffix-free", "auto-measured"])
def test_real_model_suffix_greedy_equals_plain(default_model_f32, real_refs, mode: str, cost) -> None:
    prompts, ref = real_refs
    eng = engine_for(default_model_f32, SpecConfig(mode=mode, profile_at_start=cost is None), cost,
                     max_model_len=1024)
    outs = generate(eng, prompts, SamplingParams(temperature=0, max_tokens=64))
    assert ids_of(outs) == ids_of(ref)
    assert [o.text for o in outs] == [o.text for o in ref]
    if cost is FREE:
        assert eng.counters.accepted > 50  # long runs were drafted and accepted (repetitive prompts)


def test_real_model_batch_stop_string_and_max_tokens_inside_run(default_model_f32, real_refs) -> None:
    prompts, ref = real_refs
    tok = default_model_f32.tokenizer
    refs = {tuple(tok(p, add_special_tokens=False)["input_ids"]): o.token_ids for p, o in zip(prompts, ref)}
    oracle = OracleProposer(refs, default_model_f32.arch.vocab_size, depth=12)
    eng = engine_for(default_model_f32, oracle_spec(), FORCE, {"learned": oracle}, max_model_len=1024)
    # A stop string from the middle of the first answer, applied to every prompt in one batch.
    text0 = ref[0].text
    stop = text0[text0.find("fox"):text0.find("fox") + 9] if "fox" in text0 else text0[20:28]
    outs = generate(eng, prompts, SamplingParams(temperature=0, max_tokens=64, stop=[stop]))
    for o, r in zip(outs, ref):
        cut = r.text.find(stop)
        assert o.text == (r.text[:cut] if cut >= 0 else r.text)
        assert o.token_ids == r.token_ids[:len(o.token_ids)]
        assert o.finish_reason == ("stop" if cut >= 0 else r.finish_reason)
    assert outs[0].finish_reason == "stop"
    outs = generate(eng, prompts, SamplingParams(temperature=0, max_tokens=11))
    assert ids_of(outs) == [r.token_ids[:11] for r in ref]


def test_speculative_logprobs_equal_plain(default_model_f32, real_refs) -> None:
    prompts, _ = real_refs
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    plain = generate(engine_for(default_model_f32, max_model_len=1024), prompts[:2], params)
    spec = generate(engine_for(default_model_f32, SpecConfig(mode="suffix", profile_at_start=False), FREE,
                               max_model_len=1024), prompts[:2], params)
    for a, b in zip(plain, spec):
        assert a.token_ids == b.token_ids
        for (la, alts_a), (lb, alts_b) in zip(a.logprobs, b.logprobs):
            assert la == pytest.approx(lb, abs=1e-3)
            assert [t for t, _ in alts_a] == [t for t, _ in alts_b]


# ---- sampling is lossless through Engine.step --------------------------------------------------------

SMALL_V = 8
N_TRIALS = 6000


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory) -> LoadedModel:
    path = make_tiny_model(tmp_path_factory.mktemp("smallv") / "m", "llama", vocab_size=SMALL_V, seed=7)
    return load_model(str(path), "float32")


PROMPT = [3, 5, 1, 7, 4]
SAMPLING = {
    "temp1": dict(temperature=1.0),
    "temp0.7-top_p0.8": dict(temperature=0.7, top_p=0.8),
}


def target_tables(lm: LoadedModel, params: SamplingParams,
                  adjust: Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor] | None = None
                  ) -> dict[tuple[int, ...], torch.Tensor]:
    """Exact processed next-token distribution after PROMPT + ctx, for every ctx of length 0..2; ``adjust``
    maps a row of raw logits [1, V] and its ctx to the row sampling processes (penalties, bias)."""
    kv = KVCache(lm.arch, 1, 32, torch.float32)
    from onspec.engine.runner import ModelRunner

    runner = ModelRunner(lm.model, kv)
    tables = {}
    ctxs = [()] + [(a,) for a in range(SMALL_V)] + [(a, b) for a in range(SMALL_V) for b in range(SMALL_V)]
    for ctx in ctxs:
        ids = PROMPT + list(ctx)
        logits = runner.run([RowSpec(0, 0, ids, logits_from=len(ids) - 1)]).logits[0]
        if adjust is not None:
            logits = adjust(logits, ctx)
        tables[ctx] = process_logits(logits, params)[0].double()
    return tables


class TableDrafter(Proposer):
    """Test drafters over the small vocabulary, given the exact target tables (so 'bad' and 'good'
    are meant literally). Kinds: point-mass trees of the least likely tokens (bad), a chain of the most
    likely tokens (good), i.i.d. children from a wrong q (bad) or from a q close to p (good)."""

    name = "learned"
    wants_aux = False

    def __init__(self, kind: str, tables: dict, seed: int = 0) -> None:
        self.kind, self.tables = kind, tables
        self.rng = torch.Generator().manual_seed(seed)
        g = torch.Generator().manual_seed(seed + 1)
        self.wrong_q = torch.softmax(2.0 * torch.randn(SMALL_V, generator=g, dtype=torch.float64), -1)
        self.drafted = 0

    def p(self, ctx: tuple[int, ...]) -> torch.Tensor:
        # Beyond the tables (past max_tokens, cut anyway) any distribution will do.
        return self.tables.get(ctx, torch.full((SMALL_V,), 1.0 / SMALL_V, dtype=torch.float64))

    def q_for(self, ctx) -> torch.Tensor:
        if self.kind == "iid_good":
            return (0.7 * self.p(ctx) + 0.3 / SMALL_V).float()
        # A wrong q that cannot propose the target's favourite token.
        q = self.wrong_q.clone()
        q[self.p(ctx).argmax()] = 0.0
        return (q / q.sum()).float()

    def propose(self, seqs, budgets) -> dict[int, DraftTree]:
        out = {}
        for s in seqs:
            ctx = tuple(s.output_ids)
            tokens, parents, dists, ctxs = [s.tokens[-1]], [-1], {}, [ctx]

            def add(parent: int, tok: int) -> int:
                tokens.append(tok)
                parents.append(parent)
                ctxs.append(ctxs[parent] + (tok,))
                return len(tokens) - 1

            def iid(parent: int, k: int) -> list[int]:
                q = self.q_for(ctxs[parent])
                dists[parent] = q
                draws = torch.multinomial(q, k, replacement=True, generator=self.rng).tolist()
                return [add(parent, t) for t in draws]

            if self.kind == "bad_points":
                # root -> [worst, worst (duplicate), 2nd worst], each -> [worst]
                order = self.p(ctx).argsort().tolist()
                for t in (order[0], order[0], order[1]):
                    c = add(0, t)
                    add(c, self.p(ctxs[c]).argsort()[0].item())
            elif self.kind == "good_chain":
                node = 0
                for _ in range(3):  # one deeper than max_tokens allows: cut inside the accepted run
                    node = add(node, int(self.p(ctxs[node]).argmax()))
            elif self.kind in ("iid_bad", "iid_good"):
                for c in iid(0, 3):
                    iid(c, 2)
            self.drafted += len(tokens) - 1
            out[s.seq_id] = DraftTree(tokens, parents, [1.0] * len(tokens), child_dists=dists, source=self.name)
        return out


def sampled_triples(lm: LoadedModel, params: SamplingParams, drafter, n_trials: int, seeded: bool = True
                    ) -> tuple[torch.Tensor, Engine]:
    """Counts [V, V, V] of the first three tokens of n_trials requests of PROMPT (and the engine); ``seeded``:
    each request has its own seed (the exponential race), otherwise none (rejection sampling)."""
    spec = SpecConfig(mode="learned" if drafter else "off", profile_at_start=False, off_batch_size=10_000,
                      max_batch_draft_tokens=100_000, max_draft_tokens=16)
    eng = engine_for(lm, spec, FORCE if drafter else None, {"learned": drafter} if drafter else None,
                     max_model_len=32, max_num_seqs=200, max_num_batched_tokens=2048)
    counts = torch.zeros(SMALL_V ** 3, dtype=torch.float64)
    batch = 200
    for start in range(0, n_trials, batch):
        rids = []
        for i in range(start, min(n_trials, start + batch)):
            p = SamplingParams(**{**params.__dict__, "seed": 10_000 + i if seeded else None})
            eng.add_request(f"t{i}", PROMPT, p)
            rids.append(f"t{i}")
        while eng.has_unfinished():
            eng.step()
        for rid in rids:
            a, b, c = eng.requests[rid][0].output_ids
            counts[(a * SMALL_V + b) * SMALL_V + c] += 1
            eng.release_request(rid)
    return counts.view(SMALL_V, SMALL_V, SMALL_V), eng


def exact_triples(tables) -> torch.Tensor:
    p1 = tables[()]
    out = torch.zeros(SMALL_V, SMALL_V, SMALL_V, dtype=torch.float64)
    for a in range(SMALL_V):
        for b in range(SMALL_V):
            out[a, b] = p1[a] * tables[(a,)][b] * tables[(a, b)]
    return out


def triple_pvalues(counts: torch.Tensor, exact: torch.Tensor) -> dict[str, float]:
    return {"t1": chisq_pvalue(counts.sum((1, 2)), exact.sum((1, 2))),
            "t1t2": chisq_pvalue(counts.sum(2), exact.sum(2)),
            "t2t3": chisq_pvalue(counts.sum(0), exact.sum(0)),
            "t1t2t3": chisq_pvalue(counts, exact)}


DRAFT_KINDS = ["bad_points", "good_chain", "iid_bad", "iid_good"]


# Each case runs 6000 requests (10-20 s on a shared 2-core machine): half the grid runs by default,
# every drafter kind and both sampling settings among them; the rest with `-m slow`.
_FAST = {("temp1", "bad_points"), ("temp1", "iid_good"), ("temp0.7-top_p0.8", "good_chain"),
         ("temp0.7-top_p0.8", "iid_bad")}
LOSSLESS_CASES = [pytest.param(s, k, marks=() if (s, k) in _FAST else pytest.mark.slow, id=f"{s}-{k}")
                  for s in SAMPLING for k in DRAFT_KINDS]


@pytest.mark.parametrize("sampling, kind", LOSSLESS_CASES)
def test_engine_sampling_is_lossless(small_vocab, kind: str, sampling: str) -> None:
    params = SamplingParams(max_tokens=3, ignore_eos=True, **SAMPLING[sampling])
    tables = target_tables(small_vocab, params)
    exact = exact_triples(tables)
    counts, eng = sampled_triples(small_vocab, params, TableDrafter(kind, tables), N_TRIALS)
    # Every request's first decode step verified a whole tree (3 to 9 nodes).
    assert eng.counters.drafted >= 3 * N_TRIALS
    if kind in ("good_chain", "iid_good"):
        assert eng.counters.accepted > N_TRIALS // 2
    pv = triple_pvalues(counts, exact)
    assert min(pv.values()) > 1e-3, pv


def test_plain_engine_matches_exact_tables(small_vocab) -> None:
    """The same statistics for the plain engine: the tables really are what plain decoding samples."""
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.7, top_p=0.8)
    exact = exact_triples(target_tables(small_vocab, params))
    pv = triple_pvalues(sampled_triples(small_vocab, params, None, N_TRIALS)[0], exact)
    assert min(pv.values()) > 1e-3, pv


@pytest.mark.parametrize("kind", ["iid_bad", pytest.param("bad_points", marks=pytest.mark.slow)])
def test_lossy_verifier_fails_engine_test(small_vocab, monkeypatch, kind: str) -> None:
    """Power check: the same engine test with a deliberately lossy verifier (tests/helpers.py) fails."""
    import onspec.engine.engine as engine_mod

    monkeypatch.setattr(engine_mod, "verify_tree", lossy_verify_tree)
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0)
    tables = target_tables(small_vocab, params)
    counts, _ = sampled_triples(small_vocab, params, TableDrafter(kind, tables), N_TRIALS)
    assert min(triple_pvalues(counts, exact_triples(tables)).values()) < 1e-6


def test_small_vocab_setup_is_sane(small_vocab) -> None:
    tables = target_tables(small_vocab, SamplingParams(temperature=1.0))
    exact = exact_triples(tables)
    assert float(exact.sum()) == pytest.approx(1.0)
    # Varied distributions (neither one-hot nor uniform), so good and bad drafters differ.
    top = [float(t.max()) for t in tables.values()]
    assert 0.2 < min(top) and max(top) < 0.99


# ---- the controller ---------------------------------------------------------------------------------


def scored_chain(n: int, score: float, source: str = "suffix") -> DraftTree:
    return DraftTree.chain(0, list(range(1, n + 1)), [score] * n, source=source)


def test_controller_off_when_verification_costs_more_than_it_returns() -> None:
    ctl = Controller(SpecConfig())
    trees = {i: scored_chain(8, 0.7) for i in range(4)}
    ctl.cost = STEEP
    plan = ctl.plan(trees, base_tokens=4, num_decode=4)
    assert plan.budget == 0 and plan.trees == {}
    ctl.cost = FREE
    plan = ctl.plan(trees, base_tokens=4, num_decode=4)
    assert plan.budget == 32 and all(t.num_draft == 8 for t in plan.trees.values())


def test_controller_budget_follows_the_cost_curve() -> None:
    """A flat-then-linear cost (like bf16 AMX: flat to 32 tokens) buys nodes up to the knee only."""
    ctl = Controller(SpecConfig(max_batch_draft_tokens=512))
    ctl.cost = FixedCost(lambda n: 0.025 if n <= 32 else 0.025 * n / 32)
    trees = {i: scored_chain(16, 0.9) for i in range(8)}
    plan = ctl.plan(trees, base_tokens=8, num_decode=8)
    assert 0 < plan.budget <= 32 - 8
    # High-probability nodes are bought first: every request gets its shallow nodes before anyone's deep ones.
    assert all(t.num_draft >= 2 for t in plan.trees.values())


def test_controller_sees_the_jump_to_the_masked_path() -> None:
    """Plain decode steps and steps with draft nodes take different attention paths; the first node costs a
    jump that the controller must charge, or it drafts at batch sizes where drafting loses."""
    trees = {i: scored_chain(2, 0.2) for i in range(16)}
    two_curves = Controller(SpecConfig())
    one_curve = Controller(SpecConfig())
    for n in (8, 16, 32, 64):
        two_curves.cost.observe(n, 0.040, "plain")
        two_curves.cost.observe(n, 0.055, "masked")
        one_curve.cost.observe(n, 0.040, "plain")   # no masked measurement yet: borrows the plain curve
    assert two_curves.plan(trees, base_tokens=16, num_decode=16).budget == 0
    assert one_curve.plan(trees, base_tokens=16, num_decode=16).budget > 0
    # With prefill chunks in the step the base is masked too, so nodes are only charged their own tokens.
    assert two_curves.plan(trees, base_tokens=48, num_decode=16).budget > 0


def test_controller_charges_the_padded_size_of_a_verification_step() -> None:
    """The runner pads multi-token forwards to bucket sizes: two nodes on a batch of 8 run as 16 tokens,
    so they must be charged the 16-token cost, not an interpolation at 10."""
    from onspec.engine.runner import bucket_tokens

    trees = {i: scored_chain(1, 1.0) for i in range(2)}       # 8 decoding rows, 2 of them with one node
    plans = {}
    for pad in (None, bucket_tokens):
        ctl = Controller(SpecConfig(), pad=pad)
        for _ in range(50):                                   # a record of full acceptance: calibration ~1
            ctl.observe(scored_chain(1, 1.0), 1)
        ctl.cost.observe(8, 0.040, "plain")
        for n, sec in ((8, 0.040), (16, 0.060), (32, 0.062)):
            ctl.cost.observe(n, sec, "masked")
        plans[pad is None] = ctl.plan(trees, base_tokens=8, num_decode=8)
    assert plans[True].budget == 2       # unpadded: 10 tokens look cheap (0.045 s)
    assert plans[False].budget == 0      # padded: they cost 16 tokens' 0.060 s for 1.8 extra tokens


def linear_costs(ctl: Controller, fixed: float = 0.020, per_token: float = 0.002, jump: float = 0.002) -> None:
    """A CPU-like cost curve: a step of n tokens costs fixed + per_token * n (+ jump on the masked path)."""
    for n in (1, 2, 4, 8, 16, 32, 64):
        ctl.cost.observe(n, fixed + per_token * n, "plain")
        ctl.cost.observe(n, fixed + per_token * n + jump, "masked")


def calibrated_controller(**kw) -> Controller:
    ctl = Controller(SpecConfig(**kw))
    for _ in range(50):  # a record of full acceptance: calibrated probabilities ~1
        ctl.observe(scored_chain(4, 1.0), 4)
    linear_costs(ctl)
    return ctl


def test_closed_batch_values_tokens_by_how_much_they_shorten_the_batch() -> None:
    """8 rows, drafts for 2 of them. Per step the drafts pay (8 more tokens for 9 tokens' worth of compute);
    in a closed batch where all 8 rows have 50 tokens left they do not: the batch still takes 50 steps, the
    2 rows only leave it sooner. Where those 2 rows are the ones holding the batch up, they pay again."""
    ctl = calibrated_controller()
    trees = {i: scored_chain(4, 1.0) for i in range(2)}
    assert ctl.plan(trees, base_tokens=8, num_decode=8).budget == 8                      # per-step throughput
    tied = {i: 50 for i in range(8)}
    assert ctl.plan(trees, base_tokens=8, num_decode=8, remaining=tied).budget == 0
    behind = {i: 50 if i < 2 else 10 for i in range(8)}
    assert ctl.plan(trees, base_tokens=8, num_decode=8, remaining=behind).budget == 8
    # every tied row drafting shortens the batch: that pays in a closed batch too
    everyone = {i: scored_chain(4, 1.0) for i in range(8)}
    assert ctl.plan(everyone, base_tokens=8, num_decode=8, remaining=tied).budget > 0


def test_a_step_with_a_prefill_chunk_drafts_only_what_pays_at_the_decoding_rate() -> None:
    """A step that carries a 512-token prefill chunk is slow for reasons drafting does not change. Rated by
    the whole step, its 8 decoding rows looked slow (8 tokens per ~1 s) and nodes accepted 40% of the time
    looked like a bargain; rated as decoding (8 tokens per 36 ms) plus what the nodes add, they do not pay."""
    ctl = calibrated_controller()
    weak = {i: scored_chain(1, 0.4) for i in range(8)}
    strong = {i: scored_chain(1, 1.0) for i in range(8)}
    assert ctl.plan(weak, base_tokens=8 + 512, num_decode=8).budget == 0
    assert ctl.plan(strong, base_tokens=8 + 512, num_decode=8).budget == 8
    assert ctl.plan(weak, base_tokens=8, num_decode=8).budget == 0       # pure decoding: same verdict


def test_makespan_value_of_one_row_is_its_accepted_tokens() -> None:
    """One row: every accepted token saves a whole step, as in the throughput rule. Many rows: a token on a
    row that is ahead saves only the per-row cost c; tied rows save the fixed cost F only together."""
    from onspec.speculation.controller import MakespanValue

    one = MakespanValue({7: 30}, step_seconds=0.025, one_row_seconds=0.025)
    assert one.add(7, 0.8) == pytest.approx(0.8 * 0.025) and one.add(7, 0.5) == pytest.approx(1.3 * 0.025)
    # T(4) = 0.032, T(1) = 0.020: c = 0.004, F = 0.016
    ahead = MakespanValue({0: 10, 1: 40, 2: 40, 3: 40}, step_seconds=0.032, one_row_seconds=0.020)
    assert ahead.add(0, 1.0) == pytest.approx(0.004)
    tied = MakespanValue({1: 40, 2: 40, 3: 40, 4: 40}, step_seconds=0.032, one_row_seconds=0.020)
    for sid in (1, 2, 3):
        worth = tied.add(sid, 1.0)
    assert worth == pytest.approx(3 * 0.004)                   # row 4 still holds the batch at 40
    assert tied.add(4, 1.0) == pytest.approx(4 * 0.004 + 0.016)
    # accepted tokens beyond what a row may still produce are worth nothing
    short = MakespanValue({0: 1, 1: 1}, step_seconds=0.032, one_row_seconds=0.020)
    assert short.add(0, 1.0) == short.add(0, 1.0)


def test_generate_drafts_for_a_closed_batch_the_server_for_a_stream(tiny) -> None:
    """LLM.generate returns when the whole batch is done: with objective "auto" its steps are planned by
    makespan (``remaining`` passed to plan) whenever nothing waits; steps driven one by one (a server)
    and objective "throughput" are planned per step."""
    def planned(objective: str, via_generate: bool) -> list:
        eng = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=False, objective=objective), max_num_seqs=4)
        seen = []
        plan = eng.spec.controller.plan

        def spy(trees, base_tokens, num_decode, remaining=None):
            seen.append(remaining)
            return plan(trees, base_tokens, num_decode, remaining)

        eng.spec.controller.plan = spy
        prompts = token_prompts(tiny.arch.vocab_size, (5, 9, 12))
        params = SamplingParams(temperature=0, max_tokens=6)
        if via_generate:
            generate(eng, prompts, params)
        else:
            for i, p in enumerate(prompts):
                eng.add_request(f"r{i}", p, params)
            while eng.has_unfinished():
                eng.step()
        assert eng.closed_batch is False
        return seen

    closed = [r for r in planned("auto", True) if r is not None]
    assert closed and all(1 <= v <= 6 for r in closed for v in r.values())
    assert all(r is None for r in planned("auto", False))
    assert all(r is None for r in planned("throughput", True))
    assert any(r is not None for r in planned("makespan", False))
    with pytest.raises(ConfigError, match="objective"):
        SpecConfig(objective="latency")


def test_live_step_costs_replace_the_start_up_profile() -> None:
    """Profile readings are priors: the first live step of a size replaces them outright (they missed the
    step's drafting, verification and real contexts), and a later profile reading changes nothing."""
    cost = StepCostModel()
    cost.observe(16, 0.045, "masked", prior=True)
    cost.observe(16, 0.047, "masked", prior=True)
    assert cost.cost(16, "masked") == pytest.approx(0.046)
    cost.observe(16, 0.060, "masked")
    assert cost.cost(16, "masked") == pytest.approx(0.060)
    cost.observe(16, 0.070, "masked")
    assert cost.cost(16, "masked") == pytest.approx(0.065)     # a running mean until the EMA takes over
    cost.observe(16, 0.010, "masked", prior=True)
    assert cost.cost(16, "masked") == pytest.approx(0.065)
    # The live/profile ratio seen at 16 tokens (0.060 / 0.046) scales what only the profile measured.
    cost.observe(8, 0.030, "plain", prior=True)
    assert cost.cost(8, "plain") == pytest.approx(0.030 * 0.060 / 0.046)


def test_start_up_profile_times_batched_decoding_and_verification(tiny) -> None:
    eng = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=True), max_num_seqs=8)
    cost = eng.spec.controller.cost
    assert set(cost.tables["plain"]) == {1, 2, 4, 8}           # B rows x 1 token
    assert set(cost.tables["masked"]) == {2, 4, 8, 16}         # B rows x 2 tokens
    assert eng.kv.num_free == eng.kv.num_slots


def test_policy_off_at_large_batch() -> None:
    """Gate ``batch_size``: at ``off_batch_size`` decoding rows no drafter is asked, however cheap nodes are."""
    from onspec.speculation.policy import DraftPolicy

    cfg = SpecConfig(off_batch_size=16)
    ctl = Controller(cfg)
    ctl.cost = FREE
    policy = DraftPolicy(cfg, ctl, MeasuredUtility(), {"suffix": StubProposer()})
    assert not policy.open_step(DraftInput([object()] * 16, 16), ["suffix"])
    assert policy.open_step(DraftInput([object()] * 15, 15), ["suffix"])
    assert policy.counts.steps == {"batch_size": 1} and policy.steps == 1


def test_controller_choose_prefers_the_better_calibrated_strategy() -> None:
    ctl = Controller(SpecConfig())
    a, b = scored_chain(6, 0.8, "suffix"), scored_chain(6, 0.8, "learned")
    for _ in range(50):  # suffix trees were always rejected, learned ones fully accepted
        ctl.observe(scored_chain(6, 0.8, "suffix"), 0)
        ctl.observe(scored_chain(6, 0.8, "learned"), 6)
    assert ctl.choose({1: [a, b]})[1].source == "learned"
    assert ctl.choose({1: [DraftTree.root_only(0)]}) == {}


def test_policy_backs_off_exploring_a_losing_strategy_and_forgets_on_a_new_drafter() -> None:
    """Gate ``record``: a strategy whose record does not pay is retried after 4, 8, 16, then every 32 steps."""
    from onspec.speculation.policy import DraftPolicy

    cfg = SpecConfig(mode="learned", record_backoff_first=4, record_backoff_max=32)
    ctl = Controller(cfg)
    policy = DraftPolicy(cfg, ctl, MeasuredUtility(), {"learned": StubProposer()})
    ctl.worth_drafting = lambda *args, **kwargs: worth    # the record's verdict, injected
    inp = DraftInput([], 0)

    def asked_at(step: int) -> bool:
        policy.steps = step
        return policy.ask("learned", inp)

    worth = False
    tries = [step for step in range(200) if asked_at(step)]
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert tries[0] == 4 and gaps[:3] == [8, 16, 32] and set(gaps[3:]) == {32}
    assert policy.counts.strategies["learned"] == {"record": 200 - len(tries)}
    worth = True
    assert asked_at(201)                                   # a paying record resets the back-off
    worth = False
    assert not asked_at(202) and asked_at(206)
    policy.forget("learned")
    assert asked_at(207) is False


def test_a_cheap_drafter_is_always_asked_an_expensive_one_by_its_record() -> None:
    """The same losing record (every node rejected) keeps an expensive drafter out, but not one whose
    proposals cost next to nothing: plan() then decides per step from that step's trees."""
    ctl = Controller(SpecConfig())
    ctl.cost.observe(2, 0.025, "plain")
    for n in (4, 8, 16, 32):
        ctl.cost.observe(n, 0.030, "masked")
    for name in ("suffix", "learned"):
        for _ in range(ctl.cfg.record_explore_steps):
            ctl.observe(scored_chain(8, 0.5, name), 0)
    assert ctl.worth_drafting("suffix", 2, 2, draft_seconds=0.0002)
    assert not ctl.worth_drafting("learned", 2, 2, draft_seconds=0.020)
    # A cheap drafter with a record that pays is asked as well; an expensive one that pays despite its cost too.
    for _ in range(200):
        ctl.observe(scored_chain(8, 0.9, "learned"), 8)
    assert ctl.worth_drafting("learned", 2, 2, draft_seconds=0.020)


def test_a_drafter_models_time_stays_out_of_the_step_cost_curve(tiny) -> None:
    """A learned drafter's forward is priced by its own proposal cost; charged to the step as well, it
    made every masked step look dearer and so priced every strategy's nodes too high. Forwards take 5 ms
    and each proposal 0.2 s on an injected clock."""
    clock = FakeClock(tick=0.005)

    class SlowLearned(StubProposer):
        wants_aux = True

        def propose(self, seqs, budgets):
            clock.advance(0.2)
            return {s.seq_id: scored_chain(2, 0.9, "learned") for s in seqs}

    class Recorded(StepCostModel):  # records what it observes, prices every step the same (draft everything)
        def cost(self, tokens: int, kind: str = "masked") -> float:
            return 1.0

    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32", spec=SpecConfig(profile_at_start=False)),
                 loaded=tiny)
    spec = attach_speculation(eng, eng.cfg.spec, {"learned": SlowLearned()})
    eng.clock = spec.clock = clock
    spec.controller.worth_drafting = lambda *args, **kwargs: True
    spec.controller.cost = cost = Recorded()
    eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=6))
    while eng.has_unfinished():
        eng.step()
    assert spec.policy.draft_cost["learned"] >= 0.2                         # the drafter was asked and timed
    assert clock.now > 0.4                                                  # ... more than once
    # Every observed step cost is the forward and the step's own work alone, not the 0.2 s proposals.
    assert cost.tables["masked"] and max(cost.tables["masked"].values()) < 0.1


@pytest.mark.parametrize("expected, held_back", [(1.0, True), (5.0, False), (None, False)])
def test_auto_holds_back_a_drafter_whose_heldout_estimate_cannot_pay(tiny, expected, held_back: bool) -> None:
    """A drafter model whose held-out acceptance length (1.0: a random day-0 head) cannot cover its own
    proposal time (10 ms against a 50 ms step: it needs more than 1.2) is asked once, to time it, and then
    not again; one with a paying estimate, or none, keeps being asked. Proposals take 10 ms on an injected
    clock."""
    clock = FakeClock()

    class Learned(StubProposer):
        wants_aux = True

        def __init__(self) -> None:
            self.expected_acceptance = expected
            self.asked = 0

        def propose(self, seqs, budgets):
            self.asked += 1
            clock.advance(0.01)
            return {s.seq_id: scored_chain(2, 0.9, "learned") for s in seqs}

    learned = Learned()
    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32",
                              spec=SpecConfig(mode="auto", profile_at_start=False)), loaded=tiny)
    spec = attach_speculation(eng, eng.cfg.spec, {"learned": learned})
    eng.clock = spec.clock = clock
    spec.controller.worth_drafting = lambda *args, **kwargs: True
    spec.controller.cost = FixedCost(lambda n: 0.05)
    eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    if held_back:
        assert learned.asked == 1 and spec.policy.counts.strategies["learned"]["estimate"] >= 5
    else:
        assert learned.asked >= 4


def test_a_drafter_model_must_pay_beside_what_the_free_drafter_commits(tiny) -> None:
    """With 10 ms proposals against a 50 ms step, a drafter model needs L > 1.2 to beat plain decoding, but
    beside a free drafter that already commits one extra token per row (g = 1) its best case (its drafts
    added to the free drafter's) pays only when L > 1 + 0.2 * 2 = 1.4."""
    from onspec.speculation.controller import StrategyStats

    class Learned(StubProposer):
        wants_aux = True
        expected_acceptance = 1.3

    class Free(StubProposer):
        name = "suffix"

    learned = Learned()
    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32",
                              spec=SpecConfig(mode="auto", profile_at_start=False)), loaded=tiny)
    spec = attach_speculation(eng, eng.cfg.spec, {"suffix": Free(), "learned": learned})
    spec.controller.cost = FixedCost(lambda n: 0.05)
    policy = spec.policy
    policy.draft_cost["learned"] = 0.01
    assert policy.free_gain() == 0.0 and policy.estimate_allows("learned", 1, 1)    # no free record yet
    policy.rows_asked["suffix"] = 40
    spec.controller.stats["suffix"] = StrategyStats(accepted=40.0, steps=25)   # 40 drafts over 40 rows asked
    assert policy.free_gain() == pytest.approx(1.0)
    assert not policy.estimate_allows("learned", 1, 1)
    learned.expected_acceptance = 1.45
    assert policy.estimate_allows("learned", 1, 1)
    # the record is per row the free drafter was asked for, whatever it drafted: half the gain, a lower bar
    policy.rows_asked["suffix"] = 80
    learned.expected_acceptance = 1.35
    assert policy.free_gain() == pytest.approx(0.5) and policy.estimate_allows("learned", 1, 1)


def test_speculation_forgets_a_strategys_record_when_its_drafter_is_swapped(tiny) -> None:
    """A new drafter version must be judged afresh, not by the record of the one it replaced."""
    learned = StubProposer()
    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32", spec=SpecConfig(profile_at_start=False)),
                 loaded=tiny)
    spec = attach_speculation(eng, eng.cfg.spec, {"learned": learned})
    spec.controller.observe(scored_chain(4, 0.9, "learned"), 0)
    seqs = eng.add_request("r", [1, 2, 3], GREEDY)
    spec.draft(DraftInput(seqs, 1))
    assert "learned" in spec.controller.stats              # same drafter: the record stays
    eng.events.drafter_swapped("learned")                  # what EagleProposer.swap emits
    spec.draft(DraftInput(seqs, 1))
    assert "learned" not in spec.controller.stats          # swapped: forgotten


@pytest.mark.parametrize("cost, drafts", [(STEEP, False), (FREE, True)], ids=["steep", "free"])
def test_engine_speculates_only_when_it_pays(tiny, tiny_refs, cost, drafts: bool) -> None:
    prompts = [list(p) for p in tiny_refs][:3]
    oracle = OracleProposer(tiny_refs, tiny.arch.vocab_size, depth=8)
    eng = engine_for(tiny, oracle_spec(), cost, {"learned": oracle})
    outs = generate(eng, prompts, GREEDY)
    assert ids_of(outs) == [tiny_refs[tuple(p)] for p in prompts]
    assert (eng.counters.drafted > 0) == drafts
    strategies = set(eng.counters.by_strategy)
    assert ("learned" in strategies) if drafts else strategies == {"off"}


def test_measured_cost_profile_is_seeded_at_start(tiny) -> None:
    eng = engine_for(tiny, SpecConfig(mode="suffix", profile_at_start=True))
    table = eng.spec.controller.cost.table
    assert set(table) >= {1, 2, 4, 8, 16} and all(v > 0 for v in table.values())
    assert eng.kv.num_free == eng.kv.num_slots  # the scratch slot was given back


def test_step_cost_is_read_at_the_sizes_a_bucket_actually_saw() -> None:
    """A power-of-two bucket holds every size up to its power (bucket 8: 5-8 tokens). Read as the cost of 8
    tokens, a bucket filled by 6-token steps made 6 tokens look cheaper than they are (interpolated between
    buckets 4 and 8), and the budget rule overdrafted. Each bucket's seconds now sit at its mean size."""
    linear = lambda n: 0.030 + 0.004 * n           # noqa: E731  (a forward whose cost grows with its tokens)
    cost = StepCostModel(decay=0.5)
    for n in (2, 3, 3, 6, 6, 6, 12, 12):
        cost.observe(n, linear(n), "masked")
    for n in (3, 6, 12):
        assert cost.cost(n, "masked") == pytest.approx(linear(n), rel=1e-6)
    assert cost.cost(9, "masked") == pytest.approx(linear(9), rel=1e-6)    # between two buckets' means
    assert cost.cost(24, "masked") == pytest.approx(linear(12) * 2, rel=1e-6)  # beyond: from the origin
    # the old reading (bucket 8's seconds at 8 tokens) put 6 tokens well below their cost
    old_reading = 0.5 * cost.tables["masked"][4] + 0.5 * cost.tables["masked"][8]
    assert old_reading < 0.95 * linear(6)


def test_drafters_are_asked_less_where_their_nodes_keep_not_paying(tiny) -> None:
    """When a step's trees hold nodes and the plan keeps none (verification would cost more than the nodes
    are expected to return), the next asks at that batch size back off (1, 2, 4, then 8 steps skipped);
    where nodes pay, the drafter is asked every step."""
    class Counting(StubProposer):
        name = "suffix"

        def __init__(self) -> None:
            self.asked = []

        def propose(self, seqs, budgets):
            self.asked.append(self.step)
            return {s.seq_id: scored_chain(4, 0.9, "suffix") for s in seqs}

    def asks(cost: StepCostModel) -> tuple[list[int], Engine]:
        eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32", max_model_len=256,
                                  spec=SpecConfig(mode="suffix", profile_at_start=False)), loaded=tiny)
        drafter = Counting()
        spec = attach_speculation(eng, eng.cfg.spec, {"suffix": drafter})
        spec.controller.cost = cost
        eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
        step = 0
        while eng.has_unfinished():
            drafter.step = step = step + 1
            eng.step()
        return drafter.asked, eng

    losing, eng = asks(STEEP)                  # every verified token costs 10x a step: no node pays
    gaps = [b - a for a, b in zip(losing, losing[1:])]
    assert gaps[:4] == [2, 3, 5, 9] and set(gaps[4:]) <= {9}
    counts = eng.spec.policy.counts.steps
    assert counts["unpaid"] == eng.spec.policy.steps - len(losing)       # every decoding step not asked
    assert counts["plan"] == len(losing) and set(counts) == {"unpaid", "plan"}
    paying, _ = asks(FREE)                      # nodes cost nothing: asked at every decoding step
    assert paying == list(range(paying[0], paying[0] + len(paying)))


def test_one_slow_proposal_does_not_make_a_cheap_drafter_look_expensive(tiny) -> None:
    """A cheap drafter's cost is the lower median of its recent proposals: a one-off pause (GC, a lazy
    build) neither closes gate 6 on it nor lingers; a drafter that is always slow is priced as slow."""
    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32",
                              spec=SpecConfig(mode="auto", profile_at_start=False)), loaded=tiny)
    spec = attach_speculation(eng, eng.cfg.spec)
    spec.controller.cost = FixedCost(lambda n: 0.015)          # a 15 ms plain step: cheap is under 0.75 ms
    policy = spec.policy
    for _ in range(5):
        policy.asked("suffix", 2, 0.0001)
    policy.asked("suffix", 2, 0.05)                            # one 50 ms pause
    assert policy.draft_cost["suffix"] == pytest.approx(0.0001)
    assert spec.controller.worth_drafting("suffix", 2, 2, policy.draft_cost["suffix"])
    policy.asked("slow", 1, 0.004)                             # the first call of a drafter is its figure
    assert policy.draft_cost["slow"] == pytest.approx(0.004)
    for _ in range(9):
        policy.asked("slow", 1, 0.004)
    policy.asked("slow", 1, 0.0001)                            # one fast call does not make it cheap either
    assert policy.draft_cost["slow"] == pytest.approx(0.004)
