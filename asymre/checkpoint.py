"""Checkpoints for exact resume, written atomically, rotated, and loaded without unpickling user-untrusted data.

A checkpoint `RUN/checkpoints/step-000040/` holds:
- `accelerate/`: model (safetensors), optimiser, LR schedule and RNG states via `Accelerator.save_state`
  (so FSDP/DeepSpeed shards are handled by Accelerate; loaded back with `weights_only=True`);
- `behaviour/model.safetensors`: the engine's (stale) behaviour weights, when they differ from the learner's;
- `trainer_state.json` (and `trainer_state.rankN.json` for other ranks): learner step, policy version,
  replay-buffer contents, prompt-stream position, running-baseline estimates, generation round counter:
  JSON only.
It is written into a hidden temporary folder and renamed into place once complete, so a crash
mid-write never leaves a checkpoint that `latest_checkpoint` would pick. Before writing, the disk must
have room for one more checkpoint (the size of the last one, or the caller's estimate for the first);
a full disk, found then or mid-write, raises `CheckpointError` with the half-written folder removed
and the earlier checkpoints intact.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from asymre.sync import read_weights_folder, write_weights_folder

COMPLETE = "COMPLETE"
GiB = 2**30


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (full or failing disk); the earlier checkpoints are intact."""


def checkpoint_bytes(weight_bytes: int, with_behaviour: bool) -> int:
    """Estimated size of one checkpoint: weights and AdamW's two moments (and the behaviour weights)."""
    return weight_bytes * (4 if with_behaviour else 3)


def saves_final_checkpoint(cfg) -> bool:
    """checkpoint.save_final_checkpoint, or by default: only when the run checkpoints periodically."""
    ck = cfg.checkpoint
    return ck.save_final_checkpoint if ck.save_final_checkpoint is not None else ck.every > 0


def warn_if_disk_short(cfg, run_dir: str | Path, one_checkpoint: int, final_model: int) -> None:
    """Say what the run writes (checkpoints of `one_checkpoint` bytes, a final model of `final_model` bytes), and
    warn when they may not fit on the run folder's disk (an estimate; the exact check runs before each checkpoint)."""
    log = logging.getLogger("asymre")
    ck, steps = cfg.checkpoint, cfg.learner.steps
    count = ((steps - 1) // ck.every if ck.every else 0) + int(saves_final_checkpoint(cfg))  # periodic ones, then the final one
    need = min(count, ck.keep_last + 1) * one_checkpoint + final_model  # rotation deletes the oldest after writing the new one
    log.info("this run writes %s%s", f"checkpoints of about {one_checkpoint / GiB:.2f} GiB each ({count} in all, the last "
             f"{ck.keep_last} kept)" if count else "no checkpoint (checkpoint.every=0; checkpoint.save_final_checkpoint=true "
             "keeps a final one for resume=auto)", f" and a final model of {final_model / GiB:.2f} GiB" if final_model else "")
    free = shutil.disk_usage(run_dir).free
    if free < need:
        log.warning("run folder %s: %.2f GiB free, this run may write up to %.2f GiB (checkpoints of about %.2f GiB, "
                    "checkpoint.keep_last=%d, final model %.2f GiB); a checkpoint that does not fit stops the run "
                    "with the earlier ones intact", run_dir, free / GiB, need / GiB, one_checkpoint / GiB, ck.keep_last, final_model / GiB)


def _state_name(rank: int) -> str:
    return "trainer_state.json" if rank == 0 else f"trainer_state.rank{rank}.json"


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in the run folder (`resume=auto`), or None."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())
    return done[-1] if done else None


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _what_is_kept(run_dir: str | Path) -> str:
    last = latest_checkpoint(run_dir)
    if last is None:
        return "no earlier checkpoint exists"
    return f"the last complete checkpoint {last} is intact (free space, then rerun with resume=auto)"


def _room_problem(run_dir: str | Path, name: str, expected_bytes: int) -> str | None:
    """Why the next checkpoint cannot fit on the run folder's disk, or None when it can."""
    last = latest_checkpoint(run_dir)
    need = max(folder_bytes(last) if last is not None else 0, expected_bytes)
    free = shutil.disk_usage(checkpoint_dir(run_dir)).free
    if free >= need:
        return None
    return (f"checkpoint {name} not written: {free / GiB:.2f} GiB free on the disk of {checkpoint_dir(run_dir)}, "
            f"one checkpoint takes about {need / GiB:.2f} GiB; {_what_is_kept(run_dir)}")


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict[str, Any],
                    behaviour: dict[str, torch.Tensor] | None = None, keep_last: int = 2,
                    expected_bytes: int = 0) -> Path | None:
    """Collective (every rank calls it). Returns the checkpoint folder on the main process.

    `expected_bytes`: the caller's estimate of this checkpoint; free space must hold the larger of it
    and the last checkpoint's real size. Raises CheckpointError (nothing half-written left behind)
    when the disk has no room or a write fails."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    problem = None
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        problem = _room_problem(run_dir, final.name, expected_bytes)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem is not None:
        raise CheckpointError(problem)
    try:
        if accelerator.is_main_process:
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
        # each rank's own buffer and prompt position (colocated ranks generate their own shares)
        (tmp / _state_name(accelerator.process_index)).write_text(json.dumps(state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and behaviour is not None:
            write_weights_folder(behaviour, tmp / "behaviour")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {final.name} not written ({e}); {_what_is_kept(run_dir)}") from e
    if accelerator.is_main_process:
        (tmp / COMPLETE).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        done = sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())
        for old in done[: max(len(done) - keep_last, 0)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def load_checkpoint(accelerator, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model/optimiser/schedule/RNG into the prepared objects; return (trainer state, behaviour weights or None)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    accelerator.load_state(str(path / "accelerate"))
    own = path / _state_name(accelerator.process_index)
    state = json.loads((own if own.is_file() else path / _state_name(0)).read_text())
    behaviour = dict(read_weights_folder(path / "behaviour")) if (path / "behaviour").is_dir() else None
    return state, behaviour
