"""The benchmarks' launcher: the training recipe run as a user runs it, `accelerate launch` on this CPU.

    from bench.launch import run_recipe
    summary = run_recipe("recipes/configs/smollm2_arithmetic_cpu.yaml", ["learner.steps=4"], run_dir)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from asymre.tracking import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def run_recipe(config: str | Path, overrides: list[str], run_dir: str | Path, accelerate_config: str = "recipes/accelerate/cpu.yaml") -> dict:
    """Train with `recipes/train.py` into `run_dir`; returns the held-out pass@1 before and after (when the run
    evaluated at both ends) and the run's metrics rows. A failed run raises with its output's tail."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", accelerate_config, "recipes/train.py",
           "--config", str(config), *overrides, f"logging.run_dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = read_metrics(run_dir)
    evals = [r["eval/pass@1"] for r in rows if "eval/pass@1" in r]
    summary: dict = {"rows": rows}
    if len(evals) >= 2:
        summary.update({"eval/pass@1_start": evals[0], "eval/pass@1_end": evals[-1]})
    return summary
