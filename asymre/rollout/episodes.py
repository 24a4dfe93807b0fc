"""The episode loop: prompts -> trajectory groups, over any engine's token-level `sample`, for every backend.

An episode is the prompt followed by alternating segments: tokens the policy sampled (trained, with their behaviour
log-probs) and tokens the environment inserted (tool results and the next assistant header, rendered by the chat
template as a suffix: asymre/envs/templates.py; never trained). It is stored as one token list with a per-token mask
(`Trajectory.completion_ids`, `Trajectory.mask`): the model's tokens are never decoded and re-encoded.

A single completion is the one-turn episode: with no tools and no environment the loop samples once and stops, and
the trajectories are exactly what `generate` returned before episodes existed (same seeds, no mask).

Scheduling: lock-step turns with a straggler bound. Each turn samples every live episode's next model turn in one
engine call (the engine batches them; vLLM's prefix cache reuses each episode's context), then runs every call
those turns made at once (a thread per call, `async def` tools on their own loop), waiting at most
`rollout.tool_timeout_s` for the slowest: a hung tool costs one timeout, not the step, and the episode goes on with
a `timeout` fault as the tool's result. Chosen over per-episode tasks on vLLM's async engine, which the offline
`LLM` (the colocated engine, whose weights the learner pushes in place) does not offer; the benchmark
(bench/bench_episodes.py) measures what lock-step costs over plain generation of the same tokens.

Faults are data: a malformed call (bad JSON, unknown tool, wrong arguments), a tool that raises or exceeds its
timeout reaches the model as the tool's result and is counted (`rollout.on_bad_tool_call`: 'message', the default;
'end' ends the episode there; 'reward' ends it with `rollout.bad_tool_call_reward`). An environment whose `reset`
raises drops that sample (an empty trajectory the learner skips) with one warning naming the class and the row.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.envs import settle
from asymre.rollout.base import SamplingSpec, derive_seed

log = logging.getLogger("asymre.episodes")
TRUNCATION_MARK = " ... [truncated]"


@dataclass(frozen=True)
class EpisodeSpec:
    """How an episode runs (rollout.* keys); picklable, so worker processes and evaluations get the same."""

    tools: tuple[str, ...] = ()  # rollout.tools: 'pkg.module:function'
    environment: str | tuple[tuple[str, str], ...] | None = None  # rollout.environment: 'pkg.module:Class' or (name, path) pairs
    environment_column: str = "environment"  # the row's column naming its environment, when there are several
    max_turns: int = 1  # model turns per episode
    max_tokens: int = 0  # completion tokens per episode (the model's and the environment's); 0: max_new_tokens * max_turns
    tool_timeout_s: float = 10.0
    max_tool_result_tokens: int = 256
    on_bad_tool_call: str = "message"  # 'message', 'end' or 'reward'
    bad_tool_call_reward: float = 0.0
    tool_parser: str = "auto"
    chat_template: str | None = None  # template text (model.chat_template resolved), else the tokenizer's own

    @property
    def multi_turn(self) -> bool:
        return bool(self.tools or self.environment)

    def budget(self, max_new_tokens: int) -> int:
        return self.max_tokens or max_new_tokens * self.max_turns

    @staticmethod
    def from_config(cfg) -> EpisodeSpec:
        from asymre.envs.templates import resolve_chat_template

        ro = cfg.rollout
        env = ro.environment
        if env is not None and not isinstance(env, str):
            env = tuple(sorted((str(k), str(v)) for k, v in dict(env).items()))
        return EpisodeSpec(tuple(ro.tools), env, ro.environment_column, ro.max_turns, ro.max_episode_tokens, ro.tool_timeout_s,
                           ro.max_tool_result_tokens, ro.on_bad_tool_call, ro.bad_tool_call_reward, ro.tool_parser,
                           resolve_chat_template(cfg.model.chat_template))


def episode_spec(cfg) -> EpisodeSpec | None:
    """The run's EpisodeSpec, or None when samples are single completions with the tokenizer's own template."""
    ep = EpisodeSpec.from_config(cfg)
    return ep if ep.multi_turn or ep.chat_template is not None else None


@dataclass
class _Runtime:
    """What an EpisodeSpec resolves to in this process (imported once, kept per spec and tokenizer)."""

    tools: dict
    classes: dict
    schemas: list  # the plain tools' JSON schemas, in rollout.tools order
    parser: Any
    class_schemas: dict = field(default_factory=dict)  # environment class -> its methods' schemas (built once)


_RUNTIMES: dict[tuple, _Runtime] = {}


def _runtime(ep: EpisodeSpec, tokenizer) -> _Runtime:
    key = (ep, id(tokenizer))
    if key not in _RUNTIMES:
        from asymre.envs import load_environments, load_tools, schema
        from asymre.envs.parsing import make_parser

        tools = load_tools(ep.tools)
        env = dict(ep.environment) if isinstance(ep.environment, tuple) else ep.environment
        _RUNTIMES[key] = _Runtime(tools, load_environments(env), [schema(f) for f in tools.values()],
                                  make_parser(ep.tool_parser, tokenizer))
    return _RUNTIMES[key]


@dataclass
class _Episode:
    prompt_ids: list[int]
    env: Any = None
    tools: dict = field(default_factory=dict)
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    turns: int = 0
    calls: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    env_tokens: int = 0
    finish: str = "stop"
    text: str = ""
    done: bool = False
    dropped: str | None = None
    forced_reward: float | None = None
    env_reward: float | None = None  # the environment's get_reward(), an extra reward source
    pending: list = field(default_factory=list)  # this turn's calls (ToolCall | ToolFault)


def encode_episode_prompts(tokenizer, prompts: list[Prompt], max_prompt_tokens: int, chat_template_kwargs: dict | None,
                           ep: EpisodeSpec, schemas: list[list[dict]] | None = None) -> list[list[int]]:
    """Prompt token ids: the chat template applied with the episode's tools (and template), or `encode_prompts`'s
    rendering when the episode has none (a single completion)."""
    from asymre.rollout.base import encode_prompts

    if not ep.multi_turn and ep.chat_template is None:
        return encode_prompts(tokenizer, prompts, max_prompt_tokens, chat_template_kwargs)
    from asymre.envs.templates import render

    out = []
    for i, p in enumerate(prompts):
        ids = render(tokenizer, p.messages, tools=schemas[i] if schemas else None, generation_prompt=True,
                     template=ep.chat_template, kwargs=chat_template_kwargs)
        out.append(ids[-max_prompt_tokens:])
    return out


def run_episodes(engine, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
    """One group of `spec.n` episodes per prompt, through `engine.sample` (its tokenizer, max_prompt_tokens,
    chat_template_kwargs and version)."""
    ep = spec.episode or EpisodeSpec()
    tok = engine.tokenizer
    rt = _runtime(ep, tok) if ep.multi_turn else None
    budget = ep.budget(spec.max_new_tokens)
    episodes: list[list[_Episode]] = []
    shown: list[Prompt] = []
    schemas: list[list[dict]] = []
    for p in prompts:
        group, p_shown, p_schemas = _start_group(p, spec.n, ep, rt)
        episodes.append(group)
        shown.append(p_shown)
        schemas.append(p_schemas)
    ids = encode_episode_prompts(tok, shown, engine.max_prompt_tokens, engine.chat_template_kwargs, ep, schemas)
    first = engine.sample(ids, replace(spec, max_new_tokens=min(spec.max_new_tokens, budget)))
    if not ep.multi_turn:  # the one-turn episode: today's single completion, unchanged
        return _groups(prompts, ids, episodes, first, engine.version, ep, spec.logprobs)
    flat: list[_Episode] = []
    for group, pid, samples in zip(episodes, ids, first):
        for e, s in zip(group, samples):
            e.prompt_ids = pid
            if e.dropped is None:
                _take_turn(e, s, spec.logprobs)
            flat.append(e)
    eos = getattr(engine, "eos", None) or _eos(tok)
    turn = 1
    while True:
        live = [e for e in flat if not e.done and e.dropped is None]
        for e in live:
            _decide(e, rt, ep, turn)
        calling = [e for e in live if not e.done]
        if not calling:
            break
        _answer_calls(calling, ep, tok, eos, budget, engine.chat_template_kwargs)
        nxt = [e for e in calling if not e.done]
        if not nxt:
            break
        turn += 1
        t_spec = replace(spec, n=1, seed=None if spec.seed is None else derive_seed(spec.seed, 7919, turn))
        caps = [min(spec.max_new_tokens, budget - len(e.ids)) for e in nxt]
        outs = engine.sample([e.prompt_ids + e.ids for e in nxt], t_spec, max_new_tokens=caps)
        for e, s in zip(nxt, outs):
            _take_turn(e, s[0], spec.logprobs)
    for e in flat:
        if e.env is not None and e.dropped is None and callable(getattr(e.env, "get_reward", None)):
            try:
                e.env_reward = float(settle(e.env.get_reward()))  # an async get_reward (an LLM judge) too, as TRL allows
            except Exception as err:  # noqa: BLE001 - counted like a reward function's failure: the sample keeps its other rewards
                log.warning("%s.get_reward raised %s: %s", type(e.env).__name__, type(err).__name__, err)
    return _groups(prompts, ids, episodes, first, engine.version, ep, spec.logprobs)


def _start_group(p: Prompt, n: int, ep: EpisodeSpec, rt: _Runtime | None) -> tuple[list[_Episode], Prompt, list[dict]]:
    """The group's episodes with their environments reset on the row, the prompt they are shown and its tool schemas."""
    if rt is None:
        return [_Episode([]) for _ in range(n)], p, []
    from asymre.envs import environment_tools, schema

    cls = None
    if rt.classes:
        name = p.columns.get(ep.environment_column) if len(rt.classes) > 1 else next(iter(rt.classes))
        cls = rt.classes.get(name)
        if cls is None:
            raise ValueError(f"prompt {p.uid!r}: its {ep.environment_column!r} column is {name!r}, not one of the environments "
                             f"{sorted(rt.classes)} (rollout.environment)")
    group, observation = [], None
    for _ in range(n):
        e = _Episode([], tools=dict(rt.tools))
        if cls is not None:
            try:
                e.env = cls()
                obs = e.env.reset(**_row(p, ep.environment_column if len(rt.classes) > 1 else None))
            except Exception as err:  # noqa: BLE001 - a user environment: drop the sample, go on
                log.warning("%s.reset raised on row %r (%s: %s): that sample is dropped", cls.__name__, p.uid, type(err).__name__, err)
                e.dropped = f"reset raised {type(err).__name__}"
                group.append(e)
                continue
            if observation is None:
                observation = obs
            elif obs != observation:
                raise ValueError(f"{cls.__name__}.reset returned different observations for the samples of row {p.uid!r}: "
                                 "the samples of a group share their prompt (its baseline is computed within it), so reset "
                                 "must depend on the row alone")
            e.tools.update(environment_tools(e.env))
        group.append(e)
    shown = p
    if observation:
        messages = [dict(m) for m in p.messages]
        messages[-1]["content"] = messages[-1]["content"] + observation
        shown = replace(p, messages=messages)
    live = next((e for e in group if e.dropped is None), None)
    if cls is not None and cls not in rt.class_schemas and live is not None:
        rt.class_schemas[cls] = [schema(f) for name, f in live.tools.items() if name not in rt.tools]
    return group, shown, rt.schemas + rt.class_schemas.get(cls, [])


