"""The measured-utility check on speculation (speculation/utility.py): a strategy is switched off, per batch-size
bucket, where its steps measurably commit fewer tokens per second than plain decoding, and retried later."""

from __future__ import annotations

import pytest

from conftest import StubProposer
from helpers import FakeClock
from onspec.config import EngineConfig, SpecConfig
from onspec.engine.engine import Engine
from onspec.engine.sampler import SamplingParams
from onspec.models.loader import LoadedModel, load_model
from onspec.speculation.controller import attach_speculation
from onspec.speculation.tree import DraftTree
from onspec.speculation.utility import MeasuredUtility


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs) -> LoadedModel:
    return load_model(str(tiny_model_dirs["llama"]), "float32")


def warm_plain(u: MeasuredUtility, batch: int, n: int = 4, rate: float = 100.0) -> None:
    for _ in range(n):
        u.step_arms(batch, {})
        u.observe(batch, batch, batch / rate, None, {})


def drive(u: MeasuredUtility, batch: int, steps: int, plain_rate: float, drafted_rate: float,
          name: str = "suffix") -> list[bool]:
    """Run ``steps`` decisions; a step where ``name`` drafts commits ``2 * batch`` tokens at
    ``drafted_rate``, a plain one ``batch`` tokens at ``plain_rate``. Returns the allow() decisions."""
    decisions = []
    for _ in range(steps):
        ok = name in (u.step_arms(batch, {name: False}) or set())
        decisions.append(ok)
        tokens = 2 * batch if ok else batch
        u.observe(batch, tokens, tokens / (drafted_rate if ok else plain_rate), name if ok else None,
                  {name: 0.0} if ok else {})
    return decisions


def runs_of(d: list[bool]) -> list[tuple[bool, int]]:
    runs: list[list] = []
    for x in d:
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])
    return [tuple(r) for r in runs]


def test_a_losing_strategy_is_switched_off_and_tried_again_with_growing_pauses() -> None:
    u = MeasuredUtility(min_steps=4, trial_steps=4, pause_min=8, pause_max=32, probe_every=1000)
    warm_plain(u, 32)
    d = drive(u, 32, 200, plain_rate=100.0, drafted_rate=80.0)   # drafting commits 20% fewer tokens/s
    # off after min_steps losing steps; trials of 4 after pauses of 8, 16, then 32 (doubling, capped)
    assert runs_of(d)[:8] == [(True, 4), (False, 8), (True, 4), (False, 16), (True, 4), (False, 32), (True, 4),
                              (False, 32)]
    assert sum(d) < 0.2 * len(d)
    assert u.summary()[32]["strategies"]["suffix"]["off"]


def test_a_paying_strategy_stays_on_and_the_baseline_stays_measured() -> None:
    u = MeasuredUtility(min_steps=4, probe_every=10)
    warm_plain(u, 1)
    d = drive(u, 1, 100, plain_rate=100.0, drafted_rate=150.0)
    assert not u.summary()[1]["strategies"]["suffix"]["off"]
    assert 85 <= sum(d) <= 95                       # one plain probe step in ``probe_every``
    assert u.buckets[1].plain.count > 4


def test_a_trial_that_pays_switches_it_back_on_and_buckets_are_independent() -> None:
    u = MeasuredUtility(min_steps=4, trial_steps=4, pause_min=8, probe_every=1000)
    warm_plain(u, 32)
    warm_plain(u, 1)
    drive(u, 32, 10, plain_rate=100.0, drafted_rate=70.0)
    assert u.buckets[32].strategies["suffix"].closed
    assert drive(u, 1, 20, plain_rate=100.0, drafted_rate=140.0) == [True] * 20   # batch 1 is unaffected
    # the traffic changed: drafting pays at batch 32 now; the next trial switches it back on for good
    d = drive(u, 32, 60, plain_rate=100.0, drafted_rate=130.0)
    assert not u.buckets[32].strategies["suffix"].closed and all(d[-20:])


