"""Tasks: turn `cfg.task` into (train prompts, eval prompts) of `asymre.data.Prompt`."""

from __future__ import annotations

from asymre.data import Prompt


def build_task(task) -> tuple[list[Prompt], list[Prompt]]:
    """`task` is a `TaskConfig`. Dispatches on `task.name`."""
    if task.name == "arithmetic":
        from asymre.tasks import arithmetic

        return arithmetic.build(task.train_size, task.eval_size, task.max_operand, list(task.operations), task.seed,
                                task.system_prompt)
    raise ValueError(f"task.name={task.name!r}: unknown task; built in: 'arithmetic'")
