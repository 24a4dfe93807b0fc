"""The generation role's interface: a `Generator` turns prompts into trajectory groups and accepts weights.

Backends implement this Protocol (vLLM in-process or in a worker process, transformers `generate`,
a remote vLLM server); tests swap in fakes. Prompts are tokenised here, once, with the model's chat
template, so every backend samples from exactly the same token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch

from asymre.data import Prompt, TrajectoryGroup

Weights = Iterable[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. temperature 0 means greedy."""

    n: int = 1  # samples per prompt (G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int | None = None
    logprobs: bool = False  # return behaviour log-probs of sampled tokens (GRPO needs them)

    @staticmethod
    def preset(name: str, n: int, max_new_tokens: int, seed: int | None = None) -> "SamplingSpec":
        """'greedy', 'paper' (the paper's evaluation: T = 0.1, top-p 0.95)."""
        if name == "greedy":
            return SamplingSpec(n=n, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
        if name == "paper":
            return SamplingSpec(n=n, temperature=0.1, top_p=0.95, max_new_tokens=max_new_tokens, seed=seed)
        raise ValueError(f"unknown sampling preset {name!r}; expected 'greedy' or 'paper'")


@runtime_checkable
class Generator(Protocol):
    """Owns an inference engine holding the behaviour policy mu at `version`."""

    version: int

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        """One group of `spec.n` trajectories per prompt, each tagged with `self.version`."""
        ...

    def load_weights(self, weights: Weights | str, version: int) -> None:
        """Replace the engine's weights (HF parameter names, or a safetensors folder) and set `version`."""
        ...

    def close(self) -> None: ...


def prompt_text(prompt: Prompt) -> str:
    """The raw text of a prompt for a model without a chat template (a base model): the messages' contents,
    one paragraph each (a standard-format prompt without a system prompt is its string, unchanged)."""
    return "\n\n".join(m["content"] for m in prompt.messages)


def encode_prompts(tokenizer, prompts: list[Prompt], max_prompt_tokens: int, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt token ids (truncated from the left): the chat template applied to the messages (with
    `chat_template_kwargs`, e.g. {"enable_thinking": False}), or the raw text when the tokenizer has no
    chat template (base models), as TRL tokenizes a standard-format prompt."""
    out = []
    templated = getattr(tokenizer, "chat_template", None) is not None
    for p in prompts:
        if templated:
            ids = tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                                **(chat_template_kwargs or {}))
        else:
            ids = tokenizer(prompt_text(p))["input_ids"]
        out.append(list(ids)[-max_prompt_tokens:])
    return out


def trim_completion(ids: list[int], eos_ids: set[int], pad_id: int | None) -> tuple[list[int], str]:
    """Cut a generated sequence after its first EOS (kept: the policy must learn to stop).
    Returns (ids, finish_reason)."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1], "stop"
    if pad_id is not None and pad_id not in eos_ids:
        ids = [t for t in ids if t != pad_id]
    return ids, "length"


def eos_token_ids(tokenizer, generation_config=None) -> set[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(x) for x in gen_eos)
    return ids
