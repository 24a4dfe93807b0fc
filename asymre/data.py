"""The data contract: the only objects that cross a role boundary (rollout -> rewards -> buffer -> learner).

Design choice: plain dataclasses of Python lists (picklable across processes, cheap to checkpoint as
JSON) rather than tensors; the learner builds tensors once, at collation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Prompt:
    """One task item: the chat messages to generate from and the columns a reward may read."""

    uid: str  # stable id (used by the per-prompt running baseline and for resume)
    messages: list[dict[str, str]]  # chat messages, e.g. [{"role": "user", "content": "What is 3 + 5?"}]
    columns: dict[str, Any] = field(default_factory=dict)  # reference answer and any dataset columns
    # True when the dataset gave the prompt as chat messages (TRL's conversational format): rewards then get
    # prompts as message lists and completions as [{"role": "assistant", "content": ...}], as under TRL.
    conversational: bool = False


@dataclass
class Trajectory:
    """One sampled completion of its group's prompt (the prompt's token ids and the policy version that
    sampled it are the group's)."""

    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    logprobs: list[float] | None = None  # behaviour log-probs of completion tokens, when the engine gives them
    reward: float | None = None  # None until scored, or when every reward function abstained/failed
    extras: dict[str, Any] = field(default_factory=dict)  # columns a reward logged for this sample (TRL's log_extra)
    scores: dict[str, float | None] = field(default_factory=dict)  # each reward function's value, before weights
    # Multi-turn episodes (asymre/rollout/episodes.py): `completion_ids` is everything after the prompt, the policy's
    # sampled tokens and the environment's inserted ones (tool results rendered by the chat template) in order; `mask`
    # says which is which, per token (1 sampled by the policy: trained; 0 inserted: never trained, its log-prob a 0.0
    # placeholder). None: every token is the policy's (a single completion).
    mask: list[int] | None = None
    episode: dict[str, Any] | None = None  # the episode's record: messages, turns, tool calls and errors (JSON-safe)

    @property
    def model_tokens(self) -> int:
        """Tokens the policy sampled (the ones the learner trains)."""
        return len(self.completion_ids) if self.mask is None else sum(self.mask)


@dataclass
class TrajectoryGroup:
    """The G samples of one prompt, drawn together by one engine: they share the prompt's token ids and the
    behaviour policy version, stored once here. They stay together: the baseline is computed within the group."""

    prompt: Prompt
    prompt_ids: list[int]  # the prompt's token ids every trajectory continues (chat template applied, truncated)
    trajectories: list[Trajectory]
    version: int  # behaviour policy version (learner step of the weights the engine held) of every trajectory
    uses: int = 0  # times the learner has trained on this group
    # Not a field (never saved): an episode's environment instance per trajectory, for the reward functions'
    # `environments=` (TRL's contract); set by the episode loop, gone once the group is scored and buffered.
    environments = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrajectoryGroup:
        if "prompt_ids" not in d:
            raise ValueError("a trajectory group saved in the old format (prompt ids and version per trajectory) "
                             "cannot be loaded: start a fresh run")
        return TrajectoryGroup(
            prompt=Prompt(**d["prompt"]),
            prompt_ids=d["prompt_ids"],
            trajectories=[Trajectory(**t) for t in d["trajectories"]],
            version=d["version"],
            uses=d.get("uses", 0),
        )
