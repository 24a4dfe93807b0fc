"""Every bad input at start-up: the training command prints one line naming it (the key, the file and line,
the row and column, the model name) and exits with code 2, before any model loads, leaving nothing in the
run folder but (at most) its config. Runs the command's `main` in this process: no model is loaded."""

import dataclasses
import json

import pytest

from asymre.config import Config, _say
from tests.recipe_utils import ROOT, load_recipe_module

CPU = str(ROOT / "recipes" / "configs" / "smollm2_arithmetic_cpu.yaml")


def _files(tmp_path):
    """Data files with one thing wrong each."""
    good = {"prompt": "What is 1 + 1?", "answer": "2"}
    made = {
        "empty": "",
        "broken": json.dumps(good) + '\n{"prompt": "q" "answer": "1"}\n' + json.dumps(good) + "\n",
        "number": "\n".join(json.dumps(r) for r in [good, good, {"prompt": 7, "answer": "1"}, good]) + "\n",
        "no_answer": "\n".join(json.dumps(r) for r in [good, {"prompt": "q", "answer": ""}, good]) + "\n",
        "not_object": json.dumps(good) + "\n[1, 2]\n",
    }
    for name, text in made.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    return tmp_path


ROWS = [  # (overrides, the one line it prints); {d} is the folder of the data files above
    (["task.name=file", "task.path={d}/missing.jsonl"], "data error: {d}/missing.jsonl: no such file or folder"),
    (["task.name=file", "task.path={d}/empty.jsonl"], "data error: {d}/empty.jsonl: empty file (no rows)"),
    (["task.name=file", "task.path={d}/broken.jsonl"],
     "data error: {d}/broken.jsonl, line 2: not valid JSON (Expecting ',' delimiter at column 16)"),
    (["task.name=file", "task.path={d}/not_object.jsonl"], "data error: {d}/not_object.jsonl, line 2: a row must be a JSON object, got list"),
    (["task.name=file", "task.path={d}/number.jsonl"],
     "data error: {d}/number.jsonl, row 2 (0-based), column 'prompt': a prompt is a string or a list of {{role, content}} messages, got int"),
    (["task.name=file", "task.path={d}/no_answer.jsonl"],
     "data error: {d}/no_answer.jsonl, row 1 (0-based): missing column 'answer' (columns: ['answer', 'prompt'])"),
    (["task.name=math"], "config error: task.name=math needs task.path (a hub id, or a local JSONL/parquet file or folder)"),
    (["task.name=mmlu"], "config error: task.name='mmlu' is not one of ['arithmetic', 'file', 'gsm8k', 'math']"),
    (["model.name={d}/no_model"], "model error: model.name={d}/no_model: looked for a local folder, the embedded models "
     "(smollm2-135m-instruct) and a hub id: no such local folder, and '{d}/no_model' is not a hub id ('org/name')"),
    (["model.name=some-org/some-model"], "model error: model.name=some-org/some-model: looked for a local folder, the embedded "
     "models (smollm2-135m-instruct) and a hub id: no such local folder, and hub id 'some-org/some-model' is not in the local "
     "hub cache (HF_HUB_OFFLINE is set: this machine may have no hub access)"),
    (["rollout.temperature=-1"], "config error: rollout.temperature=-1.0 must be >= 0"),
    (["rollout.top_p=1.5"], "config error: rollout.top_p=1.5 must be in (0, 1]"),
    (["learner.lr=0"], "config error: learner.lr=0.0 must be > 0"),
    (["reward.funcs=[no_such_reward]"], "reward error: reward 'no_such_reward': not a built-in (boxed_format, first_number, "
     "just_number_format, length_penalty, math_verify, numeric) and not a dotted path 'pkg.module:function'"),
    (["rollout.backend=hf", "rollout.generation_kwargs={{stop: [x]}}"],
     "config error: rollout.generation_kwargs: 'stop' is unknown to the hf engine's sampling parameters"),
    (["rollout.backend=vllm", "eval.generation_kwargs={{topk: 5}}"],
     "config error: eval.generation_kwargs: 'topk' is unknown to the vllm engine's sampling parameters"),
    (["rollout.generation_kwargs={{temperature: 0.5}}"], "config error: rollout.generation_kwargs: 'temperature' is set by "
     "asymre's own keys (rollout.group_size, temperature, top_p, max_new_tokens, seed)"),
    (["rollout.backend=tests.fakes:SlowGenerator", "task.chat_template_kwargs={{enable_thinking: false}}"],
     "config error: rollout.backend=tests.fakes:SlowGenerator: the factory takes no chat_template_kwargs, but "
     "task.chat_template_kwargs={{'enable_thinking': False}} is set"),
    (["learner.lrr=1"], "config error: command line: bad config key 'learner.lrr': Key 'lrr' not in 'LearnerConfig'. Did you mean: 'lr'?"),
]


