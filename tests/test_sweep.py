"""Sweeps: every shipped sweep validates each run's config (the paper's GPU sweeps included, which cannot
run here), and a bad run is named before anything starts."""


import pytest

from asymre.config import ConfigError, load_config
from tests.recipe_utils import ROOT, load_recipe_module

sweep = load_recipe_module("sweep")

SWEEPS = sorted((ROOT / "recipes" / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_sweep_run_validates(path):
    spec = sweep.load_sweep(path)
    cmds = sweep.commands(spec, [])
    assert len(cmds) == len(spec["runs"]) >= 5
    assert any("accelerate launch" in line for line in path.read_text().splitlines()[:6] if line.startswith("#"))
    for name, cmd in cmds:
        assert cmd[1] == "launch" and "recipes/train.py" in cmd and any(a.endswith(name) for a in cmd)


def test_paper_sweep_matches_the_paper():
    """delta_V in {-0.5, -0.3, -0.2, -0.1, 0, 0.1, 0.2, 0.3} plus GRPO, all at N = 250, on the paper's settings."""
    spec = sweep.load_sweep(ROOT / "recipes/configs/sweeps/paper_delta_v_qwen3b.yaml")
    cfgs = {name: load_config(ROOT / spec["config"], sweep.run_overrides(spec, run, []))
            for run in spec["runs"] for name in [run["name"]]}
    assert sorted(c.loss.delta_v for n, c in cfgs.items() if n != "grpo") == [-0.5, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3]
    assert cfgs["grpo"].loss.name == "grpo"
    for c in cfgs.values():
        assert c.sync.interval == 250 and c.rollout.group_size == 8 and c.rollout.prompts_per_step == 16
        assert c.learner.lr == 6e-8 and c.rollout.max_new_tokens == 2048 and c.rollout.temperature == 1.0
        assert c.eval.preset == "paper" and c.model.name == "Qwen/Qwen2.5-3B-Instruct" and c.task.name == "math"


def test_bad_run_is_named_before_anything_runs(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("config: recipes/configs/smollm2_arithmetic_cpu.yaml\nruns:\n  - name: ok\n  - name: broken\n    overrides: {loss.baselin: x}\n")
    with pytest.raises(ConfigError, match="broken.*loss.baselin"):
        sweep.commands(sweep.load_sweep(f), [])
    assert sweep.main([str(f), "--dry-run"]) == 2
