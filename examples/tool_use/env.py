"""A TRL user's tool-using task, unchanged: an environment class (TRL's `environment_factory=` form: one instance per
episode, `reset(**row)`, its public methods are the tools) and reward functions that read the episode's
environments. asymre's config names them: rollout.environment and reward.funcs (examples/tool_use/config.yaml)."""

from __future__ import annotations

import json
from pathlib import Path

PEOPLE = json.loads((Path(__file__).with_name("people.json")).read_text())


class PeopleDirectory:
    """Where people live. The database is the environment's; the policy reaches it only through `lookup`."""

    def reset(self, **kwargs) -> str | None:
        self.lookups: list[str] = []
        return None

    def lookup(self, name: str) -> str:
        """
        Look up the city a person lives in.

        Args:
            name: The person's full name, e.g. "Ada Lovelace".

        Returns:
            The city, or "no such record".
        """
        self.lookups.append(name)
        return PEOPLE.get(name.strip(), "no such record")


def _final(completion) -> str:
    """The last assistant message of a conversational completion (an episode's answer), or the text itself."""
    if isinstance(completion, str):
        return completion
    said = [m.get("content") or "" for m in completion if m.get("role") == "assistant"]
    return said[-1] if said else ""


def answer_reward(completions, solution, **kwargs) -> list[float]:
    """1.0 when the final answer names the city."""
    return [float(s.lower() in _final(c).lower()) for c, s in zip(completions, solution)]


def looked_up_reward(completions, person, environments=None, **kwargs) -> list[float | None]:
    """0.5 when the episode looked the right person up (read from its environment, as under TRL); no opinion (None)
    on a completion that had no environment (asymre's start-up preflight scores the reference answers alone)."""
    if environments is None:
        return [None] * len(completions)
    return [0.5 * (p in env.lookups) if env is not None else None for p, env in zip(person, environments)]
