"""Per-sample advantages: what multiplies log pi(y|x) in every loss. Rewards and groups in, advantages out.

One entry per `loss.name` in `ADVANTAGES`, each computed over the whole step batch (a group's samples are
all in it, so a baseline never straddles micro-batches):

- asymre (Arnal et al. 2025, Eq. 3-4): A = r - V with V = V_hat(x) + delta_V, V_hat from `loss.baseline`
  (asymre/baselines.py) and delta_V from its schedule at the learner's step;
- grpo: A = (r - group mean) / (group std + eps), the group-normalised advantage;
- reinforce: A = r (V = 0).

Each entry also gives back the V it subtracted (`Advantages.baseline`, logged as `loss/baseline_mean`):
AsymRE's V, zeros for REINFORCE, None for GRPO (which logs no baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from asymre.baselines import RunningBaseline, compute_baseline, delta_v_at, group_mean, group_std

if TYPE_CHECKING:
    from asymre.config import LossConfig


@dataclass(frozen=True)
class Advantages:
    advantages: torch.Tensor  # [B] what multiplies log pi(y|x)
    baseline: torch.Tensor | None  # [B] the V in r - V (0 for REINFORCE), for loss/baseline_mean; None for GRPO


def asymre_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    baseline: str,
    delta_v: float,
    constant_v: float = 0.0,
    running: RunningBaseline | None = None,
    prompt_uids: list[str] | None = None,
) -> Advantages:
    """A = r - V, V = V_hat (by `baseline`) + delta_V. rewards [B] float32, group_ids [B] -> A [B], V [B]."""
    v = compute_baseline(baseline, rewards, group_ids, delta_v, constant_v, running, prompt_uids)  # [B]
    return Advantages(rewards - v, v)  # [B], [B]


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps). rewards [B], group_ids [B] -> [B]."""
    return (rewards - group_mean(rewards, group_ids)) / (group_std(rewards, group_ids) + eps)  # [B]


def reinforce_advantages(rewards: torch.Tensor) -> Advantages:
    """A = r: REINFORCE is AsymRE with V = 0. rewards [B] -> A [B], V [B] (zeros)."""
    return Advantages(rewards, torch.zeros_like(rewards))


# loss.name -> (loss config, rewards [B], group ids [B], learner step, running baseline, prompt uid of each group) -> Advantages
AdvantagesFn = Callable[["LossConfig", torch.Tensor, torch.Tensor, int, RunningBaseline, list[str]], Advantages]

ADVANTAGES: dict[str, AdvantagesFn] = {
    "asymre": lambda lc, rewards, group_ids, step, running, prompt_uids: asymre_advantages(
        rewards, group_ids, lc.baseline, delta_v_at(step, lc.delta_v, lc.delta_v_final, lc.delta_v_steps), lc.constant_v,
        running, prompt_uids),
    "grpo": lambda lc, rewards, group_ids, step, running, prompt_uids: Advantages(grpo_advantages(rewards, group_ids), None),
    "reinforce": lambda lc, rewards, group_ids, step, running, prompt_uids: reinforce_advantages(rewards),
}
