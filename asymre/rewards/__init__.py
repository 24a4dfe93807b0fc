"""Reward scoring: resolve reward functions by name or dotted path, combine them with weights, and
score trajectory groups with a per-call timeout, never letting a bad reward kill the run.

A reward is a plain callable `f(prompts, completions, **columns) -> list[float | None]`, TRL's shape,
so a TRL reward function works unchanged. Design choice: each call runs on its own daemon thread with a
timeout (cheap, shares memory); the alternative, a process pool, could kill a hung call but costs a
pickle of every batch. A call that hangs is abandoned (its daemon thread never blocks exit) and its
samples dropped; it cannot be killed.
"""

from __future__ import annotations

import threading
import importlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from asymre.data import TrajectoryGroup
from asymre.rewards.builtin import BINARY, REGISTRY

RewardFn = Callable[..., list]


class RewardError(RuntimeError):
    """A reward function cannot be used, or failed on every sample of a step."""


def resolve_reward(spec: str) -> RewardFn:
    """'numeric' (registry) or 'my_pkg.rewards:score' (dotted path) -> callable. Fails at start-up."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" not in spec:
        raise RewardError(f"reward {spec!r}: not a built-in ({', '.join(sorted(REGISTRY))}) and not a dotted path 'pkg.module:function'")
    module, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise RewardError(f"reward {spec!r}: cannot import module {module!r}: {e}") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: module {module!r} has no callable {attr!r}")
    return fn


@dataclass
class RewardScorer:
    """Scores groups in place (sets `Trajectory.reward`) and counts every dropped sample by reason."""

    specs: list[str]
    weights: list[float] = field(default_factory=list)
    timeout_s: float = 10.0
    scale: str = "01"

    def __post_init__(self) -> None:
        self.funcs = [resolve_reward(s) for s in self.specs]
        self.weights = list(self.weights) or [1.0] * len(self.funcs)

    def _call(self, i: int, prompts: list[str], completions: list[str], columns: dict[str, list]) -> tuple[list[float | None], str | None]:
        """One function over the batch. Returns (values, failure reason or None)."""
        box: dict = {}

        def call():
            try:
                box["values"] = self.funcs[i](prompts, completions, **columns)
            except Exception:  # noqa: BLE001 - a reward raising is counted, never fatal on its own
                box["raised"] = True

        th = threading.Thread(target=call, name=f"reward:{self.specs[i]}", daemon=True)
        th.start()
        th.join(self.timeout_s)
        if th.is_alive():
            return [None] * len(completions), "timeout"
        if box.get("raised"):
            return [None] * len(completions), "raised"
        values = box.get("values")
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            return [None] * len(completions), "wrong_length"
        out: list[float | None] = []
        for v in values:
            if v is None:
                out.append(None)
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                out.append(None)
                continue
            out.append(None if math.isnan(f) or math.isinf(f) else f)
        return out, None

    def score(self, groups: list[TrajectoryGroup]) -> dict[str, float]:
        """Score every trajectory of `groups`; returns metrics `reward/...`. Raises RewardError when
        every sample failed, naming the reward functions and why."""
        flat = [(g, t) for g in groups for t in g.trajectories]
        if not flat:
            return {}
        prompts = [g.prompt.messages[-1]["content"] for g, _ in flat]
        completions = [t.text for _, t in flat]
        keys = sorted({k for g, _ in flat for k in g.prompt.columns})
        columns = {k: [g.prompt.columns.get(k) for g, _ in flat] for k in keys}
        totals: list[float | None] = [None] * len(flat)
        reasons: Counter[str] = Counter()
        per_fn: dict[str, float] = {}
        for i, spec in enumerate(self.specs):
            values, failure = self._call(i, prompts, completions, columns)
            if failure:
                reasons[f"{spec}:{failure}"] += len(flat)
            else:
                nones = sum(v is None for v in values)
                if nones:
                    reasons[f"{spec}:none_or_nan"] += nones
            ok = [v for v in values if v is not None]
            per_fn[f"reward/{spec}_mean"] = sum(ok) / len(ok) if ok else float("nan")
            for j, v in enumerate(values):
                if v is None:
                    continue
                if self.scale == "pm1" and spec in BINARY:
                    v = 2.0 * v - 1.0
                totals[j] = (totals[j] or 0.0) + self.weights[i] * v
        for (_, t), r in zip(flat, totals):
            t.reward = r
        scored = [r for r in totals if r is not None]
        if not scored:
            raise RewardError(f"every sample of this step failed reward scoring: {dict(reasons)} (reward functions {self.specs})")
        metrics = {"reward/mean": sum(scored) / len(scored), "reward/dropped": float(len(flat) - len(scored))}
        metrics.update(per_fn)
        metrics.update({f"reward/dropped_{k}": float(v) for k, v in reasons.items()})
        return metrics

    def close(self) -> None:
        """Nothing to release: abandoned calls live on daemon threads."""
