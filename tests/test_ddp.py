"""A real multi-process `accelerate launch`: two learner ranks (DDP over gloo, or DeepSpeed ZeRO-2/3 on its CPU
accelerator) train on different prompts and must end with identical weights (gradients were all-reduced), different
from the start, one optimizer step per learner step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _two_cpu_processes(name: str, tmp_path: Path) -> Path:
    """A shipped accelerate config with only the process count and the device swapped: 2 processes, no GPU ids."""
    cfg = yaml.safe_load((ROOT / "recipes/accelerate" / f"{name}.yaml").read_text())
    swapped = {**cfg, "num_processes": 2}
    swapped.pop("gpu_ids", None)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(swapped))
    return path


@pytest.mark.parametrize("backend", ["cpu_ddp2", "deepspeed_zero2", "deepspeed_zero3"])
def test_two_ranks_train_as_one(backend, tmp_path, model_path):
    """Two learner ranks under DDP (gloo) and the shipped DeepSpeed ZeRO-2/3 configs (DeepSpeed's CPU accelerator):
    both end with identical weights, different from the start (gradients were all-reduced); each learner step is
    exactly one optimizer step although every step runs 4 micro-batches (and a rank short of micro-batches pads
    with zero-weight ones); each rank's own engine holds the final weights (under ZeRO-3 each rank gathers them)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(accelerate), "launch", "--config_file", str(_two_cpu_processes(backend, tmp_path)), "--main_process_port", "29533",
           "tests/scripts/ddp_recipe.py", str(tmp_path),
           "rollout.backend=hf", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
           "learner.groups_per_step=2", "learner.steps=2", "learner.lr=1e-4", "learner.warmup_steps=4", "sync.interval=1", "buffer.max_staleness=0",
           "learner.micro_batch_tokens=40", "eval.at_start=false", "eval.at_end=false", "logging.progress=false",
           f"logging.run_dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    want = "DEEPSPEED" if backend.startswith("deepspeed") else "MULTI_CPU"  # the requested backend ran, not a fallback
    assert all(r["backend"] == f"DistributedType.{want}" for r in ranks)
    assert ranks[0]["before"] == ranks[1]["before"]
    assert ranks[0]["after"] == ranks[1]["after"], "ranks diverged"
    assert ranks[0]["after"] != ranks[0]["before"], "no training happened"
    assert ranks[0]["prompts"] != ranks[1]["prompts"], "ranks saw the same data: the test would prove nothing"
    # one schedule step per learner step, not one per process: after 2 of 4 warm-up steps lr = 3/4 * 1e-4
    assert ranks[0]["lr"] == ranks[1]["lr"] == pytest.approx(0.75e-4)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "learner/optimizer_steps" in m]
    assert [m["learner/optimizer_steps"] for m in steps] == [1, 2]
    assert all(m["learner/micro_batches"] >= 2 for m in steps), "one micro-batch a step would not show extra optimizer steps"
    assert all(r["optimizer_steps"] == r["learner_steps"] == 2 for r in ranks)
    assert all(r["engine_diff"] == 0 for r in ranks), [r["engine_diff"] for r in ranks]
    assert (tmp_path / "run" / "final_model" / "model.safetensors").is_file()


