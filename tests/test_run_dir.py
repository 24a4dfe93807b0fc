"""A run folder belongs to one run: a second run into a used folder is refused and leaves the first run's
files byte for byte; logging.overwrite=true starts clean; resume continues only a checkpoint made with the
same maths. A run writes a full checkpoint at the end only when asked (or when it checkpoints anyway)."""

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from asymre.config import load_config, to_dict
from asymre.run_dir import (
    MAY_CHANGE_ON_RESUME,
    RunDirError,
    config_differences,
    open_run_dir,
)

ROOT = Path(__file__).resolve().parent.parent


def _config(*overrides):
    return to_dict(load_config(None, list(overrides)))


def _fake_run(run_dir: Path, config: dict, checkpoint: bool = True) -> None:
    """What a finished run leaves: metrics, config, a complete checkpoint holding its config, a final model."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss/value": 0.5}\n')
    (run_dir / "config.json").write_text(json.dumps(config))
    if checkpoint:
        ck = run_dir / "checkpoints" / "step-000001"
        ck.mkdir(parents=True)
        (ck / "trainer_state.json").write_text(json.dumps({"learner_step": 1, "config": config}))
        (ck / "COMPLETE").write_text("1")
    (run_dir / "final_model").mkdir()
    (run_dir / "final_model" / "model.safetensors").write_bytes(b"weights")


def _digest(run_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_fresh_folder_is_made_and_gets_the_config(tmp_path):
    cfg = _config()
    assert open_run_dir(tmp_path / "run", "none", False, cfg, 0.0) is None
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == cfg


@pytest.mark.parametrize("resume", ["none", "auto"])
def test_used_folder_is_refused_and_left_untouched(tmp_path, resume):
    run = tmp_path / "run"
    _fake_run(run, _config(), checkpoint=resume == "none")
    before = _digest(run)
    with pytest.raises(RunDirError) as e:
        open_run_dir(run, resume, False, _config("loss.delta_v=0.3"), 0.0)
    msg = str(e.value)
    assert str(run) in msg and "\n" not in msg and "logging.overwrite=true" in msg and "logging.run_name" in msg
    assert ("continue it with resume=auto" in msg) == (resume == "none")  # offered only where a checkpoint exists
    assert _digest(run) == before


def test_used_folder_without_checkpoint_does_not_offer_resume(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _config(), checkpoint=False)
    with pytest.raises(RunDirError, match=r"holds a run \(metrics.jsonl, final_model/\): delete it first with logging.overwrite=true, "
                                          r"or pick another logging.run_name \(it left no checkpoint to continue from\)"):
        open_run_dir(run, "none", False, _config(), 0.0)


def test_overwrite_deletes_only_what_a_run_writes(tmp_path, caplog):
    run = tmp_path / "run"
    _fake_run(run, _config())
    (run / "notes.txt").write_text("mine")
    (run / "tensorboard" / "asymre").mkdir(parents=True)  # report_to=[tensorboard]: the old event files would mix with the new
    with caplog.at_level(logging.WARNING, logger="asymre"):
        assert open_run_dir(run, "none", True, _config(), 0.0) is None
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "notes.txt"]
    assert "deleted the earlier run's metrics.jsonl, config.json, checkpoints, final_model" in caplog.text


def test_resume_continues_a_checkpoint_with_the_same_maths(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, _config())
    found = open_run_dir(run, "auto", False, _config("learner.steps=500", "eval.every=5", "logging.progress=false"), 0.0)
    assert found == run / "checkpoints" / "step-000001"


@pytest.mark.parametrize("key, value", [("loss.delta_v", "0.2"), ("model.name", "other"), ("rollout.group_size", "4"),
                                        ("learner.seed", "3"), ("task.max_operand", "5")])
def test_resume_with_other_maths_is_refused_naming_the_key(tmp_path, key, value):
    run = tmp_path / "run"
    _fake_run(run, _config())
    with pytest.raises(RunDirError, match=rf"different settings that change the maths: {key}: .* in the checkpoint"):
        open_run_dir(run, "auto", False, _config(f"{key}={value}"), 0.0)


def test_what_may_change_on_resume():
    saved = _config()
    changed = _config("learner.steps=7", "eval.every=3", "checkpoint.every=2", "logging.run_name=x", "sync.timeout_s=5")
    assert config_differences(saved, changed) == []
    assert [k for k, _, _ in config_differences(saved, _config("learner.lr=1.0", "sync.interval=3"))] == ["learner.lr", "sync.interval"]
    assert "learner.steps" in MAY_CHANGE_ON_RESUME


def test_resume_path_and_overwrite_together_is_refused(tmp_path):
    with pytest.raises(RunDirError, match="pick one"):
        open_run_dir(tmp_path / "run", str(tmp_path / "ck"), True, _config(), 0.0)


# ---- the same through the training command, as a user meets it ---------------------------------------------

ARGS = ["rollout.backend=hf", "rollout.prompts_per_step=1", "rollout.group_size=2", "rollout.max_new_tokens=4",
        "learner.groups_per_step=1", "learner.steps=1", "eval.at_start=false", "eval.at_end=false",
        "checkpoint.save_final_model=false", "logging.progress=false"]


def _train(run_dir, *extra):
    cmd = [sys.executable, "recipes/train.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml", *ARGS,
           f"logging.run_dir={run_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_second_run_refused_overwrite_starts_clean_resume_checks_the_maths(tmp_path, model_path):
    run = tmp_path / "run"
    first = _train(run, "checkpoint.save_final_checkpoint=true")
    assert first.returncode == 0, first.stderr[-2000:]
    before = _digest(run)
    assert "checkpoints/step-000001/trainer_state.json" in before and "metrics.jsonl" in before

    # the checkpoint exports to a Hugging Face folder with the learner's weights, which transformers loads
    out = tmp_path / "exported"
    ex = subprocess.run([sys.executable, "-m", "asymre.cli", "export", str(run / "checkpoints" / "step-000001"), str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ex.returncode == 0, ex.stderr[-2000:]
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    trained = load_file(str(run / "checkpoints" / "step-000001" / "accelerate" / "model.safetensors"))
    exported = dict(AutoModelForCausalLM.from_pretrained(out).state_dict())
    assert trained and all(exported[k].equal(v) for k, v in trained.items())
    base = dict(AutoModelForCausalLM.from_pretrained(model_path).state_dict())
    assert any(not base[k].equal(v) for k, v in trained.items())  # the learner's step, not the base model
    assert json.loads((out / "asymre_export.json").read_text())["learner_step"] == 1
    again = subprocess.run([sys.executable, "-m", "asymre.cli", "export", str(run / "checkpoints" / "step-000001"), str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "export error: " in again.stderr and "not empty" in again.stderr
    assert _digest(run) == before  # exporting reads the checkpoint only

    second = _train(run)
    said = (f"run folder error: run folder {run} already holds a run (metrics.jsonl, 1 checkpoint(s)): continue it with "
            "resume=auto, delete it first with logging.overwrite=true, or pick another logging.run_name")
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [said]
    other = _train(run, "resume=auto", "loss.delta_v=0.2")
    assert other.returncode == 2 and "loss.delta_v: -0.1 in the checkpoint, 0.2 now" in other.stderr
    assert _digest(run) == before  # neither refused run touched the first run's files

    longer = _train(run, "resume=auto", "learner.steps=2")
    assert longer.returncode == 0 and "resumed from" in longer.stdout, longer.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss/value"' in x]
    assert steps == [1, 2]

    again = _train(run, "logging.overwrite=true")
    assert again.returncode == 0, again.stderr[-2000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/value" in r] == [1]  # only the new run's step
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").glob("step-*"))  # no final checkpoint by default


def test_final_model_keeps_the_models_own_dtype(tmp_path, model_path):
    """A bf16 checkpoint trained in fp32 (model.dtype=float32) is saved as bf16, half the bytes, and says so."""
    from accelerate import Accelerator
    from safetensors import safe_open

    from asymre.learner import Learner

    src = tmp_path / "bf16_model"
    src.mkdir()
    for f in Path(model_path).iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    config = json.loads((Path(model_path) / "config.json").read_text())
    config.pop("torch_dtype", None)
    (src / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    learner = Learner(load_config(None, ["model.dtype=float32"]), str(src), Accelerator(cpu=True))
    assert next(learner.model.parameters()).dtype.is_floating_point and str(next(learner.model.parameters()).dtype) == "torch.float32"
    learner.save_model(str(tmp_path / "final_model"))
    with safe_open(str(tmp_path / "final_model" / "model.safetensors"), "pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}
    assert json.loads((tmp_path / "final_model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert learner.weight_bytes(learner.save_dtype) * 2 == learner.weight_bytes()


def test_export_refuses_what_it_cannot_export(tmp_path):
    from asymre.export import ExportError, export_checkpoint

    with pytest.raises(ExportError, match="not a complete asymre checkpoint"):
        export_checkpoint(tmp_path / "nothing", tmp_path / "out")
    run = tmp_path / "run"
    _fake_run(run, _config())
    ck = run / "checkpoints" / "step-000001"
    with pytest.raises(ExportError, match="no behaviour weights"):
        export_checkpoint(ck, tmp_path / "out", behaviour=True)
    with pytest.raises(ExportError, match=r"no accelerate/model.safetensors \(a sharded FSDP/DeepSpeed state\?"):
        export_checkpoint(ck, tmp_path / "out")
