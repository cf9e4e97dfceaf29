"""The dashboard in a real headless Chromium: it loads without any external network, draws non-empty charts
after some traffic (drafter events included), lists the draft policy's counts as the series route serves
them, and a screenshot is saved.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped with that hint when it is missing.
Set ``ONSPEC_TEST_ARTIFACTS=DIR`` to keep the screenshot (otherwise it lives in pytest's tmp dir).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import httpx
import pytest

from onspec.server.bridge import EngineSnapshot
from onspec.server.metrics import SeriesRecorder
from test_server_support import FakeLearner, make_chat_model, running_server, tiny_config, wait_until

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed; "
                                                             "install it with: apt-get install -y chromium")
CHARTS = ("c-tps", "c-acc", "c-speed", "c-load")


def chromium(profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-sync", "--disable-component-update", f"--user-data-dir={profile}",
           "--window-size=1400,1150", "--hide-scrollbars", "--virtual-time-budget=5000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def make_traffic(url: str, admin_key: str, stop: threading.Event) -> None:
    """Rounds of four streamed completions until ``stop`` is set; a promotion after round 2 and a rollback
    after round 4."""
    prompts = ["List the numbers: one two three four one two three four", "tick tock " * 6,
               "The quick brown fox jumps over the lazy dog. The quick brown fox", "a b c d e f g a b c d e f g"]
    body = {"model": "default", "max_tokens": 48, "temperature": 0, "stream": True, "ignore_eos": True}

    def one(i: int) -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "prompt": prompts[i % 4]},
                          headers={"Authorization": "Bearer k"}, timeout=60) as r:
            for _ in r.iter_lines():
                pass

    admin = {"Authorization": f"Bearer {admin_key}"}
    i = 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while not stop.is_set():
            list(pool.map(one, range(i, i + 4)))
            i += 4
            if i == 8:
                httpx.post(url + "/v1/speculator/promote", json={"version": 2}, headers=admin, timeout=30)
            if i == 16:
                httpx.post(url + "/v1/speculator/rollback", headers=admin, timeout=30)


def test_series_carries_the_draft_policy_counts_of_the_latest_sample() -> None:
    """The draft policy panel's data path: the engine snapshot's ``draft_policy`` (DraftCounts.summary) is what
    the series route serves beside its points, as of the latest sample."""
    series = SeriesRecorder()
    assert series.to_json()["draft_policy"] == {"steps": {}, "strategies": {}}
    first = {"steps": {"probe": 1, "drafted": 3}, "strategies": {}}
    latest = {"steps": {"probe": 2, "plan": 1, "drafted": 7}, "strategies": {"learned": {"estimate": 4}}}
    series.sample(EngineSnapshot(time=1.0, draft_policy=first), 0, None, now=1.0)
    assert series.to_json()["draft_policy"] == first
    series.sample(EngineSnapshot(time=2.0, draft_policy=latest), 0, None, now=2.0)
    assert series.to_json(since=5.0)["draft_policy"] == latest     # whatever ``since``: counts are totals


def policy_rows(dom: str, table: str) -> list[tuple[str, list[str]]]:
    """(data-key, cell texts) of each row of ``table``'s body in the dumped DOM."""
    body = re.search(rf'<table id="{table}"[^>]*>.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, dom[:3000]
    return [(key, re.findall(r"<td[^>]*>(.*?)</td>", cells))
            for key, cells in re.findall(r'<tr data-key="([^"]*)">(.*?)</tr>', body.group(1), re.S)]


@needs_chromium
def test_dashboard_renders_charts_in_headless_chromium(tmp_path_factory, tmp_path):
    model = make_chat_model(tmp_path_factory.mktemp("dash") / "tiny-chat")
    cfg = tiny_config(model, api_key="k", admin_key="adm", max_concurrency=8)
    with running_server(cfg, handle=FakeLearner()) as srv:
        stop = threading.Event()
        traffic = threading.Thread(target=make_traffic, args=(srv.url, "adm", stop), daemon=True)
        traffic.start()
        state = srv.app.state.onspec
        series = state.series
        kinds = lambda: {e["kind"] for e in series.events}  # noqa: E731
        try:
            assert wait_until(lambda: sum(p.tokens_per_s > 0 for p in list(series.points)) >= 4
                              and {"promote", "rollback"} <= kinds(), timeout=60)
        finally:
            stop.set()
            traffic.join(60)
        # the engine is idle now: the next sample carries its final draft policy counts
        assert wait_until(lambda: series.draft_policy == state.worker.snapshot.draft_policy, timeout=10)
        served = httpx.get(f"{srv.url}/v1/dashboard/series", headers={"Authorization": "Bearer k"},
                           timeout=30).json()["draft_policy"]
        assert served == state.worker.snapshot.draft_policy and sum(served["steps"].values()) > 0
        page = f"{srv.url}/dashboard#key=k"

        dom = chromium(tmp_path / "profile-dom", page, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        for chart in CHARTS:
            m = re.search(rf'<canvas id="{chart}"[^>]*data-points="(\d+)"', dom.stdout)
            assert m and int(m.group(1)) > 0, (chart, dom.stdout[:3000])
        m = re.search(r'<canvas id="c-tps"[^>]*data-max="([0-9.e+-]+)"', dom.stdout)
        assert m and float(m.group(1)) > 0
        assert "promote" in dom.stdout and "rollback" in dom.stdout  # the events table
        # the draft policy panel: one row per reason, in the served order, with the served counts
        assert re.search(rf'<table id="policy-steps" data-total="{sum(served["steps"].values())}"', dom.stdout)
        assert [(k, cells[:2]) for k, cells in policy_rows(dom.stdout, "policy-steps")] == \
            [(reason, [reason, str(n)]) for reason, n in served["steps"].items()]
        skips = [(f"{name}/{gate}", [name, gate, str(n)]) for name, gates in served["strategies"].items()
                 for gate, n in gates.items()]
        assert policy_rows(dom.stdout, "policy-skips") == skips
        assert "needs an API key" not in dom.stdout and "Cannot reach" not in dom.stdout

        shot = tmp_path / "dashboard.png"
        res = chromium(tmp_path / "profile-shot", page, f"--screenshot={shot}")
        assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        keep = os.environ.get("ONSPEC_TEST_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "dashboard.png")


@needs_chromium
def test_dashboard_asks_for_a_key_when_one_is_needed(tmp_path_factory, tmp_path):
    model = make_chat_model(tmp_path_factory.mktemp("dash2") / "tiny-chat")
    with running_server(tiny_config(model, api_key="k", speculation="off")) as srv:
        dom = chromium(tmp_path / "profile", f"{srv.url}/dashboard", "--dump-dom")
        assert dom.returncode == 0
        assert "needs an API key" in dom.stdout
