"""The generation role's interface: a `Generator` turns prompts into trajectory groups and accepts weights.

Backends implement this Protocol (vLLM in-process or in a worker process, transformers `generate`,
a remote vLLM server); tests swap in fakes. Prompts are tokenised here, once, with the model's chat
template, so every backend samples from exactly the same token ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from asymre.data import Prompt, Trajectory, TrajectoryGroup

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
    extra: dict = field(default_factory=dict)  # the engine's own sampling parameters (rollout/eval.generation_kwargs)
    # How each sample runs as an episode (asymre.rollout.episodes.EpisodeSpec: tools, environment, limits); None: one
    # completion per sample. `max_new_tokens` is then the cap of one model turn.
    episode: Any = None

    @staticmethod
    def preset(name: str, n: int, max_new_tokens: int, seed: int | None = None, extra: dict | None = None,
               episode: Any = None) -> SamplingSpec:
        """'greedy', 'paper' (the paper's evaluation: T = 0.1, top-p 0.95)."""
        if name == "greedy":
            return SamplingSpec(n=n, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed, extra=dict(extra or {}),
                                episode=episode)
        if name == "paper":
            return SamplingSpec(n=n, temperature=0.1, top_p=0.95, max_new_tokens=max_new_tokens, seed=seed, extra=dict(extra or {}),
                                episode=episode)
        raise ValueError(f"unknown sampling preset {name!r}; expected 'greedy' or 'paper'")


def derive_seed(*parts: int) -> int:
    """A 62-bit seed from integers (blake2b of them): the seed of one round from (run seed, rank, round), of one request
    from (round seed, prompt index). vLLM 0.32 gives the samples of a request with seed S the seeds S, S+1, ...
    (v1/engine/parallel_sampling.py), so neighbouring integers would share samples; hashed seeds are 2^62 apart on
    average. A round and its requests are reproducible from their parts, so a resumed run draws the same samples."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


@runtime_checkable
class Generator(Protocol):
    """Owns an inference engine holding the behaviour policy mu at `version`."""

    version: int
    # The weight-push methods this engine accepts (asymre.sync.WeightSync): an in-process engine takes
    # ("inprocess", "disk"), the default for an engine that does not say; a remote server ("disk",).
    sync_methods: tuple[str, ...]

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        """One group of `spec.n` trajectories (episodes, under `spec.episode`) per prompt, with the prompt's token ids,
        tagged with `self.version`. asymre's backends run `asymre.rollout.episodes.run_episodes` over their `sample`."""
        ...

    def load_weights(self, weights: Weights | str, version: int) -> None:
        """Replace the engine's weights (HF parameter names, or a safetensors folder) and set `version`."""
        ...

    def close(self) -> None: ...


class TokenSampler(Protocol):
    """The token-level primitive the episode loop runs on (asymre's backends have it; a custom backend that has only
    `generate` runs single completions)."""

    tokenizer: Any
    max_prompt_tokens: int
    chat_template_kwargs: dict

    def sample(self, token_lists: list[list[int]], spec: SamplingSpec, max_new_tokens: list[int] | None = None) -> list[list[Trajectory]]:
        """Continue each token list `spec.n` times (at most `max_new_tokens[i]` new tokens for list i, else
        spec.max_new_tokens): the new tokens, their text, behaviour log-probs (spec.logprobs) and finish reason."""
        ...


# Sampling settings asymre sets from its own keys (rollout.group_size, temperature, top_p, max_new_tokens, seed,
# the loss's need for log-probs): never through generation_kwargs.
OWN_SAMPLING_KEYS = {"n", "temperature", "top_p", "max_tokens", "max_new_tokens", "seed", "logprobs", "do_sample",
                     "num_return_sequences", "output_scores", "return_dict_in_generate"}


def generation_kwargs_problem(backend: str, kwargs: dict) -> str | None:
    """Why `kwargs` cannot go to `backend`'s sampler, or None: a key asymre sets itself, or one the engine does
    not know (vLLM's `SamplingParams` fields for vllm and remote servers, `GenerationConfig`'s for hf; a
    custom backend's keys are its own business)."""
    if not kwargs:
        return None
    own = sorted(set(kwargs) & OWN_SAMPLING_KEYS)
    if own:
        return f"{own[0]!r} is set by asymre's own keys (rollout.group_size, temperature, top_p, max_new_tokens, seed)"
    if backend in ("vllm", "remote"):
        try:
            from vllm import SamplingParams
        except ImportError:  # a remote server's client machine may have no vLLM: the server will say
            return None

        known = {k for k in SamplingParams.__struct_fields__ if not k.startswith("_")}
    elif backend == "hf":
        from transformers import GenerationConfig

        known = set(GenerationConfig().to_dict()) | {"stop_strings"}
    else:
        return None
    unknown = sorted(set(kwargs) - known)
    if unknown:
        return f"{unknown[0]!r} is unknown to the {backend} engine's sampling parameters"
    return None


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


def check_groups(groups, prompts: list[Prompt], spec: SamplingSpec, vocab_size: int | None = None) -> str | None:
    """What is wrong with `groups` as another process's answer to (prompts, spec), or None. Checked before
    anything reaches the buffer: a bad token id would otherwise crash deep in the learner's embedding."""
    if not isinstance(groups, list) or len(groups) != len(prompts):
        return f"{len(groups) if isinstance(groups, list) else type(groups).__name__} groups for {len(prompts)} prompts"
    for i, (g, p) in enumerate(zip(groups, prompts)):
        if not isinstance(g, TrajectoryGroup):
            return f"group {i} is a {type(g).__name__}, not a TrajectoryGroup"
        if g.prompt.uid != p.uid:
            return f"group {i} answers prompt {g.prompt.uid!r}, not the requested {p.uid!r}"
        if len(g.trajectories) != spec.n:
            return f"group {i} has {len(g.trajectories)} samples, not {spec.n}"
        problem = _token_ids_problem(g.prompt_ids, vocab_size)
        if problem:
            return f"group {i}: prompt {problem}"
        if not g.prompt_ids:
            return f"group {i}: empty prompt token ids"
        for j, t in enumerate(g.trajectories):
            problem = _token_ids_problem(t.completion_ids, vocab_size)
            if problem:
                return f"group {i} sample {j}: completion {problem}"
            if spec.logprobs and (t.logprobs is None or len(t.logprobs) != len(t.completion_ids)):
                return (f"group {i} sample {j}: {'no' if t.logprobs is None else len(t.logprobs)} log-probs for "
                        f"{len(t.completion_ids)} completion tokens")
            if not isinstance(t.text, str):
                return f"group {i} sample {j}: text is a {type(t.text).__name__}, not a string"
    return None


def _token_ids_problem(ids, vocab_size: int | None) -> str | None:
    """What is wrong with `ids` as token ids of a model with `vocab_size` tokens, or None."""
    if not isinstance(ids, list) or not all(type(x) is int for x in ids):
        return "token ids are not a list of integers"
    bad = [x for x in ids if x < 0 or (vocab_size is not None and x >= vocab_size)]
    if bad:
        return f"token id {bad[0]} is outside the vocabulary (0..{(vocab_size or 1) - 1})"
    return None


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
