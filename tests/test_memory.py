"""Memory stays flat over many requests: forwards come in a few token-count buckets (engine/runner.py) and
oneDNN's per-shape primitive caches are bounded in the server (server/memory.py).

Why shapes are the thing to test: on a CPU every distinct (rows, weight) shape of a bf16 matrix product
leaves a compiled oneDNN primitive (~0.7 MB) in two caches of 1024 entries each, so a server whose forwards
had a new token count nearly every step (speculation: rows + draft nodes + prefill chunk) grew by hundreds
of MiB over a few thousand requests. Counting the distinct forward sizes is exact and cheap, where a
resident-memory assertion on a shared 2-core machine would be slow and noisy; one RSS check (bf16, with a
generous margin) backs it up.
"""

from __future__ import annotations

import gc
import random

import psutil
import pytest
import torch

from onspec.config import EngineConfig, SpecConfig
from onspec.engine.engine import Engine
from onspec.engine.kv_cache import KVCache
from onspec.engine.runner import ModelRunner, RowSpec, bucket_tokens
from onspec.engine.sampler import SamplingParams
from onspec.models.loader import load_model
from onspec.server import memory as server_memory
from onspec.spec.controller import attach_speculation
from onspec.spec.tree import DraftTree


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), "float32")


def engine_for(loaded, speculation: str = "off", dtype: str = "float32", **kw) -> Engine:
    kw.setdefault("max_model_len", 256)
    kw.setdefault("max_num_seqs", 8)
    spec = SpecConfig(mode=speculation, profile_at_start=False)
    eng = Engine(EngineConfig(model=str(loaded.path), dtype=dtype, num_threads=1, spec=spec, **kw), loaded=loaded)
    if speculation != "off":
        attach_speculation(eng, spec)
    return eng


def record_forward_sizes(eng: Engine) -> list[tuple[int, int]]:
    """(tokens in the forward, most tokens of one row) for every forward the runner builds from now on."""
    sizes: list[tuple[int, int]] = []
    build = eng.runner.build

    def recording(rows):
        out = build(rows)
        sizes.append((int(out[0].shape[0]), max(len(r.tokens) for r in rows)))
        return out

    eng.runner.build = recording
    return sizes


def repetitive_prompts(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a pattern (the suffix drafter drafts long runs), of many different lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pattern = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 11))]
        out.append((pattern * 12)[:rng.randint(9, 90)])
    return out


def run_requests(eng: Engine, prompts: list[list[int]], concurrency: int = 6) -> list[list[int]]:
    """Greedy requests with varied max_tokens, ``concurrency`` in flight, a new one admitted as soon as one
    finishes (a server's traffic: prefill chunks and draft trees of many sizes share steps)."""
    rng = random.Random(1)
    outs: dict[str, list[int]] = {}
    queue = [(f"r{i}", p) for i, p in enumerate(prompts)]
    while queue or eng.has_unfinished():
        while queue and len(eng.requests) < concurrency:
            rid, p = queue.pop(0)
            eng.add_request(rid, p, SamplingParams(temperature=0, max_tokens=rng.randint(4, 40), ignore_eos=True))
        eng.step()
        for rid, seqs in list(eng.requests.items()):
            if all(s.finished for s in seqs):
                outs[rid] = list(seqs[0].output_ids)
                eng.release_request(rid)
    return [outs[f"r{i}"] for i in range(len(prompts))]


# ---- buckets -----------------------------------------------------------------------------------------


def test_bucket_tokens_is_a_small_set_with_bounded_padding() -> None:
    sizes = {bucket_tokens(n) for n in range(1, 513)}
    assert len(sizes) <= 27
    for n in range(1, 2049):
        b = bucket_tokens(n)
        assert 0 <= b - n < max(8, n / 4) and bucket_tokens(b) == b
        assert n == 1 or bucket_tokens(n - 1) <= b  # monotone
    assert [bucket_tokens(n) for n in (1, 8, 9, 17, 64, 65, 129, 257, 512)] == [1, 8, 16, 24, 64, 80, 160, 320, 512]


def _filled_cache(loaded, slots: int = 4, max_len: int = 64) -> KVCache:
    kv = KVCache(loaded.arch, slots, max_len, torch.float32)
    g = torch.Generator().manual_seed(0)
    for k, v in zip(kv.k, kv.v):
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    return kv


def _tree_row(slot: int, cache_len: int, tokens: list[int]) -> RowSpec:
    tree = DraftTree(tokens, [-1, 0, 0, 1, 1, 2][:len(tokens)], [1.0] * len(tokens), source="t")
    return RowSpec(slot, cache_len, tokens, depths=tree.depths(), tree_mask=tree.ancestor_mask(), logits_from=0)


