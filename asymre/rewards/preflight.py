"""Reward preflight: before any model loads, score each task's reference answers with the run's reward functions,
so a reward that can never pay (the answer column names the wrong field, a parser that never finds the gold answer,
a reward returning the wrong shape) stops the run at start-up instead of training for hours at reward 0.

A handful of training rows (spread over the set) each get their reference answer written as a completion the way
the prompt asks for it (`\\boxed{..}` where the prompt asks for a box, `#### ..` where it asks for GSM8K's final
line, the bare answer otherwise), and an empty completion as the control. The run passes when some reference's
total reward (the weighted sum the learner trains on) is above the lowest total any of them got: the reward can
tell a right answer from a wrong one. `reward.preflight=false` skips it, for rewards that cannot be scored that way
(a model-based judge, a reward that needs the episode's environment). Completions are text only: a reward that
reads `completion_ids` sees them empty here.
"""

from __future__ import annotations

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.rewards import RewardContractError, RewardError, RewardScorer

ROWS = 8  # the handful of rows scored


def reference_completion(prompt: Prompt, answer: str) -> str:
    """`answer` written as the prompt asks for it."""
    asked = "\n".join(m["content"] for m in prompt.messages)
    if "\\boxed" in asked:
        return f"The answer is \\boxed{{{answer}}}."
    if "####" in asked:
        return f"#### {answer}"
    return answer


def _rows(prompts: list[Prompt], n: int = ROWS) -> list[int]:
    if len(prompts) <= n:
        return list(range(len(prompts)))
    return sorted({round(i * (len(prompts) - 1) / (n - 1)) for i in range(n)})


def preflight(scorer: RewardScorer, prompts: list[Prompt], answer_column: str = "answer") -> dict[str, float]:
    """Score reference answers of `prompts` (the training set); raises RewardError naming the reward functions, the
    column and one example when none pays more than a wrong completion; returns what each function gave the
    references (for the log). A reward that breaks the contract (a list of the wrong length, a string) raises here."""
    rows = _rows(prompts)
    groups, shown = [], []
    for i in rows:
        p = prompts[i]
        answer = str(p.columns.get("answer", ""))
        text = reference_completion(p, answer)
        shown.append((i, answer, text))
        groups.append(TrajectoryGroup(p, [], [Trajectory([], text, "stop"), Trajectory([], "", "stop")], 0))
    try:
        scorer.score(groups, step=0)
    except RewardContractError as e:
        raise RewardError(f"reward preflight (reference answers of {len(rows)} training rows): {e}") from None
    except RewardError:  # every sample failed (raised, timed out, abstained): none paid, said below
        pass
    refs = [g.trajectories[0] for g in groups]
    totals = [t.reward for g in groups for t in g.trajectories if t.reward is not None]
    if any(t.reward is not None and t.reward > min(totals) for t in refs):
        return {spec: max((t.scores.get(spec) or 0.0) for t in refs) for spec in scorer.specs}
    i, answer, text = shown[0]
    got = ", ".join(f"{spec} {_said(refs[0].scores.get(spec))}" for spec in scorer.specs)
    raise RewardError(f"reward preflight: reward.funcs={scorer.specs} paid none of the reference answers of {len(rows)} training rows "
                      f"more than an empty completion (e.g. row {i}: column {answer_column!r} = {_short(answer)}, written as "
                      f"{_short(text)}, scored {got}); check the task's answer column and the reward, or set "
                      f"reward.preflight=false for a reward that cannot score reference answers")


def _said(v) -> str:
    return "None (abstained)" if v is None else f"{v:g}"


def _short(s: str, limit: int = 60) -> str:
    text = repr(s)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
