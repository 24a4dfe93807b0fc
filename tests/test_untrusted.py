"""What crosses a process boundary is checked: groups from a generation worker or a remote vLLM server with
bad token ids, mismatched lengths or the wrong prompt are refused with an error naming the worker or
server, before they reach the buffer; a remote server's API key reaches its Authorization header and
nothing else."""

import copy
import json
import re
import subprocess
import sys
import time

import pytest

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.rollout.base import SamplingSpec, check_groups
from tests.recipe_utils import ROOT, worker_pool
from tests.rollout.test_remote import _Handler, server  # noqa: F401 - the stand-in vLLM server fixture

SPEC = SamplingSpec(n=2, logprobs=True)
PROMPTS = [Prompt("a", [{"role": "user", "content": "1+1?"}]), Prompt("b", [{"role": "user", "content": "2+2?"}])]


def _good():
    return [TrajectoryGroup(p, [1, 2], [Trajectory([3, 4], "x", "stop", logprobs=[-0.1, -0.2]) for _ in range(2)], 0)
            for p in PROMPTS]


def _with(change):
    groups = copy.deepcopy(_good())
    change(groups)
    return groups


def _set(obj, attr, value):
    setattr(obj, attr, value)


@pytest.mark.parametrize("change, said", [
    (lambda g: g.pop(), "1 groups for 2 prompts"),
    (lambda g: _set(g[1], "prompt", PROMPTS[0]), "group 1 answers prompt 'a', not the requested 'b'"),
    (lambda g: g[0].trajectories.pop(), "group 0 has 1 samples, not 2"),
    (lambda g: _set(g[0].trajectories[1], "completion_ids", [3, "4"]), "group 0 sample 1: completion token ids are not a list of integers"),
    (lambda g: _set(g[0].trajectories[1], "completion_ids", [3, True]), "group 0 sample 1: completion token ids are not a list of integers"),
    (lambda g: _set(g[1].trajectories[0], "completion_ids", [3, 100]), "group 1 sample 0: completion token id 100 is outside the vocabulary (0..99)"),
    (lambda g: _set(g[1], "prompt_ids", [-1, 2]), "group 1: prompt token id -1 is outside the vocabulary (0..99)"),
    (lambda g: _set(g[1], "prompt_ids", [1, 2.0]), "group 1: prompt token ids are not a list of integers"),
    (lambda g: _set(g[0], "prompt_ids", []), "group 0: empty prompt token ids"),
    (lambda g: _set(g[0].trajectories[0], "logprobs", [-0.1]), "group 0 sample 0: 1 log-probs for 2 completion tokens"),
    (lambda g: _set(g[0].trajectories[0], "logprobs", None), "group 0 sample 0: no log-probs for 2 completion tokens"),
    (lambda g: _set(g[0].trajectories[0], "text", None), "group 0 sample 0: text is a NoneType, not a string"),
    (lambda g: g.__setitem__(0, "not a group"), "group 0 is a str, not a TrajectoryGroup"),
])
def test_each_malformed_kind_is_named(change, said):
    assert check_groups(_good(), PROMPTS, SPEC, vocab_size=100) is None
    assert check_groups(_with(change), PROMPTS, SPEC, vocab_size=100) == said


@pytest.mark.slow
def test_worker_sending_malformed_groups_is_named(model_path):
    """Through a real worker process: each defect stops with WorkerError naming the worker and request."""
    from asymre.config import load_config
    from asymre.rollout.worker import WorkerError
    from asymre.tasks import build_task

    train, _ = build_task(load_config().task)
    pool = worker_pool(model_path, "tests.fakes:MalformedGenerator", worker_timeout_s=60)
    pool.vocab_size = 49152
    try:
        for defect, said in [("out_of_vocab", "completion token id 1000000000 is outside the vocabulary (0..49151)"),
                             ("not_int", "completion token ids are not a list of integers"),
                             ("logprobs", "log-probs for"), ("wrong_prompt", "answers prompt 'someone-else'"),
                             ("missing_group", "1 groups for 2 prompts")]:
            prompts = [Prompt(p.uid, p.messages, {**p.columns, "defect": defect}) for p in train[:2]]
            rid = pool.submit(prompts, SamplingSpec(n=2, max_new_tokens=4, logprobs=True))
            with pytest.raises(WorkerError, match=rf"generation worker 0 returned malformed groups for request {rid}: .*{re.escape(said)}"):
                deadline = time.time() + 60
                while time.time() < deadline:
                    pool.poll(timeout=1.0)
        assert pool.results == []  # nothing malformed was kept
    finally:
        pool.close()


def test_remote_server_sending_bad_token_ids_is_named(server, model_path, monkeypatch):  # noqa: F811
    from asymre.rollout.remote import RemoteVLLMGenerator

    gen = RemoteVLLMGenerator(server, model_path)
    monkeypatch.setattr(_Handler, "token_ids", [33, 10**9], raising=False)
    with pytest.raises(RuntimeError, match=rf"vLLM server {server} returned malformed completions: group 0 sample 0: "
                                           rf"completion token id 1000000000 is outside the vocabulary \(0\.\.49151\)"):
        gen.generate(PROMPTS[:1], SamplingSpec(n=1, max_new_tokens=4))


def test_api_key_reaches_the_authorization_header(server, model_path, monkeypatch):  # noqa: F811
    from asymre.rollout.remote import RemoteVLLMGenerator

    monkeypatch.setenv("ASYMRE_TEST_VLLM_KEY", "sk-test-7f3a")
    gen = RemoteVLLMGenerator(server, model_path, api_key_env="ASYMRE_TEST_VLLM_KEY")
    gen.generate(PROMPTS[:1], SamplingSpec(n=1, max_new_tokens=4))
    assert _Handler.auth and set(_Handler.auth) == {"Bearer sk-test-7f3a"}
    with pytest.raises(ValueError, match="ASYMRE_TEST_NO_SUCH_KEY: that environment variable is not set"):
        RemoteVLLMGenerator(server, model_path, api_key_env="ASYMRE_TEST_NO_SUCH_KEY")


@pytest.mark.slow
def test_api_key_in_no_log_metric_or_saved_config(server, tmp_path):  # noqa: F811
    """The async recipe against the stand-in server with an API key: the server sees it on every request; the
    run's output, metrics.jsonl and config.json never contain it."""
    key = "sk-never-print-5c1d"
    run = tmp_path / "run"
    cmd = [sys.executable, "recipes/train.py", "--config", "recipes/configs/smollm2_arithmetic_cpu.yaml", "rollout.mode=async",
           f"rollout.server_urls=[{server}]", "rollout.server_api_key_env=ASYMRE_TEST_VLLM_KEY", "rollout.prompts_per_step=2",
           "rollout.group_size=2", "learner.groups_per_step=2", "learner.steps=1", "eval.at_start=false", "eval.at_end=false",
           "checkpoint.save_final_model=false", "logging.progress=false", f"logging.run_dir={run}"]
    env = {**__import__("os").environ, "ASYMRE_TEST_VLLM_KEY": key, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _Handler.auth and set(_Handler.auth) == {f"Bearer {key}"}
    assert key not in r.stdout + r.stderr
    for f in ("metrics.jsonl", "config.json"):
        assert key not in (run / f).read_text()
    assert json.loads((run / "config.json").read_text())["rollout"]["server_api_key_env"] == "ASYMRE_TEST_VLLM_KEY"
