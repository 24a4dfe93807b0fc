"""Checkpoint writing on a small prepared model (in-process, CPU): rotation keeps the newest keep_last,
a half-written folder is never picked, and a full disk (found before writing or mid-write) raises a
CheckpointError naming the free space and the intact earlier checkpoint, with nothing half-written
left behind and the earlier checkpoints still loadable."""

import errno
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import asymre.checkpoint as ckpt
from asymre.checkpoint import COMPLETE, CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


@pytest.fixture()
def acc_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


def _train_step(model, opt):
    model(torch.randn(4, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _steps(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_rotation_keeps_the_newest_and_skips_half_written(acc_model, tmp_path):
    acc, model, opt = acc_model
    run = tmp_path / "run"
    for step in (2, 4, 6):
        _train_step(model, opt)
        save_checkpoint(acc, run, step, {"learner_step": step}, keep_last=2)
    assert _steps(run) == ["step-000004", "step-000006"]
    (run / "checkpoints" / "step-000009").mkdir()  # a crash mid-write leaves no COMPLETE marker
    assert latest_checkpoint(run).name == "step-000006"
    state, behaviour = load_checkpoint(acc, latest_checkpoint(run))
    assert state == {"learner_step": 6} and behaviour is None


def test_behaviour_weights_round_trip(acc_model, tmp_path):
    """A checkpoint taken while the engine lags keeps the engine's weights (tied names included), and loads them back
    exactly; one taken in step with the engine has none."""
    acc, model, opt = acc_model
    _train_step(model, opt)
    shared = torch.randn(8, 4)
    behaviour = {"embed.weight": shared, "lm_head.weight": shared, "norm.weight": torch.arange(4.0), "step": torch.tensor([3])}
    save_checkpoint(acc, tmp_path / "run", 4, {"learner_step": 4, "engine_version": 3}, behaviour)
    state, loaded = load_checkpoint(acc, latest_checkpoint(tmp_path / "run"))
    assert state == {"learner_step": 4, "engine_version": 3}
    assert loaded.keys() == behaviour.keys() and all(torch.equal(loaded[k], behaviour[k]) for k in behaviour)
    assert loaded["step"].dtype == torch.int64


def test_no_room_for_the_next_checkpoint_fails_before_writing(acc_model, tmp_path, monkeypatch):
    acc, model, opt = acc_model
    run = tmp_path / "run"
    _train_step(model, opt)
    first = save_checkpoint(acc, run, 2, {"learner_step": 2})
    size = ckpt.folder_bytes(first)
    assert size > 64 * 64 * 4 * 3  # weights and AdamW's two moments
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(10 * size, 9 * size, size // 2))
    _train_step(model, opt)
    with pytest.raises(CheckpointError, match=r"step-000004 not written: .* GiB free .*step-000002 is intact"):
        save_checkpoint(acc, run, 4, {"learner_step": 4})
    assert _steps(run) == ["step-000002"]

    # with no earlier checkpoint, the caller's estimate is what must fit
    with pytest.raises(CheckpointError, match="no earlier checkpoint exists"):
        save_checkpoint(acc, tmp_path / "other", 2, {}, expected_bytes=size)
    assert list((tmp_path / "other" / "checkpoints").iterdir()) == []
    monkeypatch.undo()

    load_checkpoint(acc, latest_checkpoint(run))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_disk_full_mid_write_removes_the_partial_folder(acc_model, tmp_path, monkeypatch):
    acc, model, opt = acc_model
    run = tmp_path / "run"
    _train_step(model, opt)
    save_checkpoint(acc, run, 2, {"learner_step": 2})

    def full_disk(folder, *a, **k):
        (Path(folder) / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(acc, "save_state", full_disk)
    with pytest.raises(CheckpointError, match=r"step-000004 not written \(.*No space left.*step-000002 is intact"):
        save_checkpoint(acc, run, 4, {"learner_step": 4})
    assert _steps(run) == ["step-000002"]  # no .tmp-step-000004 left taking space
    assert (run / "checkpoints" / "step-000002" / COMPLETE).is_file()


@pytest.mark.slow
def test_recipe_keeps_the_final_model_when_the_final_checkpoint_does_not_fit(tmp_path, monkeypatch):
    """The embedded model, one colocated step: the final checkpoint finds no room, the run still saves
    its final model (smaller, and what the user wants most), then reports the checkpoint error."""
    from asymre.config import load_config
    from tests.recipe_utils import run_recipe

    real = shutil.disk_usage

    def no_room_for_checkpoints(path):
        u = real(path)
        return u._replace(free=0) if Path(path).name == "checkpoints" else u

    monkeypatch.setattr(shutil, "disk_usage", no_room_for_checkpoints)
    run = tmp_path / "run"
    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", [
        "rollout.backend=hf", "rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=4",
        "learner.groups_per_step=1", "learner.steps=1", "eval.at_start=false", "eval.at_end=false",
        "checkpoint.save_final_checkpoint=true", "logging.progress=false", f"logging.run_dir={run}"])
    with pytest.raises(CheckpointError, match="step-000001 not written: 0.00 GiB free.*no earlier checkpoint exists"):
        run_recipe(cfg)
    assert (run / "final_model" / "model.safetensors").is_file()
    assert list((run / "checkpoints").iterdir()) == []
