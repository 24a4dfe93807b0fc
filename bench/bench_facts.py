"""In-tool versus in-weight learning of facts by RL (Houliston et al., arXiv 2508.20755, with AsymRE), on this CPU.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_facts [--only NAME ...] [--out bench/results/facts.json]

Runs the shipped recipes (recipes/train.py, one CPU process, as `accelerate launch` with recipes/accelerate/cpu.yaml
runs them) with the overrides below, then measures each final model:
- its task accuracy before training, after the warm-start and after RL (the runs' own evaluations, greedy);
- in-tool: accuracy on a fresh database (task.facts.seed=1, 512 people, none trained on), through the same tool;
- in-weight: recall of the trained facts (the run's evaluation) and accuracy on held-out people (a guess);
- drift from the base model: KL and total variation on the shipped general prompts (asymre/drift.py);
- the built-in arithmetic task's held-out accuracy (greedy), before and after.
Writes the table to --out and docs/figures/facts_*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INTOOL = "recipes/configs/smollm2_facts_intool_cpu.yaml"
INWEIGHT = "recipes/configs/smollm2_facts_inweight_cpu.yaml"
RUNS = {  # name -> (config, overrides); every run shares its config's warm-start and learner budget
    "intool": (INTOOL, []),
    "intool_dv0": (INTOOL, ["loss.delta_v=0.0"]),
    "intool_dv+0.1": (INTOOL, ["loss.delta_v=0.1"]),
    "intool_grpo": (INTOOL, ["loss.name=grpo"]),
    "inweight_n16": (INWEIGHT, ["task.facts.num_people=32"]),
    "inweight_n64": (INWEIGHT, ["task.facts.num_people=128"]),
    "inweight_n256": (INWEIGHT, ["task.facts.num_people=512"]),
    "inweight_n16_10x": (INWEIGHT, ["task.facts.num_people=32", "warm_start.steps=30"]),
}


def _py() -> str:
    return str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else sys.executable


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _eval(config: str, model: str, overrides: list[str]) -> dict:
    out = subprocess.run([_py(), "-m", "asymre.cli", "eval", "--config", config, "--model", model, "rollout.backend=hf", *overrides],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout[out.stdout.index("{"):])


def run(name: str, base: str, out_dir: Path) -> dict:
    config, overrides = RUNS[name]
    run_dir = out_dir / name
    t0 = time.perf_counter()
    subprocess.run([_py(), "recipes/train.py", "--config", config, *overrides, f"logging.run_dir={run_dir}", "logging.overwrite=true",
                    "logging.progress=false", f"logging.run_name={name}"], cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    recs = _records(run_dir)
    evals = [r for r in recs if "eval/pass@1" in r]
    warm = next((r for r in recs if "warm_start/seconds" in r), {})
    steps = [r for r in recs if "perf/step_seconds" in r]
    res = {"config": config, "overrides": overrides, "wall_seconds": wall,
           "train_seconds": warm.get("warm_start/seconds", 0.0) + sum(r["perf/step_seconds"] for r in steps),
           "warm_start_seconds": warm.get("warm_start/seconds", 0.0), "rl_steps": len(steps),
           "acc_start": evals[0]["eval/pass@1"], "acc_warm_start": warm.get("warm_start/eval/pass@1"), "acc_end": evals[-1]["eval/pass@1"],
           "reward_mean_per_step": [r.get("reward/mean") for r in steps],
           "tool_calls_start": evals[0].get("eval/episode/tool_calls"), "tool_calls_end": evals[-1].get("eval/episode/tool_calls")}
    model = str(run_dir / "final_model")
    if config == INTOOL:
        fresh = _eval(config, model, ["task.facts.seed=1", "task.facts.num_people=512", "task.eval_size=64"])
        res["acc_fresh_database_512"] = fresh["eval/pass@1"]
    else:
        held = _eval(config, model, [*overrides, "task.facts.eval_on=held_out"])
        res["acc_held_out"] = held["eval/pass@1"]
    res["arithmetic_after"] = _eval("recipes/configs/smollm2_arithmetic_cpu.yaml", model, [])["eval/pass@1"]
    from asymre.drift import drift

    res.update({f"drift_{k}": v for k, v in drift(base, model).items()})
    return res


def _figures(results: dict, base: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_dir = ROOT / "docs" / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    ns = [(16, "inweight_n16"), (64, "inweight_n64"), (256, "inweight_n256")]
    have = [(n, k) for n, k in ns if k in results]
    if have and "intool" in results:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([n for n, _ in have], [results[k]["acc_end"] for _, k in have], "o-", label="in-weight: recall of trained facts")
        ax.axhline(results["intool"]["acc_end"], color="C1", ls="--", label="in-tool: held-out people")
        if "acc_fresh_database_512" in results["intool"]:
            ax.axhline(results["intool"]["acc_fresh_database_512"], color="C2", ls=":", label="in-tool: fresh 512-person database")
        ax.set_xscale("log", base=2)
        _save(plt, fig, ax, "trained people (4 facts each)", "accuracy (greedy)", "SmolLM2-135M, same learner budget",
              fig_dir / "facts_recall_vs_n.png")
    rows = [k for k in LOSS_LABELS if k in results]
    if rows:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for k in rows:
            r = results[k]["reward_mean_per_step"]
            ax.plot(range(1, len(r) + 1), r, "o-", label=LOSS_LABELS[k])
        _save(plt, fig, ax, "learner step (after the warm-start)", "training reward (behaviour policy)",
              "in-tool facts, off-policy (sync.interval=2)", fig_dir / "facts_intool_delta_v.png")


LOSS_LABELS = {"intool": "AsymRE dV=-0.1", "intool_dv0": "AsymRE dV=0", "intool_dv+0.1": "AsymRE dV=+0.1", "intool_grpo": "GRPO"}


def _save(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, help=f"runs to do (default all): {', '.join(RUNS)}")
    p.add_argument("--out", default="bench/results/facts.json")
    p.add_argument("--runs-dir", default="/tmp/asymre-bench-facts")
    a = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from asymre.models import resolve_model

    out = ROOT / a.out
    saved = json.loads(out.read_text()) if out.is_file() else {}
    results, base = saved.get("runs", {}), saved.get("base", {})
    base_path = resolve_model("smollm2-135m-instruct")
    if "arithmetic" not in base:
        base["arithmetic"] = _eval("recipes/configs/smollm2_arithmetic_cpu.yaml", base_path, [])["eval/pass@1"]
        calls = _eval(INTOOL, base_path, ["eval.preset=paper", "eval.k=2", "task.eval_size=64"])  # 128 samples at T = 0.1
        base["intool_tool_calls_per_128_samples"] = calls.get("eval/episode/tool_calls", 0.0)
        base["intool_acc_paper_preset"] = calls["eval/pass@1"]
    for name in a.only or list(RUNS):
        print(f"== {name}", flush=True)
        results[name] = run(name, base_path, Path(a.runs_dir))
        print(json.dumps(results[name]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": "2 CPU cores", "base": base, "runs": results}, indent=1))
    _figures(results, base)


if __name__ == "__main__":
    main()