def _row(p: Prompt, drop: str | None) -> dict:
    """reset's keyword arguments: the dataset row, its prompt and columns (TRL 1.16 `environment.reset(**x)`), without
    the column that chose the environment when there are several (TRL drops its `environment` field too)."""
    row = {"prompt": p.messages if p.conversational else p.messages[-1]["content"], **p.columns}
    if drop:
        row.pop(drop, None)
    return row


def _take_turn(e: _Episode, s: Trajectory, logprobs: bool) -> None:
    e.turns += 1
    e.ids += s.completion_ids
    e.mask += [1] * len(s.completion_ids)
    if logprobs:
        e.logprobs += list(s.logprobs or [0.0] * len(s.completion_ids))
    e.finish = s.finish_reason
    e.text = s.text


def _decide(e: _Episode, rt: _Runtime, ep: EpisodeSpec, turn: int) -> None:
    """After a model turn: its message, and whether the episode goes on to its calls."""
    from asymre.envs.parsing import ToolCall

    content, calls = rt.parser(e.text) if e.tools else (e.text.strip(), [])
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    good = [c for c in calls if isinstance(c, ToolCall)]
    if good:
        msg["tool_calls"] = [c.message() for c in good]
    e.messages.append(msg)
    e.text = content
    if e.finish == "length" or not calls:
        e.done = True
    elif turn >= ep.max_turns:
        e.done, e.finish = True, "length"  # out of turns with a call still to make: truncated
    else:
        e.pending = calls


