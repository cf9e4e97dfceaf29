"""What ``onspec simulate-rollout`` shows and writes: a rich table, ``metrics.jsonl`` (one row per policy
and cluster size), ``summary.json`` (inputs with their sources, length statistics, results) and, with
``--plot``, ``curves.png`` (makespan, tail, utilisation and speedup over the baseline against N)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from .sweep import Sweep, length_stats

PANELS = (("makespan", "makespan (s)"), ("tail", "tail: last 10% of responses (s)"),
          ("utilisation", "worker utilisation"), ("speedup", "throughput over baseline (x)"))


def rows(sweep: Sweep, baseline: str) -> list[dict]:
    """One flat dict per (policy, N): the result plus its ratios against ``baseline`` at the same N."""
    out = []
    for r in sweep.results:
        row = {**asdict(r), "tokens_per_second": r.tokens_per_second}
        if baseline in sweep.config.policies:
            row.update(sweep.versus(r.policy, r.workers, baseline))
        out.append(row)
    return out


def summary(sweep: Sweep, sources: dict[str, object], baseline: str) -> dict:
    cfg = sweep.config
    largest = max(sweep.lengths)
    return {"config": asdict(cfg), "sources": sources, "baseline": baseline,
            "lengths_at_largest_n": {"workers": largest, **length_stats(sweep.lengths[largest], cfg.max_tokens)},
            "results": rows(sweep, baseline)}


def print_table(sweep: Sweep, baseline: str, sources: dict[str, object]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"simulated rollout (vs {baseline} at the same N)")
    for i, col in enumerate(("N", "policy", "makespan s", "x", "tail s", "tail -%", "util", "slots",
                             "drafting", "moves")):
        table.add_column(col, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows(sweep, baseline):
        table.add_row(str(row["workers"]), row["policy"], f"{row['makespan']:.1f}", f"{row.get('speedup', 0):.2f}",
                      f"{row['tail']:.1f}", f"{100 * row.get('tail_reduction', 0):.0f}",
                      f"{row['utilisation']:.2f}", f"{row['slot_utilisation']:.2f}",
                      f"{row['drafting_steps'] / row['steps']:.2f}" if row["steps"] else "-", str(row["moves"]))
    console = Console() if sys.stdout.isatty() else Console(width=140)  # a pipe or file: no squeezing
    console.print(table)
    for key, value in sources.items():
        console.print(f"{key}: {value}", highlight=False, soft_wrap=True)


def write(sweep: Sweep, out: Path, sources: dict[str, object], baseline: str, plot: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows(sweep, baseline)))
    summary_path = out / "summary.json"
    summary_path.write_text(json.dumps(summary(sweep, sources, baseline), indent=2))
    paths = [metrics, summary_path]
    if plot:
        paths.append(plot_sweep(sweep, out / "curves.png", baseline))
    return paths


def plot_sweep(sweep: Sweep, path: Path, baseline: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = rows(sweep, baseline)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes.flat, PANELS):
        for policy in sweep.config.policies:
            pts = sorted((r["workers"], r[key]) for r in data if r["policy"] == policy and key in r)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers (N)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("onspec simulate-rollout")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
