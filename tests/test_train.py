"""Online drafter learning, offline parts: what verification records, the objective, publishing, the gate.

* Traces: the recorder's chunks reproduce each sequence's committed stream with the target's own aux and
  hidden states (checked against a fresh full forward), rejected tree nodes hang off the right parents,
  continued chunks repeat context without training it twice; prompt hidden states are recomputed exactly.
* Objective: the loss falls on a fixed batch; the discard term changes the gradient only through rejected
  nodes; the simulated acceptance length counts exactly the accepted prefix of each chain.
* Buffers and queues: the byte budget holds, sampling favours recent chunks, the sender never blocks.
* Versions: atomic publication with checksums; corrupt versions (bad checksum, wrong shape, truncated
  file) are refused; export/import round trip in the EAGLE-3 layout, also through the CLI.
* Gate and live monitor: a random candidate is not promoted over a trained drafter; a live regression
  after a promotion triggers a rollback.
"""

from __future__ import annotations

import json
import queue
import random
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from onspec.config import EngineConfig, SpecConfig, TrainerConfig
from onspec.engine.engine import Engine
from onspec.engine.runner import RowSpec
from onspec.engine.sampler import SamplingParams
from onspec.models.loader import load_model
from onspec.speculation.eagle import EagleConfig, attach_learned, init_drafter, load_eagle3
from onspec.train.channel import TraceSender
from onspec.train.objective import SoftTargets, collate, discard_loss, main_loss, simulated_acceptance
from onspec.train.publish import (Manifest, VersionError, VersionState, export_version, list_versions,
                                  publish_version, verify_checksums, version_dir)
from onspec.train.recompute import PromptHidden
from onspec.train.swap import CandidateError, Gate, LiveMonitor, load_candidate
from onspec.train.traces import TraceBuffer, TraceChunk, TraceRecorder, attach_recorder
from onspec.train.trainer import Trainer, offline_config


@pytest.fixture(scope="module")
def target(tiny_llama):
    return load_model(str(tiny_llama), "float32")


def small_cfg(**kw) -> TrainerConfig:
    base = dict(chunk_positions=48, chunk_context=8, min_positions=16, batch_positions=256, heldout_every=4,
                gate_min_positions=8, autocast=False, lr=3e-3)
    base.update(kw)
    return TrainerConfig(**base)


def run_traffic(target, cfg: TrainerConfig, n: int = 6, max_tokens: int = 40, seed: int = 0, mode: str = "suffix"):
    """Serve ``n`` random prompts greedily with the learned drafter attached; returns (engine, chunks, recorder)."""
    engine = Engine(EngineConfig(model=str(target.path), dtype="float32", max_num_seqs=4,
                                 spec=SpecConfig(mode=mode, profile_at_start=False)), loaded=target)
    attach_learned(engine, engine.cfg.spec, init_drafter(target, seed=seed))
    chunks: list[TraceChunk] = []
    rec = TraceRecorder(cfg, chunks.append)
    attach_recorder(engine, rec)
    r = random.Random(seed)
    for i in range(n):
        # a repeated motif in the prompt gives the suffix drafter something to propose (trees, branches)
        motif = [r.randrange(3, 500) for _ in range(4)]
        prompt = [r.randrange(3, 500) for _ in range(r.randrange(3, 12))] + motif * 3
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
    while engine.has_unfinished():
        engine.step()
    rec.flush_all()
    return engine, chunks, rec


@pytest.fixture(scope="module")
def traffic(target):
    return run_traffic(target, small_cfg())


# ---- traces -------------------------------------------------------------------------------------------
def test_recorder_reproduces_each_sequence_with_the_targets_states(target, traffic) -> None:
    engine, chunks, rec = traffic
    assert rec.resyncs == 0 and rec.branches > 0
    by_key: dict[str, list[TraceChunk]] = {}
    for c in chunks:
        by_key.setdefault(c.key, []).append(c)
    assert len(by_key) == 6
    slot = engine.kv.allocate()
    try:
        for rid, seqs in engine.requests.items():
            seq = seqs[0]
            parts = sorted(by_key[f"{rid}/{seq.seq_id}"], key=lambda c: c.start)
            # Continued chunks start with context repeated from their predecessor; new positions follow on.
            stream: list[int] = []
            for c in parts:
                assert c.loss_from == (0 if c.start == 0 else small_cfg().chunk_context)
                assert c.start + c.loss_from == len(stream)
                stream.extend(c.tokens[c.loss_from:].tolist())
            # Every committed token but the last (whose aux the target never computed) is recorded.
            assert stream == seq.tokens[:-1]
            # The recorded states are the target's: a fresh full forward gives the same aux and hidden.
            out = engine.runner.run([RowSpec(slot, 0, stream, logits_from=0)], want_aux=True)
            for c in parts:
                rows = slice(c.start, c.start + len(c))
                assert torch.allclose(out.aux[0][rows], c.aux, atol=1e-4)
                has = c.has_hidden
                assert torch.allclose(out.hidden[0][rows][has], c.hidden[has], atol=1e-4)
                assert bool(c.has_hidden[c.generated].all())        # every generated position has a hidden
                assert c.generated.tolist() == [c.start + t >= seq.num_prompt for t in range(len(c))]
    finally:
        engine.kv.free(slot)


