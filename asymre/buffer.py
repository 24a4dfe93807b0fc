"""Replay buffer of trajectory groups, tagged with the policy version that produced them.

A prompt's G samples stay together (the baseline is computed within the group). Each group's
staleness is the learner version minus its behaviour version; groups past `max_staleness` are
evicted before sampling. Sampling modes: 'fifo' (oldest first, each group trained on once) and
'reuse' (uniform, each group at most `max_reuse` times). The state is plain JSON for checkpoints.
Design choice: one bounded in-memory deque on the learner's main process; the alternative, a
shared-memory or Redis store, only pays off with many learner hosts.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from typing import Any

from asymre.data import TrajectoryGroup

SETTINGS = ("capacity", "max_staleness", "sampling", "max_reuse")  # saved with the buffer, checked when it is restored


class ReplayBuffer:
    def __init__(self, capacity: int = 256, max_staleness: int = 1000, sampling: str = "fifo", max_reuse: int = 1, seed: int = 0):
        if sampling not in ("fifo", "reuse"):
            raise ValueError(f"buffer.sampling={sampling!r}: expected 'fifo' or 'reuse'")
        self.capacity = capacity
        self.max_staleness = max_staleness
        self.sampling = sampling
        self.max_reuse = max_reuse if sampling == "reuse" else 1
        self.groups: deque[TrajectoryGroup] = deque()
        self.rng = random.Random(seed)
        self.counts = Counter()  # added, sampled, evicted_stale, evicted_capacity, evicted_used

    @classmethod
    def from_config(cls, cfg, ranks: int = 1) -> ReplayBuffer:
        """The run's buffer, feeding `ranks` learner ranks (its capacity is checked for them)."""
        from asymre.config import check_buffer_capacity

        check_buffer_capacity(cfg, ranks)
        b = cfg.buffer
        return cls(b.capacity, b.max_staleness, b.sampling, b.max_reuse, cfg.learner.seed)

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, groups: list[TrajectoryGroup]) -> None:
        """Buffer scored groups; a group none of whose samples got a reward is dropped (and counted)."""
        for g in groups:
            if not any(t.reward is not None and t.completion_ids for t in g.trajectories):
                self.counts["dropped_unscored"] += 1
                continue
            self.groups.append(g)
            self.counts["added"] += 1
        while len(self.groups) > self.capacity:
            self.groups.popleft()
            self.counts["evicted_capacity"] += 1

    def evict_stale(self, learner_version: int) -> int:
        """Drop groups with learner_version - version > max_staleness; returns how many."""
        keep = deque(g for g in self.groups if learner_version - g.version <= self.max_staleness)
        dropped = len(self.groups) - len(keep)
        self.groups = keep
        self.counts["evicted_stale"] += dropped
        return dropped

    def available(self, learner_version: int) -> int:
        """Groups that could be sampled now (fresh enough)."""
        return sum(1 for g in self.groups if learner_version - g.version <= self.max_staleness)

    def sample(self, n: int, learner_version: int) -> list[TrajectoryGroup]:
        """Up to `n` groups for a learner step at `learner_version`. Stale groups are evicted first."""
        self.evict_stale(learner_version)
        if self.sampling == "fifo":
            picked = [self.groups.popleft() for _ in range(min(n, len(self.groups)))]
        else:
            idx = sorted(self.rng.sample(range(len(self.groups)), min(n, len(self.groups))))
            picked = [self.groups[i] for i in idx]
        for g in picked:
            g.uses += 1
            self.counts["sampled"] += 1
        if self.sampling == "reuse":
            before = len(self.groups)
            self.groups = deque(g for g in self.groups if g.uses < self.max_reuse)
            self.counts["evicted_used"] += before - len(self.groups)
        return picked

    def staleness(self, learner_version: int) -> list[int]:
        return [learner_version - g.version for g in self.groups]

    def stats(self, learner_version: int) -> dict[str, float]:
        """Metrics `buffer/...`: size, staleness mean/max, histogram buckets and lifetime counters."""
        st = self.staleness(learner_version)
        out: dict[str, float] = {"buffer/groups": float(len(st))}
        if st:
            out["buffer/staleness_mean"] = sum(st) / len(st)
            out["buffer/staleness_max"] = float(max(st))
        for k, v in self.counts.items():
            out[f"buffer/{k}"] = float(v)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"groups": [g.to_dict() for g in self.groups], "counts": dict(self.counts), "rng": self.rng.getstate(),
                **{key: getattr(self, key) for key in SETTINGS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved buffer into one built with the same settings; a saved buffer made with other settings
        (another capacity, staleness bound, sampling mode or reuse count) is refused, naming the key."""
        for key in SETTINGS:
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"buffer.{key}: the saved buffer was made with {state[key]!r}, this run has {getattr(self, key)!r}; "
                                 f"resume with the run's own buffer settings")
        self.groups = deque(TrajectoryGroup.from_dict(g) for g in state["groups"])
        self.counts = Counter(state["counts"])
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
