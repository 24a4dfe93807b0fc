"""PNG curves of a run from its metrics.jsonl: reward, eval accuracy, entropy, staleness, loss (and
completion length, distinct answers). `asymre plot RUN_DIR [--out FILE]`."""

from __future__ import annotations

from pathlib import Path

from asymre.tracking import read_metrics

PANELS = [
    ("reward/mean", "reward (train samples)"),
    ("eval/pass@1", "held-out pass@1"),
    ("loss/entropy", "policy entropy (nats/token)"),
    ("rollout/staleness_mean", "staleness of trained groups"),
    ("loss/value", "loss"),
    ("rollout/completion_len", "completion length (tokens)"),
    ("collapse/distinct_answers", "distinct answers per group"),
    ("loss/positive_weight_share", "positive weight share"),
]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    last: dict[int, float] = {}
    for r in rows:
        if r.get(key) is not None:
            last[r["step"]] = r[key]  # a step re-done after resume replaces the earlier record
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir}/metrics.jsonl has no metrics")
    present = [(k, t) for k, t in PANELS if series(rows, k)[0]]
    cols = 2
    n_rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(10, 2.8 * n_rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present):
        x, y = series(rows, key)
        ax.plot(x, y, "o-" if len(x) < 30 else "-", ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
