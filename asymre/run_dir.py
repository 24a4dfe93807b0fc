"""A run folder belongs to one run: opened at start-up, before any model loads.

`open_run_dir` decides, from what the folder holds and `resume` / `logging.overwrite`, whether this launch
starts fresh, continues a checkpoint, or is refused; it checks that a checkpoint to continue was made
with the same maths (every config key but those in `MAY_CHANGE_ON_RESUME`), that the folder is writable
and that its disk has room. Design choice: refuse a used folder and say the three ways on (resume,
overwrite, another name) rather than give every run a timestamped folder: `runs/<run_name>` stays a name a
user can type, plot and resume. `logging.overwrite=true` deletes only what a run writes there.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from asymre.checkpoint import COMPLETE, GiB, checkpoint_dir, latest_checkpoint
from asymre.config import InputError

log = logging.getLogger("asymre")

# What a run writes into its folder: all of it, and only it, goes with logging.overwrite=true.
RUN_FILES = ("metrics.jsonl", "completions.jsonl", "config.json", "checkpoints", "final_model", "sync", "wandb", "tensorboard", "curves.png")
# Keys that may differ between a checkpoint and the run that continues it: length, cadence, logging,
# placement and deadlines. Every other key changes what the run computes and must match.
MAY_CHANGE_ON_RESUME = ("learner.steps", "resume", "logging.", "eval.", "checkpoint.", "model.cache_dir",
                        "model.gradient_checkpointing", "learner.micro_batch_tokens", "rollout.devices",
                        "rollout.server_urls", "rollout.server_api_key_env", "rollout.gpu_memory_utilization", "rollout.kv_cache_gb",
                        "rollout.worker_timeout_s", "rollout.max_worker_restarts", "sync.timeout_s", "sync.channel_host",
                        "reward.timeout_s", "learner.dist_timeout_s")


class RunDirError(InputError):
    """The run folder cannot be used as asked; the message says which folder and the ways on."""

    label = "run folder error"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "chat_template_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every key that changes the maths and differs."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys
            if a.get(k) != b.get(k) and not any(k == m or (m.endswith(".") and k.startswith(m)) for m in MAY_CHANGE_ON_RESUME)]


def _holds_a_run(run_dir: Path) -> list[str]:
    """What in `run_dir` belongs to an earlier run (metrics, checkpoints, a final model)."""
    found = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    ck = checkpoint_dir(run_dir)
    steps = sorted(p.name for p in ck.glob("step-*")) if ck.is_dir() else []
    if steps:
        found.append(f"{len(steps)} checkpoint(s)")
    if (run_dir / "final_model").exists():
        found.append("final_model/")
    return found


def _check_resume(path: Path, config: dict[str, Any]) -> None:
    state_file = path / "trainer_state.json"
    if not (path / COMPLETE).is_file() or not state_file.is_file():
        raise RunDirError(f"resume={path}: not a complete checkpoint (no {COMPLETE} marker or trainer_state.json)")
    saved = json.loads(state_file.read_text()).get("config")
    if saved is None:
        return
    diff = config_differences(saved, config)
    if diff:
        said = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diff[:4])
        more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
        raise RunDirError(f"cannot resume {path}: it was made with different settings that change the maths: {said}{more}. "
                          f"Keys that may change on resume: {', '.join(MAY_CHANGE_ON_RESUME)}; or start a new run "
                          f"(another logging.run_name, or logging.overwrite=true)")


def open_run_dir(run_dir: str | Path, resume: str, overwrite: bool, config: dict[str, Any], min_free_gb: float) -> Path | None:
    """Make `run_dir` this run's own and return the checkpoint to continue from (None: start fresh).
    Raises RunDirError, naming the folder or the key, when the folder cannot be used as asked."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run folder {run_dir} is not writable: a file of that name is in the way")
    earlier = _holds_a_run(run_dir) if run_dir.is_dir() else []
    resume_from: Path | None = None
    if resume not in ("none", "auto"):
        resume_from = Path(resume)
        if overwrite:
            raise RunDirError(f"resume={resume} with logging.overwrite=true: pick one (continue the checkpoint, or start over)")
    elif resume == "auto" and not overwrite:
        resume_from = latest_checkpoint(run_dir)
        if resume_from is None and earlier:
            raise RunDirError(f"resume=auto: run folder {run_dir} holds a run ({', '.join(earlier)}) but no complete checkpoint "
                              f"to continue from; start it over with logging.overwrite=true or pick another logging.run_name")
    if resume_from is not None:
        _check_resume(resume_from, config)
    elif earlier and not overwrite:
        cont = "continue it with resume=auto, " if latest_checkpoint(run_dir) else ""
        why = "" if cont else " (it left no checkpoint to continue from)"
        raise RunDirError(f"run folder {run_dir} already holds a run ({', '.join(earlier)}): {cont}delete it first with "
                          f"logging.overwrite=true, or pick another logging.run_name{why}")
    elif overwrite and run_dir.is_dir():
        gone = [name for name in RUN_FILES if (run_dir / name).exists()]
        for name in gone:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if gone:
            log.warning("logging.overwrite=true: deleted the earlier run's %s from %s", ", ".join(gone), run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run folder {run_dir} is not writable: {e}") from e
    free_gb = shutil.disk_usage(run_dir).free / GiB
    if free_gb < min_free_gb:
        raise RunDirError(f"run folder {run_dir}: only {free_gb:.2f} GiB free on its disk, below checkpoint.min_free_gb={min_free_gb}")
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))  # the resolved config of this launch
    return resume_from
