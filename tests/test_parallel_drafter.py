"""Tests for the parallel drafter (P-EAGLE: speculation/parallel_drafter.py, parallel_proposer.py,
parallel_checkpoint.py, train/parallel_objective.py).

Model: the training unroll computes what one proposal forward computes; depth d never sees the rows of
depths > d (bit for bit); one drafter forward per proposal whatever the depth; trees are the best nodes by
product of probabilities. Engine: greedy output equals plain greedy output (float32; bf16 where onspec's
kernels run), chains and trees, batched; sampled output has the target's distribution. Training: the loss
of every depth at once (plus the rejected-branch term) falls on a fixed batch. Checkpoints: a round trip
gives identical logits, the config names what vLLM's and speculators' loaders read, bad files are rejected.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_eagle import cfg, tiny  # noqa: F401  (fixtures: the tiny target, float32, and its drafter shape)
from test_eagle import PROMPTS, FakeSeq, _corrupt, force_all_drafts, greedy_continuations, prefilled, target_pass
from test_exact_bf16 import bf16_engine, outputs
from test_speculation import SMALL_V, exact_triples, sampled_triples, target_tables, triple_pvalues
from test_speculation import small_vocab  # noqa: F401  (a fixture)

import test_speculation

from onspec.config import ConfigError, EngineConfig, SpecConfig, TrainerConfig
from onspec.engine.engine import Engine
from onspec.engine.sampler import SamplingParams
from onspec.engine.step import Prefill
from onspec.models.bf16_linear import compiled_kernel
from onspec.models.loader import load_model
from onspec.speculation.controller import attach_speculation
from onspec.speculation.eagle import DrafterLoadError, EagleConfig, day0_token_counts, init_drafter, load_eagle3
from onspec.speculation.parallel_checkpoint import PARALLEL_CONFIG_KEYS, load_parallel, save_parallel
from onspec.speculation.parallel_drafter import (
    ParallelConfig,
    ParallelDrafter,
    ParallelInput,
    from_eagle,
    init_parallel,
    tree_from_depths,
)
from onspec.speculation.parallel_proposer import ParallelProposer, attach_parallel
from onspec.train.objective import (Batch, Sample, accepted_by_depth, collate, make_optimizer,
                                    simulated_acceptance, trainable_parameters)
from onspec.train.parallel_objective import train_step
from onspec.train.publish import Manifest, publish_version

DEPTHS = 4


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------


def sample_of(lm, drafter: ParallelDrafter, key: str, tokens: list[int], prompt_len: int, K: int = 8,
              branches: int = 2) -> Sample:
    """A training sample of one sequence: soft labels (the target's top-K draft-vocabulary distribution at
    every position) and ``branches`` rejected nodes (the target's runner-up token after generated
    positions, with the target's state and distribution after it), as the trace recorder would give."""
    logits, aux = target_pass(lm, tokens, drafter.cfg.aux_layers)
    p, ids = drafter.target_to_draft_probs(torch.softmax(logits, -1)).topk(K, dim=-1)
    t2d = torch.full((drafter.cfg.vocab_size,), -1, dtype=torch.long)
    t2d[drafter.draft_ids] = torch.arange(drafter.cfg.draft_vocab_size)
    L = len(tokens)
    s = Sample(key=key, tokens=torch.tensor(tokens), aux=aux, lab_ids=ids, lab_p=p / p.sum(-1, keepdim=True),
               lab_ok=torch.ones(L, dtype=torch.bool), weight=torch.ones(L), draft_tok=t2d[torch.tensor(tokens)],
               generated=torch.arange(L) >= prompt_len)
    parents = list(range(prompt_len, L - 1, max(1, (L - 1 - prompt_len) // max(1, branches))))[:branches]
    br_tok, br_aux, br_ids, br_p = [], [], [], []
    for par in parents:
        refused = int(logits[par].topk(2).indices[1])
        lg, a = target_pass(lm, tokens[:par + 1] + [refused], drafter.cfg.aux_layers)
        bp, bi = drafter.target_to_draft_probs(torch.softmax(lg[-1:], -1)).topk(K, dim=-1)
        br_tok.append(refused)
        br_aux.append(a[-1])
        br_ids.append(bi[0])
        br_p.append(bp[0] / bp[0].sum())
    if parents:
        s.br_parent, s.br_token = torch.tensor(parents), torch.tensor(br_tok)
        s.br_aux, s.br_lab_ids, s.br_lab_p = torch.stack(br_aux), torch.stack(br_ids), torch.stack(br_p)
    return s


def training_batch(lm, drafter: ParallelDrafter, n_tokens: int = 40) -> Batch:
    seqs = greedy_continuations(lm, PROMPTS, n_tokens)
    return collate([sample_of(lm, drafter, str(i), s, len(p)) for i, (p, s) in enumerate(zip(PROMPTS, seqs))],
                   bucket=False)


def fit(drafter: ParallelDrafter, batch: Batch, steps: int, lr: float) -> list[float]:
    tcfg = TrainerConfig(lr=lr, weight_decay=0.0, discard_weight=0.3)
    params = trainable_parameters(drafter, train_head=True)
    opt = make_optimizer(params, tcfg)
    g = torch.Generator().manual_seed(0)
    return [train_step(drafter, batch, opt, params, tcfg, g).loss for _ in range(steps)]


@pytest.fixture(scope="module")
def trained(tiny, cfg) -> ParallelDrafter:
    """A parallel drafter trained briefly on the tiny target's own greedy continuations of the test prompts
    (the traffic it then drafts for)."""
    seqs = greedy_continuations(tiny, PROMPTS, 40)
    counts = day0_token_counts(cfg.vocab_size, seen_token_ids=[t for s in seqs for t in s],
                               always_include=tuple(tiny.eos_token_ids))
    drafter = init_parallel(tiny, cfg, ParallelConfig(depths=DEPTHS), seed=1, token_counts=counts)
    fit(drafter, training_batch(tiny, drafter), steps=60, lr=1e-2)
    return drafter.eval().requires_grad_(False)


def active_rows(prop: ParallelProposer, seqs: list[FakeSeq], budget: int = 8) -> list:
    """What ``propose`` hands its drafting: (seq, state, budget), the root row to be recomputed."""
    out = []
    for s in seqs:
        st = prop.states[s.seq_id]
        st.n_kv = min(st.n_kv, st.n_aux - 1)
        out.append((s, st, budget))
    return out


def run_engine(lm, prompts, params_fn, drafter: ParallelDrafter | None, topk: int = 4, budget: int = 8,
               max_seqs: int = 8):
    spec_cfg = SpecConfig(mode="parallel", max_draft_tokens=budget, profile_at_start=False)
    eng = Engine(EngineConfig(model="tiny", dtype="float32", max_num_seqs=max_seqs, max_model_len=256,
                              spec=spec_cfg), loaded=lm)
    if drafter is not None:
        force_all_drafts(attach_parallel(eng, spec_cfg, drafter, topk=topk))
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params_fn(i))
    while eng.has_unfinished():
        eng.step()
    return [eng.requests[str(i)][0].output_ids for i in range(len(prompts))], eng


def greedy(_i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


# ------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------


def test_config_validation(tiny, cfg) -> None:
    for bad in [dict(depths=0), dict(depths=17), dict(mask_token_id=-1)]:
        with pytest.raises(ConfigError):
            ParallelConfig(**bad)
    with pytest.raises(ConfigError, match="mask_token_id"):
        ParallelDrafter(cfg, ParallelConfig(mask_token_id=cfg.vocab_size))


def test_init_from_eagle_copies_the_head_and_depth_one_is_its_root_prediction(tiny, cfg) -> None:
    eagle = init_drafter(tiny, cfg, seed=5)
    par = from_eagle(eagle, ParallelConfig(depths=3), seed=2)
    for name, t in eagle.state_dict().items():
        assert torch.equal(par.state_dict()[name], t), name
    assert par.mask_hidden.shape == (3 * cfg.target_hidden_size,) and float(par.mask_hidden.detach().abs().sum()) > 0
    assert par.embed_weight.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()
    ctx = greedy_continuations(tiny, [PROMPTS[0]], 6)[0]
    _, aux = target_pass(tiny, ctx, cfg.aux_layers)
    ids = torch.tensor([ctx])
    with torch.no_grad():
        assert torch.equal(par.forward_train(aux[None], ids)[0], eagle.forward_train(aux[None], ids)[0])
    # Day 0: random layers, the target's lm_head rows and final norm (init_drafter's free warm start).
    day0 = init_parallel(tiny, cfg, ParallelConfig(depths=2), seed=0)
    assert torch.equal(day0.lm_head.weight, tiny.model.lm_head.weight.float()[day0.draft_ids])
    assert day0.parallel.depths == 2 and isinstance(day0, ParallelDrafter)


def test_training_unroll_is_what_one_proposal_computes(tiny, trained) -> None:
    """forward_train's step i at root t = the proposal forward's depth i + 1 for that root."""
    prop = ParallelProposer(trained)
    ctx = greedy_continuations(tiny, [PROMPTS[1]], 9)[0]
    seq = prefilled(prop, tiny, 0, ctx)
    with torch.no_grad():
        out = trained.draft_parallel(prop.parallel_input(active_rows(prop, [seq])))
        _, aux = target_pass(tiny, ctx, trained.cfg.aux_layers)
        unroll = trained.forward_train(aux[None], torch.tensor([ctx]), ttt_steps=DEPTHS)
    assert out.logits.shape == (1, DEPTHS, trained.cfg.draft_vocab_size)
    for i in range(DEPTHS):
        torch.testing.assert_close(out.logits[0, i], unroll[i][0, len(ctx) - 1], atol=1e-4, rtol=1e-4)


def perturbed(inp: ParallelInput, rows: torch.Tensor, seed: int) -> ParallelInput:
    """``inp`` with random tokens and features at ``rows`` [B, n] (row indices per sequence)."""
    g = torch.Generator().manual_seed(seed)
    tokens, features = inp.tokens.clone(), inp.features.clone()
    b = torch.arange(tokens.shape[0])[:, None].expand_as(rows)
    tokens[b, rows] = torch.randint(0, 500, rows.shape, generator=g)
    features[b, rows] = 3.0 * torch.randn(*rows.shape, features.shape[-1], generator=g, dtype=features.dtype)
    return ParallelInput(tokens, features, inp.positions, inp.mask, inp.depth_rows, inp.past_k, inp.past_v)


def test_depth_d_cannot_see_the_rows_of_deeper_depths(tiny, trained) -> None:
    """Row d stands for the token at depth d - 1 and predicts depth d: changing the inputs of every row
    standing for a token at depth >= d leaves depth d's logits unchanged, bit for bit (two sequences of
    different lengths, so padding and cached context are both in play); changing depth d's own input
    changes them (the test can fail)."""
    prop = ParallelProposer(trained)
    full = greedy_continuations(tiny, [PROMPTS[0], PROMPTS[3]], 9)
    seqs = [prefilled(prop, tiny, i, c[:-2]) for i, c in enumerate(full)]
    with torch.no_grad():
        prop.propose(seqs, {0: 8, 1: 8})                 # caches the context: the next forward has past rows
        for s, c, extra in zip(seqs, full, (2, 1)):       # 2 and 1 more committed tokens: padding rows too
            for _ in range(extra):
                commit_one(prop, tiny, s, c[len(s.tokens)])
        inp = prop.parallel_input(active_rows(prop, seqs))
        assert inp.past_k is not None
        base = trained.draft_parallel(inp).logits
        for d in range(1, DEPTHS + 1):
            deeper = inp.depth_rows[:, d:]                 # rows of depths d + 1.. : inputs of depths >= d
            if deeper.shape[1]:
                assert torch.equal(trained.draft_parallel(perturbed(inp, deeper, d)).logits[:, d - 1],
                                   base[:, d - 1]), d
            own = inp.depth_rows[:, d - 1:d]
            assert not torch.equal(trained.draft_parallel(perturbed(inp, own, d)).logits[:, d - 1], base[:, d - 1])


def commit_one(prop: ParallelProposer, lm, seq: FakeSeq, token: int) -> None:
    """The target processes ``seq``'s root (its aux row observed) and ``token`` becomes the new root."""
    _, aux = target_pass(lm, seq.tokens, prop.drafter.cfg.aux_layers)
    seq.tokens.append(token)
    seq.cache_len = len(seq.tokens) - 1
    prop.on_prefill(Prefill(seq, 1, "computed", aux[-1:]))


@pytest.mark.parametrize("depths", [1, 3, 7])
def test_one_drafter_forward_per_proposal_whatever_the_depth(tiny, cfg, depths) -> None:
    """A chain (top-1 per depth) reaches every depth from one forward."""
    drafter = init_parallel(tiny, cfg, ParallelConfig(depths=depths), seed=3)
    prop = ParallelProposer(drafter, topk=1)
    calls = []
    hook = prop.drafter.midlayer.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    try:
        seqs = [prefilled(prop, tiny, i, c) for i, c in enumerate(greedy_continuations(tiny, PROMPTS[:3], 5))]
        trees = prop.propose(seqs, {0: 16, 1: 16, 2: 16})
    finally:
        hook.remove()
    assert len(calls) == 1 and prop.stats.forwards == 1
    assert len(trees) == 3 and all(t.is_chain() and t.num_draft == depths for t in trees.values())


def test_only_the_depth_rows_run_the_layer_and_a_small_budget_computes_fewer_depths(tiny, trained) -> None:
    """Context rows give keys and values only: the query, MLP and lm_head see the depth rows alone, and a
    budget of b nodes (a tree at most b deep) computes only min(depths, b) of them. The outputs are those of
    the full forward (same logits for the depths computed, same cache rows)."""
    prop = ParallelProposer(trained, topk=1)
    full = greedy_continuations(tiny, [PROMPTS[0], PROMPTS[2]], 8)
    seqs = [prefilled(prop, tiny, i, c[:-3]) for i, c in enumerate(full)]
    with torch.no_grad():
        prop.propose(seqs, {0: 8, 1: 8})
        for s, c in zip(seqs, full):                       # three committed tokens: three context rows
            for _ in range(3):
                commit_one(prop, tiny, s, c[len(s.tokens)])
        rows_seen = []
        hook = trained.midlayer.mlp.gate_proj.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
        try:
            small = trained.draft_parallel(prop.parallel_input(active_rows(prop, seqs, budget=2)))
            big = trained.draft_parallel(prop.parallel_input(active_rows(prop, seqs, budget=16)))
        finally:
            hook.remove()
    assert small.logits.shape[1] == 2 and big.logits.shape[1] == DEPTHS
    assert rows_seen[0] <= 2 * 2 < rows_seen[1] <= 2 * DEPTHS < 2 * (3 + DEPTHS - 1)
    torch.testing.assert_close(small.logits, big.logits[:, :2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(small.k[:, :, :3], big.k[:, :, :3], atol=1e-5, rtol=1e-5)
    trees = prop.propose(seqs, {0: 2, 1: 2})
    assert all(t.num_draft == 2 and t.is_chain() for t in trees.values())


def test_swap_takes_the_new_drafters_depths_and_rebuilds_the_cache(tiny, cfg, trained) -> None:
    prop = ParallelProposer(trained, topk=1)
    seq = prefilled(prop, tiny, 0, greedy_continuations(tiny, [PROMPTS[2]], 4)[0])
    assert prop.propose([seq], {0: 16})[0].num_draft == DEPTHS
    other = init_parallel(tiny, cfg, ParallelConfig(depths=6), seed=9)
    prop.swap(other)
    assert isinstance(prop.drafter, ParallelDrafter) and prop.states[0].n_kv == 0
    tree = prop.propose([seq], {0: 16})[0]
    assert tree.num_draft == 6 and prop.stats.forwards == 2 and prop.stats.swaps == 1


def test_tree_is_the_best_nodes_by_product_of_probabilities() -> None:
    lp = [[math.log(0.6), math.log(0.3)], [math.log(0.9), math.log(0.05)], [math.log(0.5), math.log(0.4)]]
    tok = [[10, 11], [20, 21], [30, 31]]
    full = tree_from_depths(1, lp, tok, budget=100)
    assert full.num_draft == 2 + 4 + 8 and full.source == "parallel" and not full.child_dists
    paths = full.path_scores()
    best = tree_from_depths(1, lp, tok, budget=5)
    kept = sorted(paths[1:], reverse=True)[:5]
    assert sorted(best.path_scores()[1:], reverse=True) == pytest.approx(kept)
    # Chain first: 0.6, 0.54, 0.3, 0.27 (0.6 * 0.9 * 0.5), 0.27 (0.3 * 0.9).
    assert best.tokens[:4] == [1, 10, 20, 11] and best.parents[:4] == [-1, 0, 1, 0]
    for i in range(1, len(best)):
        assert best.parents[i] < i
        assert best.scores[i] == pytest.approx(math.exp(lp[best.depths()[i] - 1][tok[best.depths()[i] - 1]
                                                                                 .index(best.tokens[i])]))
    assert tree_from_depths(1, lp, tok, budget=0).num_draft == 0


# ------------------------------------------------------------------------------------------------
# through the engine: lossless
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("batch, topk", [(1, 1), (3, 1), (1, 4), (3, 4)], ids=["chain-1", "chain-3", "tree-1",
                                                                              "tree-3"])
def test_greedy_speculative_equals_plain_greedy(tiny, cfg, trained, which, batch, topk) -> None:
    prompts = PROMPTS[:batch]
    plain, _ = run_engine(tiny, prompts, greedy, None)
    drafter = trained if which == "trained" else init_parallel(tiny, cfg, ParallelConfig(depths=DEPTHS), seed=11)
    out, eng = run_engine(tiny, prompts, greedy, drafter, topk=topk)
    assert out == plain
    c = eng.counters
    assert c.drafted > 0 and c.by_strategy.get("parallel", [0])[0] > 0
    prop = eng.spec.proposers["parallel"]
    assert prop.stats.forwards == prop.stats.proposals          # one forward per proposal
    if which == "trained":  # trained on this traffic: drafts get accepted, past depth 1 too
        assert c.accepted / c.decode_steps_seq > 1.0, (c.accepted, c.decode_steps_seq)


@pytest.mark.skipif(compiled_kernel() is None, reason="onspec's kernels cannot run on this CPU")
def test_tiny_model_bf16_batched_parallel_equals_plain_alone(tiny_llama, cfg) -> None:
    lm = load_model(str(tiny_llama), "bfloat16")
    prompts = [[5, 9, 14, 9, 5, 9, 14, 9, 5, 9], [17, 3, 3, 8, 120, 7, 7], list(range(3, 40))]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = outputs(bf16_engine(lm, "off", prefix_reuse=False), prompts, params, batched=False)
    spec = SpecConfig(mode="parallel", profile_at_start=False, objective="throughput")
    eng = Engine(EngineConfig(model=str(lm.path), dtype="bfloat16", num_threads=1, max_num_seqs=4,
                              max_model_len=1024, spec=spec), loaded=lm)
    drafter = init_parallel(lm, cfg, ParallelConfig(depths=DEPTHS), seed=0)
    force_all_drafts(attach_parallel(eng, spec, drafter))
    assert eng.spec.proposers["parallel"].drafter.dtype == torch.bfloat16
    assert outputs(eng, prompts, params, batched=True) == plain and eng.counters.drafted > 0


def test_sampled_distribution_is_the_targets(small_vocab, monkeypatch) -> None:
    """The first three sampled tokens (temperature 1) over 3000 seeded requests against the exact tables,
    with every proposal a parallel drafter's tree (point masses: accepted or rejected, bonus tokens)."""
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0)
    exact = exact_triples(target_tables(small_vocab, params))
    shape = EagleConfig.for_target(small_vocab.arch, draft_vocab_size=SMALL_V)
    prop = ParallelProposer(init_parallel(small_vocab, shape, ParallelConfig(depths=3), seed=4), topk=3)

    def attach(engine, spec_cfg, extra=None):  # the proposer knows its engine (prefix reuse serves it)
        spec = attach_speculation(engine, spec_cfg, extra)
        prop.attach(engine)
        return spec

    monkeypatch.setattr(test_speculation, "attach_speculation", attach)
    counts, eng = sampled_triples(small_vocab, params, prop, 3000)
    assert eng.counters.drafted >= 3 * 3000 and 0 < eng.counters.accepted < eng.counters.drafted
    assert prop.stats.forwards == prop.stats.proposals > 0
    pv = triple_pvalues(counts, exact)
    assert min(pv.values()) > 1e-3, pv
    # The test has power: the same counts reject a somewhat different sampler (temperature 1.5).
    other = exact_triples(target_tables(small_vocab, SamplingParams(max_tokens=3, ignore_eos=True,
                                                                    temperature=1.5)))
    assert min(triple_pvalues(counts, other).values()) < 1e-3


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def test_loss_of_every_depth_falls_on_a_fixed_batch(tiny, cfg) -> None:
    drafter = init_parallel(tiny, cfg, ParallelConfig(depths=DEPTHS), seed=2)
    batch = training_batch(tiny, drafter, n_tokens=24)
    tcfg = TrainerConfig(lr=5e-3, weight_decay=0.0, discard_weight=0.3)
    params = trainable_parameters(drafter, train_head=False)
    assert any(p is drafter.mask_hidden for p in params)
    opt = make_optimizer(params, tcfg)
    mask_before = drafter.mask_hidden.detach().clone()
    reports = [train_step(drafter, batch, opt, params, tcfg) for _ in range(12)]
    first, last = reports[0], reports[-1]
    assert len(first.kl_depths) == DEPTHS and first.branches > 0 and first.discard > 0
    assert last.loss < 0.7 * first.loss, [r.loss for r in reports]
    assert all(b < a for a, b in zip(first.kl_depths, last.kl_depths)), (first.kl_depths, last.kl_depths)
    assert not torch.equal(drafter.mask_hidden.detach(), mask_before)   # the placeholder is learned


def test_acceptance_by_depth_counts_the_chains_leading_matches(tiny, trained) -> None:
    """``accepted_by_depth`` (what the bench reports): roots whose first d drafts were all accepted, never
    more at a greater depth, and their sum is the simulated acceptance the promotion gate uses."""
    batch = training_batch(tiny, trained, n_tokens=24)
    by_depth, roots = accepted_by_depth(trained, batch, DEPTHS)
    assert len(by_depth) == DEPTHS and roots > 0 and by_depth[0] > 0
    assert all(b <= a for a, b in zip(by_depth, by_depth[1:]))
    length, n = simulated_acceptance(trained, batch.samples, DEPTHS)
    assert n == roots and length == pytest.approx(1 + sum(by_depth) / roots)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_the_fields_loaders_read(tmp_path, tiny, cfg, trained) -> None:
    out = save_parallel(tmp_path / "ckpt", trained)
    raw = json.loads((out / "config.json").read_text())
    # vLLM's Eagle3LlamaForCausalLM / EAGLE proposer and speculators' P-EAGLE config read these.
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and raw["num_hidden_layers"] == 1
    assert raw["parallel_drafting"] is True and raw["para_depths"] == DEPTHS
    assert raw["pard_token"] == raw["ptd_token_id"] == raw["mask_token_id"] == trained.parallel.mask_token_id
    assert set(PARALLEL_CONFIG_KEYS) <= set(raw)
    for key in ("vocab_size", "draft_vocab_size", "hidden_size", "target_hidden_size", "intermediate_size",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta"):
        assert key in raw, key
    assert raw["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": list(cfg.aux_layers),
                                   "use_aux_hidden_state": True}
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["mask_hidden"].shape == (1, 3 * cfg.target_hidden_size)      # vLLM's buffer shape
    assert {"fc.weight", "lm_head.weight", "d2t", "t2d", "midlayer.self_attn.q_proj.weight"} < set(tensors)
    loaded = load_parallel(out, tiny)
    assert loaded.parallel == trained.parallel
    ctx = greedy_continuations(tiny, [PROMPTS[2]], 5)[0]
    _, aux = target_pass(tiny, ctx, cfg.aux_layers)
    with torch.no_grad():
        a = trained.forward_train(aux[None], torch.tensor([ctx]), ttt_steps=DEPTHS)
        b = loaded.forward_train(aux[None], torch.tensor([ctx]), ttt_steps=DEPTHS)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert load_parallel(save_parallel(tmp_path / "bf", trained.to_dtype(torch.bfloat16)), tiny).dtype == torch.bfloat16
    # A parallel checkpoint is not a sequential EAGLE-3 one: load_eagle3 names the extra tensor.
    with pytest.raises(DrafterLoadError, match="mask_hidden"):
        load_eagle3(out, tiny)


def test_corrupt_checkpoints_are_rejected_with_clear_errors(tmp_path, tiny, cfg) -> None:
    good = save_parallel(tmp_path / "good", init_parallel(tiny, cfg, ParallelConfig(depths=3)))
    assert load_parallel(good, tiny).parallel.depths == 3

    def drop_tokens(c):
        for k in ("pard_token", "ptd_token_id", "mask_token_id"):
            c.pop(k)

    cases = [
        (_corrupt(tmp_path, good, "nomask", edit_state=lambda s: s.pop("mask_hidden")), "no mask_hidden"),
        (_corrupt(tmp_path, good, "nan", edit_state=lambda s: s["mask_hidden"].fill_(float("nan"))), "NaN"),
        (_corrupt(tmp_path, good, "shape", edit_state=lambda s: s.update(mask_hidden=torch.zeros(1, 5))),
         "mask_hidden has shape"),
        (_corrupt(tmp_path, good, "notoken", edit_cfg=drop_tokens), "names no mask token"),
        (_corrupt(tmp_path, good, "bigtoken", edit_cfg=lambda c: c.update(pard_token=10 ** 6)), "mask_token_id"),
        (_corrupt(tmp_path, good, "depths", edit_cfg=lambda c: c.update(para_depths=0)), "depths"),
        (_corrupt(tmp_path, good, "strdepth", edit_cfg=lambda c: c.update(para_depths="4")), "integers"),
        (_corrupt(tmp_path, good, "trunc", raw_bytes=(good / "model.safetensors").read_bytes()[:100]),
         "corrupt safetensors"),
        (_corrupt(tmp_path, good, "fc", edit_state=lambda s: s.pop("fc.weight")), "missing \\['fc.weight'\\]"),
    ]
    for path, message in cases:
        with pytest.raises(DrafterLoadError, match=message):
            load_parallel(path, tiny)


def test_export_speculator_writes_a_parallel_drafter(tmp_path, tiny_llama, tiny, cfg) -> None:
    """``onspec export-speculator --parallel K``: a version's EAGLE-3 head as a parallel drafter (its layers,
    a fresh mask vector); with no versions, a day-0 head; ``load_parallel`` reads both."""
    from onspec.cli import main

    root = tmp_path / "versions"
    head = init_drafter(tiny, cfg, seed=8)
    publish_version(root, head, Manifest(version=0, parent=None, kind="initial"))
    common = ["export-speculator", "--model", str(tiny_llama), "--dtype", "float32"]
    assert main([*common, "--speculator-dir", str(root), "--out", str(tmp_path / "o1"), "--parallel", "3"]) == 0
    drafter = load_parallel(tmp_path / "o1", tiny)
    assert drafter.parallel.depths == 3
    for name, t in head.state_dict().items():
        assert torch.equal(drafter.state_dict()[name], t), name
    assert main([*common, "--speculator-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o2"),
                 "--parallel", "2"]) == 0
    assert load_parallel(tmp_path / "o2", tiny).parallel.depths == 2
    assert main([*common, "--speculator-dir", str(root), "--out", str(tmp_path / "o3"), "--parallel", "2",
                 "--version", "7"]) == 2                           # a clear error, not a stack trace
