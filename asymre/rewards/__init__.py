"""Reward scoring: resolve reward functions by name or dotted path, combine them with weights, and
score trajectory groups with a per-call timeout, never letting a bad reward kill the run.

A reward is called exactly as TRL 1.16's `GRPOTrainer._calculate_rewards` calls it, so a reward file
written for TRL runs here unchanged:

    f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., log_extra=..., log_metric=...)
        -> list[float | None]

`prompts`/`completions` follow the dataset's format: strings (standard), or message lists for a
conversational dataset (completions as `[{"role": "assistant", "content": text}]`); every dataset column
but `prompt` arrives as a keyword list; `async def` rewards are awaited, concurrently with each other.

Design choice: each call runs on a daemon thread with a timeout (cheap, shares memory, TRL's reward
state keeps working); the alternative, a process pool, could kill a hung call but costs a pickle of every
batch and breaks rewards that hold state. A call that hangs is abandoned (its daemon thread never blocks
exit) and its samples dropped. A call that raises is retried one sample at a time, so only the samples
that raise are lost, and its traceback is logged once per function per step with the sample index.
Signal-based timeouts (math-verify's) do not work off the main thread: the built-in `math_verify` turns
them off there and relies on this timeout, as TRL's own `accuracy_reward` does.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.util
import inspect
import logging
import math
import numbers
import os
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asymre.data import TrajectoryGroup
from asymre.rewards.builtin import BINARY, REGISTRY

RewardFn = Callable[..., list]
log = logging.getLogger("asymre.rewards")
# Keys the scorer passes itself; a dataset column of the same name is not passed twice (TRL drops
# "prompt", "completion" and "completion_ids" from the columns too).
_RESERVED = {"prompt", "prompts", "completion", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}


class RewardError(RuntimeError):
    """A reward function cannot be used, or failed on every sample of a step."""

    label = "reward error"


class RewardContractError(RewardError):
    """A reward function returned something that is not one number or None per completion (a list of the wrong length,
    not a list, a string in it): a bug in the function, not a sample it could not score, so the run stops on it."""


CONTRACT = "a reward returns one float per completion, or None to abstain"


@dataclass
class TrainerState:
    """The part of TRL's `TrainerState` a reward can read here: shape rewards by training progress."""

    global_step: int = 0  # learner steps done when the samples are scored
    max_steps: int = 0  # learner.steps


def _import_here_too(module: str):
    """Import `module`, or, when its top-level package is nowhere on the import path, from the folder the run was
    launched from (`my_rewards:fn` next to where the user typed the command, as `python -c` would find it):
    that one package is loaded from there, the import path itself is left alone."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.partition(".")[0]
        if e.name != top:
            raise
        spec = importlib.machinery.PathFinder.find_spec(top, [os.getcwd()])
        if spec is None:
            raise
    mod = importlib.util.module_from_spec(spec)
    sys.modules[top] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[top]
        raise
    return importlib.import_module(module)  # a submodule is found through the package's own __path__


def resolve_reward(spec: str) -> RewardFn:
    """'numeric' (registry) or 'my_pkg.rewards:score' (dotted path) -> callable. Fails at start-up."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" not in spec:
        raise RewardError(f"reward {spec!r}: not a built-in ({', '.join(sorted(REGISTRY))}) and not a dotted path 'pkg.module:function'")
    module, _, attr = spec.partition(":")
    try:
        mod = _import_here_too(module)
    except Exception as e:
        raise RewardError(f"reward {spec!r}: cannot import module {module!r}: {e}") from e
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {spec!r}: module {module!r} has no callable {attr!r}")
    return fn


