"""Tools and environments for multi-turn episodes, under TRL 1.16's contract (`tools=`, `environment_factory=`).

- `rollout.tools: ["my_tools:search", ...]`: plain functions (sync or `async def`) with type hints and a Google-style
  docstring; their JSON schemas come from transformers' `get_json_schema`, and the chat template renders them.
- `rollout.environment: "my_env:FactEnv"` (or {name: "pkg.mod:Class"}, chosen per row by the dataset's
  `environment` column): one instance per episode; `reset(**row)` returns None or a string appended to the last user
  message; its public methods but `reset` (and asymre's extra, `get_reward`) are the episode's tools; the instances
  reach the reward functions as `environments=`.

This module resolves them (at start-up: a bad path, a tool without a docstring, an environment class that cannot be
built is one line naming it) and calls tools: each call on its own daemon thread under `rollout.tool_timeout_s`
(a hung call is abandoned, never waited on: nothing stalls the step), its arguments checked against the signature
first, every failure turned into a `ToolFault` the model reads as the tool's result.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
import typing
from collections.abc import Callable
from typing import Any

from asymre.config import ConfigError
from asymre.envs.parsing import ToolCall, ToolFault

# Methods of an environment class that are never tools: TRL's reset, and the optional reward source.
NOT_TOOLS = {"reset", "get_reward"}


class ToolConfigError(ConfigError):
    """A tool or environment named in the config cannot be used (raised at start-up)."""


def import_object(spec: str, key: str):
    """'pkg.module:name' -> the object, imported as reward functions are (the launch folder's package too)."""
    from asymre.rewards import _import_here_too

    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ToolConfigError(f"{key}: {spec!r} is not a dotted path 'pkg.module:name'")
    try:
        mod = _import_here_too(module)
    except Exception as e:
        raise ToolConfigError(f"{key}: {spec!r}: cannot import module {module!r}: {e}") from e
    obj = mod
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ToolConfigError(f"{key}: {spec!r}: module {module!r} has no {attr!r}")
    return obj


def load_tools(specs) -> dict[str, Callable]:
    """rollout.tools -> {name: function}, each with a schema transformers can build."""
    out: dict[str, Callable] = {}
    for spec in specs:
        fn = import_object(spec, "rollout.tools")
        if not callable(fn):
            raise ToolConfigError(f"rollout.tools: {spec!r} is not callable")
        schema(fn, f"rollout.tools: {spec!r}")
        if fn.__name__ in out:
            raise ToolConfigError(f"rollout.tools: two tools are named {fn.__name__!r}")
        out[fn.__name__] = fn
    return out


def load_environments(spec) -> dict[str, type]:
    """rollout.environment -> {name: class}: one class under its own name, or a mapping chosen per row."""
    if spec is None:
        return {}
    items = dict(spec).items() if not isinstance(spec, str) else [(None, spec)]
    out = {}
    for name, path in items:
        cls = import_object(path, "rollout.environment")
        if not callable(cls):
            raise ToolConfigError(f"rollout.environment: {path!r} is not a class")
        out[name or cls.__name__] = cls
    return out


def environment_tools(env) -> dict[str, Callable]:
    """The episode's tools an environment instance offers: its public methods but reset and get_reward."""
    out = {}
    for name in dir(type(env)):
        if name.startswith("_") or name in NOT_TOOLS:
            continue
        attr = getattr(env, name, None)
        if inspect.ismethod(attr) or (callable(attr) and not isinstance(attr, type)):
            out[name] = attr
    return out


def schema(fn: Callable, where: str = "") -> dict:
    """transformers' JSON schema of a tool (what `apply_chat_template(tools=...)` renders)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as e:  # DocstringParsingException, TypeHintParsingException: a missing docstring or hint
        raise ToolConfigError(f"{where or getattr(fn, '__qualname__', fn)}: cannot build its tool schema ({e}); a tool "
                                "needs type hints and a Google-style docstring with an Args section, as under TRL") from e


def check_environment(classes: dict[str, type], tools: dict[str, Callable]) -> None:
    """Start-up: every environment class builds with no arguments, and its tools have schemas and no name clash."""
    for name, cls in classes.items():
        try:
            env = cls()
        except Exception as e:
            raise ToolConfigError(f"rollout.environment: {name} cannot be built with no arguments ({type(e).__name__}: {e}); "
                                    "TRL's environment_factory is called that way, once per episode") from e
        if not callable(getattr(env, "reset", None)):
            raise ToolConfigError(f"rollout.environment: {name} has no reset(**row) method")
        methods = environment_tools(env)
        clash = sorted(set(methods) & set(tools))
        if clash:
            raise ToolConfigError(f"rollout.environment: {name}.{clash[0]} has the name of a rollout.tools function")
        for m, fn in methods.items():
            schema(fn, f"rollout.environment: {name}.{m}")


# --------------------------------------------------------------------------------------------- calling tools
def _arguments_problem(fn: Callable, args: dict) -> str | None:
    """Why `args` cannot go to `fn` (missing, unknown, or of the wrong simple type), or None."""
    try:
        sig = inspect.signature(fn)
        sig.bind(**args)
    except TypeError as e:
        return str(e)
    except ValueError:
        return None
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - no hints to check: binding was checked
        hints = {}
    for k, v in args.items():
        want = hints.get(k)
        if want in (int, float, str, bool) and not _fits(v, want):
            return f"argument {k!r} must be {want.__name__}, got {type(v).__name__} {json.dumps(v)[:40]}"
    return None


def _fits(v, want) -> bool:
    if want is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if want is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, want)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return str(value)


def call_tools(calls: list[tuple[ToolCall | ToolFault, dict[str, Callable]]], timeout_s: float) -> list[str | ToolFault]:
    """Make every call at once (each on a daemon thread; `async def` tools on their own event loop there) and wait
    for all of them together, at most `timeout_s` from the start: a call still running then is a `timeout` fault
    and abandoned. Returns, per call, the result as text or the fault."""
    out: list[str | ToolFault | None] = [None] * len(calls)
    boxes: list[tuple[int, threading.Thread, dict]] = []
    for i, (call, tools) in enumerate(calls):
        if isinstance(call, ToolFault):
            out[i] = call
            continue
        fn = tools.get(call.name)
        if fn is None:
            out[i] = ToolFault("unknown_tool", f"Error: unknown tool {call.name!r}; the tools are: {', '.join(sorted(tools)) or 'none'}", call.name)
            continue
        problem = _arguments_problem(fn, call.arguments)
        if problem:
            out[i] = ToolFault("bad_arguments", f"Error: wrong arguments for {call.name}: {problem}", call.name)
            continue
        box: dict = {}
        th = threading.Thread(target=_run, args=(fn, call.arguments, box), name=f"tool:{call.name}", daemon=True)
        th.start()
        boxes.append((i, th, box))
    deadline = time.monotonic() + timeout_s
    for i, th, box in boxes:
        th.join(max(0.0, deadline - time.monotonic()))
        name = calls[i][0].name
        if th.is_alive():
            out[i] = ToolFault("timeout", f"Error: {name} did not answer within {timeout_s:g} s", name)
        elif "error" in box:
            e = box["error"]
            out[i] = ToolFault("raised", f"Error: {name} raised {type(e).__name__}: {str(e)[:300]}", name)
        else:
            out[i] = _as_text(box.get("value"))
    return out  # type: ignore[return-value]


def settle(value):
    """`value`, or what it resolves to when it is awaitable (an `async def` tool or get_reward), on its own event loop
    in this thread."""
    return asyncio.run(_await(value)) if inspect.isawaitable(value) else value


def _run(fn: Callable, args: dict, box: dict) -> None:
    try:
        box["value"] = settle(fn(**args))
    except BaseException as e:  # noqa: BLE001 - a tool's failure is data for the model
        box["error"] = e


async def _await(aw):
    return await aw
