"""The supervised warm-start: demonstrations trained with advantage 1 through the same learner, before RL.

A demonstration is a whole conversation: the prompt's messages, then the turns an expert would take (assistant turns,
tool results, further assistant turns). It becomes one trajectory the way an episode does (asymre/rollout/episodes.py):
the prompt rendered with its generation prompt, each assistant turn the template's tokens for it up to and including
its end-of-turn token (mask 1: trained), everything the template puts between turns (a tool result, the next assistant
header) masked 0. The tokens are rendered by the run's chat template (model.chat_template, the tools' schemas), so a
demonstration is the episode the policy would have sampled had it written those turns. Trained with advantage 1 and
no baseline, the policy-gradient loss is the negative log-likelihood of the model's tokens: supervised fine-tuning,
which is what the facts paper's in-tool learning was (TRL users run SFTTrainer before GRPOTrainer; here it is one
switch, `warm_start.steps`, in the same run and on the same optimiser).

Sources (`warm_start.data`): 'task', the task's own demonstrations (the facts task writes them from its database), or
a JSONL file whose `messages` column holds whole conversations (TRL's conversational SFT format): the messages up
to the first assistant turn are the prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from asymre.config import ConfigError, InputError
from asymre.data import Prompt, Trajectory, TrajectoryGroup


def conversations(cfg, train: list[Prompt]) -> list[tuple[list[dict], list[dict]]]:
    """warm_start.data -> [(prompt messages, demonstrated turns)]."""
    ws = cfg.warm_start
    if ws.data == "task":
        if cfg.task.name != "facts":
            raise ConfigError(f"warm_start.data=task: task.name={cfg.task.name} writes no demonstrations (the facts task does); "
                              "give warm_start.data a JSONL file with a `messages` column")
        from asymre.tasks.facts import demonstrations

        seen, prompts = set(), []
        for p in train:  # each distinct training prompt once (train_size may repeat them)
            if p.uid not in seen:
                seen.add(p.uid)
                prompts.append(p)
        if ws.size:
            prompts = [prompts[i % len(prompts)] for i in range(ws.size)]
        return [(p.messages, turns) for p, turns in zip(prompts, demonstrations(prompts, cfg.task.facts.mode, cfg.rollout.tool_parser))]
    path = Path(ws.data).expanduser()
    if not path.is_file():
        raise InputError(f"warm_start.data={ws.data}: not 'task' and no such file (a JSONL file with a `messages` column)")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"warm_start.data {path} row {i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from e
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise InputError(f"{where}: needs a `messages` list of {{role, content}} messages")
        first = next((k for k, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if not first:
            raise InputError(f"{where}: needs at least one message before the first assistant turn, and an assistant turn")
        out.append((msgs[:first], msgs[first:]))
    if not out:
        raise InputError(f"warm_start.data={ws.data}: no demonstrations in the file")
    if ws.size:
        out = [out[i % len(out)] for i in range(ws.size)]
    return out


def encode(tokenizer, prompt: list[dict], turns: list[dict], eos: set[int], *, tools=None, template=None, kwargs=None,
           max_prompt_tokens: int = 1 << 30) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, mask) of one demonstration, rendered as the episode loop renders an episode."""
    from asymre.envs.templates import _cut_after_last, render

    conv = list(prompt)
    ids = render(tokenizer, conv, tools=tools, generation_prompt=True, template=template, kwargs=kwargs)
    n_prompt = len(ids)
    mask: list[int] = []
    for k, m in enumerate(turns):
        conv.append(m)
        if m["role"] == "assistant":
            full = render(tokenizer, conv, tools=tools, generation_prompt=False, template=template, kwargs=kwargs)
            cut = _cut_after_last(full, eos)
            if full[:len(ids)] != ids or cut is None or cut <= len(ids):
                raise ValueError("the chat template does not render this demonstration's assistant turn as a continuation "
                                 "ending on an end-of-turn token")
            seg, flag = full[len(ids):cut], 1
        elif k + 1 < len(turns) and turns[k + 1]["role"] != "assistant":
            continue  # several tool results in a row: rendered together, before the next assistant turn
        else:
            full = render(tokenizer, conv, tools=tools, generation_prompt=True, template=template, kwargs=kwargs)
            if full[:len(ids)] != ids:
                raise ValueError("the chat template re-renders earlier turns once a tool turn follows")
            seg, flag = full[len(ids):], 0
        ids = ids + seg
        mask += [flag] * len(seg)
    while mask and mask[-1] == 0:  # nothing after the last assistant turn is trained or needed
        mask.pop()
    keep = n_prompt + len(mask)
    prompt_ids = ids[:n_prompt][-max_prompt_tokens:]
    return prompt_ids, ids[n_prompt:keep], mask