def _outside(valid: str, is_int: bool):
    """A value just outside the interval `valid`."""
    lo, hi = (x.strip() for x in valid[1:-1].split(","))
    if hi != "inf":
        return (int(float(hi)) + 1 if is_int else float(hi) + 0.5) if valid[-1] == "]" else (int(float(hi)) if is_int else float(hi))
    return (int(float(lo)) - 1 if is_int else float(lo) - 0.5) if valid[0] == "[" else (int(float(lo)) if is_int else float(lo))


def _range_rows():
    """One row per key with a declared valid range: the value just outside it."""
    rows = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
            elif "valid" in f.metadata:
                is_list = isinstance(default, list)
                is_int = (type(default[0]) if is_list else type(default)) is int
                bad = _outside(f.metadata["valid"], is_int)
                value = [*default[:-1], bad] if is_list else bad
                shown = json.dumps(value).replace('"', "") if is_list else value
                rows.append(([f"{prefix}{f.name}={shown}"],
                             f"config error: {prefix}{f.name}={value} must be {_say(f.metadata['valid'])}"))
    walk(Config, "")
    return rows


RANGE_ROWS = _range_rows()


def test_every_range_check_has_a_row():
    assert len(RANGE_ROWS) >= 40 and {"rollout.top_p", "learner.lr", "learner.betas", "rollout.temperature"} <= {
        r[0][0].split("=")[0] for r in RANGE_ROWS}


@pytest.mark.parametrize("overrides, said", ROWS + RANGE_ROWS, ids=[r[0][-1][:60] for r in ROWS + RANGE_ROWS])
def test_bad_input_is_one_line_and_exit_code_2(overrides, said, tmp_path, capsys, monkeypatch):
    import asymre.models

    monkeypatch.setattr(asymre.models, "resolve_model", lambda *a, **k: pytest.fail("a model was loaded before the input was checked"))
    d = _files(tmp_path)
    run = tmp_path / "run"
    mod = load_recipe_module()
    monkeypatch.setattr(mod, "resolve_model", asymre.models.resolve_model)
    args = ["--config", CPU, *[o.format(d=d) for o in overrides], f"logging.run_dir={run}", "logging.report_to=[]"]
    assert mod.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [said.format(d=d)]
    assert not run.exists() or sorted(p.name for p in run.iterdir()) in ([], ["config.json"])


@pytest.mark.parametrize("tracker, said", [
    ("tensorbord", "config error: logging.report_to: 'tensorbord' is not a tracker asymre logs to (wandb, tensorboard, trackio, mlflow)"),
    ("tensorboard", "config error: logging.report_to: 'tensorboard' needs the tensorboard package, which is not installed "
                    "(pip install tensorboard)")])
def test_a_tracker_unknown_or_not_installed_is_refused_at_start_up(tracker, said, tmp_path, capsys, monkeypatch):
    """A typo or a tracker whose package is missing stops the run before any model loads and before the run folder is
    claimed (the rerun after `pip install` must not find it taken), instead of failing at the first log line."""
    import asymre.models
    import asymre.tracking

    monkeypatch.setattr(asymre.tracking, "_installed", lambda name: name != "tensorboard")  # whatever this machine has
    mod = load_recipe_module()
    monkeypatch.setattr(mod, "resolve_model", lambda *a, **k: pytest.fail("a model was loaded before the input was checked"))
    assert mod.main(["--config", CPU, f"logging.report_to=[wandb,{tracker}]", f"logging.run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [said]
    assert not (tmp_path / "run").exists()


def test_verbose_shows_the_traceback(tmp_path):
    from asymre.tasks.datasets import DataError

    with pytest.raises(DataError, match="no such file"):
        load_recipe_module().main(["--config", CPU, "task.name=file", f"task.path={tmp_path}/x.jsonl", "logging.verbose=true",
                                   f"logging.run_dir={tmp_path / 'run'}"])


def test_accelerate_config_asking_for_what_this_machine_would_drop(tmp_path, capsys, monkeypatch):
    """`accelerate launch --config_file recipes/accelerate/fsdp.yaml` on a machine without a GPU sets this variable;
    Accelerator(cpu=True) would then silently run plain data parallel. (DeepSpeed runs there: tests/test_ddp.py.)"""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert load_recipe_module().main(["--config", CPU, f"logging.run_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "config error: the accelerate config asks for FSDP (ACCELERATE_USE_FSDP=true), which this run without a GPU would silently "
        "drop; launch with recipes/accelerate/cpu.yaml or cpu_ddp2.yaml (or DeepSpeed)"]
    assert not (tmp_path / "run").exists()
