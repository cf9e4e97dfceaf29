"""Serving benchmark: a loopback load generator against `onspec serve`, speculation auto against off.

For each mode a real server process is started; for each concurrency level (1, 4, 16, 32 by default) a
fixed list of chat prompts is streamed through it (greedy, the same prompts in the same order for both
modes) and the script records throughput (completion tokens per second of wall time), time to first token
and inter-token latency. Inter-token latency (ITL) is the gap between successive streamed chunks, as in
vLLM's benchmark; with speculation a chunk can carry several tokens, so the time per output token
(TPOT = (end - first token) / (tokens - 1)) is reported too. Speedups are ratios against "off" measured
in this same run.

Memory: the server's resident set (its children included: a trainer process with --train online) is
sampled every 0.1 s; the table reports the peak, and a final phase sends --mem-requests requests to the
"auto" server and compares the resident set after the first and the last hundred (growth would be a
leak), for the server process, its children (the trainer) and their total apart. Writes bench/results/serve.json and bench/results/serve.png.

    python bench/serve.py --quick                 # one run per level, 200-request memory phase
    python bench/serve.py --requests 64           # 64 requests per level, 3 runs each (median)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

PROMPTS = [
    "Rewrite this function with type hints and a docstring:\n\ndef area(w, h):\n    return w * h\n",
    "List the planets of the solar system, one per line.",
    "Explain what a hash map is in two sentences.",
    "Convert this list to a JSON array of objects with name and age: Alice 31, Bob 27, Carol 45.",
    "Write a Python function that returns the n-th Fibonacci number, then show an example call.",
    "Summarise: The quick brown fox jumps over the lazy dog. The dog does not move. The fox jumps again.",
    "Translate to French: Good morning. How are you today? I am fine, thank you.",
    "Give three tips for writing clear emails.",
    "Fix the bug in this code and return the corrected code:\n\nfor i in range(10)\n    print(i)\n",
    "What are the days of the week? Answer with a numbered list.",
    "Write a haiku about the sea.",
    "Repeat the following sentence three times: Practice makes perfect.",
    "Describe the water cycle in four steps.",
    "Write SQL that selects the names of users older than 30 from a table users(name, age).",
    "Name five fruits and their colours as a markdown table.",
    "Explain recursion to a child in three sentences.",
]


@dataclass
class RequestResult:
    ttft: float
    e2e: float
    tokens: int
    gaps: list[float] = field(default_factory=list)
    ok: bool = True


@dataclass
class LevelResult:
    mode: str
    concurrency: int
    requests: int
    failed: int
    wall_s: float
    completion_tokens: int          # over all runs
    throughput: float               # tokens/s of the median run
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float
    tpot_p50: float
    peak_rss_mib: float


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RSSSampler:
    """Resident memory of a process and its children, sampled on a thread: the total's peak, and each part's.

    Parts: ``server`` (the process itself), ``trainer`` (its children: with ``--train online`` the drafter
    trainer, plus multiprocessing's small resource tracker) and ``total``. Reporting them apart is what lets
    growth be attributed: the two processes hold different caches (the engine's KV cache and oneDNN
    primitives; the trainer's replay buffer and its own primitives).
    """

    PARTS = ("server", "trainer", "total")

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.peaks = {k: 0 for k in self.PARTS}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def parts(self) -> dict[str, int]:
        """Bytes resident now: {"server", "trainer" (all children), "total"}."""
        out = {k: 0 for k in self.PARTS}
        try:
            out["server"] = self.proc.memory_info().rss
            children = self.proc.children(recursive=True)
        except psutil.Error:
            return out
        for p in children:
            try:
                out["trainer"] += p.memory_info().rss
            except psutil.Error:
                pass
        out["total"] = out["server"] + out["trainer"]
        return out

    def current(self) -> int:
        return self.parts()["total"]

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.parts()
            for k, v in now.items():
                self.peaks[k] = max(self.peaks[k], v)
            self.peak = self.peaks["total"]
            time.sleep(self.interval)

    def start(self) -> "RSSSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class Server:
    def __init__(self, args: argparse.Namespace, mode: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "onspec.cli", "serve", "--model", args.model, "--port", str(self.port),
               "--speculation", mode, "--max-concurrency", "32", "--max-queue", "1024",
               # learning needs speculation on: the "off" baseline serves without a trainer
               "--train", args.train if mode != "off" else "off",
               "--log-level", "warning", "--threads", str(args.threads), "--max-model-len", "1024"]
        self.log = open(Path(tempfile.gettempdir()) / f"onspec-bench-serve-{mode}.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start in 300 s")
            time.sleep(0.3)
        self.rss = RSSSampler(self.proc.pid).start()

    def stop(self) -> None:
        self.rss.stop()
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> RequestResult:
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return RequestResult(0, 0, 0, ok=False)
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    end = time.perf_counter()
    return RequestResult(ttft=(first or end) - t0, e2e=end - t0, tokens=tokens, gaps=gaps)


async def run_level(url: str, concurrency: int, requests: int, max_tokens: int) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def task(i: int) -> RequestResult:
            async with sem:
                return await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        return list(results), time.perf_counter() - t0


def summarise(mode: str, conc: int, runs: list[tuple[list[RequestResult], float]], peak: int) -> LevelResult:
    """Throughput of the median run (by tokens/s); latency percentiles over the requests of all runs."""
    rates = sorted((sum(r.tokens for r in res if r.ok) / wall, wall) for res, wall in runs)
    rate, wall = rates[len(rates) // 2]
    results = [r for res, _ in runs for r in res]
    ok = [r for r in results if r.ok]
    toks = sum(r.tokens for r in ok)
    gaps = [g for r in ok for g in r.gaps]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    return LevelResult(mode, conc, len(results), len(results) - len(ok), wall, toks, rate,
                       pct([r.ttft for r in ok], 50), pct([r.ttft for r in ok], 99), pct(gaps, 50), pct(gaps, 99),
                       pct(tpot, 50), peak / 2**20)


def memory_phase(server: Server, n: int, max_tokens: int) -> dict:
    """n requests at concurrency 16 in blocks of 100; the resident set after each block.

    ``rss_mib_by_requests`` is [(requests, total MiB)] as before; ``by_process`` has the same marks and the
    first/last/growth/peak figures for each part of :class:`RSSSampler` (server, trainer, total).
    """
    marks: list[tuple[int, float]] = []
    parts: list[tuple[int, dict[str, float]]] = []
    done = 0
    while done < n:
        block = min(100, n - done)
        asyncio.run(run_level(server.url, 16, block, max_tokens))
        done += block
        now = {k: v / 2**20 for k, v in server.rss.parts().items()}
        parts.append((done, now))
        marks.append((done, now["total"]))
        print(f"  memory: {done:5d} requests, RSS {now['total']:7.1f} MiB (server {now['server']:7.1f}, "
              f"trainer {now['trainer']:7.1f})", flush=True)
    first, last = marks[0][1], marks[-1][1]
    by_process = {}
    for k in RSSSampler.PARTS:
        series = [(d, m[k]) for d, m in parts]
        by_process[k] = {"rss_mib_by_requests": series, "first_mib": series[0][1], "last_mib": series[-1][1],
                         "growth_mib": series[-1][1] - series[0][1], "peak_mib": server.rss.peaks[k] / 2**20}
    return {"requests": n, "rss_mib_by_requests": marks, "first_mib": first, "last_mib": last,
            "growth_mib": last - first, "peak_mib": server.rss.peak / 2**20, "by_process": by_process}


def plot(levels: list[LevelResult], memory: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 if memory else 3, figsize=(18 if memory else 14, 4))
    for mode in sorted({lv.mode for lv in levels}):
        rows = [lv for lv in levels if lv.mode == mode]
        xs = [lv.concurrency for lv in rows]
        axes[0].plot(xs, [lv.throughput for lv in rows], marker="o", label=mode)
        axes[1].plot(xs, [lv.ttft_p50 * 1000 for lv in rows], marker="o", label=f"{mode} p50")
        axes[1].plot(xs, [lv.ttft_p99 * 1000 for lv in rows], marker="x", linestyle="--", label=f"{mode} p99")
        axes[2].plot(xs, [lv.tpot_p50 * 1000 for lv in rows], marker="o", label=f"{mode} TPOT p50")
        axes[2].plot(xs, [lv.itl_p50 * 1000 for lv in rows], marker="x", linestyle="--", label=f"{mode} ITL p50")
    for ax, title, unit in zip(axes, ("throughput", "time to first token", "per-token latency"),
                               ("tokens/s", "ms", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if memory:
        xs, ys = zip(*memory["rss_mib_by_requests"])
        axes[3].plot(xs, ys, marker="o", label="total")
        for part in ("server", "trainer"):
            series = memory.get("by_process", {}).get(part, {}).get("rss_mib_by_requests")
            if series and any(v for _, v in series):
                axes[3].plot(*zip(*series), marker=".", linestyle="--", label=part)
        axes[3].legend(fontsize=8)
        axes[3].set_title("resident memory (server + trainer)")
        axes[3].set_xlabel("requests served")
        axes[3].set_ylabel("MiB")
        axes[3].set_ylim(0, max(ys) * 1.2)
        axes[3].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--quick", action="store_true", help="fewer requests, shorter answers, short memory phase")
    p.add_argument("--requests", type=int, default=0, help="requests per concurrency level (default: by mode)")
    p.add_argument("--concurrency", default="1,4,16,32")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--modes", default="off,auto", help="speculation modes; the first is the baseline")
    p.add_argument("--repeats", type=int, default=0, help="runs per level, median reported (default 3, quick 1)")
    p.add_argument("--mem-requests", type=int, default=-1, help="memory phase size (default 1000, quick 200)")
    p.add_argument("--train", default="off", choices=["off", "online"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "serve.json"))
    args = p.parse_args()
    levels_c = [int(x) for x in args.concurrency.split(",")]
    max_tokens = args.max_tokens or (32 if args.quick else 96)
    mem_n = args.mem_requests if args.mem_requests >= 0 else (200 if args.quick else 1000)
    modes = args.modes.split(",")
    args.repeats = args.repeats or (1 if args.quick else 3)
    RESULTS.mkdir(parents=True, exist_ok=True)

    levels: list[LevelResult] = []
    memory = None
    for mode in modes:
        print(f"== speculation {mode}: starting the server", flush=True)
        server = Server(args, mode)
        try:
            asyncio.run(run_level(server.url, 2, 4, 8))  # warm-up
            for conc in levels_c:
                n = args.requests or (max(8, conc) if args.quick else max(16, 2 * conc))
                n = max(n, conc)
                runs = [asyncio.run(run_level(server.url, conc, n, max_tokens)) for _ in range(args.repeats)]
                lv = summarise(mode, conc, runs, server.rss.peak)
                levels.append(lv)
                print(f"  c={conc:3d}: {lv.throughput:7.1f} tok/s, TTFT p50 {lv.ttft_p50 * 1000:7.0f} ms, "
                      f"TPOT p50 {lv.tpot_p50 * 1000:6.1f} ms, failed {lv.failed}", flush=True)
            if mode == modes[-1] and mem_n > 0:
                memory = memory_phase(server, mem_n, 16)
        finally:
            server.stop()

    base = {lv.concurrency: lv for lv in levels if lv.mode == modes[0]}
    print()
    print(f"model {args.model}, greedy, max_tokens {max_tokens}, {len(PROMPTS)} chat prompts, "
          f"{args.repeats} run(s) per level (median tok/s), baseline = speculation {modes[0]}")
    head = (f"{'mode':>6} {'conc':>4} {'reqs':>4} {'tok/s':>7} {'x base':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
            f"{'ITL p50':>8} {'ITL p99':>8} {'TPOT p50':>9} {'peak RSS':>9}")
    print(head)
    print("-" * len(head))
    for lv in sorted(levels, key=lambda x: (x.concurrency, modes.index(x.mode))):
        ratio = lv.throughput / base[lv.concurrency].throughput if lv.concurrency in base else float("nan")
        print(f"{lv.mode:>6} {lv.concurrency:>4} {lv.requests:>4} {lv.throughput:>7.1f} {ratio:>5.2f}x "
              f"{lv.ttft_p50 * 1000:>7.0f}ms {lv.ttft_p99 * 1000:>7.0f}ms {lv.itl_p50 * 1000:>6.1f}ms "
              f"{lv.itl_p99 * 1000:>6.1f}ms {lv.tpot_p50 * 1000:>7.1f}ms {lv.peak_rss_mib:>6.0f}MiB")
    if memory:
        print(f"\nmemory ({modes[-1]}, {memory['requests']} requests at concurrency 16): peak "
              f"{memory['peak_mib']:.0f} MiB, after first 100 {memory['first_mib']:.0f} MiB, after all "
              f"{memory['last_mib']:.0f} MiB (growth {memory['growth_mib']:+.0f} MiB); limit 3072 MiB")
        print(f"{'part':>8} {'first':>8} {'last':>8} {'growth':>8} {'peak':>8}  (MiB)")
        for part, m in memory["by_process"].items():
            print(f"{part:>8} {m['first_mib']:>8.0f} {m['last_mib']:>8.0f} {m['growth_mib']:>+8.0f} "
                  f"{m['peak_mib']:>8.0f}")
    out = Path(args.out)
    out.write_text(json.dumps({"args": vars(args), "max_tokens": max_tokens, "levels": [asdict(x) for x in levels],
                               "memory": memory, "cpu_count": os.cpu_count(),
                               "load_avg_at_end": os.getloadavg()}, indent=2))
    plot(levels, memory, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    failed = sum(lv.failed for lv in levels)
    over = memory is not None and memory["peak_mib"] > 3072
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
