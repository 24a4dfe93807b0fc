"""Evaluation: pass@1 and pass@k on held-out prompts with a sampling preset ('greedy', or the paper's
T = 0.1, top-p 0.95), through any `Generator`. Runs periodically in training and standalone.

pass@k uses the unbiased estimator of Chen et al. (2021): 1 - C(n - c, k) / C(n, k) with n samples
per prompt, c of them correct.
"""

from __future__ import annotations

import math
import time

from asymre.data import Prompt
from asymre.rewards import RewardScorer
from asymre.rollout.base import Generator, SamplingSpec


def pass_at_k(n: int, c: int, k: int) -> float:
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(generator: Generator, prompts: list[Prompt], scorer: RewardScorer, preset: str = "greedy", k: int = 1,
             max_new_tokens: int = 64, seed: int = 0, threshold: float = 0.5, step: int = 0,
             generation_kwargs: dict | None = None, episode=None) -> dict[str, float]:
    """A sample counts as correct when its reward exceeds `threshold` (0.5 suits 0/1 and +-1 scales alike:
    pass it as 0.0 for -1/+1); rewards see `step` as trainer_state.global_step. Greedy with k > 1 samples once (every sample would be the same).
    `episode` (an EpisodeSpec): a tool-using policy is evaluated through the same episodes it trains on."""
    t0 = time.perf_counter()
    n = 1 if preset == "greedy" else k
    spec = SamplingSpec.preset(preset, n=n, max_new_tokens=max_new_tokens, seed=seed, extra=generation_kwargs, episode=episode)
    groups = generator.generate(prompts, spec)
    scored = scorer.score(groups, step)
    p1, pk, lens = [], [], []
    for g in groups:
        correct = sum(1 for t in g.trajectories if t.reward is not None and t.reward > threshold)
        p1.append(correct / len(g.trajectories))
        pk.append(pass_at_k(len(g.trajectories), correct, min(k, len(g.trajectories))))
        lens += [len(t.completion_ids) for t in g.trajectories]
    from asymre.rollout.episodes import episode_metrics

    out = {**{k.replace("episode/", "eval/episode/", 1): v for k, v in episode_metrics(groups).items()},
           "eval/pass@1": sum(p1) / len(p1), "eval/completion_len": sum(lens) / len(lens),
           "eval/prompts": float(len(prompts)), "eval/dropped": scored.get("reward/dropped", 0.0),
           "eval/seconds": time.perf_counter() - t0}
    if k > 1:
        out[f"eval/pass@{k}"] = sum(pk) / len(pk)
    return out
