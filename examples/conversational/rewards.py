"""Reward functions written for TRL's GRPOTrainer on a conversational dataset, used here unchanged.

Each reads the completion as TRL hands it over for a conversational dataset (`completion[0]["content"]`), a
dataset column (`solution`) as a keyword list, and the extras TRL passes (`log_metric`, `trainer_state`).
"""

from __future__ import annotations

import re


def accuracy_reward(completions, solution, log_metric=None, **kwargs):
    """1.0 when the completion's first number is the solution (the task asks for just the number)."""
    contents = [completion[0]["content"] for completion in completions]
    rewards = []
    for content, sol in zip(contents, solution, strict=True):
        found = re.search(r"-?\d+", content)
        rewards.append(float(found is not None and found.group() == sol.strip()))
    if log_metric:
        log_metric("answered_with_a_number", sum(bool(re.search(r"\d", c)) for c in contents) / len(contents))
    return rewards


def brevity_reward(completions, trainer_state=None, **kwargs):
    """A small penalty per character past 8, phased in over the first 10 steps (TRL's reward shaping by step)."""
    ramp = min(1.0, (trainer_state.global_step if trainer_state else 10) / 10)
    return [-ramp * 0.01 * max(len(c[0]["content"].strip()) - 8, 0) for c in completions]