def test_a_rank_left_waiting_fails_at_learner_dist_timeout_s_naming_it(tmp_path):
    """learner.dist_timeout_s reaches the learners' process group: a rank left alone in a barrier fails after that
    long (not torch's 30-minute default), and the recipe's message names the key."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(accelerate), "launch", "--config_file", "recipes/accelerate/cpu_ddp2.yaml", "--main_process_port", "29534",
           "tests/scripts/dist_timeout.py", str(tmp_path), "4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    waiting = json.loads((tmp_path / "rank1.json").read_text())
    assert waiting["world"] == 2, proc.stderr[-2000:]
    assert waiting["error"] and waiting["error"].startswith("distributed error:") and "learner.dist_timeout_s=4 s" in waiting["error"]
    assert 3.0 <= waiting["waited_s"] < 15.0, waiting


def test_zero3_checkpoint_resumes_weights_optimizer_and_behaviour(tmp_path):
    """The shipped ZeRO-3 config (2 CPU processes): a checkpoint taken off-policy (sync.interval=2, so it holds the
    engine's behaviour weights too) resumes into a second launch whose AdamW continues its own count (step 2 is the
    optimizer's second update, so its state came back), with its engines still one version behind (the off-policy
    regime continues across the resume)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = tmp_path / "run"
    base = [str(accelerate), "launch", "--config_file", str(_two_cpu_processes("deepspeed_zero3", tmp_path)), "--main_process_port", "29534",
            "recipes/train.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml",
            "rollout.backend=hf", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
            "learner.groups_per_step=2", "learner.micro_batch_tokens=40", "sync.interval=2", "eval.at_start=false", "eval.at_end=false",
            "logging.progress=false", "checkpoint.every=1", "checkpoint.save_final_model=false", f"logging.run_dir={run}"]
    first = subprocess.run([*base, "learner.steps=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (run / "checkpoints" / "step-000001" / "behaviour").is_dir()
    second = subprocess.run([*base, "learner.steps=2", "resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {m["step"]: m for m in rows if "learner/optimizer_steps" in m}
    assert sorted(steps) == [1, 2]
    assert steps[2]["learner/optimizer_steps"] == 2, "AdamW's state did not come back with the checkpoint"
    assert steps[2]["rollout/staleness_mean"] == 1, "the engines did not resume at version 0"


def test_async_mode_with_two_ranks_evaluates_on_the_workers_every_step(tmp_path):
    """Async mode under two learner ranks with eval.every=1 and sync.interval=2: every evaluation (at the start, at
    steps 1 and 2, at the end) runs on the generation worker, rank 1 waiting for it at the next collective, and no
    engine is ever built in a learner process (the script refuses one). The step-1 evaluation falls between pushes:
    the worker is lent the learner's weights, so no trained group may carry version 1 (pushes are at 0 and 2)."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = tmp_path / "run"
    cmd = [str(accelerate), "launch", "--config_file", "recipes/accelerate/cpu_ddp2.yaml", "--main_process_port", "29535",
           "tests/scripts/async_recipe.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml",
           "rollout.mode=async", "rollout.backend=hf", "rollout.num_workers=1", "rollout.prompts_per_step=2", "rollout.group_size=2",
           "rollout.max_new_tokens=6", "learner.groups_per_step=1", "learner.steps=3", "sync.interval=2", "buffer.max_staleness=2",
           "eval.every=1", "eval.max_new_tokens=6", "task.eval_size=3", "checkpoint.save_final_model=false", "logging.progress=false",
           f"logging.run_dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/pass@1" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3] and all(r["eval/prompts"] == 3 and r["eval/dropped"] == 0 for r in evals)
    assert [r["step"] for r in records if "loss/value" in r] == [1, 2, 3]
    versions = {json.loads(line)["policy_version"] for line in (run / "completions.jsonl").read_text().splitlines()}
    assert versions <= {0, 2}, versions


def test_fsdp2_weights_are_whole_on_every_rank_for_colocated_engines(tmp_path):
    """Under FSDP2 each rank holds a shard of every weight (accelerate's get_state_dict gathers to rank 0 alone); a
    colocated rank's engine needs them all: `gather_fsdp2` gives every rank the whole weights, on the host, a tied pair
    once. Two real processes (torchrun, gloo) with FSDP2's own `fully_shard` on the CPU."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29536", "tests/scripts/fsdp2_gather.py", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["shard_rows"] == 2, "the weights were not sharded: the gather would prove nothing"
        assert r["names"] == r["reference"] and r["equal"] and r["on_host"] and r["tied_once"], r


def test_two_colocated_ranks_each_build_their_own_vllm_engine(tmp_path):
    """Colocated vLLM on 2 learner ranks (gloo): each rank's engine joins the launcher's process group through vLLM's
    external_launcher executor (on GPUs: each on its rank's own device, not all on GPU 0), generates its own prompts,
    and holds the learner's final weights after the last push."""
    accelerate = Path(sys.executable).parent / "accelerate"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [str(accelerate), "launch", "--config_file", "recipes/accelerate/cpu_ddp2.yaml", "--main_process_port", "29537",
           "tests/scripts/ddp_recipe.py", str(tmp_path), "rollout.backend=vllm", "rollout.kv_cache_gb=0.25", "rollout.prompts_per_step=2",
           "rollout.group_size=2", "rollout.max_new_tokens=6", "learner.groups_per_step=2", "learner.steps=2", "learner.lr=1e-3",
           "learner.warmup_steps=0", "sync.interval=1", "buffer.max_staleness=0", "eval.at_start=false", "eval.at_end=false",
           "logging.progress=false", "checkpoint.save_final_model=false", f"logging.run_dir={tmp_path}/run"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["executor"] for r in ranks] == ["external_launcher"] * 2
    assert [r["engine_device"] for r in ranks] == ["cpu"] * 2  # on GPUs: cuda:0 and cuda:1 (make gpu-smoke, part 6)
    assert ranks[0]["after"] == ranks[1]["after"] != ranks[0]["before"]
    assert ranks[0]["prompts"] != ranks[1]["prompts"]
    assert all(r["engine_diff"] == 0 for r in ranks), [r["engine_diff"] for r in ranks]


def test_fsdp2_bf16_learner_starts_and_steps_on_two_ranks(tmp_path):
    """`Learner.__init__` under accelerate's FSDP2 plugin with bf16 mixed precision (recipes/accelerate/fsdp.yaml) used
    to crash before the first step (it undid a forward wrapper that FSDP2's prepare never makes). Two real processes
    (torchrun, gloo): accelerate 1.16 enables FSDP for GPU process types only, so the script puts FSDP2's plugin state in
    place by hand and the rest (prepare, fully_shard on a CPU mesh, bf16 autocast) is accelerate's and torch's own. The
    step runs several micro-batches, each reduce-scattered (no unsharded accumulated gradients)."""
    model = tmp_path / "model"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(model)
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", "29538", "tests/scripts/fsdp2_learner.py", str(tmp_path),
                           str(model)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)):
        assert r["fsdp2"] and r["native_amp"] and r["sharded"], r  # the path of a bf16 FSDP2 launch on GPUs
        assert r["loss_finite"] and r["changed"] == r["tensors"] and r["micro_batches"] > 1 and r["reduce_each_micro_batch"], r
    # a main-process push in bf16 (gather_fsdp2's dtype and keep=False): rank 0 holds bf16 host copies equal to the
    # trained weights rounded once, a tied pair once; rank 1 took part in every all-gather and holds nothing
    main, other = (json.loads((tmp_path / f"rank{i}.pushed").read_text()) for i in (0, 1))
    assert len(main["names"]) == r["tensors"] and main["bf16"] and main["on_host"] and main["equal"] and main["tied_once"], main
    assert other["names"] == [], other
    assert "lm_head.weight" in main["names"], main["names"]  # the tied name the other rank must skip as rank 0 does
    # a colocated push streams instead (Learner.stream_state): the same bf16 weights on both ranks, read lazily
    for i in (0, 1):
        st = json.loads((tmp_path / f"rank{i}.stream").read_text())
        assert st["lazy"] and st["names"] == main["names"] and st["equal"] and st["tied_once"], st
