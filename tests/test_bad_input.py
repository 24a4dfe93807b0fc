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
    (["task.name=mmlu"], "config error: task.name='mmlu' is not one of ['arithmetic', 'facts', 'file', 'gsm8k', 'math']"),
    (["model.name={d}/no_model"], "model error: model.name={d}/no_model: looked for a local folder, the embedded models "
     "(smollm2-135m-instruct) and a hub id: no such local folder, and '{d}/no_model' is not a hub id ('org/name')"),
    (["model.name=some-org/some-model"], "model error: model.name=some-org/some-model: looked for a local folder, the embedded "
     "models (smollm2-135m-instruct) and a hub id: no such local folder, and hub id 'some-org/some-model' is not in the local "
     "hub cache (HF_HUB_OFFLINE is set: this machine may have no hub access)"),
    (["rollout.temperature=-1"], "config error: rollout.temperature=-1.0 must be >= 0"),
    (["rollout.top_p=1.5"], "config error: rollout.top_p=1.5 must be in (0, 1]"),
    (["learner.lr=0"], "config error: learner.lr=0.0 must be > 0"),
    (["reward.funcs=[no_such_reward]"], "reward error: reward 'no_such_reward': not a built-in (boxed_format, facts, first_number, "
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
    (["learner.betas=[0.9"], "config error: command line: 'learner.betas=[0.9': the value is not valid YAML: did not find expected "
     "',' or ']' (quote it, or close its brackets)"),
    (["rollout.group_size=1"], "config error: rollout.group_size=1: loss.baseline=group_mean is computed within a group and needs "
     "rollout.group_size >= 2 (with one sample every advantage is -delta_V, whatever its reward); the baselines that accept "
     "rollout.group_size=1: constant, running"),
    (["rollout.group_size=1", "loss.baseline=leave_one_out"], "config error: rollout.group_size=1: loss.baseline=leave_one_out is "
     "computed within a group and needs rollout.group_size >= 2 (with one sample every advantage is -delta_V, whatever its "
     "reward); the baselines that accept rollout.group_size=1: constant, running"),
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
    monkeypatch.setitem(mod.main.__globals__, "resolve_model", asymre.models.resolve_model)
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
    monkeypatch.setitem(mod.main.__globals__, "resolve_model", lambda *a, **k: pytest.fail("a model was loaded before the input was checked"))
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


# ---------------------------------------------------------------------------------------------- round two
def _start(mod, monkeypatch, args, capsys, config=CPU):
    """main(args) with a model load turned into a failure; returns (exit code, stderr lines)."""
    import asymre.models

    def fail(*a, **k):
        pytest.fail("a model was loaded before the input was checked")

    monkeypatch.setitem(mod.main.__globals__, "resolve_model", fail)  # the recipe's own name (runpy: its globals, not `mod`)
    monkeypatch.setattr(asymre.models, "resolve_model", fail)
    code = mod.main(["--config", str(config), "logging.report_to=[]", *args])
    return code, capsys.readouterr().err.strip().splitlines()


def test_a_config_file_with_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, capsys, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("learner:\n  lr: [1e-5\nrollout:\n  group_size: 4\n")
    code, err = _start(load_recipe_module(), monkeypatch, [f"logging.run_dir={tmp_path / 'run'}"], capsys, broken)
    assert code == 2 and err == [f"config error: {broken}, line 3, column 8: not valid YAML: did not find expected ',' or ']' "
                                 f"(while parsing a flow sequence that starts at line 2, column 7)"]
    listed = tmp_path / "list.yaml"
    listed.write_text("- learner\n- rollout\n")
    code, err = _start(load_recipe_module(), monkeypatch, [], capsys, listed)
    assert code == 2 and err == [f"config error: {listed}: a config file is a mapping of keys (learner: {{lr: ...}}), got a ListConfig"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("baseline", ["constant", "running"])
def test_a_group_of_one_is_accepted_by_the_baselines_that_need_no_group(baseline):
    from asymre.config import load_config

    assert load_config(CPU, ["rollout.group_size=1", f"loss.baseline={baseline}"]).rollout.group_size == 1


REWARDS = """
from pathlib import Path

FIXED = Path({fixed!r})


def wrong_length(completions, **kw):
    return [1.0] * len(completions) if FIXED.exists() else [1.0]


def wrong_length_from_step_1(completions, trainer_state, **kw):
    return [1.0] if trainer_state.global_step >= 1 and not FIXED.exists() else [0.5] * len(completions)


def words(completions, **kw):
    return ["yes" for _ in completions]


def a_dict(completions, **kw):
    return {{"score": 1.0}}


def reads_solution(completions, solution=None, **kw):  # TRL's accuracy_reward reads the `solution` column
    return [float(s is not None and c.strip() == str(s)) for c, s in zip(completions, solution or [None] * len(completions))]
"""


def _reward_module(tmp_path, monkeypatch, name: str) -> str:
    """A user's reward file next to the run (a module name of its own: the scorer imports it once per process)."""
    (tmp_path / f"{name}.py").write_text(REWARDS.format(fixed=str(tmp_path / "fixed")))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("fn, said", [
    ("wrong_length", "returned 1 values for 2 completions"),
    ("words", "returned str 'yes' for sample 0, expected a float or None"),
    ("a_dict", "returned dict, expected a list of 16 floats")])
def test_a_reward_of_the_wrong_shape_stops_at_start_up_naming_it(fn, said, tmp_path, capsys, monkeypatch):
    """The preflight calls the configured rewards on reference answers before the model loads: a function that
    breaks the contract (one number or None per completion) is one line naming it and what it returned."""
    name = _reward_module(tmp_path, monkeypatch, f"shape_rewards_{fn}")
    code, err = _start(load_recipe_module(), monkeypatch, [f"reward.funcs=[{name}:{fn}]", f"logging.run_dir={tmp_path / 'run'}"], capsys)
    rows = "8 training rows"
    if fn == "wrong_length":  # a batch call that raised nothing: the per-sample retry is not taken, the batch is 16
        said = "returned 1 values for 16 completions"
    assert code == 2 and err == [f"reward error: reward preflight (reference answers of {rows}): reward function "
                                 f"'{name}:{fn}' {said} (a reward returns one float per completion, or None to abstain)"]
    assert not (tmp_path / "run").exists()


def test_a_reward_that_can_never_pay_stops_at_start_up_and_preflight_false_skips_it(tmp_path, capsys, monkeypatch):
    """Answers the numeric reward cannot parse ('forty-two'): no reference answer scores above an empty completion,
    so the run would train at reward 0 for its whole length. The line names the reward, the column and a row."""
    rows = [{"question": f"What is {i} + {i}?", "result": w} for i, w in enumerate(["zero", "two", "four", "six"] * 3)]
    data = tmp_path / "words.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["task.name=file", f"task.path={data}", "task.prompt_column=question", "task.answer_column=result", "task.eval_size=2",
            f"logging.run_dir={tmp_path / 'run'}"]
    mod = load_recipe_module()
    code, err = _start(mod, monkeypatch, args, capsys)
    assert code == 2 and err == [
        "reward error: reward preflight: reward.funcs=['numeric'] paid none of the reference answers of 8 training rows more "
        "than an empty completion (e.g. row 0: column 'result' = 'zero', written as 'zero', scored numeric None (abstained)); check the "
        "task's answer column and the reward, or set reward.preflight=false for a reward that cannot score reference answers"]
    assert not (tmp_path / "run").exists()
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # past the preflight, on to the model
        _start(mod, monkeypatch, [*args, "reward.preflight=false"], capsys)


def test_a_reward_reading_a_column_the_task_does_not_have_stops_at_start_up(tmp_path, capsys, monkeypatch):
    """A TRL reward that reads `solution`, on a task whose reference is in `answer`: it scores every reference 0, as it
    does an empty completion (the run would train on reward 0 throughout)."""
    name = _reward_module(tmp_path, monkeypatch, "column_rewards")
    code, err = _start(load_recipe_module(), monkeypatch, [f"reward.funcs=[{name}:reads_solution]", f"logging.run_dir={tmp_path / 'run'}"],
                       capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(
        f"reward error: reward preflight: reward.funcs=['{name}:reads_solution'] paid none of the reference answers of 8 training rows "
        f"more than an empty completion (e.g. row 0: column 'answer' = "), err
    assert f"scored {name}:reads_solution 0)" in err[0]
    (tmp_path / "solutions.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "solution": str(i + 1)}) + "\n"
                                                     for i in range(12)))
    with pytest.raises(pytest.fail.Exception, match="a model was loaded"):  # the same reward, on a task that has the column
        _start(load_recipe_module(), monkeypatch, [f"reward.funcs=[{name}:reads_solution]", "task.name=file",
                                                   f"task.path={tmp_path / 'solutions.jsonl'}", "task.answer_column=solution",
                                                   "task.eval_size=2", f"logging.run_dir={tmp_path / 'run'}"], capsys)


def _shipped_runs():
    from tests.test_recipes import HARDWARE, _data_overrides, _runs

    return [(path, own + HARDWARE + _data_overrides(path)) for path, own in _runs()]


@pytest.mark.parametrize("path, overrides", _shipped_runs(), ids=[p for p, _ in _shipped_runs()])
def test_the_reward_preflight_passes_on_every_shipped_config(path, overrides):
    """Each shipped config's reward pays its task's reference answers (on the committed fixtures of its datasets)."""
    from asymre.config import load_config
    from asymre.rewards import RewardScorer
    from asymre.rewards.preflight import preflight
    from asymre.tasks import build_task

    cfg = load_config(ROOT / path, overrides)
    assert cfg.reward.preflight
    train, _ = build_task(cfg.task)
    paid = preflight(RewardScorer.from_config(cfg), train)
    assert set(paid) == set(cfg.reward.funcs) and max(paid.values()) > 0


@pytest.mark.parametrize("path, overrides", _shipped_runs(), ids=[p for p, _ in _shipped_runs()])
@pytest.mark.parametrize("bad, said", [
    (["rollout.group_size=1"], "config error: rollout.group_size=1: loss.baseline=group_mean is computed within a group"),
    (["rollout.temperature=-1"], "config error: rollout.temperature=-1.0 must be >= 0"),
    (["learner.lrr=1"], "config error: command line: bad config key 'learner.lrr'"),
    (["reward.funcs=[no_such_reward]", "reward.weights=[]"], "reward error: reward 'no_such_reward': not a built-in"),
    (["task.name=file", "task.path={d}/missing.jsonl"], "data error: {d}/missing.jsonl: no such file or folder"),
    (["model.name={d}/no_model"], "model error: model.name={d}/no_model: looked for a local folder"),
    (["logging.report_to=[tensorbord]"], "config error: logging.report_to: 'tensorbord' is not a tracker")])
def test_start_up_errors_hold_on_every_shipped_config(path, overrides, bad, said, tmp_path, capsys, monkeypatch):
    """The start-up checks of every round, on each shipped config (not only the default one) and example: one line,
    exit 2, before any model loads. (The group-of-one row applies to the configs training with the group mean.)"""
    from asymre.config import load_config

    if bad == ["rollout.group_size=1"] and load_config(ROOT / path, overrides).loss.baseline != "group_mean":
        pytest.skip("this config's baseline accepts a group of one")
    mod = load_recipe_module()
    args = [*overrides, *[b.format(d=tmp_path) for b in bad], f"logging.run_dir={tmp_path / 'run'}"]
    code, err = _start(mod, monkeypatch, args, capsys, ROOT / path)
    assert code == 2 and len(err) == 1 and err[0].startswith(said.format(d=tmp_path)), err
    assert not (tmp_path / "run").exists() or sorted(p.name for p in (tmp_path / "run").iterdir()) in ([], ["config.json"])


@pytest.mark.slow
def test_a_reward_that_breaks_the_contract_mid_run_stops_in_one_line_and_the_run_resumes_once_fixed(tmp_path, capsys, monkeypatch):
    """Past the preflight (reward.preflight=false), the second step's scoring finds a list of the wrong length: one
    line naming the function and both lengths, exit 2, and the first step's state checkpointed, so that once the
    function is fixed `resume=auto` continues the same run folder from it to the end."""
    name = _reward_module(tmp_path, monkeypatch, "midrun_rewards")
    run = tmp_path / "run"
    args = ["--config", CPU, f"reward.funcs=[{name}:wrong_length_from_step_1]", "reward.preflight=false", "rollout.backend=hf",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "learner.groups_per_step=2",
            "learner.steps=2", "eval.at_start=false", "eval.at_end=false", "checkpoint.save_final_model=false",
            "logging.progress=false", "logging.report_to=[]", f"logging.run_dir={run}"]
    mod = load_recipe_module()
    assert mod.main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert err == [f"reward error: reward function '{name}:wrong_length_from_step_1' returned 1 values for 4 completions (a reward "
                   f"returns one float per completion, or None to abstain); stopped at learner step 1, checkpointed in {run}: fix the reward "
                   f"and continue with resume=auto"], err
    (tmp_path / "fixed").write_text("")  # the user fixes the function
    assert mod.main([*args, "resume=auto"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/value" in r] == [1, 2]  # step 1 from the first launch, step 2 resumed
