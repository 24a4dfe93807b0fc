"""Baselines V for the AsymRE loss: pure tensor functions over a flat batch with group ids.

The paper's LLM form (Eq. 4) is V = V_hat(x) + delta_V, with V_hat(x) the mean reward of the G samples
drawn for prompt x and delta_V a global constant (-0.1 recommended; >= 0 collapses off-policy).
Alternatives offered: leave-one-out group mean, a constant, a per-prompt running mean of past groups.

Singleton groups (G = 1, or a group left with one scored sample): the group mean is the sample's own
reward, so V = r + delta_V and the advantage is exactly -delta_V. Leave-one-out has no other sample
and falls back to that same value. This is deliberate: a lone sample carries no contrast.
"""

from __future__ import annotations

import math

import torch


def _group_sums(values: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's sum of `values` and its sample count (in `values`' dtype).
    values [B] float, group_ids [B] long in 0..n_groups-1 -> ([n], [n])."""
    n = int(group_ids.max().item()) + 1 if group_ids.numel() else 0
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, group_ids, values)  # [n]
    counts = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, group_ids, torch.ones_like(values))  # [n]
    return sums, counts


def group_mean(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean reward of each sample's group. rewards [B] float, group_ids [B] long in 0..n_groups-1 -> [B]."""
    sums, counts = _group_sums(rewards, group_ids)  # [n], [n]
    return (sums / counts)[group_ids]  # [B]


def leave_one_out_mean(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Mean reward of the *other* samples of each sample's group; singletons fall back to their own reward. -> [B]"""
    sums, counts = _group_sums(rewards, group_ids)  # [n], [n]
    sums, counts = sums[group_ids], counts[group_ids]  # [B], [B]
    loo = (sums - rewards) / (counts - 1).clamp(min=1)  # [B]
    return torch.where(counts > 1, loo, rewards)  # [B]


def group_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Population std of each sample's group (GRPO's normaliser). -> [B]"""
    mean = group_mean(rewards, group_ids)  # [B]
    return group_mean((rewards - mean) ** 2, group_ids).sqrt()  # [B]


def delta_v_at(step: int, delta_v: float, delta_v_final: float | None = None, delta_v_steps: int = 0) -> float:
    """delta_V schedule: constant `delta_v`, or linear from `delta_v` to `delta_v_final` over `delta_v_steps`."""
    if delta_v_final is None or delta_v_steps <= 0:
        return delta_v
    frac = min(max(step, 0) / delta_v_steps, 1.0)
    return delta_v + frac * (delta_v_final - delta_v)


class RunningBaseline:
    """Per-prompt exponential moving average of past group-mean rewards.

    `values(...)` returns, for each sample, the estimate from *earlier* groups of the same prompt
    (a prompt seen for the first time uses its current group mean), then folds the current group in.
    Its state is a plain dict so checkpoints store it as JSON.
    """

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"running baseline momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.estimates: dict[str, float] = {}

    def values(self, rewards: torch.Tensor, group_ids: torch.Tensor, prompt_uids: list[str]) -> torch.Tensor:
        """rewards [B], group_ids [B]; prompt_uids[g] names group g's prompt. -> V_hat [B] (before delta_V)."""
        current = group_mean(rewards, group_ids)  # [B]
        first = {}
        for i, g in enumerate(group_ids.tolist()):
            first.setdefault(g, i)
        per_group = torch.empty(len(prompt_uids), dtype=rewards.dtype, device=rewards.device)  # [n]
        for g, uid in enumerate(prompt_uids):
            now = float(current[first[g]]) if g in first else math.nan
            per_group[g] = self.estimates.get(uid, now)
            if g in first:
                old = self.estimates.get(uid)
                self.estimates[uid] = now if old is None else self.momentum * old + (1 - self.momentum) * now
        return per_group[group_ids]  # [B]

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "estimates": dict(self.estimates)}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state["momentum"])
        self.estimates = {str(k): float(v) for k, v in state["estimates"].items()}


def compute_baseline(
    kind: str,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    delta_v: float,
    constant_v: float = 0.0,
    running: RunningBaseline | None = None,
    prompt_uids: list[str] | None = None,
) -> torch.Tensor:
    """V for each sample: V_hat (by `kind`) + delta_V. rewards [B], group_ids [B] -> [B]."""
    if kind == "group_mean":
        v_hat = group_mean(rewards, group_ids)
    elif kind == "leave_one_out":
        v_hat = leave_one_out_mean(rewards, group_ids)
    elif kind == "constant":
        v_hat = torch.full_like(rewards, constant_v)
    elif kind == "running":
        if running is None or prompt_uids is None:
            raise ValueError("baseline 'running' needs a RunningBaseline and the groups' prompt uids")
        v_hat = running.values(rewards, group_ids, prompt_uids)
    else:
        raise ValueError(f"unknown baseline {kind!r}; expected group_mean, leave_one_out, constant or running")
    return v_hat + delta_v  # [B]
