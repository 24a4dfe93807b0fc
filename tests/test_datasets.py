"""GSM8K, MATH and generic prompt/answer files through `datasets`, on small local files in the real
formats of those datasets (tests/data); bad rows fail naming the file, row and column."""

import json
from pathlib import Path

import pytest

from asymre.config import load_config
from asymre.rewards.builtin import math_verify, numeric
from asymre.tasks import build_task
from asymre.tasks.datasets import DataError, last_boxed

DATA = Path(__file__).parent / "data"


def test_gsm8k_folder_train_and_test_splits():
    cfg = load_config(None, ["task.name=gsm8k", f"task.path={DATA}", "task.train_size=0"])
    tr, ev = build_task(cfg.task)
    assert [p.columns["answer"] for p in tr] == ["72", "10", "5"] and [p.columns["answer"] for p in ev] == ["18", "3"]
    assert "Natalia" in tr[0].messages[-1]["content"] and "####" in tr[0].messages[-1]["content"]
    assert numeric([""], ["... so 16-3-4=9 eggs, 9*2 = 18\n#### 18"], answer=[ev[0].columns["answer"]]) == [1.0]


def test_math_answers_come_from_boxed_solution_and_verify():
    cfg = load_config(None, ["task.name=math", f"task.path={DATA / 'math_train.jsonl'}", f"task.eval_path={DATA / 'math_test.jsonl'}",
                             "task.train_size=0"])
    tr, ev = build_task(cfg.task)
    assert [p.columns["answer"] for p in tr] == ["\\sqrt{2}", "\\frac{3}{4}"]
    assert [p.columns["answer"] for p in ev] == ["70", "2\\sqrt{2}"]
    assert tr[0].columns["level"] == "Level 3"  # every column rides along for rewards
    assert math_verify([""] * 2, ["so it is \\boxed{0.75}", "\\boxed{\\sqrt{8}}"], answer=[tr[1].columns["answer"], ev[1].columns["answer"]]) == [1.0, 1.0]


def test_last_boxed_matches_nested_braces():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"
    assert last_boxed("no box") is None


def test_generic_parquet_file_with_held_out_tail(tmp_path):
    import pandas as pd

    f = tmp_path / "qa.parquet"
    pd.DataFrame({"q": [f"question {i}" for i in range(10)], "a": [str(i) for i in range(10)], "extra": list(range(10))}).to_parquet(f)
    cfg = load_config(None, ["task.name=file", f"task.path={f}", "task.prompt_column=q", "task.answer_column=a",
                             "task.eval_size=3", "task.train_size=0", "task.system_prompt=Be brief."])
    tr, ev = build_task(cfg.task)
    assert [p.columns["answer"] for p in ev] == ["7", "8", "9"] and len(tr) == 7
    assert tr[0].messages[0]["content"] == "Be brief." and tr[2].columns["extra"] == 2


@pytest.mark.parametrize("task, row, missing", [("gsm8k", {"question": "q"}, "answer"), ("math", {"solution": "\\boxed{1}"}, "problem"),
                                                ("file", {"prompt": "q"}, "answer")])
def test_row_without_column_names_file_row_and_column(tmp_path, task, row, missing):
    f = tmp_path / "bad.jsonl"
    good = {"gsm8k": {"question": "q", "answer": "x #### 1"}, "math": {"problem": "p", "solution": "\\boxed{1}"},
            "file": {"prompt": "q", "answer": "1"}}[task]
    f.write_text("\n".join(json.dumps(r) for r in [good, good, row, good]) + "\n")
    cfg = load_config(None, ["task.name=" + task, f"task.path={f}", "task.eval_size=1"])
    with pytest.raises(DataError) as e:
        build_task(cfg.task)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "row 2" in msg and repr(missing) in msg


def test_math_solution_without_boxed_answer(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"problem": "p", "solution": "the answer is 3"}) + "\n" + json.dumps({"problem": "p", "solution": "\\boxed{3}"}) + "\n")
    with pytest.raises(DataError, match=r"m.jsonl, row 0 .*boxed"):
        build_task(load_config(None, ["task.name=math", f"task.path={f}", "task.eval_size=1"]).task)


def test_dataset_task_needs_a_path():
    with pytest.raises(ValueError, match="task.path"):
        build_task(load_config(None, ["task.name=gsm8k"]).task)