def test_branches_are_rejected_nodes_with_the_targets_view(target, traffic) -> None:
    engine, chunks, _ = traffic
    with_branches = [c for c in chunks if c.num_branches]
    assert with_branches
    slot = engine.kv.allocate()
    try:
        for c in with_branches[:3]:
            for r in range(c.num_branches):
                # Rebuild the branch's context: committed tokens up to its committed ancestor, then the
                # chain of rejected nodes down to it; the target's aux/hidden there must match the record.
                path, p = [int(c.br_token[r])], int(c.br_parent[r])
                while p < 0:
                    path.append(int(c.br_token[-1 - p]))
                    p = int(c.br_parent[-1 - p])
                ctx = c.tokens[:p + 1].tolist() + path[::-1]
                if c.start:  # need the whole prefix of the sequence: take it from the engine's sequence
                    seq = next(s[0] for rid, s in engine.requests.items() if c.key == f"{rid}/{s[0].seq_id}")
                    ctx = seq.tokens[:c.start + p + 1] + path[::-1]
                out = engine.runner.run([RowSpec(slot, 0, ctx, logits_from=0)], want_aux=True)
                assert torch.allclose(out.aux[0][-1], c.br_aux[r], atol=1e-4)
                assert torch.allclose(out.hidden[0][-1], c.br_hidden[r], atol=1e-4)
                # and it was rejected: the committed token after the ancestor differs from the branch's first
                if p + 1 < len(c) and path[-1] == int(c.tokens[p + 1]):
                    pytest.fail("a recorded branch token equals the committed token: it was not rejected")
    finally:
        engine.kv.free(slot)


def test_prompt_hidden_is_recomputed_exactly(target, traffic) -> None:
    engine, chunks, _ = traffic
    first = next(c for c in chunks if c.start == 0 and not bool(c.has_hidden.all()))
    slot = engine.kv.allocate()
    try:
        out = engine.runner.run([RowSpec(slot, 0, first.tokens.tolist(), logits_from=0)], want_aux=True)
    finally:
        engine.kv.free(slot)
    chunk = TraceChunk.from_bytes(first.to_bytes())  # a copy (also checks serialization)
    missing = ~chunk.has_hidden
    aux_layers = engine.spec.proposers["learned"].drafter.cfg.aux_layers
    assert PromptHidden(target, aux_layers).fill(chunk)
    assert bool(chunk.has_hidden.all())
    assert torch.allclose(chunk.hidden[missing], out.hidden[0][missing], atol=1e-4)


# ---- objective ----------------------------------------------------------------------------------------
def test_loss_falls_on_a_fixed_batch(target, traffic) -> None:
    _, chunks, _ = traffic
    cfg = small_cfg()
    trainer = Trainer(init_drafter(target, seed=1), target, cfg)
    for c in chunks:
        trainer.add(c)
    batch = trainer.buffer.sample(256, random.Random(0))
    first = trainer.step(batch)["loss"]
    for _ in range(15):
        last = trainer.step(batch)["loss"]
    assert last < 0.7 * first
    al, roots = trainer.evaluate(batch)
    assert roots > 0 and al > 1.0   # it learned to draft (some of) what it was trained on


