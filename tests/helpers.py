"""Small helpers that only tests need (kept out of the package)."""

from __future__ import annotations


def rewards_of(group) -> list[float | None]:
    """Each trajectory's reward in a group, in order (None where dropped)."""
    return [t.reward for t in group.trajectories]
