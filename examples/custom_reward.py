"""Bring your own reward: two user-defined reward functions plugged into the AsymRE recipe by config.

1. `concise_correct`: asymre's reward shape, written from scratch: 1.0 for a correct final number, minus
   a small penalty per character beyond 12, so the policy learns to answer briefly.
2. `trl_accuracy_reward`: a reward written for TRL's GRPOTrainer, used unchanged: same signature
   `(prompts, completions, **kwargs) -> list[float | None]`, dataset columns arriving as keyword lists.

Run (about 2 minutes on a 2-core CPU):

    .venv/bin/accelerate launch --config_file recipes/accelerate/cpu.yaml recipes/train.py \
        --config recipes/configs/smollm2_arithmetic_cpu.yaml \
        'reward.funcs=[examples.custom_reward:concise_correct,examples.custom_reward:trl_accuracy_reward]' \
        'reward.weights=[1.0,0.5]' learner.steps=4

or simply `python examples/custom_reward.py`, which launches exactly that.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def concise_correct(prompts: list[str], completions: list[str], answer: list[str], **_) -> list[float | None]:
    out: list[float | None] = []
    for text, ref in zip(completions, answer):
        numbers = re.findall(r"-?\d+", text)
        if not numbers:
            out.append(0.0)
            continue
        correct = float(int(numbers[-1]) == int(ref))
        out.append(correct - 0.01 * max(len(text.strip()) - 12, 0))
    return out


def trl_accuracy_reward(prompts, completions, **kwargs):
    """As in a TRL GRPO script: the reference comes in through kwargs (a dataset column)."""
    rewards = []
    for completion, solution in zip(completions, kwargs["answer"]):
        rewards.append(1.0 if solution in completion else 0.0)
    return rewards


CONFIG = "recipes/configs/smollm2_arithmetic_cpu.yaml"
OVERRIDES = ["reward.funcs=[examples.custom_reward:concise_correct,examples.custom_reward:trl_accuracy_reward]",
             "reward.weights=[1.0,0.5]", "learner.steps=4", "logging.run_name=custom-reward"]


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "recipes/accelerate/cpu.yaml",
           "recipes/train.py", "--config", CONFIG, *OVERRIDES, *sys.argv[1:]]
    return subprocess.call(cmd, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)})


if __name__ == "__main__":
    sys.exit(main())
