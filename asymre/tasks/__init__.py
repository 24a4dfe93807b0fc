"""Tasks: turn `cfg.task` into (train prompts, eval prompts) of `asymre.data.Prompt`."""

from __future__ import annotations

from asymre.data import Prompt


def build_task(task, tool_parser: str = "find") -> tuple[list[Prompt], list[Prompt]]:
    """`task` is a `TaskConfig`. Dispatches on `task.name`; the facts task's prompt teaches `tool_parser`'s call syntax
    (rollout.tool_parser)."""
    if task.name == "arithmetic":
        from asymre.tasks import arithmetic

        return arithmetic.build(task.train_size, task.eval_size, task.max_operand, list(task.operations), task.seed,
                                task.system_prompt, task.template)
    if task.name == "facts":
        from asymre.tasks import facts

        return facts.build(task, tool_parser)
    if task.name in ("gsm8k", "math", "file"):
        return _dataset_task(task)
    raise ValueError(f"task.name={task.name!r}: unknown task; expected arithmetic, facts, gsm8k, math or file")


def _dataset_task(task) -> tuple[list[Prompt], list[Prompt]]:
    """Train rows from `task.path` ('train' split); held-out rows from `task.eval_path`, else the 'test'
    split of a hub id or folder, else the last `task.eval_size` rows of a single file."""
    from pathlib import Path

    from asymre.tasks import datasets as D

    if not task.path:
        raise ValueError(f"task.name={task.name} needs task.path (a hub id, or a local JSONL/parquet file or folder)")
    rows, source = D.load_rows(task.path, "train", task.subset)
    start = 0
    if task.eval_path:
        eval_rows, eval_source = D.load_rows(task.eval_path, "test")
    elif Path(task.path).is_file():
        cut = max(len(rows) - task.eval_size, len(rows) // 2)
        rows, eval_rows, eval_source, start = rows[:cut], rows[cut:], source, cut
    else:
        eval_rows, eval_source = D.load_rows(task.path, "test", task.subset)

    def convert(rs: list[dict], src: str, offset: int) -> list[Prompt]:
        if task.name == "gsm8k":
            return D.gsm8k(rs, src, task.system_prompt, offset)
        if task.name == "math":
            return D.math(rs, src, task.system_prompt, offset)
        return D.prompt_file(rs, src, task.prompt_column, task.answer_column, task.system_prompt, offset)

    train = convert(rows, source, 0)
    held_out = convert(eval_rows, eval_source, start)
    return (train[: task.train_size] if task.train_size else train), held_out[: task.eval_size]


class PromptStream:
    """An endless, seeded stream of training prompts: reshuffled each epoch; its position is saved in
    checkpoints so a resumed run sees the same prompts. `shard`/`num_shards` give each rank its own slice."""

    def __init__(self, prompts: list[Prompt], seed: int = 0, shard: int = 0, num_shards: int = 1):
        if not prompts:
            raise ValueError("the task produced no training prompts")
        self.prompts = prompts[shard::num_shards] or prompts
        self.seed = seed
        self.epoch = 0
        self.pos = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        import random

        order = list(range(len(self.prompts)))
        random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._shuffled(self.epoch)
            out.append(self.prompts[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._shuffled(self.epoch)
