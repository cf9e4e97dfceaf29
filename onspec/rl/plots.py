"""PNG curves of an RL run's per-step metrics (reward, rollout time, tail, acceptance, tokens/s, training)."""

from __future__ import annotations

from pathlib import Path

PANELS = (
    ("reward", "mean reward"),
    ("rollout_seconds", "rollout seconds"),
    ("tail_seconds", "tail seconds"),
    ("acceptance_length", "acceptance length"),
    ("tokens_per_second", "rollout tokens/s"),
    ("train_seconds", "training seconds"),
)


def plot_metrics(rows: list[dict], path: Path, title: str = "onspec rl") -> Path:
    """One figure, one panel per metric, x = RL step."""
    return plot_runs({"run": rows}, path, title)


def plot_runs(runs: dict[str, list[dict]], path: Path, title: str = "onspec rl",
              panels: tuple[tuple[str, str], ...] = PANELS) -> Path:
    """Several runs' metrics side by side (one line per run in each panel)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        for name, rows in runs.items():
            xs = [r["step"] for r in rows if key in r]
            ys = [r[key] for r in rows if key in r]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_title(label)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(runs) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
