"""Async mode: generation workers in their own processes overlap with learning; staleness stays bounded;
dead and hanging workers end in clear errors or restarts, never a hang."""

import json
import time

import pytest

from asymre.config import load_config
from asymre.rollout.base import SamplingSpec
from asymre.rollout.worker import WorkerError
from asymre.sync import SyncTimeout, WeightSync
from asymre.tasks import build_task
from asymre.tracking import read_metrics
from tests.recipe_utils import load_recipe_module, worker_pool

pytestmark = pytest.mark.slow


def _cfg(tmp_path, *extra):
    return load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", [
        "rollout.mode=async", "rollout.backend=tests.fakes:SlowGenerator", "rollout.num_workers=1",
        "rollout.prompts_per_step=2", "rollout.group_size=2", "learner.groups_per_step=2", "learner.steps=6",
        "sync.interval=2", "buffer.max_staleness=2", "eval.at_start=false", "eval.at_end=false",
        "checkpoint.save_final_model=false", f"logging.run_dir={tmp_path}/run", "logging.progress=false", *extra])


@pytest.mark.parametrize("method", ["disk", "broadcast"])
def test_slow_generator_overlaps_learning_and_staleness_is_bounded(tmp_path, monkeypatch, model_path, method):
    """If workers and learner ran in lock-step, no generation interval would overlap a learner step;
    if eviction were broken, a step could train on groups older than buffer.max_staleness."""
    log = tmp_path / "gen.jsonl"
    monkeypatch.setenv("ASYMRE_FAKE_GEN_LOG", str(log))
    monkeypatch.setenv("ASYMRE_FAKE_GEN_SLEEP", "1.5")
    mod = load_recipe_module()
    recipe = mod.AsymRERecipe(_cfg(tmp_path, f"sync.method={method}"))
    recipe.setup()
    steps = []
    real_step = recipe.learner.train_step

    def timed_step(groups):
        t0 = time.time()
        out = real_step(groups)
        steps.append((t0, time.time()))
        return out

    recipe.learner.train_step = timed_step
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    gens = [json.loads(line) for line in log.read_text().splitlines()]
    overlaps = [(g, s) for g in gens for s in steps if g["start"] < s[1] and s[0] < g["end"]]
    assert overlaps, f"no generation overlapped a learner step: gens={gens} steps={steps}"
    metrics = [m for m in read_metrics(tmp_path / "run") if "rollout/staleness_max" in m]
    assert len(metrics) == 6
    assert max(m["rollout/staleness_max"] for m in metrics) <= 2
    assert max(m["rollout/staleness_max"] for m in metrics) >= 1  # it did train on stale groups
    assert {g["version"] for g in gens} >= {0, 2}  # workers received pushed weights
    assert all(m["sync/seconds"] > 0 for m in metrics if "sync/seconds" in m)



def test_dead_worker_is_restarted_then_reported(model_path, monkeypatch):
    """A worker that dies is restarted (its request re-sent); past max_restarts the error names it."""
    monkeypatch.setenv("ASYMRE_FAKE_GEN_SLEEP", "0.1")
    monkeypatch.setenv("ASYMRE_FAKE_DIE_AT", "1")  # every incarnation dies on its first request
    train, _ = build_task(load_config().task)
    pool = worker_pool(model_path, "tests.fakes:DyingGenerator", worker_timeout_s=30, max_restarts=1)
    try:
        pool.submit(train[:1], SamplingSpec(n=1, max_new_tokens=4))
        t0 = time.time()
        with pytest.raises(WorkerError, match=r"worker 0 exited with code 17; restarted 1 times"):
            for _ in range(200):
                pool.poll(timeout=0.5)
        assert time.time() - t0 < 120
        assert pool.workers[0].restarts == 1
    finally:
        pool.close()


def test_worker_dying_mid_evaluation_gets_its_share_again_then_is_reported(model_path, monkeypatch):
    """An evaluation waits on its workers with their deadlines: a worker that dies on its share is restarted and
    given the share again (the second incarnation dies on it too), and past max_restarts the error names it."""
    monkeypatch.setenv("ASYMRE_FAKE_GEN_SLEEP", "0.1")
    monkeypatch.setenv("ASYMRE_FAKE_DIE_AT", "1")  # every incarnation dies on its first request
    _, prompts = build_task(load_config(None, ["task.eval_size=3"]).task)
    pool = worker_pool(model_path, "tests.fakes:DyingGenerator", worker_timeout_s=30, max_restarts=1)
    try:
        t0 = time.time()
        with pytest.raises(WorkerError, match=r"worker 0 exited with code 17; restarted 1 times"):
            pool.evaluate(prompts, SamplingSpec(n=1, temperature=0.0, max_new_tokens=4), version=0)
        assert time.time() - t0 < 120
        assert pool.workers[0].restarts == 1 and list(pool.workers[0].evals.values())[0][0] == prompts
    finally:
        pool.close()


def test_weight_push_to_hanging_worker_times_out(model_path, tmp_path):
    pool = worker_pool(model_path, "tests.fakes:HangingGenerator", worker_timeout_s=60)
    try:
        sync = WeightSync(interval=1, method="disk", timeout_s=2.0, folder=tmp_path)
        import torch

        t0 = time.time()
        with pytest.raises(SyncTimeout, match="sync.timeout_s=2.0"):
            sync.push({"w": torch.zeros(2)}, 1, pool.handles)
        assert time.time() - t0 < 30
    finally:
        pool.close()