def _is_async(fn: Callable) -> bool:
    """An `async def` function, or an object whose `__call__` is one (TRL's `is_async_callable`)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def _start(target: Callable[[], Any], name: str) -> tuple[threading.Thread, dict]:
    """Run `target` on a daemon thread; `_join` collects it."""
    box: dict = {}

    def run():
        try:
            box["result"] = target()
        except BaseException as e:  # noqa: BLE001 - reported to the caller, never fatal here
            box["error"] = e

    th = threading.Thread(target=run, name=name, daemon=True)
    th.start()
    return th, box


def _join(th: threading.Thread, box: dict, timeout_s: float, n: int) -> list:
    """The target's list of n results (an exception stands for a call that raised, TimeoutError for one
    past its deadline); all TimeoutError when the thread is still running at the deadline."""
    th.join(max(timeout_s, 0.0))
    if th.is_alive():
        return [TimeoutError()] * n
    if "error" in box:
        return [box["error"]] * n
    return box["result"]


def _run_sync(calls: list[tuple[Callable, dict]]) -> Callable[[], list]:
    def run():
        out = []
        for fn, kw in calls:
            try:
                out.append(fn(**kw))
            except Exception as e:  # noqa: BLE001 - a raising reward is the user's: the caller retries it sample by sample
                out.append(e)
        return out
    return run


def _run_async(calls: list[tuple[Callable, dict]], timeout_s: float) -> Callable[[], list]:
    """All calls awaited concurrently on one event loop (TRL gathers its async rewards the same way), each
    cancelled at its deadline."""
    async def gather():
        return await asyncio.gather(*(asyncio.wait_for(fn(**kw), timeout_s) for fn, kw in calls), return_exceptions=True)
    return lambda: asyncio.run(gather())


@dataclass
class _Outcome:
    """One reward function's result over a batch: a value (or None) per sample, and what went wrong."""

    values: list[float | None]
    reasons: Counter = field(default_factory=Counter)  # failure reason -> samples lost to it
    problem: str | None = None  # what to log (a traceback or a description), once
    contract: str | None = None  # how the function broke the reward contract (the run stops on it)


