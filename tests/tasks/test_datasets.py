"""GSM8K, MATH and generic prompt/answer files through `datasets`, on small local files in the real
formats of those datasets (tests/data); bad rows fail naming the file, row and column."""

import json
from pathlib import Path

import pytest

from asymre.config import load_config
from asymre.rewards.builtin import math_verify, numeric
from asymre.tasks import build_task
from asymre.tasks.datasets import DataError, last_boxed

DATA = Path(__file__).parent.parent / "data"


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
    answers = [tr[1].columns["answer"], ev[1].columns["answer"]]
    assert math_verify([""] * 2, ["so it is \\boxed{0.75}", "\\boxed{\\sqrt{8}}"], answer=answers) == [1.0, 1.0]


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


# ---- TRL's prompt formats: standard (a string) and conversational (a list of messages) --------------------

def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _conv(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def test_conversational_and_standard_prompts_in_one_file(tmp_path):
    """A list of messages is the conversation (system prompt added only where it has none, columns other
    than the prompt ride along); a string becomes the user message. The answer column may be `solution`."""
    f = _jsonl(tmp_path / "trl.jsonl", [{"prompt": _conv("What is 1+1?"), "solution": "2", "level": 1},
                                        {"prompt": _conv("What is 2+2?", system="Think first."), "solution": "4", "level": 2},
                                        {"prompt": "What is 3+3?", "solution": "6", "level": 3},
                                        {"prompt": _conv("held out"), "solution": "0", "level": 4}])
    cfg = load_config(None, ["task.name=file", f"task.path={f}", "task.answer_column=solution", "task.eval_size=1",
                             "task.train_size=0", "task.system_prompt=Be brief."])
    tr, ev = build_task(cfg.task)
    assert tr[0].messages == _conv("What is 1+1?", system="Be brief.") and tr[0].conversational
    assert tr[1].messages == _conv("What is 2+2?", system="Think first.")  # its own system message is kept
    assert tr[2].messages == _conv("What is 3+3?", system="Be brief.") and not tr[2].conversational
    assert [p.columns["solution"] for p in tr] == ["2", "4", "6"] and [p.columns["answer"] for p in tr] == ["2", "4", "6"]
    assert tr[1].columns["level"] == 2 and ev[0].columns["solution"] == "0"


@pytest.mark.parametrize("prompt, said", [
    (["What is 1+1?"], "message 0 is str 'What is 1+1?', expected a dict with 'role' and 'content'"),
    ([{"content": "What is 1+1?"}], "message 0 has no 'role' (keys: ['content'])"),
    ([{"role": "user"}], "message 0 (user) has no text 'content' (got NoneType)"),
    ([], "empty prompt (an empty list of messages)"),
    ([{"role": "user", "content": "  "}], "empty prompt (every message's content is empty)"),
    ("", "missing column 'prompt'"),
    (7, "a prompt is a string or a list of {role, content} messages, got int"),
])
def test_malformed_prompt_row_names_file_row_and_column(tmp_path, prompt, said):
    good = {"prompt": _conv("ok"), "answer": "1"}
    f = _jsonl(tmp_path / "conv.jsonl", [good, good, {"prompt": prompt, "answer": "1"}, good])
    with pytest.raises(DataError) as e:
        build_task(load_config(None, ["task.name=file", f"task.path={f}", "task.eval_size=1"]).task)
    msg = str(e.value)
    assert msg.startswith(f"{f}, row 2 (0-based)") and said in msg
    if isinstance(prompt, list):
        assert "column 'prompt'" in msg


def _model_copy(model_path, dest, chat_template):
    """The embedded model's folder with another chat template (None: none at all, as a base model has)."""
    dest.mkdir()
    for f in Path(model_path).iterdir():
        if f.name != "chat_template.jinja":
            (dest / f.name).symlink_to(f)
    if chat_template is not None:
        (dest / "chat_template.jinja").write_text(chat_template)
    return str(dest)


THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n"
                     "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
                     "{% endif %}")


