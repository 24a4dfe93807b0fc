"""Observability: metrics.jsonl always written, wandb offline without a key (said once), collapse signals
warn and flag, and run curves plot to PNG."""

import json
import logging

import pytest

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.monitor import CollapseMonitor, distinct_answers
from asymre.plot import plot_run
from asymre.tracking import MetricsLogger, read_metrics


def _group(texts):
    return TrajectoryGroup(Prompt("p", [{"role": "user", "content": "q"}]), [1], [Trajectory([2], t, "stop") for t in texts], 0)


def test_metrics_jsonl_is_always_written(tmp_path):
    ml = MetricsLogger(tmp_path, [], {"a": 1})
    ml.log({"reward/mean": 0.5, "loss/value": float("nan")}, step=3)
    ml.close()
    rows = read_metrics(tmp_path)
    assert rows[0]["step"] == 3 and rows[0]["reward/mean"] == 0.5 and rows[0]["loss/value"] is None


def _home(tmp_path, monkeypatch, netrc: bool):
    """A HOME with (or without) the netrc `wandb login` writes, and no other wandb credentials."""
    home = tmp_path / ("home_netrc" if netrc else "home_empty")
    home.mkdir()
    if netrc:
        (home / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
        (home / ".netrc").chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_API_KEY", "WANDB_MODE", "NETRC", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)


def test_wandb_goes_online_with_wandb_login_credentials(tmp_path, monkeypatch):
    """A user who ran `wandb login` (key in ~/.netrc) logs online without WANDB_API_KEY; with no credentials,
    offline; an explicit WANDB_MODE wins. The decision only: nothing is sent anywhere."""
    import wandb

    from asymre.tracking import wandb_mode

    _home(tmp_path, monkeypatch, netrc=True)
    assert wandb_mode(wandb) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(wandb) == "disabled"
    _home(tmp_path, monkeypatch, netrc=False)
    assert wandb_mode(wandb) == "offline"


@pytest.mark.slow
def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    _home(tmp_path, monkeypatch, netrc=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    first = MetricsLogger(tmp_path / "run", ["wandb"], project="p", run_name="r")
    first_id = first.wandb.id
    first.close()
    again = MetricsLogger(tmp_path / "run", ["wandb"], project="p", run_name="r", resume=True)
    assert again.wandb.id == first_id
    again.close()
    other = MetricsLogger(tmp_path / "other", ["wandb"], project="p", run_name="r", resume=True)  # nothing to resume: new
    assert other.wandb.id != first_id
    other.close()


def test_wandb_offline_without_key_said_once(tmp_path, monkeypatch, caplog):
    _home(tmp_path, monkeypatch, netrc=False)
    with caplog.at_level(logging.WARNING, logger="asymre"):
        ml = MetricsLogger(tmp_path, ["wandb"], {"loss": {"delta_v": -0.1}}, project="p", run_name="r", tags=["t"])
        ml.log({"reward/mean": 1.0}, step=1)
        ml.close()
    assert sum("offline" in r.message for r in caplog.records) == 1
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote no offline run"
    assert read_metrics(tmp_path)[0]["reward/mean"] == 1.0  # wandb is never the only record


class _RecordingTracker:
    """Stands in for an Accelerate tracker class: records what MetricsLogger asks of it."""

    made: list = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.calls = args, kwargs, []
        _RecordingTracker.made.append(self)

    def start(self):
        self.calls.append(("start",))

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def log(self, values, step=None):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))


@pytest.mark.parametrize("name, cls", [("tensorboard", "TensorBoardTracker"), ("trackio", "TrackioTracker"), ("mlflow", "MLflowTracker")])
def test_accelerate_trackers_get_the_config_every_step_and_the_finish(name, cls, tmp_path, monkeypatch):
    """report_to=[NAME] starts Accelerate's tracker for it with the run's names, hands it the flattened config, every
    logged step with its step number, and finishes it on close; metrics.jsonl still gets every row."""
    import accelerate.tracking

    import asymre.tracking

    monkeypatch.setattr(asymre.tracking, "_installed", lambda n: True)
    monkeypatch.setattr(accelerate.tracking, cls, _RecordingTracker)
    _RecordingTracker.made = []
    ml = MetricsLogger(tmp_path, [name], {"loss": {"delta_v": -0.1}, "reward": {"funcs": ["numeric"], "kwargs": {}}}, project="p", run_name="r")
    ml.log({"reward/mean": 0.5}, step=1)
    ml.log({"reward/mean": 0.75}, step=2)
    ml.close()
    (tracker,) = _RecordingTracker.made
    assert tracker.calls == [("start",), ("config", {"loss.delta_v": -0.1, "reward.funcs": '["numeric"]', "reward.kwargs": "{}"}),
                             ("log", {"reward/mean": 0.5}, 1), ("log", {"reward/mean": 0.75}, 2), ("finish",)]
    made_with = {"tensorboard": (("r", tmp_path / "tensorboard"), {}), "trackio": (("p",), {"name": "r"}),
                 "mlflow": ((), {"experiment_name": "p", "run_name": "r"})}[name]
    assert (tracker.args, tracker.kwargs) == made_with
    assert [r["reward/mean"] for r in read_metrics(tmp_path)] == [0.5, 0.75]


