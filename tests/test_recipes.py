"""Every shipped recipe config and example config runs end to end on this CPU: 2 learner steps, with its own
task, data format, prompt format, reward, loss and evaluation. Only the keys in HARDWARE and CPU_SCALE below
change (and the data path, to a committed fixture in the real dataset's format). If one of these fails, a
user who launches that recipe hits the same failure (the paper's math_verify reward once dropped every
sample this way while its unit tests passed)."""

import json
import math
import os
from pathlib import Path

import pytest

from asymre.config import load_config
from tests.recipe_utils import ROOT, lend_engine, load_recipe_module

DATA = ROOT / "tests" / "data"

# What a CPU machine cannot run as shipped: the 3B/8B hub models in bf16, GPU placement and memory.
HARDWARE = ["model.name=smollm2-135m-instruct", "model.dtype=float32", "rollout.devices=[]", "rollout.num_workers=1",
            "rollout.kv_cache_gb=0.5"]  # and the accelerate config: the test runs in this process (one CPU rank)
# What makes two steps take seconds instead of hours; nothing here changes what a step computes.
CPU_SCALE = ["learner.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2", "learner.groups_per_step=2",
             "rollout.max_new_tokens=24", "rollout.max_prompt_tokens=384", "eval.max_new_tokens=24", "task.eval_size=2",
             "learner.micro_batch_tokens=1024", "logging.progress=false", "warm_start.batch_size=2"]
# The hub datasets the recipes name, as small committed files in the same formats.
DATA_FIXTURES = {"DigitalLearningGmbH/MATH-lighteval": DATA / "math_train.jsonl", "HuggingFaceH4/MATH-500": DATA / "math500_test.jsonl"}

CONFIGS = ["recipes/configs/smollm2_arithmetic_cpu.yaml", "recipes/configs/qwen2.5_3b_math_1gpu.yaml",
           "recipes/configs/llama3.1_8b_math_8gpu.yaml", "recipes/configs/smollm2_facts_intool_cpu.yaml",
           "recipes/configs/smollm2_facts_inweight_cpu.yaml", "recipes/configs/smollm2_1.7b_facts_1gpu.yaml",
           "examples/conversational/config.yaml", "examples/tool_use/config.yaml"]
# Examples that are a config plus overrides (their own launch line): (config, overrides) as the example runs it.
EXAMPLE_RUNS = {"examples/custom_reward.py": "examples.custom_reward"}


