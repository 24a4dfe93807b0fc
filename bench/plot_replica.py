"""Plot the CPU-scale replica of the paper's delta_V finding from its run folders.

    .venv/bin/python bench/plot_replica.py runs/cpu_replica-* --out docs/figures/replica

Groups runs by delta_V (the run config's loss.delta_v), averages seeds, and draws held-out pass@1,
training reward, policy entropy and distinct answers per group against the learner step; writes a PNG
and a JSON summary (final pass@1 per run).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from asymre.plot import series
from asymre.tracking import read_metrics

PANELS = [("eval/pass@1", "held-out pass@1 (greedy)"), ("reward/mean", "training reward (behaviour samples)"),
          ("loss/entropy", "policy entropy (nats/token)"), ("collapse/distinct_answers", "distinct answers per group")]


def delta_v_of(run: Path) -> float:
    return json.loads((run / "config.json").read_text())["loss"]["delta_v"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="docs/figures/replica")
    a = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_dv: dict[float, list[list[dict]]] = defaultdict(list)
    summary = {}
    for r in map(Path, a.runs):
        rows = read_metrics(r)
        dv = delta_v_of(r)
        by_dv[dv].append(rows)
        ev = series(rows, "eval/pass@1")
        summary[r.name] = {"delta_v": dv, "pass@1_by_step": dict(zip(*ev)),
                           "final_pass@1": ev[1][-1] if ev[1] else None}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    cmap = plt.get_cmap("coolwarm")
    dvs = sorted(by_dv)
    for ax, (key, title) in zip(axes.flat, PANELS):
        for i, dv in enumerate(dvs):
            curves = [series(rows, key) for rows in by_dv[dv]]
            steps = sorted(set.intersection(*(set(c[0]) for c in curves)))
            if not steps:
                continue
            mean = [sum(dict(zip(*c))[s] for c in curves) / len(curves) for s in steps]
            ax.plot(steps, mean, "o-", ms=3, color=cmap(i / max(len(dvs) - 1, 1)), label=f"delta_V = {dv:+.1f} (n={len(curves)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("learner step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("CPU replica: SmolLM2-135M, arithmetic, off-policy (weights pushed every 5 steps), mean over seeds")
    fig.tight_layout()
    fig.savefig(out / "replica_delta_v.png", dpi=100)
    (out / "replica_summary.json").write_text(json.dumps(summary, indent=1))
    for name, s in sorted(summary.items()):
        print(f"{name:28s} delta_V={s['delta_v']:+.1f} final pass@1={s['final_pass@1']}")


if __name__ == "__main__":
    main()