@pytest.mark.parametrize("case", ["free-cells", "widen", "near-slot-end"])
def test_padding_changes_no_result_and_no_live_cache_row(tiny, case: str) -> None:
    """Padded and exact forwards give the same logits, hidden and aux states and the same live cache rows;
    a slot outside the step is untouched, and padding K/V only lands past a row's live positions."""
    if case == "free-cells":  # 7 + 5 + 1 = 13 tokens -> 16: the grid (T = 7) has room for the padding
        rows = [RowSpec(0, 5, [11, 12, 13, 14, 15, 16, 17], logits_from=6), _tree_row(2, 10, [21, 22, 23, 24, 25]),
                RowSpec(3, 3, [31], logits_from=0)]
    elif case == "widen":  # two full rows of 9 -> 24: no empty cell, the grid widens to 12
        rows = [RowSpec(0, 4, list(range(40, 49)), logits_from=0), RowSpec(2, 0, list(range(50, 59)), logits_from=3)]
    else:  # row 0 has no room left in its slot: all padding goes to row 1
        rows = [RowSpec(0, 64 - 9, list(range(40, 49)), logits_from=0),
                RowSpec(1, 2, list(range(60, 69)), logits_from=8)]
    n_real = sum(len(r.tokens) for r in rows)
    results = {}
    for bucket in (False, True):
        kv = _filled_cache(tiny)
        runner = ModelRunner(tiny.model, kv)
        runner.aux_layers = (1,)
        runner.bucket_shapes = bucket
        ids, _, _ = runner.build(rows)
        assert ids.shape[0] == (bucket_tokens(n_real) if bucket else n_real)
        results[bucket] = (runner.run(rows, want_aux=True), kv)
    (exact, kv0), (padded, kv1) = results[False], results[True]
    for name in ("logits", "hidden", "aux"):
        for a, b in zip(getattr(exact, name), getattr(padded, name)):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    stepped = {r.slot: r for r in rows}
    for layer in range(len(kv0.k)):
        for cache0, cache1 in ((kv0.k[layer], kv1.k[layer]), (kv0.v[layer], kv1.v[layer])):
            for slot in range(kv0.num_slots):
                if slot not in stepped:
                    assert torch.equal(cache0[slot], cache1[slot])  # nobody else's rows are touched
                    continue
                r = stepped[slot]
                assert torch.equal(cache0[slot, :, :r.cache_len], cache1[slot, :, :r.cache_len])
                live = slice(r.cache_len, r.cache_len + len(r.tokens))
                torch.testing.assert_close(cache0[slot, :, live], cache1[slot, :, live], rtol=1e-5, atol=1e-5)


# ---- the engine ---------------------------------------------------------------------------------------


def test_speculative_forwards_come_in_bucket_sizes_and_greedy_output_is_unchanged(tiny) -> None:
    """Many requests of varied lengths with suffix speculation: every multi-token forward has a bucket size
    (so oneDNN compiles and caches a bounded set of primitives), single-token forwards are at most one per
    slot, and the greedy output equals plain decoding. Without the buckets the same traffic runs many more
    forward sizes, which is what made the server's memory grow (checked here too, so this test can fail)."""
    prompts = repetitive_prompts(tiny.arch.vocab_size, 36)
    plain = run_requests(engine_for(tiny), prompts)

    eng = engine_for(tiny, "suffix")
    sizes = record_forward_sizes(eng)
    assert run_requests(eng, prompts) == plain
    assert eng.counters.drafted > 0 and eng.counters.accepted > 0
    multi = {n for n, t in sizes if t > 1}
    single = {n for n, t in sizes if t == 1}
    assert all(bucket_tokens(n) == n for n in multi), sorted(multi)
    assert max(single, default=0) <= eng.cfg.max_num_seqs
    assert len(multi | single) <= 27 + eng.cfg.max_num_seqs

    off = engine_for(tiny, "suffix")
    off.runner.bucket_shapes = False  # the fix turned off: the regression this test guards against
    raw_sizes = record_forward_sizes(off)
    assert run_requests(off, prompts) == plain
    unbucketed = {n for n, _ in raw_sizes if bucket_tokens(n) != n}
    assert len(unbucketed) >= 5, sorted(unbucketed)  # each would fail the bucket assertion above


def _rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the per-shape caches are oneDNN's")
def test_bf16_resident_memory_stays_flat_with_speculation(tiny_model_dirs) -> None:
    """bf16 on a CPU (oneDNN): after a warm-up, more speculative traffic adds little resident memory.

    Each new forward size costs ~0.7 MB per weight shape (5 here) whatever the model's size, so the tiny
    model shows the effect: without the buckets the second phase grew the process by ~110 MiB, with them by
    ~10 MiB (a few late buckets and batch sizes, allocator noise). The limit leaves a margin both ways."""
    loaded = load_model(str(tiny_model_dirs["llama"]), "bfloat16")
    eng = engine_for(loaded, "suffix", dtype="bfloat16", max_num_seqs=8)
    vocab = loaded.arch.vocab_size
    run_requests(eng, repetitive_prompts(vocab, 48, seed=5))  # warm-up: visits most buckets
    before = _rss_mib()
    run_requests(eng, repetitive_prompts(vocab, 128, seed=6))
    growth = _rss_mib() - before
    print(f"resident memory grew {growth:.1f} MiB over 128 requests")
    assert growth < 35, f"resident memory grew {growth:.0f} MiB over 128 requests"


def test_bound_onednn_caches_sets_both_capacities_unless_given(monkeypatch) -> None:
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(name, raising=False)
    assert server_memory.bound_onednn_caches(64) == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
                                                     "LRU_CACHE_CAPACITY": "64"}
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "512")  # an operator's own setting wins
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    got = server_memory.bound_onednn_caches()
    assert got == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(server_memory.ONEDNN_CACHE_CAPACITY),
                   "LRU_CACHE_CAPACITY": "512"}