def _answer_calls(calling: list[_Episode], ep: EpisodeSpec, tok, eos: set[int], budget: int, kwargs: dict) -> None:
    """Every pending call of every episode at once; their results appended as the environment's tokens."""
    from asymre.envs import call_tools
    from asymre.envs.parsing import ToolCall, ToolFault
    from asymre.envs.templates import environment_suffix

    flat = [(e, c) for e in calling for c in e.pending]
    results = call_tools([(c, e.tools) for e, c in flat], ep.tool_timeout_s)
    per: dict[int, list] = {}
    for (e, c), r in zip(flat, results):
        per.setdefault(id(e), []).append((c, r))
    for e in calling:
        messages, faulted = [], False
        for c, r in per[id(e)]:
            name = c.name if isinstance(c, ToolCall) else (c.name or "")
            if isinstance(c, ToolCall):
                e.calls[c.name] += 1
            if isinstance(r, ToolFault):
                e.faults[r.kind] += 1
                faulted = True
                r = r.message
            messages.append({"role": "tool", "name": name, "content": _cap(tok, r, ep.max_tool_result_tokens)})
        e.pending = []
        e.messages += messages
        if faulted and ep.on_bad_tool_call != "message":
            e.done, e.finish = True, "tool_error"
            if ep.on_bad_tool_call == "reward":
                e.forced_reward = ep.bad_tool_call_reward
            continue
        last = e.ids[-1] if e.ids else None
        # the probe's call carries the real tool name (some templates, GPT-OSS's, derive the tool turn's header from it),
        # as TRL 1.16's _get_tool_suffix_ids does
        call = {"type": "function", "function": {"name": messages[0]["name"] or "tool", "arguments": {}}}
        suffix = environment_suffix(tok, messages, eos, ep.chat_template, kwargs, call)
        if last not in eos:  # the turn stopped on a stop string, not its end-of-turn token: the template's comes first
            suffix = [min(eos)] + suffix
        if len(e.ids) + len(suffix) >= budget:  # no room left for the result and a next turn
            e.done, e.finish = True, "length"
            continue
        e.ids += suffix
        e.mask += [0] * len(suffix)
        e.logprobs += [0.0] * len(suffix)
        e.env_tokens += len(suffix)