def test_discard_term_changes_gradients_only_through_rejected_nodes(target, traffic) -> None:
    _, chunks, _ = traffic
    cfg = small_cfg(discard_weight=0.5)
    drafter = init_drafter(target, seed=2).train()
    soft = SoftTargets(target.model.lm_head.weight, drafter.draft_ids, cfg.target_topk)
    samples = [soft.prepare(c, cfg.prompt_weight) for c in chunks if c.num_branches][:3]
    assert samples

    def grads(batch_samples, lam: float) -> list[torch.Tensor]:
        drafter.zero_grad(set_to_none=True)
        b = collate(batch_samples)
        logits = drafter.forward_train(b.aux, b.tokens, lengths=b.lengths, ttt_steps=cfg.ttt_steps)
        loss, _ = main_loss(logits, b, cfg.ttt_decay)
        if lam:
            disc, n = discard_loss(drafter, b, 10_000)
            assert n == sum(s.num_branches for s in batch_samples)
            loss = loss + lam * disc
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in drafter.parameters()]

    def same(a, b) -> bool:
        return all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b))

    base = grads(samples, 0.0)
    with_discard = grads(samples, 0.5)
    assert not same(base, with_discard)          # rejected nodes contribute a gradient
    # Without rejected nodes the discard term is inert.
    stripped = []
    for s in samples:
        t = SoftTargets(target.model.lm_head.weight, drafter.draft_ids, cfg.target_topk)
        chunk = next(c for c in chunks if c.key == s.key and c.num_branches and torch.equal(c.tokens, s.tokens))
        bare = TraceChunk.from_bytes(chunk.to_bytes())
        bare.br_token = bare.br_token[:0]
        bare.br_parent = bare.br_parent[:0]
        bare.br_aux = bare.br_hidden = None
        stripped.append(t.prepare(bare, cfg.prompt_weight))
    assert same(grads(stripped, 0.0), grads(stripped, 0.5))
    # Changing what the target said at rejected nodes changes the gradient only through the discard term.
    altered = []
    for s in samples:
        s2 = Sample_copy(s)
        s2.br_lab_ids = (torch.roll(s2.br_lab_ids, 1, dims=-1) + 1) % drafter.cfg.draft_vocab_size
        altered.append(s2)
    assert same(grads(altered, 0.0), base)
    assert not same(grads(altered, 0.5), with_discard)


def Sample_copy(s):
    import copy

    return copy.copy(s)


class _Oracle(torch.nn.Module):
    """A fake drafter whose unroll step i predicts ``truth`` at t + 1 + i, except where ``wrong`` says."""

    def __init__(self, vocab: int, wrong: set[tuple[int, int]]) -> None:
        super().__init__()
        self.vocab = vocab
        self.wrong = wrong

    def forward_train(self, aux, input_ids, lengths=None, ttt_steps=1):
        B, L = input_ids.shape
        outs = []
        for i in range(ttt_steps):
            lg = torch.zeros(B, L, self.vocab)
            for t in range(L):
                nxt = int(input_ids[0, t + 1 + i]) if t + 1 + i < L else 0
                lg[0, t, (nxt + 1) % self.vocab if (i, t) in self.wrong else nxt] = 10.0
            outs.append(lg)
        return outs


def test_simulated_acceptance_counts_the_accepted_prefix(target) -> None:
    L, P = 12, 4
    tokens = torch.arange(10, 10 + L)
    chunk = TraceChunk(key="k", start=0, tokens=tokens, aux=torch.zeros(L, 3), hidden=torch.zeros(L, 2),
                       has_hidden=torch.zeros(L, dtype=torch.bool), generated=torch.arange(L) >= P)
    soft = SoftTargets(torch.randn(64, 2), torch.arange(64), 1)
    sample = soft.prepare(chunk, 1.0, labels=False)
    # roots: t >= 1 with token t + 1 generated and inside: t in 3..10 -> 8 roots; chains of depth 3
    perfect, roots = simulated_acceptance(_Oracle(64, set()), [sample], 3)
    assert roots == 8
    # a perfect drafter accepts min(3, L - 1 - t) tokens at root t: 3 for t <= 8, 2 at 9, 1 at 10
    assert perfect == pytest.approx(1 + (6 * 3 + 2 + 1) / 8)
    # one wrong step-1 prediction at root 5 cuts that chain after 1 token (step 2 does not count)
    cut, _ = simulated_acceptance(_Oracle(64, {(1, 5)}), [sample], 3)
    assert cut == pytest.approx(1 + (6 * 3 + 2 + 1 - 2) / 8)


# ---- buffers and queues -------------------------------------------------------------------------------
def _chunk(n: int, tag: int) -> TraceChunk:
    return TraceChunk(key=str(tag), start=0, tokens=torch.full((n,), tag), aux=torch.zeros(n, 64),
                      hidden=torch.zeros(n, 16), has_hidden=torch.ones(n, dtype=torch.bool),
                      generated=torch.ones(n, dtype=torch.bool))