def test_tensorboard_event_file_holds_every_logged_step(tmp_path):
    """With tensorboard installed (not a dependency), report_to=[tensorboard] writes RUN_DIR/tensorboard/RUN_NAME,
    which tensorboard reads back: each scalar at its step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ml = MetricsLogger(tmp_path, ["tensorboard"], {"loss": {"delta_v": -0.1}}, run_name="r")
    ml.log({"reward/mean": 0.5, "loss/value": 1.0}, step=1)
    ml.log({"reward/mean": 0.75, "loss/value": 0.5}, step=2)
    ml.close()
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.5), (2, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("loss/value")] == [(1, 1.0), (2, 0.5)]


def test_distinct_answers():
    assert distinct_answers([_group(["5", "The answer is 5", "6"]), _group(["x", "x"])]) == pytest.approx(1.5)


def test_collapse_monitor_flags_and_warns_once(caplog):
    mon = CollapseMonitor(min_entropy=0.1, min_distinct=1.5, max_reward_drop=0.2, ema=0.0)
    healthy = mon.update({"reward/mean": 0.8, "loss/entropy": 1.0}, [_group(["1", "2", "3"])])
    assert healthy["collapse/entropy_flag"] == 0 and healthy["collapse/distinct_answers_flag"] == 0
    with caplog.at_level(logging.WARNING, logger="asymre"):
        for _ in range(3):
            bad = mon.update({"reward/mean": 0.3, "loss/entropy": 0.01}, [_group(["7", "7", "7"])])
    assert bad["collapse/entropy_flag"] == bad["collapse/distinct_answers_flag"] == bad["collapse/reward_drop_flag"] == 1.0
    assert len([r for r in caplog.records if "collapse signal" in r.message]) == 3  # one per signal, not per step


def test_plot_run_writes_png(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "reward/mean": s / 10, "loss/value": 1 / s, "loss/entropy": 2.0, "rollout/staleness_mean": 1.0}) + "\n")
        f.write(json.dumps({"step": 5, "eval/pass@1": 0.9}) + "\n")
    out = plot_run(tmp_path)
    data = out.read_bytes()
    assert out.name == "curves.png" and data[:4] == b"\x89PNG" and len(data) > 5000


def test_plot_empty_run_is_an_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metrics"):
        plot_run(tmp_path)


def test_asymre_show_prints_the_latest_steps_completions(tmp_path, capsys):
    from asymre.cli import main

    rows = [{"step": s, "group": 0, "prompt_uid": "arith:3+5", "prompt": "What is 3 + 5?", "completion": c, "reward": r,
             "rewards": {"numeric": r}, "advantage": r - 0.4, "policy_version": s - 1, "finish_reason": "stop", "completion_tokens": 2}
            for s, c, r in [(1, "7", 0.0), (2, "8", 1.0), (2, "9", 0.0)]]
    (tmp_path / "completions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["show", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step 2: 2 samples (showing 2), policy version 1")
    assert "reward 1.00 (numeric=1.00) advantage +0.60" in out and "completion: '8'" in out and "'7'" not in out
    assert main(["show", str(tmp_path), "--step", "1", "-n", "1"]) == 0 and "completion: '7'" in capsys.readouterr().out
    assert main(["show", str(tmp_path / "nothing")]) == 2


@pytest.mark.slow
def test_default_run_output_fits_on_one_screen(tmp_path):
    """The CPU default with its vLLM engine, at default verbosity: asymre's own lines and the progress bar, not
    the libraries' start-up chatter (vLLM alone printed about 40 lines before logging.verbose existed)."""
    import subprocess
    import sys

    from tests.recipe_utils import ROOT

    r = subprocess.run([sys.executable, "recipes/train.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml",
                        "learner.steps=1", "task.eval_size=4", "checkpoint.save_final_model=false", f"logging.run_dir={tmp_path / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [x for x in (r.stdout + r.stderr).splitlines() if x.strip() and "it/s]" not in x and "s/it]" not in x]
    assert any(x.startswith("held-out accuracy") for x in lines)
    assert len(lines) <= 12, "\n".join(lines)
