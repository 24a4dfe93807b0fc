"""Fakes for component tests (never for the thing an integration test claims to test).

`SlowGenerator` is a deliberately slow generation backend, loadable by `rollout.backend=tests.fakes:SlowGenerator`:
it answers arithmetic prompts with a right or wrong number (real token ids from the real tokenizer),
sleeps `ASYMRE_FAKE_GEN_SLEEP` seconds a call, tags every sample with the sum of the weights it was last pushed
(`Trajectory.extras["weights_sum"]`: a test sees which weights produced it), and appends each call's wall-clock interval and policy
version to the JSONL file `ASYMRE_FAKE_GEN_LOG` so a test can see when generation ran.
"""

from __future__ import annotations

import json
import os
import random
import time

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.models import load_tokenizer
from asymre.rollout.base import SamplingSpec, encode_prompts


class SlowGenerator:
    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0):
        self.tokenizer = load_tokenizer(model_path)
        self.rng = random.Random(seed)
        self.sleep = float(os.environ.get("ASYMRE_FAKE_GEN_SLEEP", "1.0"))
        self.log = os.environ.get("ASYMRE_FAKE_GEN_LOG")
        self.version = 0
        self.weights_sum = None  # of the last weights pushed (None: the initial ones)

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        t0 = time.time()
        time.sleep(self.sleep)
        ids = encode_prompts(self.tokenizer, prompts, 128)
        groups = []
        for p, pid in zip(prompts, ids):
            trajs = []
            for _ in range(spec.n):
                ans = p.columns["answer"] if self.rng.random() < 0.5 else str(self.rng.randint(0, 20))
                comp = self.tokenizer(ans, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
                trajs.append(Trajectory(comp, ans, "stop", logprobs=[-1.0] * len(comp), extras={"weights_sum": self.weights_sum}))
            groups.append(TrajectoryGroup(p, pid, trajs, self.version))
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"start": t0, "end": time.time(), "version": self.version, "pid": os.getpid()}) + "\n")
        return groups

    def load_weights(self, weights, version: int) -> None:
        if isinstance(weights, str):
            from asymre.sync import read_weights_folder

            weights = read_weights_folder(weights)
        self.weights_sum = sum(float(t.sum()) for _, t in weights)
        self.version = version

    def close(self) -> None:
        pass


class DyingGenerator(SlowGenerator):
    """Kills its own process on the Nth generate call of its life (ASYMRE_FAKE_DIE_AT, default 2)."""

    calls = 0

    def generate(self, prompts, spec):
        DyingGenerator.calls += 1
        if DyingGenerator.calls >= int(os.environ.get("ASYMRE_FAKE_DIE_AT", "2")):
            os._exit(17)
        return super().generate(prompts, spec)


class HangingGenerator(SlowGenerator):
    """Never answers a weight push: sync must time out with an error, not hang."""

    def load_weights(self, weights, version: int) -> None:
        time.sleep(3600)


class ReplyGenerator(SlowGenerator):
    """Answers each prompt with the texts of its `replies` column (cycled over the group), with real token
    ids: a worker-process test controls exactly what the rewards see. Each sample's extras say which process
    answered (`pid`) and with which weights (`weights_sum`, as SlowGenerator's); a call sleeps the largest `sleep`
    column of its prompts (seconds, default none)."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, **_):
        super().__init__(model_path, dtype, seed)

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        time.sleep(max(float(p.columns.get("sleep", 0.0)) for p in prompts))
        groups = []
        for p, pid in zip(prompts, encode_prompts(self.tokenizer, prompts, 128)):
            replies = p.columns["replies"]
            texts = [replies[i % len(replies)] for i in range(spec.n)]
            trajs = [Trajectory(self.tokenizer(t, add_special_tokens=False)["input_ids"], t, "stop",
                                extras={"pid": os.getpid(), "weights_sum": self.weights_sum}) for t in texts]
            groups.append(TrajectoryGroup(p, pid, trajs, self.version))
        return groups


class MalformedGenerator(SlowGenerator):
    """Answers with the defect named in the first prompt's `defect` column: what a buggy or hostile worker
    could send back (the pool must refuse it before it reaches the buffer)."""

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        self.sleep = 0.0
        groups = super().generate(prompts, spec)
        defect = prompts[0].columns.get("defect")
        t = groups[0].trajectories[0]
        if defect == "out_of_vocab":
            t.completion_ids = [t.completion_ids[0], 10**9]
        elif defect == "not_int":
            t.completion_ids = [1.5, 2.0]
        elif defect == "logprobs":
            t.logprobs = t.logprobs[:-1]
        elif defect == "wrong_prompt":
            groups[0].prompt = Prompt("someone-else", [{"role": "user", "content": "?"}])
        elif defect == "missing_group":
            groups = groups[1:]
        return groups