def test_buffer_holds_its_byte_budget_and_favours_recent_chunks() -> None:
    one = _chunk(32, 0).nbytes()
    buf = TraceBuffer(max_bytes=10 * one, half_life=64)
    for i in range(30):
        buf.add(_chunk(32, i))
    assert buf.bytes <= 10 * one and len(buf) == 10 and buf.evicted == 20
    rng = random.Random(0)
    picks = [int(buf.sample(32, rng)[0].tokens[0]) for _ in range(400)]
    assert sum(p >= 25 for p in picks) > sum(p < 25 for p in picks)   # the newest 5 of 10 dominate
    assert min(picks) >= 20


def test_offline_training_keeps_every_recorded_position(target, traffic) -> None:
    """onspec warmup trains on a fixed recording: with the live byte budget the buffer evicts part of it
    (the failure this guards against: a third of a real warm-up's positions), with offline_config none."""
    _, chunks, _ = traffic
    many = [c for _ in range(12) for c in chunks]          # more than the 1 MiB live budget below
    train = sum(len(c) for c in many if not c.heldout)
    held = sum(len(c) for c in many if c.heldout)
    assert held > 0 and train > 0
    live = small_cfg(buffer_bytes=2**20)

    def fill(cfg):
        tr = Trainer(init_drafter(target, seed=0), target, cfg)
        for c in many:
            tr.add(c)
        return tr

    lossy = fill(live)
    assert lossy.buffer.positions + lossy.heldout.positions < train + held
    cfg = offline_config(live, many)
    kept = fill(cfg)
    assert (kept.buffer.positions, kept.heldout.positions) == (train, held)
    assert kept.buffer.evicted == kept.heldout.evicted == 0
    assert sum(len(c) for c in kept.heldout_window()) == held
    # every chunk weighs its length alone (no recency preference offline)
    w = kept.buffer.weights()
    assert w[0] / len(kept.buffer.items[0][1]) == pytest.approx(w[-1] / len(kept.buffer.items[-1][1]))
    assert offline_config(cfg, chunks[:1]).buffer_bytes == cfg.buffer_bytes   # never below the given budget


class _FullQueue(queue.Queue):
    """A full queue nobody reads: every put blocks; ``tried`` is set once someone tried one."""

    def __init__(self) -> None:
        super().__init__(maxsize=1)
        self.put(b"occupied")
        self.tried = threading.Event()

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        if self.full():
            self.tried.set()
        super().put(item, block, timeout)


def test_sender_never_blocks_and_drops_the_oldest() -> None:
    full = _FullQueue()
    sender = TraceSender(full, max_chunks=4)
    try:
        for i in range(50):                    # a blocking call would hang here (pytest-timeout ends it)
            sender(_chunk(8, i))
        # the sender's thread holds one chunk in a put that never succeeds, and takes no other
        assert full.tried.wait(30)
        assert sender.dropped >= 45
        kept = [int(c.tokens[0]) for c in sender.pending]
        assert kept == sorted(kept) and kept[-1] == 49   # the newest survive
    finally:
        sender.close()


# ---- versions -----------------------------------------------------------------------------------------
def test_publish_is_atomic_and_checksummed(tmp_path, target) -> None:
    root = tmp_path / "v"
    d = publish_version(root, init_drafter(target), Manifest(version=0, parent=None, kind="initial"), {"x": 1})
    assert d == version_dir(root, 0) and list_versions(root) == [0]
    m = verify_checksums(d)
    assert set(m.sha256) == {"config.json", "model.safetensors"}
    assert (d / "optimizer.pt").is_file()
    (root / ".tmp-v0001-abc").mkdir()           # a crashed publication leaves only a temp dir
    assert list_versions(root) == [0]
    with pytest.raises(VersionError):
        publish_version(root, init_drafter(target), Manifest(version=0, parent=None, kind="initial"))
    st = VersionState(current=0, promoted=[0])
    st.save(root)
    assert VersionState.load(root).current == 0