def test_a_strategy_asked_in_vain_is_switched_off_but_not_the_one_that_drafts() -> None:
    """The learned head is asked every step, takes half the step, and its trees are never chosen: it is
    switched off; the suffix drafter, whose trees carry the step, is judged on the step without the
    learned head's time and stays on."""
    u = MeasuredUtility(min_steps=4, probe_every=1000)
    warm_plain(u, 2)
    for _ in range(40):
        allowed = u.step_arms(2, {"suffix": False, "learned": False})
        assert allowed is not None
        asked = {n: 0.0 for n in ("suffix", "learned") if n in allowed}
        if "learned" in asked:
            asked["learned"] = 0.02
        # suffix drafts: 3 tokens committed in 0.02 s of verification (plain: 2 in 0.02 s)
        u.observe(2, 3, 0.02 + sum(asked.values()), "suffix", asked)
    st = u.buckets[2].strategies
    assert st["learned"].closed and not st["suffix"].closed
    assert st["suffix"].utility(u.buckets[2].plain.rate) == pytest.approx(1.5)


def test_a_drafter_that_seldom_matches_but_pays_when_it_does_stays_on() -> None:
    """Chat through a suffix drafter: most steps find no match (the proposal costs 2% of a step and
    returns nothing), one drafts and is rejected, one commits 8 tokens. Overall the rate is 1.5x plain:
    judged by summed tokens and seconds it stays on (an average of per-step ratios, dominated by the 0.98s
    and the 0.77, would switch it off)."""
    u = MeasuredUtility(probe_every=1000)
    warm_plain(u, 1)
    for _ in range(20):
        for kind in ["none"] * 9 + ["rejected", "hit"]:
            assert u.step_arms(1, {"suffix": False}) == {"suffix"}
            if kind == "none":
                u.observe(1, 1, 0.0102, None, {"suffix": 0.0002})
            else:
                u.observe(1, 1 if kind == "rejected" else 8, 0.013, "suffix", {"suffix": 0.0002})
    st = u.buckets[1].strategies["suffix"]
    assert not st.closed
    assert st.utility(u.buckets[1].plain.rate) == pytest.approx(1.5, rel=0.1)


