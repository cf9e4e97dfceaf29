"""The measured-utility check on speculation (spec/utility.py): drafting is switched off, per batch-size
bucket, where it measurably commits fewer tokens per second than plain decoding, and retried later."""

from __future__ import annotations

import pytest

from onspec.config import EngineConfig, SpecConfig
from onspec.engine.engine import Engine
from onspec.engine.sampler import SamplingParams
from onspec.spec.controller import attach_speculation
from onspec.spec.tree import DraftTree
from onspec.models.loader import LoadedModel, load_model
from onspec.spec.utility import MeasuredUtility


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs) -> LoadedModel:
    return load_model(str(tiny_model_dirs["llama"]), "float32")


def drive(u: MeasuredUtility, batch: int, steps: int, plain_rate: float, drafted_rate: float) -> list[bool]:
    """Run ``steps`` decisions; a drafting step commits ``2 * batch`` tokens at ``drafted_rate``, a plain one
    ``batch`` tokens at ``plain_rate``. Returns the allow() decisions."""
    decisions = []
    for _ in range(steps):
        ok = u.allow(batch)
        decisions.append(ok)
        tokens = 2 * batch if ok else batch
        u.observe(batch, tokens, tokens / (drafted_rate if ok else plain_rate), drafted=ok)
    return decisions


def test_a_losing_bucket_is_closed_and_tried_again_with_growing_pauses() -> None:
    u = MeasuredUtility(min_steps=4, trial_steps=4, pause_min=8, pause_max=32, probe_every=1000)
    # plain steps first (nothing to draft yet), then drafting that commits 20% fewer tokens per second
    for _ in range(4):
        u.allow(32)
        u.observe(32, 32, 32 / 100.0, drafted=False)
    d = drive(u, 32, 200, plain_rate=100.0, drafted_rate=80.0)
    assert d[:4] == [True] * 4 and d[4] is False          # closed after min_steps losing drafted steps
    # trials of 4 drafting steps after pauses of 8, 16, then 32 (doubling, capped at 32) plain steps
    runs, cur = [], [d[0], 0]
    for x in d:
        if x == cur[0]:
            cur[1] += 1
        else:
            runs.append(tuple(cur))
            cur = [x, 1]
    runs.append(tuple(cur))
    assert runs[1:8] == [(False, 8), (True, 4), (False, 16), (True, 4), (False, 32), (True, 4), (False, 32)]
    assert sum(d) < 0.2 * len(d)
    assert u.summary()[32]["closed"]


def test_a_paying_bucket_stays_open_and_keeps_its_baseline_measured() -> None:
    u = MeasuredUtility(min_steps=4, probe_every=10)
    for _ in range(4):
        u.allow(1)
        u.observe(1, 1, 0.01, drafted=False)
    d = drive(u, 1, 100, plain_rate=100.0, drafted_rate=150.0)
    assert not u.summary()[1]["closed"]
    assert 85 <= sum(d) <= 95                       # one plain probe step in ``probe_every``
    assert u.buckets[1].plain.count > 4


def test_a_trial_that_pays_reopens_the_bucket_and_buckets_are_independent() -> None:
    u = MeasuredUtility(min_steps=4, trial_steps=4, pause_min=8, probe_every=1000)
    for _ in range(4):
        u.allow(32)
        u.observe(32, 32, 0.32, drafted=False)
        u.allow(1)
        u.observe(1, 1, 0.01, drafted=False)
    drive(u, 32, 10, plain_rate=100.0, drafted_rate=70.0)
    assert u.buckets[32].closed
    assert drive(u, 1, 20, plain_rate=100.0, drafted_rate=140.0) == [True] * 20   # batch 1 is unaffected
    # the traffic changed: drafting pays at batch 32 now; the next trial reopens the bucket for good
    d = drive(u, 32, 60, plain_rate=100.0, drafted_rate=130.0)
    assert not u.buckets[32].closed and all(d[-20:])


def test_a_new_drafter_is_judged_afresh() -> None:
    u = MeasuredUtility(min_steps=2, min_plain=2, trial_steps=2, probe_every=1000)
    for _ in range(2):
        u.allow(8)
        u.observe(8, 8, 0.08, drafted=False)
    drive(u, 8, 4, plain_rate=100.0, drafted_rate=50.0)
    assert not u.allow(8)
    u.forget()
    assert u.allow(8)


class SlowDrafter:
    """Proposes one always-rejected node per request and takes long doing it: drafting can only lose."""

    name, wants_aux = "learned", False

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.calls = 0

    def add_request(self, seq): ...
    def on_commit(self, seq, tokens): ...
    def finish(self, seq): ...
    def observe_prefill(self, seq, n, aux): ...
    def observe(self, verdicts): ...

    def propose(self, seqs, budgets):
        import time

        self.calls += 1
        time.sleep(0.02)
        out = {}
        for s in seqs:
            out[s.seq_id] = DraftTree.chain(s.tokens[-1], [(s.tokens[-1] + 1) % self.vocab], [0.95], self.name)
        return out


def test_engine_stops_asking_a_drafter_that_measurably_loses(tiny) -> None:
    """The cost model is told drafting is free, the drafter's scores promise 95% acceptance: only the
    measured rates can see that every drafting step loses, and they switch drafting off."""
    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32",
                              spec=SpecConfig(profile_at_start=False, suffix_min_prob=0.99)), loaded=tiny)
    drafter = SlowDrafter(tiny.arch.vocab_size)
    spec = attach_speculation(eng, eng.cfg.spec, {"learned": drafter})
    spec.controller.cost.cost = lambda tokens, kind="masked": 1e-3     # the model's view: nodes are free
    spec.controller.worth_drafting = lambda *a, **k: True
    eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert spec.utility.buckets[1].closed
    assert spec.skipped.get("measured", 0) > 60            # most of the 120 steps never asked the drafter
    assert drafter.calls < 50