@dataclass
class RewardScorer:
    """Scores groups in place (sets `Trajectory.reward`) and counts every dropped sample by reason."""

    specs: list[str]
    weights: list[float] = field(default_factory=list)
    timeout_s: float = 10.0
    scale: str = "01"
    max_steps: int = 0

    def __post_init__(self) -> None:
        self.funcs = [resolve_reward(s) for s in self.specs]
        self.weights = list(self.weights) or [1.0] * len(self.funcs)
        self._logged: set[tuple[str, int]] = set()  # (function, step) pairs whose failure was logged

    @classmethod
    def from_config(cls, cfg) -> RewardScorer:
        """The run's scorer: `reward.*`, and `learner.steps` as the rewards' `trainer_state.max_steps`."""
        r = cfg.reward
        return cls(list(r.funcs), list(r.weights), r.timeout_s, r.scale, cfg.learner.steps)

    # ------------------------------------------------------------------------------------ one call
    def _kwargs(self, flat, step: int, idx: list[int], logged: dict) -> dict[str, Any]:
        """TRL's keyword arguments for the samples `idx` of `flat` (list of (group, trajectory))."""
        sel = [flat[j] for j in idx]
        conv = [g.prompt.conversational for g, _ in sel]
        prompts = [g.prompt.messages if c else g.prompt.messages[-1]["content"] for (g, _), c in zip(sel, conv)]
        # an episode's completion is its messages (the model's turns, tool calls and results), as TRL passes it
        completions = [(t.episode["messages"] if t.episode is not None else [{"role": "assistant", "content": t.text}]) if c
                       else t.text for (_, t), c in zip(sel, conv)]
        keys = sorted({k for g, _ in sel for k in g.prompt.columns} - _RESERVED)
        envs = {}
        if any(g.environments is not None for g, _ in sel):  # TRL's environment_factory: the episodes' instances
            envs["environments"] = [None if g.environments is None else
                                    g.environments[next(k for k, x in enumerate(g.trajectories) if x is t)] for g, t in sel]

        def log_extra(column: str, values: list) -> None:
            for j, v in zip(idx, values):  # kept JSON-safe: trajectories travel to checkpoints and across processes
                flat[j][1].extras[column] = v if v is None or isinstance(v, (str, int, float, bool)) else str(v)

        def log_metric(name: str, value: float) -> None:
            logged[name].append(float(value))

        return {"prompts": prompts, "completions": completions, "completion_ids": [list(t.completion_ids) for _, t in sel],
                **{k: [g.prompt.columns.get(k) for g, _ in sel] for k in keys},
                "trainer_state": TrainerState(step, self.max_steps), "log_extra": log_extra, "log_metric": log_metric, **envs}

    def _per_sample(self, i: int, flat, step: int, logged: dict, batch_error: BaseException) -> _Outcome:
        """Function i raised on the batch: call it once per sample (within reward.timeout_s) so that only the
        samples that raise are lost, and say which one raised first."""
        fn, n = self.funcs[i], len(flat)
        calls = [(fn, self._kwargs(flat, step, [j], logged)) for j in range(n)]
        run = _run_async(calls, self.timeout_s) if _is_async(fn) else _run_sync(calls)
        results = _join(*_start(run, f"reward:{self.specs[i]}:per-sample"), self.timeout_s + 1.0, n)
        out = _Outcome([None] * n)
        first_bad = None
        for j, r in enumerate(results):
            if isinstance(r, TimeoutError):
                out.reasons["timeout"] += 1
            elif isinstance(r, BaseException):
                out.reasons["raised"] += 1
                first_bad = first_bad or (j, r)
            else:
                one = self._check(r, 1)
                out.values[j] = one.values[0]
                out.reasons.update(one.reasons)
                out.problem = out.problem or one.problem
                out.contract = out.contract or (one.contract and f"called on sample {j} alone, {one.contract}")
        if first_bad is not None:
            j, e = first_bad
            others = out.reasons["raised"] - 1
            out.problem = _format(e, j) + (f"\n({others} more of {n} samples raised)" if others else "")
        elif out.reasons["timeout"]:
            out.problem = f"raised on the batch of {n}, then timed out sample by sample:\n{_format(batch_error, None)}"
        else:
            out.problem = f"raised on the batch of {n} but on no sample alone (kept the per-sample values):\n{_format(batch_error, None)}"
        return out

    def _outcomes(self, flat, step: int, logged: dict) -> list[_Outcome]:
        """Every function over the whole batch: async ones concurrently on one event loop while the sync ones
        run one after another, each on its own thread under reward.timeout_s."""
        n, every = len(flat), list(range(len(flat)))
        calls = [(fn, self._kwargs(flat, step, every, logged)) for fn in self.funcs]
        is_async = [_is_async(fn) for fn in self.funcs]
        t0 = time.monotonic()
        async_calls = [c for c, a in zip(calls, is_async) if a]
        gathered = _start(_run_async(async_calls, self.timeout_s), "reward:async") if async_calls else None
        results: list = [None] * len(calls)
        for i, (call, a) in enumerate(zip(calls, is_async)):
            if not a:
                results[i] = _join(*_start(_run_sync([call]), f"reward:{self.specs[i]}"), self.timeout_s, 1)[0]
        if gathered is not None:
            left = self.timeout_s + 1.0 - (time.monotonic() - t0)
            for i, r in zip([i for i, a in enumerate(is_async) if a], _join(*gathered, left, len(async_calls))):
                results[i] = r
        out = []
        for i, r in enumerate(results):
            if isinstance(r, TimeoutError):
                out.append(_Outcome([None] * n, Counter(timeout=n), f"timed out after reward.timeout_s={self.timeout_s}s on {n} samples"))
            elif isinstance(r, BaseException):
                out.append(_Outcome([None], Counter(raised=1), _format(r, 0)) if n == 1 else
                           self._per_sample(i, flat, step, logged, r))
            else:
                out.append(self._check(r, n))
        return out

    @staticmethod
    def _check(values: Any, n: int) -> _Outcome:
        """A list of n numbers or None; anything else is dropped and described."""
        if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
            values = values.tolist()  # numpy array, torch tensor
        if not isinstance(values, (list, tuple)):
            return _Outcome([None] * n, contract=f"returned {type(values).__name__}, expected a list of {n} floats")
        if len(values) != n:
            return _Outcome([None] * n, contract=f"returned {len(values)} values for {n} completions")
        out = _Outcome([])
        for j, v in enumerate(values):
            if hasattr(v, "item") and not isinstance(v, numbers.Real):
                v = v.item()  # a 0-d tensor or array
            if v is None:
                out.values.append(None)
                out.reasons["none_or_nan"] += 1
            elif isinstance(v, numbers.Real):
                f = float(v)
                bad = math.isnan(f) or math.isinf(f)
                out.values.append(None if bad else f)
                out.reasons["none_or_nan"] += bad
            else:
                out.values.append(None)
                out.contract = out.contract or f"returned {type(v).__name__} {_short(v)} for sample {j}, expected a float or None"
        return out

    # ----------------------------------------------------------------------------------- a batch
    def score(self, groups: list[TrajectoryGroup], step: int = 0) -> dict[str, float]:
        """Score every trajectory of `groups` at learner step `step`; returns metrics `reward/...`.
        Raises RewardError when every sample failed, naming the reward functions and why."""
        flat = [(g, t) for g in groups for t in g.trajectories]
        if not flat:
            return {}
        totals: list[float | None] = [None] * len(flat)
        logged: dict[str, list[float]] = defaultdict(list)
        reasons: Counter[str] = Counter()
        metrics: dict[str, float] = {}
        outcomes = self._outcomes(flat, step, logged)
        for spec, outcome in zip(self.specs, outcomes):
            if outcome.contract:
                raise RewardContractError(f"reward function {spec!r} {outcome.contract} ({CONTRACT})")
        for i, (spec, outcome) in enumerate(zip(self.specs, outcomes)):
            for why, count in outcome.reasons.items():
                if count:
                    reasons[f"{spec}:{why}"] += count
            if outcome.problem and (spec, step) not in self._logged:
                self._logged.add((spec, step))
                log.warning("reward function %r at step %d: %s", spec, step, outcome.problem)
            ok = [v for v in outcome.values if v is not None]
            metrics[f"reward/{spec}_mean"] = sum(ok) / len(ok) if ok else float("nan")
            for (_, t), v in zip(flat, outcome.values):
                t.scores[spec] = v
            for j, v in enumerate(outcome.values):
                if v is None:
                    continue
                if self.scale == "pm1" and spec in BINARY:
                    v = 2.0 * v - 1.0
                totals[j] = (totals[j] or 0.0) + self.weights[i] * v
        for j, (_, t) in enumerate(flat):
            totals[j] = _episode_reward(t, totals[j])
            t.reward = totals[j]
        for g in groups:
            g.environments = None  # scored: nothing reads them again (they never reach the buffer's checkpoints)
        scored = [r for r in totals if r is not None]
        if not scored:
            raise RewardError(f"every sample of this step failed reward scoring: {dict(reasons)} (reward functions {self.specs})")
        mean = sum(scored) / len(scored)
        metrics.update({"reward/mean": mean, "reward/std": math.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored)),
                        "reward/dropped": float(len(flat) - len(scored))})
        metrics.update({f"reward/dropped_{k}": float(v) for k, v in reasons.items()})
        metrics.update({f"reward/custom/{k}": sum(v) / len(v) for k, v in logged.items() if v})
        return metrics

    def close(self) -> None:
        """Nothing to release: abandoned calls live on daemon threads."""


def _episode_reward(t, total: float | None) -> float | None:
    """An episode's reward: none for a dropped one (its environment's reset raised); rollout.bad_tool_call_reward for
    one a bad call ended (on_bad_tool_call=reward); else the reward functions' plus its environment's get_reward()
    (weight 1, in `scores` under the class name)."""
    ep = t.episode
    if ep is None:
        return total
    if "dropped" in ep:
        return None
    if "forced_reward" in ep:
        return float(ep["forced_reward"])
    for name, v in (ep.get("env_reward") or {}).items():
        t.scores[name] = v
        total = (total or 0.0) + v
    return total


def _short(v: Any, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format(e: BaseException, sample: int | None) -> str:
    where = f"raised on sample {sample} of the batch" if sample is not None else "raised"
    return f"{where}: {''.join(traceback.format_exception(e)).rstrip()}"
