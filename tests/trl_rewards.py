"""Reward functions written for TRL 1.16's GRPOTrainer, in the shapes its docs and `trl.rewards` use, loaded
here by dotted path (`tests.trl_rewards:accuracy_reward`). None of them knows about asymre: if one scores
differently here than under TRL, asymre's reward call is not TRL's.
"""

from __future__ import annotations

import asyncio
import re
import threading


def accuracy_reward(completions, solution, log_extra=None, **kwargs):
    """TRL's `accuracy_reward` shape: conversational completions, the `solution` column, math-verify with
    its signal timeouts off the main thread, and the parsed answers logged with `log_extra`."""
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    contents = [completion[0]["content"] for completion in completions]
    rewards, parsed = [], []
    for content, sol in zip(contents, solution, strict=True):
        gold = parse(sol, parsing_timeout=5 if main else None)
        if not gold:
            rewards.append(None)
            parsed.append("[no gold]")
            continue
        answer = parse(content, parsing_timeout=5 if main else None)
        rewards.append(float(verify(gold, answer, timeout_seconds=5 if main else None)))
        parsed.append(str(answer))
    if log_extra:
        log_extra("parsed_answer", parsed)
    return rewards


def think_format_reward(completions, **kwargs):
    """TRL's `think_format_reward`, verbatim in substance."""
    pattern = r"^<think>(?!.*<think>)(.*?)</think>.*$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, c, re.DOTALL | re.MULTILINE) else 0.0 for c in contents]


async def async_length_reward(completions, **kwargs):
    """An async reward (an LLM judge's shape): awaited by the trainer."""
    await asyncio.sleep(0.05)
    return [-len(c[0]["content"] if isinstance(c, list) else c) / 100 for c in completions]


async def async_slow_reward(completions, **kwargs):
    """Sleeps 0.6 s: two of these awaited one after the other take 1.2 s, concurrently 0.6 s."""
    await asyncio.sleep(0.6)
    return [1.0] * len(completions)


async def async_slow_reward_2(completions, **kwargs):
    await asyncio.sleep(0.6)
    return [0.5] * len(completions)


def token_budget_reward(completion_ids, **kwargs):
    """Reads `completion_ids` (as TRL's soft overlong punishment does): -0.1 per token beyond 3."""
    return [-0.1 * max(len(ids) - 3, 0) for ids in completion_ids]


def curriculum_reward(completions, trainer_state, log_metric=None, **kwargs):
    """Reads `trainer_state.global_step` (TRL's dynamic reward shaping) and logs a scalar with `log_metric`."""
    weight = min(1.0, trainer_state.global_step / 10)
    if log_metric:
        log_metric("curriculum_weight", weight)
    return [weight] * len(completions)


def prompt_echo_reward(prompts, completions, **kwargs):
    """1.0 when the completion repeats the last user message of a conversational prompt."""
    return [float(c[0]["content"] == p[-1]["content"]) for p, c in zip(prompts, completions)]


def raises_on_sevens(completions, **kwargs):
    """Raises when any completion says 7: only those samples may be lost."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    if any("7" in t for t in texts):
        raise ZeroDivisionError("seven is not allowed")
    return [1.0] * len(texts)


def returns_a_float(completions, **kwargs):
    return 1.0


def returns_strings(completions, **kwargs):
    return ["1.0"] * len(completions)
