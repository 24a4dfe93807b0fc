"""Small helpers that only tests need (kept out of the package)."""

from __future__ import annotations


def rewards_of(group) -> list[float | None]:
    """Each trajectory's reward in a group, in order (None where dropped)."""
    return [t.reward for t in group.trajectories]


def mixed_groups():
    """rewards [6] and group ids [6]: group 0 has 4 samples; groups 1 and 2 are singletons."""
    import torch

    return torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5]), torch.tensor([0, 0, 0, 0, 1, 2])