@pytest.mark.parametrize("template, kwargs", [("embedded", {}), ("thinking", {"enable_thinking": False}), (None, {})])
def test_prompt_ids_the_engine_sees(tmp_path, model_path, template, kwargs):
    """The engine's prompt ids are exactly the chat template applied to the conversation (with
    task.chat_template_kwargs), or the raw text for a model without a chat template."""
    from transformers import AutoTokenizer

    from asymre.rollout import make_generator
    from asymre.rollout.base import SamplingSpec

    path = model_path if template == "embedded" else _model_copy(model_path, tmp_path / "m", THINKING_TEMPLATE if template else None)
    f = _jsonl(tmp_path / "conv.jsonl", [{"prompt": _conv("What is 2+2?", system="Be brief."), "answer": "4"}] * 2)
    cfg = load_config(None, ["task.name=file", f"task.path={f}", "task.eval_size=1", f"task.chat_template_kwargs={json.dumps(kwargs)}"])
    train, _ = build_task(cfg.task)
    gen = make_generator("hf", path, max_prompt_tokens=128, chat_template_kwargs=cfg.task.chat_template_kwargs)
    group = gen.generate(train[:1], SamplingSpec(n=1, temperature=0.0, max_new_tokens=2))[0]
    tok = AutoTokenizer.from_pretrained(path)
    if template is None:
        assert tok.chat_template is None
        expected = tok("Be brief.\n\nWhat is 2+2?")["input_ids"]
    else:
        expected = tok.apply_chat_template(_conv("What is 2+2?", system="Be brief."), add_generation_prompt=True, tokenize=True,
                                           return_dict=False, **kwargs)
    assert group.prompt_ids == list(expected)
    if template == "thinking":
        assert tok.decode(expected).endswith("<|im_start|>assistant\n<think></think>")


def test_each_group_carries_its_own_prompt_ids(model_path):
    """The hf backend's groups (over several generate calls) each hold their own prompt's token ids, once."""
    from asymre.rollout import make_generator
    from asymre.rollout.base import SamplingSpec, encode_prompts

    train, _ = build_task(load_config("recipes/configs/smollm2_arithmetic_cpu.yaml").task)
    gen = make_generator("hf", model_path, max_prompt_tokens=128)
    gen.batch_size = 4  # two prompts of G = 2 per generate call: calls of 2 and 1 prompts
    groups = gen.generate(train[:3], SamplingSpec(n=2, temperature=1.0, max_new_tokens=1, seed=0))
    want = encode_prompts(gen.tokenizer, train[:3], 128)
    assert [g.prompt.uid for g in groups] == [p.uid for p in train[:3]]
    assert [g.prompt_ids for g in groups] == want and len({tuple(x) for x in want}) == 3
    assert all(len(g.trajectories) == 2 for g in groups)


def test_generation_kwargs_reach_transformers_generate(model_path):
    """The hf backend passes rollout.generation_kwargs to `generate` (stop_strings needs the tokenizer too)."""
    from asymre.rollout import make_generator
    from asymre.rollout.base import SamplingSpec

    train, _ = build_task(load_config("recipes/configs/smollm2_arithmetic_cpu.yaml").task)
    gen = make_generator("hf", model_path, max_prompt_tokens=128)
    plain = gen.generate(train[:2], SamplingSpec(n=1, temperature=0.0, max_new_tokens=12))
    stopped = gen.generate(train[:2], SamplingSpec(n=1, temperature=0.0, max_new_tokens=12, extra={"stop_strings": [" "]}))
    for p, s in zip(plain, stopped):
        full, cut = p.trajectories[0].text, s.trajectories[0].text
        # transformers stops once the text ends with a stop string (matched at token boundaries): an early,
        # greedy-identical prefix of the run without it
        assert full.startswith(cut.rstrip()) and len(s.trajectories[0].completion_ids) < len(p.trajectories[0].completion_ids), (full, cut)
