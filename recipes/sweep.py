"""Run a sweep: one base config, a list of runs (each a set of dotted overrides), one command.

    python recipes/sweep.py recipes/configs/sweeps/paper_delta_v_qwen.yaml [--dry-run] [--only NAME ...] [-- key=value ...]

A sweep file names the base config, the accelerate config, the overrides shared by every run, and the
runs. Each run is launched in turn with `accelerate launch` into its own run folder
(`logging.run_name` = the run's name); `--dry-run` only validates every run's config and prints the
commands (for a cluster scheduler). Every run's config is validated before the first one starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from asymre.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def load_sweep(path: str | Path) -> dict:
    spec = OmegaConf.to_container(OmegaConf.load(path))
    for key in ("config", "runs"):
        if key not in spec:
            raise ConfigError(f"sweep {path}: missing key {key!r}")
    for i, run in enumerate(spec["runs"]):
        if "name" not in run:
            raise ConfigError(f"sweep {path}: run {i} has no 'name'")
    return spec


def run_overrides(spec: dict, run: dict, extra: list[str]) -> list[str]:
    shared = [f"{k}={v}" for k, v in (spec.get("overrides") or {}).items()]
    own = [f"{k}={v}" for k, v in (run.get("overrides") or {}).items()]
    return [*shared, *own, f"logging.run_name={spec.get('prefix', '')}{run['name']}", *extra]


def commands(spec: dict, extra: list[str], only: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """Validate every run's config, then return (name, command) for each selected run."""
    out = []
    for run in spec["runs"]:
        if only and run["name"] not in only:
            continue
        overrides = run_overrides(spec, run, extra)
        try:
            load_config(ROOT / spec["config"], overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep run {run['name']!r}: {e}") from None
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch"]
        if spec.get("accelerate_config"):
            launch += ["--config_file", spec["accelerate_config"]]
        out.append((run["name"], [*launch, "recipes/train.py", "--config", spec["config"], *overrides]))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Run a sweep of the AsymRE recipe")
    p.add_argument("sweep", help="sweep YAML (recipes/configs/sweeps/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the commands, run nothing")
    p.add_argument("--only", nargs="*", help="run only these run names")
    a = p.parse_args(argv)
    try:
        cmds = commands(load_sweep(a.sweep), extra, a.only)
    except ConfigError as e:
        print(f"sweep error: {e}", file=sys.stderr)
        return 2
    failed = []
    for name, cmd in cmds:
        print(f"[sweep] {name}: {shlex.join(cmd)}", flush=True)
        if not a.dry_run and subprocess.call(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}) != 0:
            failed.append(name)
    if failed:
        print(f"[sweep] failed runs: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
