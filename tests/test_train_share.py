"""The trainer's CPU share follows measured utility (train/share.py): more while promoted versions improve
the held-out acceptance, less when they stop or are rejected, the floor after a rollback; always within
[floor, ceiling]. And the online learner moves it on its decisions, logs why, and reports it."""

from __future__ import annotations

import pytest

from helpers import FakeClock
from onspec.speculation.eagle import init_drafter
from onspec.train.online import build_online_learning
from onspec.train.publish import Manifest, publish_version
from onspec.train.share import ShareConfig, TrainerShare
from test_train_online import cfg_for, make_engine, prompts, serve, serve_until_rolled_back, target

__all__ = ["target"]  # a fixture shared with test_train_online


def promote(gain: float) -> tuple[str, dict]:
    return "promote", {"candidate_acceptance": 1.0 * (1 + gain), "serving_acceptance": 1.0}


def test_the_share_grows_while_versions_improve_and_shrinks_when_they_stop() -> None:
    share = TrainerShare(0.04, ShareConfig(floor=0.02, ceiling=0.08, min_gain=0.02, grow=1.5, shrink=0.5))
    path = []
    for kind, figures in [promote(0.10), promote(0.05), promote(0.30), promote(0.01), ("reject", {}),
                          ("swap", {}), ("live-ok", {}), promote(0.2), ("rollback", {})]:
        before = share.share
        change = share.update(kind, figures)
        path.append(round(share.share, 4))
        assert (change is None) == (share.share == before), kind  # a change is reported exactly when it moved
    assert path == [0.06, 0.08, 0.08, 0.04, 0.02, 0.02, 0.02, 0.03, 0.02]


def test_the_share_starts_inside_its_bounds_and_a_change_says_why() -> None:
    share = TrainerShare(0.5, ShareConfig(floor=0.02, ceiling=0.08))
    assert share.share == 0.08
    change = share.update("reject", {})
    assert change is not None and change.previous == 0.08 and change.share == 0.04 and "rejected" in change.reason
    assert share.update("invalid", {}).share == 0.02
    assert share.update("invalid", {}) is None  # already at the floor: nothing moved


def test_the_online_learner_drops_the_share_after_a_rollback_and_reports_it(tmp_path, target) -> None:
    engine = make_engine(target, max_num_seqs=4)
    cfg = cfg_for(tmp_path / "v", live_window_steps=12, rollback_threshold=0.3, busy_share=0.05, share_floor=0.01)
    ol = build_online_learning(engine, cfg, start_trainer=False)
    engine.clock = engine.spec.clock = clock = FakeClock(tick=0.01)
    try:
        assert ol.status()["trainer"]["busy_share"] == pytest.approx(0.05)
        serve(engine, prompts(4, seed=2), 30)
        publish_version(ol.root, init_drafter(target, seed=5), Manifest(version=1, parent=0, kind="trained"))
        ol.promote(1)
        serve_until_rolled_back(engine, ol, clock)
        engine.step()  # the step after the rollback moves the share
        st = ol.status()
        assert st["rollbacks"] == 1 and st["trainer"]["busy_share"] == pytest.approx(0.01)
        assert any(e["kind"] == "share" and "rollback" in e["detail"] for e in st["events"])
        while engine.has_unfinished():
            engine.step()
    finally:
        ol.stop()