def bursty_chat(u: MeasuredUtility, steps: int, seed: int = 0) -> int:
    """Batch 2, a suffix drafter on chat: half the steps find no match, the others draft and are either
    rejected (the step costs 25% more) or copy a run (3.5x the tokens in 1.2x the time). Hits come in
    stretches: 60 steps where a quarter of the drafting steps hit (answers that quote the prompt) alternate
    with 60 where almost none do (free text). About 1.2x of plain overall. Returns the steps the drafter
    was switched off in."""
    import random

    rng = random.Random(seed)
    warm_plain(u, 2)
    off = step = 0
    for _ in range(steps):
        allowed = u.step_arms(2, {"suffix": False})
        if allowed is None:
            u.observe(2, 2, 0.02, None, {})
            continue
        if "suffix" not in allowed:
            off += 1
            u.observe(2, 2, 0.02, None, {})
            continue
        step += 1
        hit = 0.25 if (step // 60) % 2 == 0 else 0.02
        x = rng.random()
        if x < 0.5:
            u.observe(2, 2, 0.0201, None, {"suffix": 1e-4})
        elif x < 1 - hit / 2:
            u.observe(2, 2, 0.025, "suffix", {"suffix": 1e-4})
        else:
            u.observe(2, 7, 0.024, "suffix", {"suffix": 1e-4})
    return off


def test_a_paying_drafter_is_not_switched_off_by_an_unlucky_stretch() -> None:
    """Judged on an upper confidence bound, a drafter whose steps swing between 0.8x and 3.5x stays on
    through most stretches that match badly; judged on the estimate alone (confidence 0) it is switched
    off in about a third of the run, and every failed trial doubles its pause."""
    steps = 2000
    bounded = bursty_chat(MeasuredUtility(probe_every=1000), steps)
    estimate = bursty_chat(MeasuredUtility(probe_every=1000, confidence=0.0), steps)
    assert estimate > 0.25 * steps
    assert bounded < 0.05 * steps and bounded < estimate / 4


def test_a_clear_loss_is_switched_off_sooner() -> None:
    """Half the plain rate is evidence enough after clear_steps; a 10% loss needs min_steps."""
    for drafted_rate, off_after in ((50.0, 8), (90.0, 32)):
        u = MeasuredUtility(probe_every=1000)
        warm_plain(u, 2)
        d = drive(u, 2, 40, plain_rate=100.0, drafted_rate=drafted_rate)
        assert d.index(False) == off_after


def test_a_new_drafter_is_judged_afresh() -> None:
    u = MeasuredUtility(min_steps=2, min_plain=2, trial_steps=2, probe_every=1000)
    warm_plain(u, 8, n=2)
    drive(u, 8, 4, plain_rate=100.0, drafted_rate=50.0, name="learned")
    assert "learned" not in u.step_arms(8, {"learned": False})
    u.forget("learned")
    assert "learned" in u.step_arms(8, {"learned": False})


def drive_tiers(u: MeasuredUtility, batch: int, steps: int, plain_rate: float, cheap_rate: float,
                model_rate: float) -> list[set[str] | None]:
    """A suffix arm (cheap) and a learned arm (expensive): a step that asks the learned arm commits at
    ``model_rate`` whatever else was asked, a suffix-only step at ``cheap_rate``, a plain probe at
    ``plain_rate``. Returns what each step was allowed."""
    seen = []
    for _ in range(steps):
        allowed = u.step_arms(batch, {"suffix": False, "learned": True})
        seen.append(allowed)
        if allowed is None or not allowed:
            u.observe(batch, batch, batch / plain_rate, None, {})
        elif "learned" in allowed:
            tokens = 3 * batch
            u.observe(batch, tokens, tokens / model_rate, "learned", {"suffix": 1e-4, "learned": 0.002})
        else:
            tokens = 2 * batch
            u.observe(batch, tokens, tokens / cheap_rate, "suffix", {"suffix": 1e-4})
    return seen


def test_an_expensive_drafter_that_beats_plain_but_not_the_suffix_drafter_is_switched_off() -> None:
    """A day-1 case: hybrid trees (learned + suffix) beat plain decoding by 10% but the suffix
    drafter alone by nothing; the controller kept choosing them. Judged against the suffix drafter's own
    rate (measured in cheap-probe steps) the learned arm is switched off, and the suffix arm is not."""
    u = MeasuredUtility(probe_every=1000)
    warm_plain(u, 2)
    seen = drive_tiers(u, 2, 200, plain_rate=100.0, cheap_rate=130.0, model_rate=110.0)
    st = u.buckets[2].strategies
    assert st["learned"].closed and not st["suffix"].closed
    assert st["suffix"].utility(u.buckets[2].plain.rate) == pytest.approx(1.3, rel=0.02)
    assert u.summary()[2]["strategies"]["learned"]["utility"] == pytest.approx(110 / 130, rel=0.02)
    # once off, the learned drafter is asked in trials only: most late steps ask the suffix drafter alone
    late = seen[-100:]
    assert sum(1 for a in late if a == {"suffix"}) > 70


def test_an_expensive_drafter_that_beats_the_suffix_drafter_stays_on_and_the_suffix_rate_stays_measured() -> None:
    u = MeasuredUtility(probe_every=1000)
    warm_plain(u, 2)
    seen = drive_tiers(u, 2, 200, plain_rate=100.0, cheap_rate=130.0, model_rate=160.0)
    st = u.buckets[2].strategies
    assert not st["learned"].closed and not st["suffix"].closed
    # one step in cheap_probe_every (8) leaves the learned arm out, after the early phase of one in 4
    late = seen[-160:]
    assert sum(1 for a in late if a == {"suffix"}) == 160 // u.cheap_probe_every
    assert sum(1 for a in late if a == {"suffix", "learned"}) == 160 - 160 // u.cheap_probe_every
    assert st["suffix"].asked.count >= u.min_plain


def test_without_a_cheap_record_the_expensive_arm_is_judged_against_plain() -> None:
    """Where the suffix drafter is switched off (it loses to plain here), the learned arm's baseline is
    plain decoding, and it stays on at 1.2x of plain."""
    u = MeasuredUtility(probe_every=1000)
    warm_plain(u, 4)
    drive_tiers(u, 4, 200, plain_rate=100.0, cheap_rate=60.0, model_rate=120.0)
    st = u.buckets[4].strategies
    assert st["suffix"].closed and not st["learned"].closed
    assert u.cheap_rate(u.buckets[4]) == pytest.approx(100.0, rel=0.02)


class SlowDrafter(StubProposer):
    """Proposes one always-rejected node per request and takes long doing it (20 ms on ``clock``, where a
    forward takes 1 ms): drafting can only lose."""

    def __init__(self, vocab: int, clock: FakeClock) -> None:
        self.vocab = vocab
        self.calls = 0
        self.clock = clock

    def propose(self, seqs, budgets):
        self.calls += 1
        self.clock.advance(0.02)
        return {s.seq_id: DraftTree.chain(s.tokens[-1], [(s.tokens[-1] + 1) % self.vocab], [0.95], self.name)
                for s in seqs}


def test_engine_stops_asking_a_drafter_that_measurably_loses(tiny) -> None:
    """The cost model is told drafting is free, the drafter's scores promise 95% acceptance: only the
    measured rates can see that every drafting step loses, and they switch the drafter off."""
    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32",
                              spec=SpecConfig(profile_at_start=False, suffix_min_prob=0.99)), loaded=tiny)
    eng.clock = clock = FakeClock(tick=0.001)
    drafter = SlowDrafter(tiny.arch.vocab_size, clock)
    spec = attach_speculation(eng, eng.cfg.spec, {"learned": drafter})
    spec.clock = clock
    spec.controller.cost.cost = lambda tokens, kind="masked": 1e-3     # the model's view: nodes are free
    spec.controller.worth_drafting = lambda *a, **k: True
    eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    assert spec.utility.buckets[1].strategies["learned"].closed
    assert drafter.calls < 120                              # most of the 240 steps never asked it
    assert spec.policy.counts.strategies["learned"]["utility"] > 120


