"""Tests for the EAGLE-3 drafter (onspec.speculation.eagle_model) and its proposer (onspec.speculation.eagle).

Model: config and vocabulary maps; the training-time-test unroll equals what inference computes when it
drafts a chain (so TTT really feeds the drafter its own outputs); a KL loss falls; EAGLE-3 checkpoints
round-trip and bad ones are rejected with messages naming the problem.
Proposer: trees are valid and batching/swapping do not change them; through the engine, greedy output
equals plain greedy output with a random and with a trained drafter, and sampled output has the target's
distribution (chi-square at a fixed seed, as tests/test_verify.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import chisq_pvalue
from onspec.config import ConfigError, EngineConfig, SpecConfig
from onspec.engine.engine import Engine
from onspec.engine.kv_cache import KVCache
from onspec.engine.runner import ModelRunner, RowSpec
from onspec.engine.sampler import SamplingParams, process_logits
from onspec.engine.step import Prefill, StepResult
from onspec.models.loader import load_model
from onspec.speculation.controller import Plan
from onspec.speculation.eagle import (
    DrafterLoadError,
    EagleConfig,
    EagleDrafter,
    EagleProposer,
    HybridProposer,
    attach_learned,
    build_vocab_maps,
    chain_acceptance,
    day0_token_counts,
    default_aux_layers,
    expected_shapes,
    init_drafter,
    load_eagle3,
    merge_trees,
    save_eagle3,
    ttt_loss,
    ttt_valid_mask,
)
from onspec.speculation.tree import DraftTree

PROMPTS = [[5, 17, 99, 3, 250, 41], [300, 12, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [77, 77, 78, 400]]


# ------------------------------------------------------------------------------------------------
# helpers and fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(str(tiny_llama), dtype="float32")


@pytest.fixture(scope="module")
def cfg(tiny) -> EagleConfig:
    return EagleConfig.for_target(tiny.arch, draft_vocab_size=200)


def target_pass(lm, ids: list[int], aux_layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits [L, V] and aux states [L, 3H] of one sequence (a scratch cache)."""
    runner = ModelRunner(lm.model, KVCache(lm.arch, 1, len(ids) + 4, torch.float32))
    runner.aux_layers = aux_layers
    out = runner.run([RowSpec(0, 0, ids, logits_from=0)], want_aux=True)
    return out.logits[0], out.aux[0]