def _cap(tok, text: str, max_tokens: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return tok.decode(ids[:max_tokens]) + TRUNCATION_MARK


def _eos(tok) -> set[int]:
    from asymre.rollout.base import eos_token_ids

    return eos_token_ids(tok)


def _groups(prompts, ids, episodes, first, version: int, ep: EpisodeSpec, logprobs: bool) -> list[TrajectoryGroup]:
    groups = []
    for p, pid, group, samples in zip(prompts, ids, episodes, first):
        if not ep.multi_turn:
            trajs = list(samples)
        else:
            trajs = [_trajectory(e, logprobs) for e in group]
        g = TrajectoryGroup(prompt=p, prompt_ids=pid, trajectories=trajs, version=version)
        if any(e.env is not None for e in group):
            g.environments = [e.env for e in group]
        groups.append(g)
    return groups


def _trajectory(e: _Episode, logprobs: bool) -> Trajectory:
    if e.dropped is not None:
        return Trajectory([], "", "dropped", [] if logprobs else None, mask=[],
                          episode={"dropped": e.dropped, "messages": [], "turns": 0})
    record: dict[str, Any] = {"messages": e.messages, "turns": e.turns, "tool_calls": dict(e.calls),
                              "tool_errors": dict(e.faults), "env_tokens": e.env_tokens}
    if e.forced_reward is not None:
        record["forced_reward"] = e.forced_reward
    if e.env_reward is not None:
        record["env_reward"] = {type(e.env).__name__: e.env_reward}
    return Trajectory(list(e.ids), e.text, e.finish, list(e.logprobs) if logprobs else None, mask=list(e.mask), episode=record)


def episode_metrics(groups: list[TrajectoryGroup]) -> dict[str, float]:
    """Per-round episode metrics (empty for single completions): turns, calls (by tool), faults (by kind), the share
    of completion tokens the environment inserted, truncated and dropped episodes."""
    eps = [t for g in groups for t in g.trajectories if t.episode is not None]
    if not eps:
        return {}
    live = [t for t in eps if "dropped" not in t.episode]
    calls: Counter = Counter()
    faults: Counter = Counter()
    for t in live:
        calls.update(t.episode.get("tool_calls", {}))
        faults.update(t.episode.get("tool_errors", {}))
    tokens = sum(len(t.completion_ids) for t in live)
    out = {"episode/count": float(len(eps)), "episode/dropped": float(len(eps) - len(live)),
           "episode/turns": sum(t.episode["turns"] for t in live) / max(len(live), 1),
           "episode/tool_calls": float(sum(calls.values())), "episode/tool_errors": float(sum(faults.values())),
           "episode/env_token_frac": sum(t.episode.get("env_tokens", 0) for t in live) / max(tokens, 1),
           "episode/truncated": sum(t.finish_reason == "length" for t in live) / max(len(live), 1)}
    out.update({f"episode/calls/{k}": float(v) for k, v in sorted(calls.items())})
    out.update({f"episode/tool_errors/{k}": float(v) for k, v in sorted(faults.items())})
    return out


def portable(groups: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
    """Groups about to leave this process (a worker's evaluation, scored by the learner): their environments go along
    when they pickle (the reward functions then get them), else they stay behind with one warning."""
    import pickle

    for g in groups:
        if g.environments is None:
            continue
        try:
            pickle.dumps(g.environments)
        except Exception as e:  # noqa: BLE001 - any pickling failure: the rewards get environments=None
            log.warning("%s instances cannot be pickled (%s): the reward functions scoring this evaluation in the learner's "
                        "process get environments=None", type(g.environments[0]).__name__, e)
            g.environments = None
    return groups