class SlowHybrid(SlowDrafter):
    """A hybrid stand-in: pays a drafter forward (wants the target's aux states) and is judged in the
    learned drafter's arm."""

    name, arm, wants_aux = "hybrid", "learned", True


def test_engine_judges_learned_and_hybrid_as_one_expensive_arm(tiny) -> None:
    eng = Engine(EngineConfig(model=str(tiny.path), dtype="float32",
                              spec=SpecConfig(profile_at_start=False, suffix_min_prob=0.99)), loaded=tiny)
    eng.clock = clock = FakeClock(tick=0.001)
    learned, hybrid = SlowDrafter(tiny.arch.vocab_size, clock), SlowHybrid(tiny.arch.vocab_size, clock)
    learned.wants_aux = True
    spec = attach_speculation(eng, eng.cfg.spec, {"learned": learned, "hybrid": hybrid})
    spec.clock = clock
    spec.controller.cost.cost = lambda tokens, kind="masked": 1e-3
    spec.controller.worth_drafting = lambda *a, **k: True
    eng.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=240, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    records = spec.utility.buckets[1].strategies
    assert set(records) == {"suffix", "learned"}
    assert records["learned"].expensive and not records["suffix"].expensive
    assert records["learned"].closed
    assert learned.calls < 120 and hybrid.calls < 120
    assert spec.policy.counts.strategies["hybrid"]["utility"] > 120