def _corrupt(d: Path, how: str) -> None:
    w = d / "model.safetensors"
    if how == "checksum":
        data = bytearray(w.read_bytes())
        data[-5] ^= 0xFF
        w.write_bytes(bytes(data))
    elif how == "truncated":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "shape":  # a well-formed file with a wrong shape, checksums updated to match
        state = load_file(str(w))
        state["fc.weight"] = state["fc.weight"][:, :-1].contiguous()
        save_file(state, str(w))
        m = json.loads((d / "manifest.json").read_text())
        from onspec.train.publish import sha256_file

        m["sha256"]["model.safetensors"] = sha256_file(w)
        (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("how", ["checksum", "truncated", "shape"])
def test_corrupt_versions_are_refused(tmp_path, target, how) -> None:
    root = tmp_path / "v"
    ref = init_drafter(target)
    publish_version(root, ref, Manifest(version=0, parent=None, kind="initial"))
    publish_version(root, init_drafter(target, seed=5), Manifest(version=1, parent=0, kind="trained"))
    _corrupt(version_dir(root, 1), how)
    with pytest.raises(CandidateError) as err:
        load_candidate(root, 1, target, ref)
    assert "model.safetensors" in str(err.value) or "fc.weight" in str(err.value)


def test_candidate_with_another_vocabulary_is_refused(tmp_path, target) -> None:
    root = tmp_path / "v"
    ref = init_drafter(target, EagleConfig.for_target(target.arch, draft_vocab_size=256))
    counts = torch.rand(target.arch.vocab_size)
    other = init_drafter(target, EagleConfig.for_target(target.arch, draft_vocab_size=256), token_counts=counts)
    publish_version(root, other, Manifest(version=0, parent=None, kind="trained"))
    with pytest.raises(CandidateError, match="vocabulary"):
        load_candidate(root, 0, target, ref)


def test_export_import_round_trip_in_the_eagle3_layout(tmp_path, target) -> None:
    root = tmp_path / "v"
    drafter = init_drafter(target, seed=3)
    publish_version(root, drafter, Manifest(version=0, parent=None, kind="initial"))
    publish_version(root, init_drafter(target, seed=4), Manifest(version=1, parent=0, kind="trained"))
    VersionState(current=0, promoted=[0]).save(root)
    v, out = export_version(root, tmp_path / "out")              # default: the latest promoted
    assert v == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == drafter.cfg.draft_vocab_size
    names = set(load_file(str(out / "model.safetensors")))
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= names
    assert all(n.startswith(("fc.", "midlayer.", "norm.", "lm_head.", "d2t", "t2d")) for n in names)
    back = load_eagle3(out, target, dtype=torch.float32)
    for (k, a), (_, b) in zip(drafter.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b.to(a.dtype)), k
    # through the CLI, a chosen version
    from onspec.cli import main

    assert main(["export-speculator", "--speculator-dir", str(root), "--out", str(tmp_path / "o2"),
                 "--version", "1"]) == 0
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["version"] == 1
    assert main(["export-speculator", "--speculator-dir", str(root), "--out", str(tmp_path / "o3"),
                 "--version", "7"]) == 2                           # a clear error, not a stack trace


# ---- gate and live monitor ----------------------------------------------------------------------------
def test_gate_does_not_promote_a_random_candidate_over_a_trained_drafter(target, traffic) -> None:
    _, chunks, _ = traffic
    cfg = small_cfg()
    trainer = Trainer(init_drafter(target, seed=7), target, cfg)
    for c in chunks:
        trainer.add(c)
    for _ in range(25):
        trainer.step()
    trained = trainer.drafter.eval()
    random_one = init_drafter(target, seed=8)
    gate = Gate(cfg, target)
    window = chunks  # judged on the same traces the trained drafter saw: the point is the comparison
    verdict = gate.judge(random_one, trained, window)
    assert verdict is not None and not verdict.promote and verdict.candidate < verdict.current
    assert gate.judge(trained, random_one, window).promote


def test_live_monitor_flags_a_regression_against_the_previous_version() -> None:
    mon = LiveMonitor(TrainerConfig(live_window_steps=20, rollback_threshold=0.2))
    for _ in range(30):
        mon.observe(1, 4, 12, 0.1, 0.05)      # version 1: 120 tok/s at batch 4
    mon.start_watch(2, 1)
    for _ in range(19):
        mon.observe(2, 4, 12, 0.2, 0.05)      # version 2: 60 tok/s
    assert mon.verdict() is None              # window not full yet
    mon.observe(2, 4, 12, 0.2, 0.05)
    v = mon.verdict()
    assert v.rollback and v.ratio_previous == pytest.approx(0.5)
    assert v.ratio_off == pytest.approx(60 / 80)
    mon.start_watch(3, 1)
    for _ in range(20):
        mon.observe(3, 4, 12, 0.11, 0.05)     # within the threshold
    assert not mon.verdict().rollback
