"""The built-in synthetic arithmetic task: "What is 3 + 5?", answered with just the number.

Seeded, no download, difficulty set by `max_operand` and `operations`. The embedded SmolLM2-135M
answers single-digit addition correctly only a small part of the time before training (measured in
docs/benchmarks.md, "The main job"): a real, cheap target for RL.
Train and eval prompts are disjoint (split on the operand pair, not on the draw).
"""

from __future__ import annotations

import itertools
import random

from asymre.data import Prompt

INSTRUCTION = "What is {a} {op} {b}? Answer with just the number."
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def make_prompt(a: int, op: str, b: int, system_prompt: str | None = None, template: str = INSTRUCTION) -> Prompt:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": template.format(a=a, op=op, b=b)})
    return Prompt(uid=f"arith:{a}{op}{b}", messages=messages, columns={"answer": str(_OPS[op](a, b))})


def build(train_size: int, eval_size: int, max_operand: int = 9, operations: list[str] | None = None, seed: int = 0,
          system_prompt: str | None = None, template: str = INSTRUCTION) -> tuple[list[Prompt], list[Prompt]]:
    """Returns (train prompts, eval prompts). Eval takes a held-out share of the distinct problems;
    training cycles over the rest (with repetition when train_size exceeds them)."""
    ops = operations or ["+"]
    bad = [o for o in ops if o not in _OPS]
    if bad:
        raise ValueError(f"task.operations: unknown operator(s) {bad}; expected some of {sorted(_OPS)}")
    problems = [(a, op, b) for op in ops for a, b in itertools.product(range(max_operand + 1), repeat=2)]
    rng = random.Random(seed)
    rng.shuffle(problems)
    n_eval = min(eval_size, len(problems) // 2)
    held_out, train_pool = problems[:n_eval], problems[n_eval:]
    train = [train_pool[i % len(train_pool)] for i in range(train_size)]
    rng.shuffle(train)
    return ([make_prompt(*p, system_prompt, template) for p in train], [make_prompt(*p, system_prompt, template) for p in held_out])
