"""Evaluation: pass@k estimator, presets, standalone `asymre eval` on a saved model, periodic evaluation
during training that gives the engine back its behaviour weights, and the custom-reward example."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from asymre.config import load_config
from asymre.data import Trajectory, TrajectoryGroup
from asymre.evaluate import evaluate, pass_at_k
from asymre.rewards import RewardScorer
from asymre.rollout.base import SamplingSpec
from asymre.tasks import build_task
from asymre.tracking import read_metrics
from tests.helpers import rewards_of
from tests.recipe_utils import run_recipe

ROOT = Path(__file__).resolve().parent.parent


def test_pass_at_k_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k


class _Scripted:
    """Answers each prompt's k samples: the first `right` correct, the rest wrong; records the spec."""

    version = 0

    def __init__(self, right):
        self.right, self.specs = right, []

    def generate(self, prompts, spec):
        self.specs.append(spec)
        return [TrajectoryGroup(p, [1], [Trajectory([2], p.columns["answer"] if i < self.right else "-1", "stop")
                                         for i in range(spec.n)], 0) for p in prompts]


def test_evaluate_presets_and_pass_at_k():
    _, prompts = build_task(load_config(None, ["task.eval_size=6"]).task)
    gen = _Scripted(right=1)
    res = evaluate(gen, prompts, RewardScorer(["numeric"]), preset="paper", k=4, max_new_tokens=8)
    assert gen.specs[0] == SamplingSpec(n=4, temperature=0.1, top_p=0.95, max_new_tokens=8, seed=0)
    assert res["eval/pass@1"] == pytest.approx(0.25) and res["eval/pass@4"] == pytest.approx(1.0)
    res = evaluate(gen, prompts, RewardScorer(["numeric"]), preset="greedy", k=4, max_new_tokens=8)
    assert gen.specs[1].temperature == 0.0 and gen.specs[1].n == 1 and res["eval/pass@1"] == 1.0


@pytest.mark.slow
def test_periodic_eval_restores_behaviour_weights_and_standalone_eval(tmp_path, model_path):
    """eval.every=1 with sync.interval=2: the step-1 evaluation must hand the engine back its version-0
    weights, so step 2 still trains on stale (staleness 1) groups. Then `asymre eval` scores the saved model."""
    run = tmp_path / "run"
    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", [
        "rollout.backend=hf", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "learner.groups_per_step=2", "learner.steps=3", "learner.lr=1e-4", "sync.interval=2", "buffer.max_staleness=1",
        "eval.every=1", "eval.at_start=false", "eval.max_new_tokens=6", "task.eval_size=4", "logging.progress=false",
        f"logging.run_dir={run}"])
    run_recipe(cfg)
    rows = read_metrics(run)
    steps = {r["step"]: r for r in rows if "loss/value" in r}
    assert "eval/pass@1" in steps[1] and "eval/pass@1" in steps[2]
    assert steps[2]["rollout/staleness_max"] == 1  # trained on version-0 groups: the engine was given back mu
    assert (run / "final_model" / "model.safetensors").is_file()

    out = subprocess.run([sys.executable, "-m", "asymre.cli", "eval", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml",
                          "--model", str(run / "final_model"), "rollout.backend=hf", "task.eval_size=4", "eval.max_new_tokens=6"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout[out.stdout.index("{"):])
    final_eval = [r for r in rows if "eval/pass@1" in r][-1]  # the run's own end-of-training evaluation, same settings
    assert res["model"].endswith("final_model") and res["eval/prompts"] == 4
    assert res["eval/pass@1"] == final_eval["eval/pass@1"]  # greedy on the saved weights: exactly what training measured


def test_custom_reward_example_functions():
    import examples.custom_reward as ex

    scorer = RewardScorer(["examples.custom_reward:concise_correct", "examples.custom_reward:trl_accuracy_reward"], [1.0, 0.5])
    _, prompts = build_task(load_config(None, ["task.eval_size=1"]).task)
    ans = prompts[0].columns["answer"]
    g = TrajectoryGroup(prompts[0], [1], [Trajectory([2], t, "stop") for t in (ans, f"The answer to this is {ans}", "no")], 0)
    scorer.score([g])
    assert rewards_of(g)[0] == pytest.approx(1.5) and rewards_of(g)[1] == pytest.approx(1.5 - 0.01 * (len(f"The answer to this is {ans}") - 12))
    assert rewards_of(g)[2] == 0.0
    assert "reward.funcs=[examples.custom_reward:concise_correct,examples.custom_reward:trl_accuracy_reward]" in ex.OVERRIDES
