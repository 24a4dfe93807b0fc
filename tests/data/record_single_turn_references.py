"""Re-record tests/data/single_turn_reference.json and single_turn_vllm_reference.json with the code from before the
episode loop (6e579e0^), on this install. The references are float32 numbers, so they belong to an install (CPU,
library builds); the tests compare them to that noise. Run from a worktree of the old code:

    git worktree add /tmp/old 6e579e0^ && cd /tmp/old && ln -s "$OLDPWD/.venv" .venv
    PYTHONPATH=/tmp/old .venv/bin/python "$OLDPWD/tests/data/record_single_turn_references.py" "$OLDPWD/tests/data"

It writes both files into the folder given (the arguments, 3 training steps in both loss paths, and 3 samples of the
default task's first 3 prompts on the real vLLM engine, as the two tests read them)."""

import json
import os
import sys
from pathlib import Path

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
ARGS = ["rollout.backend=hf", "rollout.prompts_per_step=4", "rollout.group_size=4", "learner.groups_per_step=4",
        "learner.steps=3", "eval.at_start=false", "eval.at_end=false", "logging.progress=false", "checkpoint.every=0"]
KEYS = ["step", "reward/mean", "loss/baseline_mean", "loss/entropy", "loss/value", "learner/grad_norm"]


def main(out: Path) -> None:
    import tempfile

    from transformers import AutoModelForCausalLM

    from asymre.config import load_config
    from asymre.models import resolve_model
    from asymre.rollout.base import SamplingSpec
    from asymre.rollout.vllm_engine import VLLMGenerator
    from asymre.tasks import build_task
    from asymre.tracking import read_metrics
    from tests.recipe_utils import lend_engine, run_recipe

    config = Path.cwd() / "recipes/configs/smollm2_arithmetic_cpu.yaml"
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shared in ("on", "off"):
            run = Path(tmp) / shared
            run_recipe(load_config(config, ARGS + [f"learner.shared_prompt={shared}", f"logging.run_dir={run}"]))
            runs[shared] = [{k: m[k] for k in KEYS} for m in read_metrics(run) if "loss/value" in m]
    (out / "single_turn_reference.json").write_text(json.dumps({"args": ARGS, "runs": runs}, indent=1) + "\n")

    path = resolve_model("smollm2-135m-instruct")
    gen = VLLMGenerator(path, dtype="float32", max_model_len=512, seed=0, kv_cache_gb=0.5, max_prompt_tokens=384)
    gen.original = dict(AutoModelForCausalLM.from_pretrained(path, dtype="float32").state_dict())
    train, _ = build_task(load_config(config).task)
    groups = lend_engine(gen, max_prompt_tokens=384).generate(
        train[:3], SamplingSpec(n=3, temperature=1.0, max_new_tokens=12, seed=1234, logprobs=True))
    got = [{"uid": g.prompt.uid, "prompt_ids": g.prompt_ids,
            "samples": [{"ids": t.completion_ids, "logprobs": t.logprobs, "text": t.text, "finish": t.finish_reason}
                        for t in g.trajectories]} for g in groups]
    (out / "single_turn_vllm_reference.json").write_text(json.dumps(got))
    type(gen).close(gen)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
