"""Shared benchmark helpers: repeated timing with medians, rich tables, JSON + PNG results.

Every speed figure in bench/ is a median over repeats, reported next to a baseline measured in the same
run (absolute tokens per second on a shared CPU mean little; ratios measured side by side do). Results
go to ``bench/results/<name>.json`` (everything needed to redo the table) and ``<name>.png`` (bars).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from onspec.data import chat_texts  # noqa: F401  (re-exported for the benches)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    """Repeated runs of one configuration: tokens and seconds per repeat."""

    name: str
    tokens: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)   # e.g. acceptance length, drafted/accepted counts (last repeat)
    extras: list[dict] = field(default_factory=list)  # the same, one per repeat

    @property
    def rates(self) -> list[float]:
        return [t / s for t, s in zip(self.tokens, self.seconds) if s > 0]

    @property
    def tps(self) -> float:
        """Median tokens per second over the repeats."""
        return statistics.median(self.rates) if self.rates else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-repeat rates: how noisy this figure is."""
        r = self.rates
        return (max(r) - min(r)) / statistics.median(r) if len(r) > 1 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tps, "rates": self.rates, "spread": self.spread}


def measure(name: str, fn: Callable[..., int | tuple[int, dict]], repeats: int, warmup: int = 0,
            setup: Callable[[], object] | None = None) -> Measurement:
    """Call ``fn`` ``warmup + repeats`` times; it returns the tokens it produced (optionally with a dict of
    extra figures, kept from the last repeat). Wall time per call is recorded for the non-warmup calls.
    ``setup``, when given, runs untimed before each call and its result is passed to ``fn`` (e.g. a fresh
    engine, so no repeat profits from state a previous one left behind)."""
    m = Measurement(name)
    for i in range(warmup + repeats):
        ctx = setup() if setup is not None else None
        t0 = time.perf_counter()
        out = fn(ctx) if setup is not None else fn()
        dt = time.perf_counter() - t0
        tokens, extra = out if isinstance(out, tuple) else (out, {})
        if i >= warmup:
            m.tokens.append(int(tokens))
            m.seconds.append(dt)
            m.extra = extra
            m.extras.append(extra)
    return m


def measure_interleaved(configs: dict[str, tuple[Callable, Callable[[], object] | None]], repeats: int,
                        warmup: int = 0) -> dict[str, Measurement]:
    """Like ``measure`` for several configurations at once, run round-robin, so that a burst of load from
    other processes hits every configuration alike and their ratios stay meaningful. The order flips every
    repeat (A B C, C B A, A B C, ...): with a fixed order, whatever drifts within a round (load, memory
    state, clock) favoured the same configuration every time. ``configs``: name -> (fn, setup or None)."""
    out = {name: Measurement(name) for name in configs}
    for i in range(warmup + repeats):
        order = list(configs.items())
        for name, (fn, setup) in (order if i % 2 == 0 else order[::-1]):
            ctx = setup() if setup is not None else None
            t0 = time.perf_counter()
            res = fn(ctx) if setup is not None else fn()
            dt = time.perf_counter() - t0
            tokens, extra = res if isinstance(res, tuple) else (res, {})
            print(f"  [{i + 1}/{warmup + repeats}] {name}: {tokens} tokens in {dt:.1f} s ({tokens / dt:.1f} tok/s)",
                  file=sys.stderr, flush=True)
            if i >= warmup:
                m = out[name]
                m.tokens.append(int(tokens))
                m.seconds.append(dt)
                m.extra = extra
                m.extras.append(extra)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine_info(threads: int) -> dict:
    """What a result was measured on: the CPU kind (its bf16-relevant flags) and onspec's compute path there."""
    import torch

    from onspec.cpu import cpu_flags
    from onspec.info import cpu_model_name
    from onspec.models.bf16_linear import active_path
    from onspec.models.compute_path import REPORTED_FLAGS

    load = os.getloadavg()[0]
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu_model_name(),
        "cpu_flags": [f for f in REPORTED_FLAGS if f in cpu_flags()],
        "compute_path": active_path().name,
        "cores": os.cpu_count(),
        "threads": threads,
        "load_average_1min": load,
    }


