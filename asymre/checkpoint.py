"""Checkpoints for exact resume, written atomically, rotated, and loaded without unpickling user-untrusted data.

A checkpoint `RUN/checkpoints/step-000040/` holds:
- `accelerate/`: model (safetensors), optimiser, LR schedule and RNG states via `Accelerator.save_state`
  (so FSDP/DeepSpeed shards are handled by Accelerate; loaded back with `weights_only=True`);
- `behaviour/model.safetensors`: the engine's (stale) behaviour weights, when they differ from the learner's;
- `trainer_state.json` (and `trainer_state.rankN.json` for other ranks): learner step, policy version,
  replay-buffer contents, prompt-stream position, running-baseline estimates, generation round counter:
  JSON only.
It is written into a hidden temporary folder and renamed into place once complete, so a crash
mid-write never leaves a checkpoint that `latest_checkpoint` would pick.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from asymre.sync import read_weights_folder, write_weights_folder

COMPLETE = "COMPLETE"


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


def save_checkpoint(accelerator, run_dir: str | Path, step: int, state: dict[str, Any],
                    behaviour: dict[str, torch.Tensor] | None = None, keep_last: int = 2) -> Path | None:
    """Collective (every rank calls it). Returns the checkpoint folder on the main process."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerate"), safe_serialization=True)
    # each rank's own buffer and prompt position (colocated ranks generate their own shares)
    (tmp / _state_name(accelerator.process_index)).write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if behaviour is not None:
            write_weights_folder(behaviour, tmp / "behaviour")
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
