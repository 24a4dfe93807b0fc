"""Collapse signals. The paper shows training accuracy collapsing for delta_V >= 0 off-policy; these are the
early signs a user watches: policy entropy on sampled tokens, distinct final answers per group,
completion length, and the reward trend. Each crossing of its threshold logs one warning and sets a
`collapse/...` flag metric (1.0) for as long as it lasts.
"""

from __future__ import annotations

import logging

from asymre.data import TrajectoryGroup
from asymre.rewards.builtin import extract_number

log = logging.getLogger("asymre")


def distinct_answers(groups: list[TrajectoryGroup]) -> float:
    """Mean number of distinct final answers (last number, else the stripped text) per group."""
    counts = []
    for g in groups:
        answers = set()
        for t in g.trajectories:
            n = extract_number(t.text)
            answers.add(n if n is not None else t.text.strip())
        counts.append(len(answers))
    return sum(counts) / len(counts) if counts else float("nan")


class CollapseMonitor:
    def __init__(self, min_entropy: float = 0.05, min_distinct: float = 1.05, max_reward_drop: float = 0.3, ema: float = 0.8):
        self.min_entropy, self.min_distinct, self.max_reward_drop, self.ema = min_entropy, min_distinct, max_reward_drop, ema
        self.reward_ema: float | None = None
        self.best_ema = float("-inf")
        self.warned: set[str] = set()

    def state_dict(self) -> dict:
        """What a checkpoint keeps (JSON): the reward average and its best, and the signals already warned about, so a
        resumed run's collapse metrics continue the uninterrupted run's."""
        return {"reward_ema": self.reward_ema, "best_ema": None if self.best_ema == float("-inf") else self.best_ema,
                "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.reward_ema = state["reward_ema"]
        self.best_ema = float("-inf") if state["best_ema"] is None else state["best_ema"]
        self.warned = set(state["warned"])

    def update(self, metrics: dict[str, float], groups: list[TrajectoryGroup]) -> dict[str, float]:
        out = {"collapse/distinct_answers": distinct_answers(groups)}
        r = metrics.get("reward/mean")
        if r is not None:
            self.reward_ema = r if self.reward_ema is None else self.ema * self.reward_ema + (1 - self.ema) * r
            self.best_ema = max(self.best_ema, self.reward_ema)
            out["collapse/reward_ema"] = self.reward_ema
        checks = {
            "entropy": ("loss/entropy", lambda v: v < self.min_entropy, f"policy entropy below logging.collapse_entropy={self.min_entropy}"),
            "distinct_answers": ("collapse/distinct_answers", lambda v: v < self.min_distinct,
                                 f"distinct answers per group below logging.collapse_distinct={self.min_distinct}"),
            "reward_drop": ("collapse/reward_ema", lambda v: self.best_ema - v > self.max_reward_drop,
                            f"reward average fell more than logging.collapse_reward_drop={self.max_reward_drop} below its best"),
        }
        merged = {**metrics, **out}
        for name, (key, crossed, why) in checks.items():
            v = merged.get(key)
            flag = v is not None and v == v and crossed(v)
            out[f"collapse/{name}_flag"] = float(flag)
            if flag and name not in self.warned:
                self.warned.add(name)
                log.warning("collapse signal: %s (%s = %.4f); delta_V >= 0 collapses off-policy, see docs/metrics.md", why, key, v)
        return out
