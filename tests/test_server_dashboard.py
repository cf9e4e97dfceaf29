"""The dashboard in a real headless Chromium: it loads without any external network, draws non-empty charts
after some traffic (drafter events included), and a screenshot is saved.

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
import time
from pathlib import Path

import httpx
import pytest

from test_server_support import FakeLearner, make_chat_model, running_server, tiny_config, wait_until

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
                 if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed; "
                                                         "install it with: apt-get install -y chromium")
CHARTS = ("c-tps", "c-acc", "c-speed", "c-load")


def chromium(profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-sync", "--disable-component-update", f"--user-data-dir={profile}",
           "--window-size=1400,1150", "--hide-scrollbars", "--virtual-time-budget=5000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def make_traffic(url: str, seconds: float, admin_key: str, stop: threading.Event) -> None:
    prompts = ["List the numbers: one two three four one two three four", "tick tock " * 6,
               "The quick brown fox jumps over the lazy dog. The quick brown fox", "a b c d e f g a b c d e f g"]
    body = {"model": "default", "max_tokens": 48, "temperature": 0, "stream": True, "ignore_eos": True}

    def one(i: int) -> None:
        with httpx.stream("POST", url + "/v1/completions", json={**body, "prompt": prompts[i % 4]},
                          headers={"Authorization": "Bearer k"}, timeout=60) as r:
            for _ in r.iter_lines():
                pass

    deadline = time.monotonic() + seconds
    admin = {"Authorization": f"Bearer {admin_key}"}
    i = 0
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while time.monotonic() < deadline and not stop.is_set():
            list(pool.map(one, range(i, i + 4)))
            i += 4
            if i == 8:
                httpx.post(url + "/v1/speculator/promote", json={"version": 2}, headers=admin, timeout=30)
            if i == 16:
                httpx.post(url + "/v1/speculator/rollback", headers=admin, timeout=30)


def test_dashboard_renders_charts_in_headless_chromium(tmp_path_factory, tmp_path):
    model = make_chat_model(tmp_path_factory.mktemp("dash") / "tiny-chat")
    cfg = tiny_config(model, api_key="k", admin_key="adm", max_concurrency=8)
    with running_server(cfg, handle=FakeLearner()) as srv:
        stop = threading.Event()
        traffic = threading.Thread(target=make_traffic, args=(srv.url, 7.0, "adm", stop), daemon=True)
        traffic.start()
        series = srv.app.state.onspec.series
        assert wait_until(lambda: sum(p.tokens_per_s > 0 for p in series.points) >= 4, timeout=60)
        traffic.join(60)
        page = f"{srv.url}/dashboard#key=k"

        dom = chromium(tmp_path / "profile-dom", page, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        for chart in CHARTS:
            m = re.search(rf'<canvas id="{chart}"[^>]*data-points="(\d+)"', dom.stdout)
            assert m and int(m.group(1)) > 0, (chart, dom.stdout[:3000])
        m = re.search(r'<canvas id="c-tps"[^>]*data-max="([0-9.e+-]+)"', dom.stdout)
        assert m and float(m.group(1)) > 0
        assert "promote" in dom.stdout and "rollback" in dom.stdout  # the events table
        assert "needs an API key" not in dom.stdout and "Cannot reach" not in dom.stdout

        shot = tmp_path / "dashboard.png"
        res = chromium(tmp_path / "profile-shot", page, f"--screenshot={shot}")
        assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        keep = os.environ.get("ONSPEC_TEST_ARTIFACTS")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "dashboard.png")


def test_dashboard_asks_for_a_key_when_one_is_needed(tmp_path_factory, tmp_path):
    model = make_chat_model(tmp_path_factory.mktemp("dash2") / "tiny-chat")
    with running_server(tiny_config(model, api_key="k", speculation="off")) as srv:
        dom = chromium(tmp_path / "profile", f"{srv.url}/dashboard", "--dump-dom")
        assert dom.returncode == 0
        assert "needs an API key" in dom.stdout