def greedy_continuations(lm, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs, _ = run_engine(lm, prompts, lambda i: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                         None)
    return [list(p) + o for p, o in zip(prompts, outs)]


def greedy_continuation(lm, prompt: list[int], n: int) -> list[int]:
    return greedy_continuations(lm, [prompt], n)[0]


def make_batch(lm, cfg: EagleConfig, seqs: list[list[int]]):
    """Right-padded training batch: aux [B, L, 3H], ids [B, L], lengths [B], target probs [B, L, V]."""
    L = max(len(s) for s in seqs)
    B = len(seqs)
    aux = torch.zeros(B, L, 3 * cfg.target_hidden_size)
    ids = torch.zeros(B, L, dtype=torch.long)
    probs = torch.zeros(B, L, cfg.vocab_size)
    for b, s in enumerate(seqs):
        logits, a = target_pass(lm, s, cfg.aux_layers)
        aux[b, :len(s)] = a
        ids[b, :len(s)] = torch.tensor(s)
        probs[b, :len(s)] = torch.softmax(logits, -1)
    return aux, ids, torch.tensor([len(s) for s in seqs]), probs


def train(drafter: EagleDrafter, batch, steps: int, lr: float = 3e-3, ttt: int = 3) -> list[float]:
    aux, ids, lengths, probs = batch
    target = drafter.target_to_draft_probs(probs)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = ttt_loss(drafter.forward_train(aux, ids, lengths=lengths, ttt_steps=ttt), target, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def trained(tiny, cfg) -> EagleDrafter:
    return make_trained(tiny, cfg)


def make_trained(tiny, cfg: EagleConfig) -> EagleDrafter:
    """A drafter trained briefly on the tiny target's own greedy continuations of the test prompts (the
    traffic it then drafts for, as online learning would see it)."""
    seqs = greedy_continuations(tiny, PROMPTS, 40)
    # Draft vocabulary from the traffic seen (the tiny target's tokens spread over all 512 ids).
    counts = day0_token_counts(cfg.vocab_size, seen_token_ids=[t for s in seqs for t in s],
                               always_include=tuple(tiny.eos_token_ids))
    drafter = init_drafter(tiny, cfg, seed=1, token_counts=counts)
    drafter.requires_grad_(True)
    train(drafter, make_batch(tiny, cfg, seqs), steps=60, lr=1e-2)
    return drafter.eval().requires_grad_(False)


def force_all_drafts(spec) -> None:
    """Verify every proposed node: the controller's cost rule would prune a weak drafter's trees away,
    and these tests are about correctness when drafts ARE verified."""
    spec.controller.plan = lambda trees, base, nd, remaining=None: Plan(trees, sum(t.num_draft for t in trees.values()), 0.0, 0.0)
    spec.controller.worth_drafting = lambda *args, **kwargs: True
    spec.policy.price = lambda *args, **kwargs: None  # full-depth trees (cost-aware depth is tested apart)


def run_engine(lm, prompts, params_fn, drafter: EagleDrafter | None, mode: str = "learned", max_seqs: int = 8,
               budget: int = 8, confident: float = 1.0):
    spec_cfg = SpecConfig(mode=mode, max_draft_tokens=budget, profile_at_start=False,
                          hybrid_suffix_confident=confident)
    eng = Engine(EngineConfig(model="tiny", dtype="float32", max_num_seqs=max_seqs, max_model_len=256,
                              spec=spec_cfg), loaded=lm)
    if drafter is not None:
        force_all_drafts(attach_learned(eng, spec_cfg, drafter))
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params_fn(i))
    while eng.has_unfinished():
        eng.step()
    return [eng.requests[str(i)][0].output_ids for i in range(len(prompts))], eng


# ------------------------------------------------------------------------------------------------
# config and vocabulary
# ------------------------------------------------------------------------------------------------


def test_config_for_target_and_validation(tiny) -> None:
    assert default_aux_layers(30) == (2, 15, 27)          # SmolLM2-135M, EAGLE-3's choice
    assert default_aux_layers(32) == (2, 16, 29)
    for n in range(2, 40):
        a = default_aux_layers(n)
        assert len(a) == 3 and 0 <= a[0] < a[1] < a[2] <= n
    with pytest.raises(ConfigError):
        default_aux_layers(1)
    c = EagleConfig.for_target(tiny.arch, draft_vocab_size=100000)
    assert c.draft_vocab_size == tiny.arch.vocab_size and c.hidden_size == c.target_hidden_size == 64
    assert c.aux_layers == (0, 1, 2)
    for bad in [dict(aux_layers=(2, 1, 0)), dict(aux_layers=(0, 1)), dict(aux_layers=(0, 1, 4)),
                dict(draft_vocab_size=513), dict(num_kv_heads=3)]:
        with pytest.raises(ConfigError):
            EagleConfig(**{**c.__dict__, **bad})


def test_build_vocab_maps() -> None:
    counts = torch.tensor([5.0, 0.0, 9.0, 5.0, 1.0, 7.0])
    d2t, t2d = build_vocab_maps(counts, 4)
    ids = torch.arange(4) + d2t
    assert ids.tolist() == [0, 2, 3, 5]                  # top 4 by count; the tie 0/3 vs 4 resolved by count
    assert t2d.tolist() == [True, False, True, True, False, True]
    d2t, _ = build_vocab_maps(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2)
    assert (torch.arange(2) + d2t).tolist() == [1, 2]    # ties: lower id first
    for bad in [(torch.tensor([1.0, -1.0]), 1), (torch.tensor([1.0, 2.0]), 3), (torch.ones(2, 2), 1)]:
        with pytest.raises(ValueError):
            build_vocab_maps(*bad)


def test_day0_counts_rank_seen_tokens_and_eos_first() -> None:
    counts = day0_token_counts(50, seen_token_ids=[40, 41, 40], always_include=(49,))
    d2t, t2d = build_vocab_maps(counts, 5)
    assert set((torch.arange(5) + d2t).tolist()) == {49, 40, 41, 0, 1}   # forced, seen, then lowest ids


def test_init_drafter_warm_start(tiny, cfg) -> None:
    d = init_drafter(tiny, cfg, seed=0)
    assert torch.equal(d.lm_head.weight, tiny.model.lm_head.weight[d.draft_ids])
    assert torch.equal(d.norm.weight, tiny.model.norm.weight)
    assert set(tiny.eos_token_ids) <= set(d.draft_ids.tolist())
    assert "embed_tokens.weight" not in d.state_dict() and all(p is not d.embed_weight for p in d.parameters())
    assert d.embed_weight.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()   # shared, not copied
    assert torch.equal(init_drafter(tiny, cfg, seed=0).fc.weight, d.fc.weight)
    assert not torch.equal(init_drafter(tiny, cfg, seed=1).fc.weight, d.fc.weight)


def test_target_to_draft_probs(tiny, cfg) -> None:
    d = init_drafter(tiny, cfg)
    p = torch.softmax(torch.randn(3, cfg.vocab_size), -1)
    q = d.target_to_draft_probs(p)
    assert q.shape == (3, cfg.draft_vocab_size)
    assert torch.allclose(q.sum(-1), torch.ones(3))
    assert torch.allclose(q, p[:, d.draft_ids] / p[:, d.draft_ids].sum(-1, keepdim=True))
    assert torch.equal(d.target_to_draft_probs(p, renormalize=False), p[:, d.draft_ids])
    with pytest.raises(ValueError):
        d.target_to_draft_probs(p[:, :10])


# ------------------------------------------------------------------------------------------------
# training-time test
# ------------------------------------------------------------------------------------------------


def inference_chain(d: EagleDrafter, aux: torch.Tensor, ids: torch.Tensor, t: int, steps: int) -> list[torch.Tensor]:
    """What drafting computes after real position t: catch up positions 1..t with the target's aux, then
    draft a chain fed with the data's tokens ids[t+1..] and the drafter's own prenorm outputs."""
    pos = torch.arange(1, t + 1)
    prenorm, k, v = d.draft_step(ids[None, 1:t + 1], d.project(aux[None, :t]), pos[None])
    h = prenorm[:, -1:]
    out = [d.logits(h)[0, 0]]
    for i in range(1, steps):
        h, k_new, v_new = d.draft_step(ids[None, t + i:t + i + 1], h, torch.tensor([[t + i]]), k, v)
        k, v = torch.cat((k, k_new), 2), torch.cat((v, v_new), 2)
        out.append(d.logits(h)[0, 0])
    return out


def test_forward_train_alignment_matches_inference_and_uses_own_outputs(tiny, cfg) -> None:
    torch.manual_seed(0)
    d = init_drafter(tiny, cfg, seed=3)
    with torch.no_grad():  # a drafter whose outputs depend strongly on its inputs
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    seqs = [greedy_continuation(tiny, PROMPTS[0], 10), greedy_continuation(tiny, PROMPTS[1], 5)]
    aux, ids, lengths, _ = make_batch(tiny, cfg, seqs)
    steps = 3
    with torch.no_grad():
        logits = d.forward_train(aux, ids, lengths=lengths, ttt_steps=steps)
    B, L = ids.shape
    assert len(logits) == steps and all(lg.shape == (B, L, cfg.draft_vocab_size) for lg in logits)
    mask = ttt_valid_mask(lengths, L, 2)
    assert mask[1].tolist() == [False] + [True] * (len(seqs[1]) - 3) + [False] * (L - len(seqs[1]) + 2)
    with torch.no_grad():
        for b in range(B):
            n = int(lengths[b])
            for t in (1, n // 2, n - steps):
                ref = inference_chain(d, aux[b], ids[b], t, steps)
                for i in range(steps):   # logits_i[:, t] is the drafter's i-th drafted step after real t
                    assert torch.allclose(logits[i][b, t], ref[i], atol=1e-4), (b, t, i)
        # The unroll must feed the drafter its own outputs: with the target's features at step 1 instead
        # (what a teacher-forced-only trainer would do) the logits differ.
        t = 4
        pos = torch.arange(1, t + 2)
        feats = d.project(aux[0, :t + 1])[None]
        teacher, _, _ = d.draft_step(ids[None, 0, 1:t + 2], feats, pos[None])
        assert not torch.allclose(d.logits(teacher[0, -1]), logits[1][0, t], atol=1e-2)


def test_ttt_loss_falls_on_fixed_batch(tiny, cfg) -> None:
    seqs = greedy_continuations(tiny, PROMPTS[:2], 20)
    batch = make_batch(tiny, cfg, seqs)
    d = init_drafter(tiny, cfg, seed=0).requires_grad_(True)
    losses = train(d, batch, steps=30)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses
    # Gradients reach fc through every unroll step, and the shared embeddings stay out of training.
    assert d.embed_weight.grad is None and not d.embed_weight.requires_grad


def test_ttt_loss_is_zero_for_a_perfect_drafter(tiny, cfg) -> None:
    d = init_drafter(tiny, cfg)
    aux, ids, lengths, probs = make_batch(tiny, cfg, [PROMPTS[0]])
    target = d.target_to_draft_probs(probs)
    L = ids.shape[1]
    # Logits equal to the (shifted) target distribution: KL 0 at every valid position of every step.
    logits = [torch.log(torch.cat((target[:, i:], target[:, :i]), 1).clamp_min(1e-30)) for i in range(3)]
    assert float(ttt_loss(logits, target, lengths)) == pytest.approx(0.0, abs=1e-5)
    assert float(ttt_loss([torch.zeros(1, L, cfg.draft_vocab_size)], target, lengths)) > 0.1


def test_chain_acceptance_counts_leading_matches(tiny) -> None:
    cfg = EagleConfig.for_target(tiny.arch, draft_vocab_size=512)
    d = init_drafter(tiny, cfg)
    assert torch.equal(d.draft_ids, torch.arange(512))   # full vocabulary: draft id == target id
    L = 12
    nxt = torch.randint(0, 512, (1, L), generator=torch.Generator().manual_seed(0))
    hit = [torch.nn.functional.one_hot(torch.cat((nxt[:, i:], nxt[:, :i]), 1), 512).float() for i in range(3)]
    miss = torch.nn.functional.one_hot((nxt + 1) % 512, 512).float()
    lengths = torch.tensor([L])
    assert chain_acceptance(d, [hit[0], miss, hit[2]], nxt, lengths) == pytest.approx(2.0)
    assert chain_acceptance(d, hit, nxt, lengths) == pytest.approx(4.0)
    assert chain_acceptance(d, [miss, hit[1]], nxt, lengths) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_layout(tmp_path, tiny, cfg, trained) -> None:
    out = save_eagle3(tmp_path / "ckpt", trained)
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLMEagle3"] and raw["model_type"] == "llama"
    assert raw["num_hidden_layers"] == 1 and raw["tie_word_embeddings"] is False
    for key, value in [("vocab_size", 512), ("draft_vocab_size", 200), ("hidden_size", 64),
                       ("target_hidden_size", 64), ("intermediate_size", 128), ("num_attention_heads", 4),
                       ("num_key_value_heads", 2), ("head_dim", 16), ("max_position_embeddings", 512)]:
        assert raw[key] == value, key
    assert raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == list(cfg.aux_layers)
    for key in ("rms_norm_eps", "rope_theta"):
        assert key in raw
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == {
        "fc.weight", "midlayer.self_attn.q_proj.weight", "midlayer.self_attn.k_proj.weight",
        "midlayer.self_attn.v_proj.weight", "midlayer.self_attn.o_proj.weight", "midlayer.mlp.gate_proj.weight",
        "midlayer.mlp.up_proj.weight", "midlayer.mlp.down_proj.weight", "midlayer.input_layernorm.weight",
        "midlayer.hidden_norm.weight", "midlayer.post_attention_layernorm.weight", "norm.weight",
        "lm_head.weight", "d2t", "t2d"}
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert tensors["midlayer.self_attn.q_proj.weight"].shape == (64, 128)      # q/k/v take 2 x hidden
    loaded = load_eagle3(out, tiny)
    aux, ids, lengths, _ = make_batch(tiny, cfg, [PROMPTS[2]])
    with torch.no_grad():
        a = trained.forward_train(aux, ids, lengths=lengths, ttt_steps=2)
        b = loaded.forward_train(aux, ids, lengths=lengths, ttt_steps=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert loaded.embed_weight.data_ptr() == tiny.model.embed_tokens.weight.data_ptr()
    # SGLang reads the aux ids as "output of layer i"; the sglang export writes ids it maps back to ours.
    sg = save_eagle3(tmp_path / "sg", trained, layer_id_convention="sglang")
    raw_sg = json.loads((sg / "config.json").read_text())
    assert [i + 1 for i in raw_sg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]] == list(cfg.aux_layers)
    assert load_eagle3(sg, tiny).cfg.aux_layers == cfg.aux_layers
    # bf16 checkpoints load too (the dtype is the file's unless asked).
    assert load_eagle3(save_eagle3(tmp_path / "bf", trained.to_dtype(torch.bfloat16)), tiny).dtype == torch.bfloat16


def _corrupt(tmp_path: Path, good: Path, name: str, edit_cfg=None, edit_state=None, raw_bytes=None) -> Path:
    d = tmp_path / name
    d.mkdir()
    cfg_json = json.loads((good / "config.json").read_text())
    if edit_cfg:
        edit_cfg(cfg_json)
    (d / "config.json").write_text(json.dumps(cfg_json))
    if raw_bytes is not None:
        (d / "model.safetensors").write_bytes(raw_bytes)
    else:
        state = load_file(str(good / "model.safetensors"))
        if edit_state:
            edit_state(state)
        save_file(state, str(d / "model.safetensors"))
    return d


def test_bad_checkpoints_are_rejected_with_clear_errors(tmp_path, tiny, cfg) -> None:
    good = save_eagle3(tmp_path / "good", init_drafter(tiny, cfg))
    load_eagle3(good, tiny)
    weights = (good / "model.safetensors").read_bytes()

    def setitem(k, v):
        return lambda s: s.__setitem__(k, v)

    cases = [
        (tmp_path / "nowhere", "not found"),
        (_corrupt(tmp_path, good, "truncated", raw_bytes=weights[: len(weights) // 2]), "corrupt"),
        (_corrupt(tmp_path, good, "garbage", raw_bytes=b"\x00" * 64), "corrupt"),
        (_corrupt(tmp_path, good, "vocab", edit_cfg=setitem("vocab_size", 1000)), "vocab_size"),
        (_corrupt(tmp_path, good, "hidden", edit_cfg=setitem("target_hidden_size", 32)), "target_hidden_size"),
        (_corrupt(tmp_path, good, "arch", edit_cfg=setitem("architectures", ["BertModel"])), "architectures"),
        (_corrupt(tmp_path, good, "nokey", edit_cfg=lambda c: c.pop("intermediate_size")), "intermediate_size"),
        (_corrupt(tmp_path, good, "aux", edit_cfg=setitem("onspec_aux_layers", [0, 1, 9])), "aux_layers"),
        (_corrupt(tmp_path, good, "shape", edit_state=setitem("fc.weight", torch.zeros(64, 190))), "fc.weight"),
        (_corrupt(tmp_path, good, "missing", edit_state=lambda s: s.pop("norm.weight")), "norm.weight"),
        (_corrupt(tmp_path, good, "extra", edit_state=setitem("midlayer.foo", torch.zeros(2))), "midlayer.foo"),
        (_corrupt(tmp_path, good, "nan", edit_state=lambda s: s["lm_head.weight"].__setitem__((0, 0), float("nan"))),
         "NaN"),
        (_corrupt(tmp_path, good, "d2t_range", edit_state=lambda s: s["d2t"].__setitem__(199, 400)), "d2t"),
        (_corrupt(tmp_path, good, "d2t_dup", edit_state=lambda s: s["d2t"].__setitem__(5, s["d2t"][4] - 1)),
         "same target"),
        (_corrupt(tmp_path, good, "t2d", edit_state=lambda s: s["t2d"].__setitem__(511, not bool(s["t2d"][511]))),
         "t2d"),
    ]
    for path, needle in cases:
        with pytest.raises(DrafterLoadError, match=needle):
            load_eagle3(path, tiny)
    no_cfg = tmp_path / "nocfg"
    no_cfg.mkdir()
    (no_cfg / "model.safetensors").write_bytes(weights)
    with pytest.raises(DrafterLoadError, match="config.json"):
        load_eagle3(no_cfg, tiny)
    (no_cfg / "config.json").write_text("{not json")
    with pytest.raises(DrafterLoadError, match="JSON"):
        load_eagle3(no_cfg, tiny)
    no_w = _corrupt(tmp_path, good, "now")
    (no_w / "model.safetensors").unlink()
    with pytest.raises(DrafterLoadError, match="model.safetensors"):
        load_eagle3(no_w, tiny)


def test_expected_shapes_cover_the_state(tiny, cfg) -> None:
    d = init_drafter(tiny, cfg)
    assert {k: tuple(v.shape) for k, v in d.state_dict().items()} == expected_shapes(cfg)


# ------------------------------------------------------------------------------------------------
# proposer
# ------------------------------------------------------------------------------------------------


class FakeSeq:
    def __init__(self, seq_id: int, tokens: list[int]) -> None:
        self.seq_id, self.tokens, self.cache_len = seq_id, list(tokens), 0
        self.slot, self.siblings = -1, None


def prefilled(proposer: EagleProposer, lm, seq_id: int, tokens: list[int]) -> FakeSeq:
    """A sequence whose context tokens[:-1] the target has processed (aux observed); tokens[-1] is the root."""
    seq = FakeSeq(seq_id, tokens)
    proposer.add_request(seq)
    _, aux = target_pass(lm, tokens[:-1], proposer.drafter.cfg.aux_layers)
    seq.cache_len = len(tokens) - 1
    proposer.on_prefill(Prefill(seq, len(tokens) - 1, "computed", aux))
    return seq


def check_tree(tree: DraftTree, root: int, budget: int, max_depth: int) -> None:
    assert tree.tokens[0] == root and tree.source == "learned"
    assert 1 <= tree.num_draft <= budget
    assert max(tree.depths()) <= max_depth
    assert all(0 < s <= 1 for s in tree.scores)
    for i in range(len(tree)):
        kids = [tree.tokens[c] for c in tree.children(i)]
        assert len(kids) == len(set(kids))                    # distinct siblings
    assert not tree.child_dists                               # point masses: lossless for any drafter


def test_propose_tree_is_valid_and_follows_the_drafter(tiny, trained) -> None:
    prop = EagleProposer(trained, topk=4, max_depth=5)
    ctx = greedy_continuation(tiny, PROMPTS[0], 12)
    seq = prefilled(prop, tiny, 0, ctx)
    tree = prop.propose([seq], {0: 12})[0]
    check_tree(tree, ctx[-1], 12, 5)
    # The first child is the drafter's most likely next token; its conditional probability is the score.
    ref = inference_chain(trained, target_pass(tiny, ctx[:-1], trained.cfg.aux_layers)[1],
                          torch.tensor(ctx + [0] * 8), len(ctx) - 1, 1)[0]
    q = torch.softmax(ref.float(), -1)
    best = int(q.argmax())
    first = tree.children(0)
    top = max(first, key=lambda c: tree.scores[c])
    assert tree.tokens[top] == int(trained.draft_ids[best])
    assert tree.scores[top] == pytest.approx(float(q[best]), rel=1e-4)
    # Nodes are the highest cumulative probabilities among everything the expansion produced: with a
    # budget of 1 only the best child survives.
    assert prop.propose([seq], {0: 1})[0].tokens == [ctx[-1], tree.tokens[top]]
    assert prop.propose([seq], {0: 0}) == {}


def test_an_unconfident_drafter_stops_growing_its_tree_early(tiny, cfg) -> None:
    """A random head is near-uniform over the (here tiny) draft vocabulary: with a cut-off above its
    probabilities its tree stops after the root's children (no forward for depth 2+), while with the
    cut-off disabled the same head pays for every depth."""
    ctx = greedy_continuation(tiny, PROMPTS[0], 12)
    forwards = {}
    for cut in (0.3, 0.0):
        prop = EagleProposer(init_drafter(tiny, cfg, seed=3), topk=3, max_depth=5, min_path_prob=cut)
        seq = prefilled(prop, tiny, 0, ctx)
        before = prop.stats.forwards
        tree = prop.propose([seq], {0: 12})[0]
        forwards[cut] = prop.stats.forwards - before
        if cut:
            assert max(tree.depths()) == 1
    assert forwards[0.3] < forwards[0.0]
    # a path probability above the cut-off keeps growing (the head's best two-token paths are ~0.01)
    prop = EagleProposer(init_drafter(tiny, cfg, seed=3), topk=3, max_depth=5, min_path_prob=0.002)
    assert max(prop.propose([prefilled(prop, tiny, 0, ctx)], {0: 12})[0].depths()) > 1


def test_batched_propose_equals_single_and_swap_rebuilds(tiny, cfg, trained) -> None:
    ctxs = [c[:len(p) + n] for c, p, n in zip(greedy_continuations(tiny, PROMPTS[:3], 15), PROMPTS, (9, 3, 15))]
    single = []
    for i, ctx in enumerate(ctxs):
        prop = EagleProposer(trained, topk=3, max_depth=4)
        single.append(prop.propose([prefilled(prop, tiny, i, ctx)], {i: 10})[i])
    prop = EagleProposer(trained, topk=3, max_depth=4)
    seqs = [prefilled(prop, tiny, i, ctx) for i, ctx in enumerate(ctxs)]
    batched = prop.propose(seqs, {i: 10 for i in range(3)})
    for i in range(3):
        assert batched[i].tokens == single[i].tokens and batched[i].parents == single[i].parents
        assert batched[i].scores == pytest.approx(single[i].scores, rel=1e-4, abs=1e-6)
    # Swap: caches are rebuilt from stored aux, so trees equal a fresh proposer's with the new drafter.
    other = init_drafter(tiny, cfg, seed=7)
    prop.swap(other)
    fresh = EagleProposer(other, topk=3, max_depth=4)
    fseqs = [prefilled(fresh, tiny, i, ctx) for i, ctx in enumerate(ctxs)]
    a, b = prop.propose(seqs, {i: 10 for i in range(3)}), fresh.propose(fseqs, {i: 10 for i in range(3)})
    assert all(a[i].tokens == b[i].tokens for i in range(3))
    # A sequence with missing aux (pending != 1 token) is skipped, not guessed.
    seqs[0].tokens.append(5)
    assert 0 not in prop.propose(seqs, {i: 10 for i in range(3)})


def test_merge_trees_union_and_hybrid() -> None:
    a = DraftTree(tokens=[9, 1, 2, 3], parents=[-1, 0, 1, 0], scores=[1, 0.5, 0.5, 0.2], source="learned")
    b = DraftTree(tokens=[9, 1, 4], parents=[-1, 0, 1], scores=[1, 0.9, 0.9], source="suffix")
    m = merge_trees([a, b], 10, "hybrid")
    paths = {tuple(m.tokens[j] for j in m.path(i)) for i in range(len(m))}
    assert paths == {(9,), (9, 1), (9, 1, 2), (9, 3), (9, 1, 4)}
    cum = dict(zip((tuple(m.tokens[j] for j in m.path(i)) for i in range(len(m))), m.path_scores()))
    assert cum[(9, 1)] == pytest.approx(0.9) and cum[(9, 1, 2)] == pytest.approx(0.25)
    assert cum[(9, 1, 4)] == pytest.approx(0.81) and m.source == "hybrid"
    assert merge_trees([a, b], 2, "hybrid").num_draft == 2


# ------------------------------------------------------------------------------------------------
# through the engine: lossless
# ------------------------------------------------------------------------------------------------


def greedy(_i: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_equals_plain_greedy(tiny, cfg, trained, which, batch) -> None:
    prompts = PROMPTS[:batch]
    plain, _ = run_engine(tiny, prompts, greedy, None)
    drafter = trained if which == "trained" else init_drafter(tiny, cfg, seed=11)
    spec_out, eng = run_engine(tiny, prompts, greedy, drafter)
    assert spec_out == plain
    c = eng.counters
    assert c.drafted > 0 and c.by_strategy.get("learned", [0])[0] > 0
    if which == "trained":  # trained on this traffic: it must get drafts accepted
        assert c.accepted / c.decode_steps_seq > 0.5, (c.accepted, c.decode_steps_seq)


@pytest.mark.parametrize("confident", [0.0, 1.0])
def test_hybrid_greedy_equals_plain(tiny, trained, confident) -> None:
    prompts = [PROMPTS[2], PROMPTS[3]]
    plain, _ = run_engine(tiny, prompts, greedy, None)
    out, eng = run_engine(tiny, prompts, greedy, trained, mode="hybrid", confident=confident)
    assert out == plain and eng.counters.by_strategy.get("hybrid", [0])[0] > 0


def test_sampled_distribution_is_the_targets(tiny, trained) -> None:
    """Joint distribution of the first three sampled tokens (top_k=3, temperature 1) over many seeds;
    tokens 2 and 3 come from speculative steps (drafts accepted or rejected, bonus tokens)."""
    prompt = PROMPTS[0]
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)

    def joint(temperature: float) -> dict[tuple[int, int, int], float]:
        """Exact probabilities of every (t1, t2, t3) under the target's top-3 sampling."""
        p = SamplingParams(**{**params.__dict__, "temperature": temperature})

        def dist(ctx: list[int]) -> torch.Tensor:
            logits, _ = target_pass(tiny, ctx, ())
            return process_logits(logits[-1:], p)[0]

        out: dict[tuple[int, int, int], float] = {}
        p1 = dist(prompt)
        for t1 in p1.nonzero().flatten().tolist():
            p2 = dist(prompt + [t1])
            for t2 in p2.nonzero().flatten().tolist():
                p3 = dist(prompt + [t1, t2])
                for t3 in p3.nonzero().flatten().tolist():
                    out[(t1, t2, t3)] = float(p1[t1] * p2[t2] * p3[t3])
        return out

    expected = joint(1.0)
    N = 1500
    outs, eng = run_engine(tiny, [prompt] * N, lambda i: SamplingParams(**{**params.__dict__, "seed": i}),
                           trained, max_seqs=32, budget=6)
    assert eng.counters.drafted > 0 and eng.counters.accepted > 0.2 * eng.counters.decode_steps_seq
    assert eng.counters.accepted < eng.counters.drafted   # rejections happen too
    keys = sorted(expected)
    index = {k: i for i, k in enumerate(keys)}
    observed = torch.zeros(len(keys))
    for o in outs:
        observed[index[tuple(o)]] += 1                      # KeyError = a token the target never samples
    probs = torch.tensor([expected[k] for k in keys])
    assert chisq_pvalue(observed, probs / probs.sum()) > 1e-3
    # The test has power: the same counts reject a somewhat different sampler (temperature 1.5).
    other = joint(1.5)
    wrong = torch.tensor([other.get(k, 0.0) for k in keys])
    assert chisq_pvalue(observed, wrong / wrong.sum()) < 1e-3


def test_default_model_greedy_equals_plain(default_model_f32) -> None:
    """The real model (float32) with a day-0 drafter of the default shape (8192-token draft vocabulary)."""
    lm = default_model_f32
    tok = lm.tokenizer
    prompts = [tok("The capital of France is", add_special_tokens=False)["input_ids"],
               tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]]
    drafter = init_drafter(lm, EagleConfig.for_target(lm.arch), seed=0)
    assert drafter.cfg.aux_layers == (2, 15, 27) and drafter.cfg.draft_vocab_size == 8192

    def run(d):
        spec_cfg = SpecConfig(mode="learned", max_draft_tokens=8, profile_at_start=False)
        eng = Engine(EngineConfig(dtype="float32", max_num_seqs=2, max_model_len=256, spec=spec_cfg), loaded=lm)
        if d is not None:
            force_all_drafts(attach_learned(eng, spec_cfg, d))
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        while eng.has_unfinished():
            eng.step()
        return [eng.requests[str(i)][0].output_ids for i in range(len(prompts))], eng

    plain, _ = run(None)
    spec_out, eng = run(drafter)
    assert spec_out == plain and eng.counters.drafted > 0
    assert eng.runner.aux_layers == (2, 15, 27)


def test_hybrid_proposer_reuses_learned_drafts(tiny, trained) -> None:
    prop = EagleProposer(trained)
    ctx = greedy_continuation(tiny, PROMPTS[1], 6)
    seq = prefilled(prop, tiny, 0, ctx)

    class NoSuffix:
        def propose(self, seqs, budgets):
            return {}

    hyb = HybridProposer(prop, NoSuffix())
    first = prop.propose([seq], {0: 8})
    before = prop.stats.proposals
    tree = hyb.propose([seq], {0: 8})[0]
    assert prop.stats.proposals == before                  # same step: the learned tree is reused
    assert tree.source == "hybrid" and tree.tokens == first[0].tokens


class FixedSuffix:
    """A stand-in suffix drafter: a fixed chain for chosen sequences, nothing for the others."""

    def __init__(self, chains: dict[int, tuple[list[int], list[float]]]) -> None:
        self.chains = chains

    def propose(self, seqs, budgets):
        out = {}
        for seq in seqs:
            if seq.seq_id in self.chains:
                toks, scores = self.chains[seq.seq_id]
                out[seq.seq_id] = DraftTree([seq.tokens[-1]] + toks, list(range(-1, len(toks))), [1.0] + scores,
                                            source="suffix")
        return out


def test_hybrid_leaves_confident_suffix_rows_to_the_suffix_drafter(tiny, trained) -> None:
    """A row whose suffix tree expects >= ``confident`` accepted drafts keeps that tree and the head does not
    draft for it; when every row is confident the head's forward is skipped; ``confident=0`` always asks."""
    ctxs = [greedy_continuation(tiny, p, 6) for p in PROMPTS[:2]]
    sure = ([11, 12, 13], [0.9, 0.9, 0.9])            # expected accepted: 0.9 + 0.81 + 0.73 = 2.44
    unsure = ([11], [0.3])
    prop = EagleProposer(trained)
    seqs = [prefilled(prop, tiny, i, c) for i, c in enumerate(ctxs)]
    budgets = {0: 8, 1: 8}
    hyb = HybridProposer(prop, FixedSuffix({0: sure, 1: unsure}), confident=1.0)
    trees = hyb.propose(seqs, budgets)
    assert trees[0].source == "suffix" and trees[0].tokens[1:] == [11, 12, 13]
    assert trees[1].source == "hybrid" and trees[1].num_draft > 1     # the head's nodes merged with [11]
    assert 11 in trees[1].tokens[1:]
    assert hyb.suffix_only == 1
    forwards = prop.stats.forwards
    hyb = HybridProposer(prop, FixedSuffix({0: sure, 1: sure}), confident=1.0)
    prop.on_step(StepResult())                         # a new step: nothing cached
    trees = hyb.propose(seqs, budgets)
    assert prop.stats.forwards == forwards and {t.source for t in trees.values()} == {"suffix"}
    hyb = HybridProposer(prop, FixedSuffix({0: sure, 1: sure}), confident=0.0)
    trees = hyb.propose(seqs, budgets)
    assert prop.stats.forwards > forwards and {t.source for t in trees.values()} == {"hybrid"}


def test_auto_asks_the_hybrid_proposer_not_the_learned_one_it_wraps(tiny, trained) -> None:
    """The hybrid tree holds the learned tree's best nodes, so in auto mode asking the learned proposer too
    would only draft for rows the hybrid one leaves to the suffix drafter; forced modes ask what they name."""
    for mode, expected in (("auto", ["suffix", "hybrid"]), ("learned", ["learned"]), ("hybrid", ["hybrid"])):
        spec_cfg = SpecConfig(mode=mode, profile_at_start=False)
        eng = Engine(EngineConfig(model="tiny", dtype="float32", max_num_seqs=2, max_model_len=64, spec=spec_cfg),
                     loaded=tiny)
        spec = attach_learned(eng, spec_cfg, trained)
        assert spec.strategies() == expected
        assert spec.proposers["hybrid"].confident == spec_cfg.hybrid_suffix_confident


def test_the_controller_prices_the_learned_drafters_depths_from_measured_costs(tiny, trained) -> None:
    """Before asking the hybrid proposer, the controller tells its learned half what a token is worth:
    B (1 + g) / T, with T the measured plain-step cost at this batch and g the suffix drafter's accepted
    drafts per row; the drafter's forwards are timed as they run."""
    spec_cfg = SpecConfig(mode="hybrid", profile_at_start=False)
    eng = Engine(EngineConfig(model="tiny", dtype="float32", max_num_seqs=2, max_model_len=128, spec=spec_cfg),
                 loaded=tiny)
    spec = attach_learned(eng, spec_cfg, trained)
    spec.controller.cost.observe(2, 0.05, "plain")       # a plain step of 2 rows: 50 ms
    learned = spec.proposers["learned"]
    seen = []
    inner = learned.propose

    def propose(seqs, budgets):  # what the drafter was told, and what it should have been told, at that moment
        seen.append((learned.tokens_per_second, 2 * (1 + spec.policy.free_gain()) / spec.controller.base_cost(2, 2)))
        return inner(seqs, budgets)

    learned.propose = propose
    for i, p in enumerate(PROMPTS[:2]):
        eng.add_request(str(i), p, greedy(i))
    for _ in range(6):
        eng.step()
    assert seen and all(told == pytest.approx(expected) and told > 0 for told, expected in seen)
    assert learned.depth_seconds is not None and learned.depth_seconds > 0


def test_learned_proposals_cached_for_some_rows_are_not_reused_for_others(tiny, trained) -> None:
    prop = EagleProposer(trained)
    seqs = [prefilled(prop, tiny, i, greedy_continuation(tiny, p, 6)) for i, p in enumerate(PROMPTS[:2])]
    budgets = {0: 8, 1: 8}
    assert set(prop.propose_cached(seqs[:1], budgets)) == {0}
    assert set(prop.propose_cached(seqs, budgets)) == {0, 1}


def test_tree_depth_stops_where_a_forward_costs_more_than_it_can_add(tiny, trained) -> None:
    """Cost-aware depth: with tokens worth nothing next to a forward the tree stops at the root's children
    (the catch-up forward only); with no price it grows as EAGLE-2 does; in between, fewer depths run and
    the tree is a top part of the unpriced one. (Budget 64 keeps every expanded node, so trees compare.)"""
    ctx = greedy_continuation(tiny, PROMPTS[0], 12)
    prop = EagleProposer(trained, topk=3, max_depth=5, min_path_prob=0.0)
    seq = prefilled(prop, tiny, 0, ctx)
    free = prop.propose([seq], {0: 64})[0]
    free_forwards = prop.stats.forwards
    assert max(free.depths()) == 5 and prop.depth_stops == 0
    prop.price_depth(1e9, 1.0)                         # a forward's time is worth more than any draft
    tree = prop.propose([seq], {0: 64})[0]
    assert max(tree.depths()) == 1 and prop.stats.forwards - free_forwards == 1 and prop.depth_stops == 1
    # A price the first expansion pays for (its best node alone is worth 0.99 of it) but the deepest,
    # less likely levels do not.
    best_child = max(free.scores[c] for c in free.children(0))
    prop.price_depth(0.99 * best_child / prop.depth_seconds, 1.0)
    before = prop.stats.forwards
    mid = prop.propose([seq], {0: 64})[0]
    assert 2 <= prop.stats.forwards - before < free_forwards
    assert 1 < max(mid.depths()) < 5
    paths = lambda t: {tuple(t.tokens[j] for j in t.path(i)) for i in range(len(t))}  # noqa: E731
    assert paths(mid) < paths(free)


def test_swap_mid_run_keeps_output_and_drafting(tiny, cfg, trained) -> None:
    """Swapping drafters between steps (same aux layers, then different ones) never changes greedy output;
    with the same layers drafting goes on from the stored aux rows; with new layers the runner is switched."""
    prompts = PROMPTS[:3]
    plain, _ = run_engine(tiny, prompts, greedy, None)
    spec_cfg = SpecConfig(mode="learned", max_draft_tokens=8, profile_at_start=False)
    eng = Engine(EngineConfig(model="tiny", dtype="float32", max_num_seqs=8, max_model_len=256, spec=spec_cfg),
                 loaded=tiny)
    spec = attach_learned(eng, spec_cfg, init_drafter(tiny, cfg, seed=2))
    force_all_drafts(spec)
    learned = spec.proposers["learned"]
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, greedy(i))
    for _ in range(4):
        eng.step()
    learned.swap(trained)
    drafted = eng.counters.drafted
    for _ in range(4):
        eng.step()
    assert eng.counters.drafted > drafted                  # drafting resumed after the lazy cache rebuild
    other_layers = EagleConfig(**{**cfg.__dict__, "aux_layers": (0, 1, 3)})
    learned.swap(init_drafter(tiny, other_layers, seed=4))
    assert eng.spec.aux_layers() == (0, 1, 3)               # the runner returns those from the next step on
    eng.step()
    assert eng.runner.aux_layers == (0, 1, 3)
    while eng.has_unfinished():
        eng.step()
    assert [eng.requests[str(i)][0].output_ids for i in range(3)] == plain
    with pytest.raises(ValueError, match="vocab"):      # a drafter for another target is refused
        learned.swap(EagleDrafter(EagleConfig(**{**cfg.__dict__, "vocab_size": 600})))
