"""The fused elementwise ops and attention (onspec/models/fused.py): where the CPU kernel runs them they
compute what PyTorch's bf16 ops compute, a row's result does not depend on the batch (nor, for attention,
on the grid around it), gradients still flow through the PyTorch versions, and bf16 speculative greedy
decoding equals plain greedy decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onspec.models import fused
from onspec.models.bf16_linear import compiled_kernel

# Kernel tests run wherever the kernel can run (every AVX2+FMA CPU), whatever path is the default there.
needs_kernel = pytest.mark.skipif(compiled_kernel() is None, reason="onspec's kernels cannot run on this CPU")


@pytest.fixture(autouse=True)
def kernel_path_on(monkeypatch):
    """These tests choose the kernel path explicitly (``ONSPEC_BF16_KERNEL`` is read on every call)."""
    monkeypatch.setenv("ONSPEC_BF16_KERNEL", "on")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place, per element."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def _close_to_pytorch(got: torch.Tensor, want: torch.Tensor) -> None:
    """At most one bf16 step anywhere, and almost everywhere bit-equal (an fp32 value within an ulp of a
    bf16 rounding boundary can round the other way when a sum's order or an exp's last bit differs)."""
    assert got.dtype is torch.bfloat16 and got.shape == want.shape
    d = _ulps(got, want)
    assert int(d.max()) <= 1
    assert float((d > 0).float().mean()) < 1e-3


def _rope_inputs(n: int, hq: int, hk: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (hq + 2 * hk) * d, generator=g).to(torch.bfloat16)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)         # strided views, as in the layer
    pos = torch.randint(0, 40, (n,), generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos.float()[:, None] * inv] * 2, dim=-1)[:, None]
    return (q.view(n, hq, d), k.view(n, hk, d), v.view(n, hk, d), emb.cos().to(torch.bfloat16),
            emb.sin().to(torch.bfloat16), pos)


@needs_kernel
@pytest.mark.parametrize("h", [576, 37])                          # 37: the scalar tail after 8-lane blocks
def test_rms_norm_matches_pytorch_on_strided_rows(h: int) -> None:
    x = (torch.randn(23, h + 5) * 3).to(torch.bfloat16)[:, :h]    # rows with a stride, as views give
    w = (torch.randn(h) * 0.2 + 1).to(torch.bfloat16)
    with torch.inference_mode():
        _close_to_pytorch(fused.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5))


@needs_kernel
@pytest.mark.parametrize("i", [1536, 13])
def test_silu_mul_matches_pytorch_including_extremes(i: int) -> None:
    gate_up = (torch.randn(11, 2 * i) * 4).to(torch.bfloat16)
    gate_up[0, :6] = torch.tensor([100.0, -100.0, 0.0, -0.0, 89.0, -90.0])
    gate, up = gate_up.chunk(2, dim=-1)
    with torch.inference_mode():
        _close_to_pytorch(fused.silu_mul(gate_up), F.silu(gate) * up)
        gate_up[1, 0] = float("nan")
        assert torch.isnan(fused.silu_mul(gate_up)[1, 0])


@needs_kernel
@pytest.mark.parametrize("d", [64, 6])                             # 6: the scalar path (half not a multiple of 8)
def test_rope_and_cache_matches_pytorch_and_writes_only_its_cells(d: int) -> None:
    q, k, v, cos, sin, pos = _rope_inputs(7, 9, 3, d)
    slot = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    kc = torch.randn(3, 3, 48, d).to(torch.bfloat16)
    vc = torch.randn(3, 3, 48, d).to(torch.bfloat16)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    with torch.inference_mode():
        got_q = fused.rope_and_cache(q, k, v, cos, sin, kc, vc, slot, pos)
        want_q = fused.apply_rope(q, cos, sin)
        kc_ref[slot, :, pos] = fused.apply_rope(k, cos, sin)
        vc_ref[slot, :, pos] = v
    _close_to_pytorch(got_q, want_q)
    _close_to_pytorch(kc, kc_ref)                 # includes every cell not written: those must be untouched
    assert torch.equal(vc, vc_ref)


@needs_kernel
def test_rope_and_cache_rejects_a_position_outside_the_cache() -> None:
    q, k, v, cos, sin, _ = _rope_inputs(2, 2, 1, 8)
    kc = torch.zeros(1, 1, 4, 8, dtype=torch.bfloat16)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="out of range"):
        fused.rope_and_cache(q, k, v, cos, sin, kc, kc.clone(), torch.tensor([0, 0]), torch.tensor([1, 4]))
    assert torch.count_nonzero(kc) == 0


@needs_kernel
def test_a_rows_result_does_not_depend_on_the_batch() -> None:
    x = torch.randn(40, 576).to(torch.bfloat16)
    w = torch.randn(576).to(torch.bfloat16)
    gate_up = torch.randn(40, 256).to(torch.bfloat16)
    with torch.inference_mode():
        norm_all, silu_all = fused.rms_norm(x, w, 1e-6), fused.silu_mul(gate_up)
        for r in (0, 17, 39):
            assert torch.equal(fused.rms_norm(x[r:r + 1], w, 1e-6), norm_all[r:r + 1])
            assert torch.equal(fused.silu_mul(gate_up[r:r + 1]), silu_all[r:r + 1])


def test_gradients_flow_through_the_pytorch_versions() -> None:
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(32, dtype=torch.bfloat16, requires_grad=True)
    assert not fused.kernel_applies(x, w)
    fused.rms_norm(x, w, 1e-6).float().sum().backward()
    assert x.grad is not None and w.grad is not None and torch.count_nonzero(w.grad) > 0
    assert not fused.kernel_applies(torch.randn(3, 4))            # float32 never takes the kernel


@needs_kernel
def test_bf16_speculative_greedy_equals_plain_greedy_with_the_kernels(tiny_model_dirs, monkeypatch) -> None:
    """bf16 with the CPU kernels is batch-invariant, so verifying long draft trees beside other requests
    changes no token of greedy output, exactly as in float32 (an oracle drafts the plain run's tokens among
    wrong branches, and fails at the first step where the engine's output leaves the plain run)."""
    from onspec.config import EngineConfig, SpecConfig
    from onspec.engine.engine import Engine
    from onspec.models.loader import load_model
    from onspec.speculation.controller import attach_speculation

    from test_speculation import FORCE, GREEDY, OracleProposer, generate, oracle_spec, token_prompts

    loaded = load_model(str(tiny_model_dirs["llama"]), "bfloat16")
    ran = []
    orig = fused.kernel_applies

    def spy(*tensors: torch.Tensor) -> bool:
        ran.append(orig(*tensors))
        return ran[-1]

    monkeypatch.setattr(fused, "kernel_applies", spy)

    def engine(spec) -> Engine:
        eng = Engine(EngineConfig(model=str(loaded.path), dtype="bfloat16", num_threads=1, max_model_len=256,
                                  spec=spec), loaded=loaded)
        if spec.mode != "off":
            attach_speculation(eng, spec, {"learned": oracle})
            eng.spec.controller.cost = FORCE
        return eng

    prompts = token_prompts(loaded.arch.vocab_size)
    plain = [o.token_ids for o in generate(engine(SpecConfig(mode="off")), prompts, GREEDY)]
    assert any(ran)                                                # the kernels ran
    oracle = OracleProposer({tuple(p): o for p, o in zip(prompts, plain)}, loaded.arch.vocab_size, depth=10)
    spec = [o.token_ids for o in generate(engine(oracle_spec()), prompts, GREEDY)]
    assert spec == plain
    assert max(a for _, a in oracle.verified) >= 8                # long accepted runs went through


def _attention_inputs(seed: int = 0, slots: int = 3, kv_heads: int = 3, heads: int = 9, d: int = 64, cache: int = 64):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(slots, kv_heads, cache, d, generator=g).to(torch.bfloat16)
    v_cache = torch.randn(slots, kv_heads, cache, d, generator=g).to(torch.bfloat16)
    q = torch.randn(6, heads, d, generator=g).to(torch.bfloat16)
    slot = torch.tensor([0, 1, 2, 1, 0, 2])
    allowed = torch.rand(6, 40, generator=g) < 0.6
    allowed[:, 0] = True
    return q, k_cache, v_cache, slot, allowed


def _attention_reference(q, k_cache, v_cache, slot, allowed) -> torch.Tensor:
    """Grouped-query attention in float64, one token at a time over the positions it may see."""
    n, h, d = q.shape
    rep = h // k_cache.shape[1]
    out = torch.empty(n, h * d, dtype=torch.float64)
    for i in range(n):
        keys = allowed[i].nonzero().flatten()
        for j in range(h):
            k = k_cache[slot[i], j // rep, keys].double()
            v = v_cache[slot[i], j // rep, keys].double()
            out[i, j * d:(j + 1) * d] = torch.softmax(q[i, j].double() @ k.T / d ** 0.5, -1) @ v
    return out


@needs_kernel
@pytest.mark.parametrize("d", [64, 16])
def test_attention_matches_a_float64_reference_with_masks_and_grouped_heads(d: int) -> None:
    q, k_cache, v_cache, slot, allowed = _attention_inputs(d=d)
    assert fused.attention_kernel_applies(q, k_cache, v_cache)
    got = fused.attend_rows(q, k_cache, v_cache, slot, allowed, allowed.shape[1])
    want = _attention_reference(q, k_cache, v_cache, slot, allowed).to(torch.bfloat16)
    _close_to_pytorch(got, want)      # fp32 sums: at most one bf16 step from the exact result, rarely that
    everything = torch.ones_like(allowed)
    assert torch.equal(fused.attend_rows(q, k_cache, v_cache, slot, None, 40),
                       fused.attend_rows(q, k_cache, v_cache, slot, everything, 40))   # None: all positions


@needs_kernel
def test_a_tokens_attention_depends_only_on_the_keys_it_sees() -> None:
    """What makes bf16 speculation exact: a token's result is the same bits alone or in a batch, and as a
    draft-tree node (its keys spread out under a mask, the cache read further) or as a plainly decoded
    token (the same keys side by side, nothing masked)."""
    q, k_cache, v_cache, slot, allowed = _attention_inputs(seed=1)
    batch = fused.attend_rows(q, k_cache, v_cache, slot, allowed, 40)
    for i in range(len(q)):
        alone = fused.attend_rows(q[i:i + 1], k_cache, v_cache, slot[i:i + 1], allowed[i:i + 1], 40)
        assert torch.equal(alone, batch[i:i + 1])
        keys = allowed[i].nonzero().flatten()
        packed_k, packed_v = k_cache.clone(), v_cache.clone()
        packed_k[slot[i], :, :len(keys)] = k_cache[slot[i], :, keys]
        packed_v[slot[i], :, :len(keys)] = v_cache[slot[i], :, keys]
        plain = fused.attend_rows(q[i:i + 1], packed_k, packed_v, slot[i:i + 1], None, len(keys))
        assert torch.equal(plain, batch[i:i + 1])


@needs_kernel
def test_real_model_bf16_speculative_greedy_equals_plain_greedy() -> None:
    """The default model in bf16, one request at a time: with PyTorch's attention, tree verification
    rounded differently from plain decoding, and the first two prompts below parted from plain greedy
    output (within 18 and 78 tokens). With the row-local attention kernel every token is the same."""
    from onspec import LLM, SamplingParams
    from onspec.data import code_edit_prompts

    from test_speculation import FORCE

    plain = LLM(model="default", dtype="bfloat16", speculation="off")
    spec = LLM(model="default", dtype="bfloat16", speculation="suffix")
    # Costs injected so that the plan keeps every drafted node whatever this machine's timings (with live
    # costs the calibrated suffix trees at temperature 0.7 were sometimes trimmed to almost nothing).
    spec.engine.spec.controller.cost = FORCE
    asks = ["Repeat this list exactly three times: apple, banana, cherry, date, elderberry, fig, grape.",
            *code_edit_prompts(3)]
    prompts = [plain.apply_chat_template([{"role": "user", "content": a}]) for a in asks]
    params = SamplingParams(temperature=0, max_tokens=200)
    lengths = []
    for prompt in prompts:        # one request at a time, as the code-editing benchmark runs
        want = plain.generate([prompt], params)[0].outputs[0]
        got = spec.generate([prompt], params)[0].outputs[0]
        assert got.token_ids == want.token_ids
        assert got.accepted > 0                # every request went through verified draft trees
        lengths.append(got.acceptance_length)
    assert sum(lengths) / len(lengths) > 1.5


@needs_kernel
def test_real_model_bf16_seeded_sampling_is_the_same_with_speculation_on_or_off() -> None:
    """A seeded request draws each token by a race on noise keyed by (seed, position), so its text depends
    only on the logits. With every op row-local in bf16, the logits of a verified tree node are the plain
    step's logits, and the seeded text must not change when speculation is on (docs/guide.md, "Seeds and
    exactness")."""
    from onspec import LLM, SamplingParams
    from onspec.data import code_edit_prompts

    from test_speculation import FORCE

    plain = LLM(model="default", dtype="bfloat16", speculation="off")
    spec = LLM(model="default", dtype="bfloat16", speculation="suffix")
    # Costs injected so that the plan keeps every drafted node whatever this machine's timings (with live
    # costs the calibrated suffix trees at temperature 0.7 were sometimes trimmed to almost nothing).
    spec.engine.spec.controller.cost = FORCE
    asks = ["Repeat this list exactly three times: apple, banana, cherry, date, elderberry, fig, grape.",
            *code_edit_prompts(3)]
    prompts = [plain.apply_chat_template([{"role": "user", "content": a}]) for a in asks]
    accepted = []
    # With PyTorch's attention monkeypatched back in, all four requests parted from the plain run (within
    # 11, 67, 9 and 26 tokens): checked when this test was written.
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.7, top_p=0.95, seed=11 + i, max_tokens=160)
        want = plain.generate([prompt], params)[0].outputs[0]
        got = spec.generate([prompt], params)[0].outputs[0]
        assert got.token_ids == want.token_ids
        accepted.append(got.acceptance_length)
    assert max(accepted) > 1.3                 # speculation verified trees, not single tokens


@needs_kernel
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])     # qwen2: q/k/v bias; qwen3: q/k norms
def test_the_direct_kernel_path_gives_the_module_path_bits(tiny_model_dirs, family: str, monkeypatch) -> None:
    """``CausalLM.forward`` calls the kernels directly (``DecoderLayer.forward_kernels``) once it has checked
    that they all apply; the module path (``DecoderLayer.forward``) calls the same kernels one module at a
    time. A prefill, a draft tree beside a decoding row and a split grid must give the same bits."""
    from onspec.engine.kv_cache import KVCache
    from onspec.engine.runner import ModelRunner, RowSpec
    from onspec.models.llama import CausalLM
    from onspec.models.loader import load_model

    loaded = load_model(str(tiny_model_dirs[family]), "bfloat16")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, loaded.arch.vocab_size, (n,), generator=g).tolist() for n in (23, 9)]
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)

    def run(direct: bool) -> list[torch.Tensor]:
        took = []
        kernels_for = CausalLM.kernels_for

        def spy(self, *args):
            took.append(kernels_for(self, *args) if direct else None)
            return took[-1]

        monkeypatch.setattr(CausalLM, "kernels_for", spy)
        runner = ModelRunner(loaded.model, KVCache(loaded.arch, 2, 64, torch.bfloat16))
        out = runner.run([RowSpec(s, 0, p, logits_from=0) for s, p in enumerate(prompts)]).logits
        out += runner.run([RowSpec(0, 23, [5, 6, 7, 8], depths=[0, 1, 1, 2], tree_mask=tree, logits_from=0),
                           RowSpec(1, 9, [4], logits_from=0)]).logits
        assert all(k is not None for k in took) == direct          # which path ran
        return out

    direct, modules = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(direct, modules))