def busy_warning(threads: int) -> str | None:
    """A warning when other processes compete for the cores (timings are then noisy, ratios less so)."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if load > max(1.0, cores - threads + 0.5):
        return (f"machine busy: 1-min load average {load:.1f} on {cores} cores; absolute timings are noisy, "
                f"compare ratios measured in the same run")
    return None


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def print_table(title: str, columns: list[str], rows: list[list], notes: Sequence[str] = ()) -> None:
    """Print a table with rich (falls back to plain text when rich is missing)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a dependency; keep the bench usable anyway
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(_fmt(c) for c in r))
        for n in notes:
            print(n)
        return
    table = Table(title=title, show_lines=False)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[_fmt(c) for c in r])
    console = Console(width=160)
    console.print(table)
    for n in notes:
        console.print(n, markup=False)


def _fmt(x) -> str:
    if isinstance(x, float):
        if x != x:  # NaN
            return "-"
        return f"{x:.2f}" if abs(x) < 100 else f"{x:.1f}"
    return str(x)


def write_results(name: str, payload: dict, bars: dict[str, dict[str, float]] | None = None,
                  ylabel: str = "tokens / s", out_dir: Path | None = None) -> tuple[Path, Path | None]:
    """Write ``<name>.json`` and, when ``bars`` is given ({panel: {label: value}}), ``<name>.png``."""
    out = out_dir or RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / f"{name}.json"
    jpath.write_text(json.dumps(payload, indent=2, default=_json_default))
    ppath = None
    if bars:
        ppath = out / f"{name}.png"
        plot_bars(bars, ppath, ylabel, title=name)
    return jpath, ppath


def _json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, float) and o != o:
        return None
    return str(o)


def plot_bars(panels: dict[str, dict[str, float]], path: Path, ylabel: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(max(5.0, 4.2 * n), 4.2), squeeze=False)
    for ax, (panel, values) in zip(axes[0], panels.items()):
        labels = list(values)
        vals = [values[k] if values[k] == values[k] else 0.0 for k in labels]
        bars = ax.bar(range(len(labels)), vals, color="#4C72B0")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(ylabel)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}" if v < 100 else f"{v:.0f}", (b.get_x() + b.get_width() / 2, v),
                        ha="center", va="bottom", fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b and a == a else float("nan")


def hf_generate(model_dir: Path | str, dtype: str, tokenizer, max_tokens: int,
                exact_length: bool = False) -> Callable[[list[str], int], Callable[[], int]]:
    """transformers ``generate`` (greedy) as a peer: loads the model once and returns
    ``make(prompts, lookup)`` -> a run function generating for each prompt in turn (plain, or prompt-lookup
    decoding with ``lookup`` tokens) and returning the number of new tokens. ``exact_length`` forces
    ``max_tokens`` new tokens per prompt (decode throughput compares equal work)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    length = {"min_new_tokens": max_tokens} if exact_length else {}

    def make(prompts: list[str], lookup: int = 0) -> Callable[[], int]:
        ids = [tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids for p in prompts]
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}

        def run() -> int:
            n = 0
            with torch.inference_mode():
                for x in ids:
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens,
                                         do_sample=False, pad_token_id=tokenizer.eos_token_id, **length, **extra)
                    n += out.shape[1] - x.shape[1]
            return n
        return run
    return make


# ---- llama.cpp (llama-cpp-python, built portable by `make bench-peers`) --------------------------------


def llamacpp_single(gguf: Path, threads: int, tokenizer, prompts: list[str], max_tokens: int, lookup: int = 0,
                    ignore_eos: bool = True):
    """A run() that generates ``prompts`` one at a time with llama.cpp (greedy; ``lookup``: its prompt-lookup
    decoding with that many draft tokens; ``ignore_eos``: EOS suppressed so every prompt runs max_tokens)."""
    import llama_cpp

    kw = {}
    if lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
    llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                          n_batch=512, verbose=False, seed=0, **kw)
    eos = llm.token_eos()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    llm.create_completion(ids[0][:8], max_tokens=2, temperature=0.0)  # warm-up (first call initialises)

    def run() -> int:
        n = 0
        for x in ids:
            llm.reset()
            out = llm.create_completion(x, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                        logit_bias={eos: -1e9} if ignore_eos else None)
            n += out["usage"]["completion_tokens"]
        return n
    return run


def llamacpp_available() -> str | None:
    """None when llama-cpp-python imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        return f"llama-cpp-python not usable ({exc.__class__.__name__}: {exc})"
    return None