def test_every_shipped_config_is_run_here():
    """A config added without a run here, or a sweep over a base config not run here, fails this test."""
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "recipes" / "configs").glob("*.yaml")}
    shipped |= {str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*.yaml")}
    assert shipped == set(CONFIGS)
    import yaml

    for sweep in (ROOT / "recipes" / "configs" / "sweeps").glob("*.yaml"):
        assert yaml.safe_load(sweep.read_text())["config"] in CONFIGS, sweep


def _data_overrides(path: str) -> list[str]:
    """The data path, to a committed fixture; a warm-start of 2 steps where the config has one (its demonstrations
    come from the task, so it has no data path to swap); an episode budget the shared engine's context holds."""
    cfg = load_config(ROOT / path)
    out = ["warm_start.steps=2"] if cfg.warm_start.steps else []
    if cfg.rollout.max_episode_tokens > 128:  # the shared engine's 512-token context: CPU_SCALE's 384 prompt tokens + 128
        out.append("rollout.max_episode_tokens=128")
    for key in ("path", "eval_path"):
        value = getattr(cfg.task, key)
        if value in DATA_FIXTURES:
            out.append(f"task.{key}={DATA_FIXTURES[value]}")
        elif value and not Path(value).is_absolute():
            out.append(f"task.{key}={ROOT / value}")  # a repo-relative file: the test runs from any folder
    return out


def _shared_engine_factory(engine, real_factory):
    """The recipe's own make_generator call (through `generator_from_config`), answered with the session's real
    vLLM engine (set up as the recipe asks) instead of a second engine start; any other backend is built as asked."""
    def make(backend, model_path, *, dtype="float32", max_model_len=2048, max_prompt_tokens=1024, chat_template_kwargs=None, **kw):
        from asymre.rollout import resolve_backend

        if resolve_backend(backend) != "vllm":
            return real_factory(backend, model_path, dtype=dtype, max_model_len=max_model_len, max_prompt_tokens=max_prompt_tokens,
                                chat_template_kwargs=chat_template_kwargs, **kw)
        assert dtype == "float32" and max_model_len <= engine.max_model_len, (dtype, max_model_len)
        return lend_engine(engine, max_prompt_tokens, chat_template_kwargs)
    return make


def _no_engine_here(backend, *args, **kwargs):
    raise AssertionError(f"a {backend!r} generation engine was built in the learner's process")


def _runs():
    """(config, the example's own overrides) for every shipped config and example."""
    import importlib

    runs = [(path, []) for path in CONFIGS]
    for module in EXAMPLE_RUNS.values():
        mod = importlib.import_module(module)
        runs.append((mod.CONFIG, [o for o in mod.OVERRIDES if not o.startswith(("learner.steps=", "logging."))]))
    return runs


def test_every_example_script_is_run_here():
    assert {str(p.relative_to(ROOT)) for p in (ROOT / "examples").glob("*.py") if p.name != "__init__.py"} == set(EXAMPLE_RUNS)


@pytest.mark.slow
@pytest.mark.parametrize("path, own", _runs(), ids=[p for p in CONFIGS] + list(EXAMPLE_RUNS))
def test_recipe_runs_end_to_end(path, own, tmp_path, vllm_engine, monkeypatch):
    cfg = load_config(ROOT / path, own + HARDWARE + CPU_SCALE + _data_overrides(path) + [f"logging.run_dir={tmp_path / 'run'}"])
    import asymre.rollout

    mod = load_recipe_module()
    if cfg.rollout.mode == "colocated":
        monkeypatch.setattr(asymre.rollout, "make_generator", _shared_engine_factory(vllm_engine, asymre.rollout.make_generator))
    else:  # async workers build their own engine in their own process, and evaluate on it: none is built here
        monkeypatch.setattr(asymre.rollout, "make_generator", _no_engine_here)
    seen = []
    real_generate = type(vllm_engine).generate
    monkeypatch.setattr(type(vllm_engine), "generate", lambda self, prompts, spec: seen.append(g := real_generate(self, prompts, spec)) or g)
    recipe = mod.AsymRERecipe(cfg)
    recipe.setup()
    try:
        summary = recipe.train()
    finally:
        recipe.cleanup()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/value" in r]
    evals = [r for r in records if "eval/pass@1" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward/dropped"] == 0 and math.isfinite(r["loss/value"]) for r in steps), steps
    assert len(evals) == 2 and all(r["eval/dropped"] == 0 for r in evals)  # the recipe's reward scores its eval set
    assert {"eval/pass@1_start", "eval/pass@1_end"} <= set(summary)
    if cfg.warm_start.steps:  # the warm-start ran before the first step, and was evaluated apart
        (warm,) = [r for r in records if "warm_start/seconds" in r]
        assert warm["step"] == 0 and warm["warm_start/steps"] == 2 and math.isfinite(warm["warm_start/loss_last"])
        assert "eval/pass@1_after_warm_start" in summary
    assert all(f"reward/{spec}_mean" in r for spec in cfg.reward.funcs for r in steps)
    assert all(r["rollout/completion_len_min"] <= r["rollout/completion_len"] <= r["rollout/completion_len_max"] for r in steps)
    assert (tmp_path / "run" / "final_model" / "config.json").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == [1, 2] and len(rows) == 2 * cfg.learner.groups_per_step * cfg.rollout.group_size
    for r in rows:  # what a user reads to catch reward hacking
        assert {"prompt", "completion", "reward", "rewards", "advantage", "policy_version", "finish_reason"} <= set(r)
        assert set(r["rewards"]) == set(cfg.reward.funcs) and isinstance(r["completion"], str) and r["prompt"]
    if cfg.loss.name == "asymre" and cfg.loss.baseline == "group_mean":  # advantage = r - (group mean + delta_V)
        for step in (1, 2):
            by_prompt = {}
            for r in rows:
                if r["step"] == step:
                    by_prompt.setdefault(r["group"], []).append(r)
            for group in by_prompt.values():
                mean = sum(r["reward"] for r in group) / len(group)
                assert all(abs(r["advantage"] - (r["reward"] - mean - cfg.loss.delta_v)) < 1e-5 for r in group)
    if cfg.rollout.environment:  # episodes: each row is the episode's messages; the rewards got its environments
        assert all(r["messages"] and r["messages"][0]["role"] == "assistant" and r["turns"] >= 1 for r in rows)
        assert all("episode/turns" in r and "episode/tool_calls" in r for r in steps)
        assert all(f"reward/{spec}_mean" in r for spec in cfg.reward.funcs for r in steps)
    if path == "examples/conversational/config.yaml":  # its rewards index completion[0]["content"] and call log_metric
        import re  # the metric its reward logged is the share of that step's completions holding a digit

        for r in steps:
            texts = [row["completion"] for row in rows if row["step"] == r["step"]]
            assert r["reward/custom/answered_with_a_number"] == pytest.approx(sum(bool(re.search(r"\d", t)) for t in texts) / len(texts))
    if cfg.rollout.mode == "colocated":  # the engine saw the chat template applied to each prompt's messages
        tok = vllm_engine.tokenizer
        groups = [g for batch in seen for g in batch]
        assert groups
        from asymre.envs import environment_tools, load_environments, load_tools, schema
        from asymre.envs.templates import resolve_chat_template

        tools = list(load_tools(cfg.rollout.tools).values())
        for cls in load_environments(cfg.rollout.environment).values():  # an episode's tools: its environment's methods
            tools += list(environment_tools(cls()).values())
        for g in groups:  # (with the run's model.chat_template, and the tools' schemas in the system turn)
            want = tok.apply_chat_template(g.prompt.messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                           tools=[schema(t) for t in tools] or None,
                                           chat_template=resolve_chat_template(cfg.model.chat_template), **cfg.task.chat_template_kwargs)
            assert g.prompt_ids == list(want)[-cfg.rollout.max_prompt_tokens:]


@pytest.mark.slow
def test_asymre_eval_with_the_paper_preset_on_math(vllm_engine, monkeypatch, capsys):
    """`asymre eval` on the Qwen MATH recipe: the paper's evaluation sampling (T = 0.1, top-p 0.95) on
    MATH-500-format rows, scored by math_verify with no sample dropped."""
    import asymre.rollout
    from asymre.cli import main

    path = "recipes/configs/qwen2.5_3b_math_1gpu.yaml"
    monkeypatch.setattr(asymre.rollout, "make_generator", _shared_engine_factory(vllm_engine, asymre.rollout.make_generator))
    specs = []
    real_generate = type(vllm_engine).generate
    monkeypatch.setattr(type(vllm_engine), "generate", lambda self, prompts, spec: specs.append(spec) or real_generate(self, prompts, spec))
    assert main(["eval", "--config", str(ROOT / path), *HARDWARE, *CPU_SCALE, *_data_overrides(path), "task.eval_size=3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["preset"] == "paper" and out["eval/prompts"] == 3 and out["eval/dropped"] == 0
    assert [(s.temperature, s.top_p) for s in specs] == [(0.1, 0.95)]


@pytest.mark.slow
def test_the_tool_example_runs_in_async_mode(tmp_path):
    """examples/tool_use in async mode: the episodes (environment instances, tools, the shipped template) run in the
    generation worker's process, are scored there with their environments, and train in the learner's."""
    import subprocess
    import sys

    run = tmp_path / "run"
    cmd = [sys.executable, "recipes/train.py", "--config", "examples/tool_use/config.yaml", "rollout.mode=async",
           "rollout.backend=hf", "rollout.num_workers=1", *CPU_SCALE, "eval.at_start=false", f"logging.run_dir={run}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/value" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["reward/dropped"] == 0 and "episode/turns" in r for r in steps if "reward/dropped" in r)
    assert any("reward/examples.tool_use.env:looked_up_reward_mean" in r for r in steps)
    evals = [r for r in records if "eval/pass@1" in r]
    assert len(evals) == 1 and "eval/episode/turns" in evals[0]
    rows = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert rows and all(r["messages"] for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["on", "off"])
def test_single_turn_runs_are_bit_identical_to_before_episodes(tmp_path, shared):
    """The CPU default config (transformers backend, 3 steps) gives, bit for bit, the losses, gradient norms, rewards,
    baselines and entropies recorded before the episode loop and the loss mask existed
    (tests/data/single_turn_reference.json, made by the code before 6e579e0: tests/data/record_single_turn_references.py),
    in both loss paths:
    single completions are the one-turn episode."""
    from asymre.tracking import read_metrics
    from tests.recipe_utils import run_recipe

    ref = json.loads((ROOT / "tests/data/single_turn_reference.json").read_text())
    run = tmp_path / shared
    run_recipe(load_config(ROOT / "recipes/configs/smollm2_arithmetic_cpu.yaml",
                           ref["args"] + [f"learner.shared_prompt={shared}", f"logging.run_dir={run}"]))
    got = [{k: m[k] for k in want} for m, want in zip([m for m in read_metrics(run) if "loss/value" in m], ref["runs"][shared])]
    assert len(got) == len(ref["runs"][shared]) == 3
    for g, want in zip(got, ref["runs"][shared]):
        # the samples (hence rewards and baselines) are the same exactly; the learner's floats are bit-identical on the
        # install that recorded them, and compared to float32 reduction-order noise: the same code on another install of
        # the same versions gave step 3's gradient norm 4e-5 apart (relative); a mask, normaliser or collation change
        # moves them by far more
        assert g["reward/mean"] == want["reward/mean"] and g["loss/baseline_mean"] == want["loss/baseline_mean"], (g, want)
        for key in ("loss/value", "learner/grad_norm", "loss/entropy"):
            assert g[key] == pytest.approx(want[key], rel=2e-4), (key, g, want)
