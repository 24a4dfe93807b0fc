"""Exact resume: a run killed with SIGKILL mid-way resumes from its last checkpoint and, with the same seed,
reproduces the uninterrupted run's metrics and final weights (CPU, colocated, transformers backend). The run is
off-policy where it is killed: its checkpoint falls between two weight pushes (the engine lags the learner), with
groups left in the buffer and the per-prompt running baseline, all of which the resumed run must carry on from."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from asymre.checkpoint import latest_checkpoint
from asymre.tracking import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ARGS = ["rollout.backend=hf", "rollout.prompts_per_step=3", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "learner.groups_per_step=2", "learner.steps=6", "learner.lr=1e-4", "sync.interval=3", "buffer.max_staleness=2",
        "loss.baseline=running",
        "checkpoint.every=2", "checkpoint.keep_last=1", "eval.at_start=false", "eval.at_end=false", "logging.progress=false"]


# The multi-turn variant: every model turn calls `echo` (the run's own tool_parser, a user's extension point), so each
# episode is turn, tool result, turn (cut at max_turns): environment tokens, masks and episode records in the buffer,
# the checkpoint and the completions, through the real transformers engine and the real episode loop.
MULTI_TURN = ["model.chat_template=chatml-tools", "rollout.tools=[tests.test_resume:echo]",
              "rollout.tool_parser=tests.test_resume:every_turn_calls_echo", "rollout.max_turns=2", "rollout.max_new_tokens=40",
              "rollout.max_episode_tokens=120"]


def echo(text: str) -> str:
    """Say the text back, louder.

    Args:
        text: What to say.
    """
    return text.upper()


def every_turn_calls_echo(text: str):
    return text, [{"name": "echo", "arguments": {"text": text[:12]}}]


def _cmd(run_dir, *extra):
    return [sys.executable, "recipes/train.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml", *ARGS,
            f"logging.run_dir={run_dir}", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))


def _by_step(run_dir):
    out = {}
    for m in read_metrics(run_dir):
        if "loss/value" in m:
            out[m["step"]] = m  # a step re-done after resume overwrites the killed run's partial record
    return out


@pytest.mark.parametrize("episodes", [[], MULTI_TURN], ids=["single-turn", "multi-turn"])
def test_sigkill_then_resume_reproduces_uninterrupted_run(tmp_path, episodes):
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = subprocess.run(_cmd(full, *episodes), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    shutil.rmtree(full / "checkpoints")  # 1.5 GB each; only its metrics and final model are compared

    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_cmd(killed, *episodes), cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    ck = killed / "checkpoints"
    while not ((ck / "step-000004" / "COMPLETE").exists() and not (ck / "step-000002").exists()):
        assert proc.poll() is None, f"run ended before it could be killed:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # keep_last=1: step 2's checkpoint went once step 4's was complete
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-000004"]
    assert latest_checkpoint(killed).name == "step-000004"
    assert not (killed / "final_model").exists()
    at_kill = json.loads((ck / "step-000004" / "trainer_state.json").read_text())
    assert at_kill["engine_version"] == 3 and (ck / "step-000004" / "behaviour" / "model.safetensors").is_file()
    assert at_kill["buffer"]["groups"] and at_kill["running_baseline"]["estimates"]
    if episodes:  # the buffered groups are episodes: the model's turns, the tool's tokens (masked), and their record
        buffered = [t for g in at_kill["buffer"]["groups"] for t in g["trajectories"]]
        assert any(0 in t["mask"] and 1 in t["mask"] and t["episode"]["tool_calls"] == {"echo": 1} for t in buffered)

    r = subprocess.run(_cmd(killed, *episodes, "resume=auto"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "resumed from" in r.stdout and "step-000004" in r.stdout

    a, b = _by_step(full), _by_step(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert "reward/mean" in a[5] and "reward/mean" not in a[6]  # step 6 trains on groups step 5 left in the buffer
    if episodes:
        assert a[5]["episode/turns"] > 1 and a[5]["episode/env_token_frac"] > 0
    for step in (5, 6):  # every metric but the timings, bit for bit
        assert a[step].keys() == b[step].keys()
        for key in (k for k in a[step] if not (k.startswith("perf/") or k.endswith("seconds") or k == "time")):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])
    wa = load_file(str(full / "final_model" / "model.safetensors"))
    wb = load_file(str(killed / "final_model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    # the buffer never handed a group out twice (fifo): every sampled group count matches the uninterrupted run
    state = json.loads((latest_checkpoint(killed) / "trainer_state.json").read_text())
    assert state["learner_step"] == 6 and state["buffer"]["counts"]["sampled"] == a[6]["buffer/sampled"]


def test_unwritable_run_folder_fails_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "run").write_text("a file where the run folder should be")
    r = subprocess.run(_cmd(ro / "run"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "is not writable" in r.stderr


def test_full_disk_fails_before_training(tmp_path):
    r = subprocess.run(_cmd(tmp_path / "run", "checkpoint.min_free_gb=1e9"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "checkpoint.min_free_gb" in r.stderr
    assert not list((tmp_path / "run").glob("metrics.jsonl"))
