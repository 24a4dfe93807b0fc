"""Learner tokens/s with each group's prompt computed once (learner.shared_prompt=on) against one row per sample
(off), on the default CPU config's steps: the same groups, the same initial weights, alternated to share the noise.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_shared_prompt [--repeats 3] [--out bench/results/shared_prompt.json]

Tokens/s counts every sequence's prompt and completion tokens, as `perf/learner_tokens_per_s` always has (so the
shared path's figure rises by the work it no longer does). The groups come from the transformers generation
backend sampling the embedded model on the arithmetic task (8 prompts x 8 samples, 16 new tokens at most).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/shared_prompt.json")
    a = p.parse_args()

    from accelerate import Accelerator

    from asymre.config import load_config
    from asymre.learner import Learner
    from asymre.models import load_tokenizer, resolve_model
    from asymre.rewards import RewardScorer
    from asymre.rollout import generator_from_config
    from asymre.rollout.base import SamplingSpec
    from asymre.tasks import build_task

    cfg_path = ROOT / "recipes/configs/smollm2_arithmetic_cpu.yaml"
    base = load_config(cfg_path, ["rollout.backend=hf"])
    path = resolve_model(base.model.name)
    train, _ = build_task(base.task)
    ro = base.rollout
    gen = generator_from_config(base, path)
    steps = []
    for r in range(a.repeats + 1):  # one step's groups per repeat (the first is the warm-up)
        prompts = train[r * ro.prompts_per_step:(r + 1) * ro.prompts_per_step]
        groups = gen.generate(prompts, SamplingSpec(n=ro.group_size, temperature=1.0, max_new_tokens=ro.max_new_tokens, seed=r))
        RewardScorer.from_config(base).score(groups)
        for g in groups:  # every group trains (the benchmark measures the learner, not the reward)
            for t in g.trajectories:
                t.reward = t.reward if t.reward is not None else 0.0
        steps.append(groups)
    gen.close()

    learners = {s: Learner(load_config(cfg_path, [f"learner.shared_prompt={s}"]), path, Accelerator(cpu=True), load_tokenizer(path))
                for s in ("on", "off")}
    rates: dict[str, list[float]] = {"on": [], "off": []}
    prompt_share = []
    for r, groups in enumerate(steps):
        for s in (("on", "off") if r % 2 else ("off", "on")):
            t0 = time.perf_counter()
            m = learners[s].train_step(groups)
            if r:
                rates[s].append(m["perf/learner_tokens"] / (time.perf_counter() - t0))
        seqs = [(len(g.prompt_ids), len(t.completion_ids)) for g in groups for t in g.trajectories]
        prompt_share.append(sum(pl for pl, _ in seqs) / sum(pl + cl for pl, cl in seqs))
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores", "steps_measured": a.repeats,
           "prompt_share_of_tokens": statistics.mean(prompt_share),
           "tokens_per_s_shared": statistics.median(rates["on"]), "tokens_per_s_unshared": statistics.median(rates["off"])}
    res["shared_over_unshared"] = res["tokens_per_s_shared"] / res["tokens_per_s_unshared"]
    print(json.dumps(res, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