def demonstration_groups(cfg, tokenizer, train: list[Prompt], rank: int = 0, world: int = 1) -> list[TrajectoryGroup]:
    """The demonstrations the warm-start will train on, in order, as one-trajectory groups with reward 1 (their
    advantage in the supervised step): warm_start.steps x batch_size of them for this rank (rank `rank` of `world`),
    drawn by passes over the shuffled demonstrations. Only those are rendered (a large database writes far more)."""
    from asymre.envs import environment_tools, load_environments, load_tools, schema
    from asymre.envs.templates import resolve_chat_template
    from asymre.rollout.base import eos_token_ids

    ws = cfg.warm_start
    convs = conversations(cfg, train)
    tools = [schema(f) for f in load_tools(cfg.rollout.tools).values()]
    env = cfg.rollout.environment
    if isinstance(env, str):  # one environment class: its tools are shown in the prompt, as in the episode loop
        cls = next(iter(load_environments(env).values()))
        tools += [schema(f) for f in environment_tools(cls()).values()]
    template = resolve_chat_template(cfg.model.chat_template)
    eos = eos_token_ids(tokenizer)
    kwargs = dict(cfg.task.chat_template_kwargs)
    rng = random.Random(cfg.learner.seed)
    order: list[int] = []
    while len(order) < ws.steps * ws.batch_size * world:  # passes over the demonstrations, each reshuffled
        more = list(range(len(convs)))
        rng.shuffle(more)
        order += more
    built: dict[int, TrajectoryGroup] = {}
    groups = []
    for i in order[: ws.steps * ws.batch_size * world][rank::world]:
        if i not in built:
            prompt, turns = convs[i]
            try:
                pid, cid, mask = encode(tokenizer, prompt, turns, eos, tools=tools or None, template=template, kwargs=kwargs,
                                        max_prompt_tokens=cfg.rollout.max_prompt_tokens)
            except ValueError as e:
                raise InputError(f"warm_start demonstration {i}: {e}") from e
            text = next((m.get("content") or "" for m in reversed(turns) if m["role"] == "assistant"), "")
            traj = Trajectory(cid, text, "stop", reward=1.0, mask=mask if 0 in mask else None)
            built[i] = TrajectoryGroup(Prompt(f"demo:{i}", prompt), pid, [traj], version=0)
        groups.append(built[i])
    return groups


def warm_start(learner, cfg, groups: list[TrajectoryGroup]) -> dict[str, float]:
    """`warm_start.steps` supervised steps, each on the next `warm_start.batch_size` of `groups` (this rank's, from
    `demonstration_groups`), at `warm_start.lr`; the learner's version and LR schedule stay where they were."""
    import time

    ws = cfg.warm_start
    saved = [g["lr"] for g in learner.optimizer.param_groups]
    t0 = time.perf_counter()
    losses: list[float] = []
    try:
        for g in learner.optimizer.param_groups:
            g["lr"] = ws.lr
        for step in range(ws.steps):
            batch = groups[step * ws.batch_size:(step + 1) * ws.batch_size]
            losses.append(learner.train_step(batch, supervised=True)["loss/value"])
    finally:
        for g, lr in zip(learner.optimizer.param_groups, saved):
            g["lr"] = lr
    return {"warm_start/steps": float(ws.steps), "warm_start/demonstrations": float(len(groups)),
            "warm_start/loss_first": losses[0], "warm_start/loss_last": losses[-1], "warm_start/seconds": time.perf_counter() - t0}
