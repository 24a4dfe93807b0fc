"""Tool calls out of a model turn's text: the tokenizer's own response parser where it has one, else a shipped one.

A parser maps the text of one model turn to (content, calls): the message's text with the calls taken out, and one
`ToolCall` per call, or a `ToolFault` where a call is there but malformed (it reaches the model as the tool's result,
asymre/rollout/episodes.py). Parsers:

- `auto`: the tokenizer's own response format when it has one (transformers 5.19 `response_template`, read by
  `tokenizer.parse_response`: the chat template's own tool format), else `hermes`.
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen2.5/3, and asymre's shipped
  `chatml-tools` template for SmolLM2); `arguments` may also be a JSON string, as OpenAI's form has it.
- `find`: the text syntax of Houliston et al. (arXiv 2508.20755), a fenced block ```` ```\nFIND <attribute> FOR <name>\n``` ````,
  read as a call to a tool `lookup(name, attribute)`; the prompt teaches it (asymre/tasks/facts.py), so the chat template
  need not render tool schemas.
- `pkg.module:function`: a user's own, `f(text) -> (content, calls)` with calls as dicts {"name", "arguments"}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

FAULT_KINDS = ("bad_json", "unknown_tool", "bad_arguments", "raised", "timeout")


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def message(self) -> dict:
        """The call as a chat message's `tool_calls` entry (transformers' and OpenAI's form)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolFault:
    """A call that could not be made (or failed): `kind` is one of FAULT_KINDS, `message` what the model reads."""

    kind: str
    message: str
    name: str | None = None


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def hermes(text: str) -> tuple[str, list[ToolCall | ToolFault]]:
    calls: list[ToolCall | ToolFault] = []
    for m in _HERMES.finditer(text):
        calls.append(_call_from_json(m.group(1).strip()))
    content = _HERMES.sub("", text).strip() if calls else text.strip()
    return content, calls


def _call_from_json(raw: str) -> ToolCall | ToolFault:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        return ToolFault("bad_json", f"Error: the tool call is not valid JSON ({e.msg} at position {e.pos}): {raw[:200]}")
    return call_from_dict(obj, raw)


def call_from_dict(obj: Any, raw: str = "") -> ToolCall | ToolFault:
    """{"name": str, "arguments": dict | JSON string} (or OpenAI's {"function": {...}}) -> ToolCall, else a fault."""
    if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
        obj = obj["function"]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        got = (raw or str(obj))[:200]
        return ToolFault("bad_json", f'Error: a tool call must be a JSON object {{"name": ..., "arguments": {{...}}}}, got: {got}')
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolFault("bad_json", f"Error: the arguments of {obj['name']!r} are not valid JSON ({e.msg})", obj["name"])
    if not isinstance(args, dict):
        return ToolFault("bad_arguments", f"Error: the arguments of {obj['name']!r} must be a JSON object, got {type(args).__name__}", obj["name"])
    return ToolCall(obj["name"], args)


_FENCE = re.compile(r"```[a-z]*[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_FIND = re.compile(r"FIND\s+(\S+)\s+FOR\s+(.+)", re.DOTALL)


def find(text: str) -> tuple[str, list[ToolCall | ToolFault]]:
    """Fenced blocks that start with FIND: each a `lookup(name, attribute)` call; a FIND block without both parts a
    `bad_arguments` fault. Other fenced blocks are plain text."""
    calls: list[ToolCall | ToolFault] = []
    spans = []
    for m in _FENCE.finditer(text):
        body = m.group(1).strip()
        if not body.upper().startswith("FIND"):
            continue
        spans.append(m.span())
        q = _FIND.fullmatch(" ".join(body.split()))
        if q is None:
            calls.append(ToolFault("bad_arguments", f"Error: write the query as FIND <attribute> FOR <full name>, got: {body[:200]}",
                                   "lookup"))
        else:
            calls.append(ToolCall("lookup", {"name": q.group(2).strip(), "attribute": q.group(1).strip()}))
    content = text
    for a, b in reversed(spans):
        content = content[:a] + content[b:]
    return content.strip(), calls


# Parsers whose call syntax the prompt teaches, not the chat template's tool schemas: the template need not render them.
TEXT_SYNTAX = {"find"}


def has_response_parser(tokenizer) -> bool:
    """The tokenizer carries its template's response format: transformers 5.19 `response_template` (or the legacy
    `response_schema` of earlier 5.x)."""
    return bool(getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None))


def schema_parser(tokenizer) -> Callable[[str], tuple[str, list[ToolCall | ToolFault]]]:
    """The tokenizer's own response parser: transformers 5.19 `tokenizer.parse_response(response, prefix=...)`
    (tokenization_utils_base.py), driven by its `response_template`; the turn's text alone, so an empty prefix. A
    region that does not parse (malformed JSON) raises ValueError there: a `bad_json` fault here (TRL 1.16 instead
    takes the turn as plain text and ends the episode)."""

    def parse(text: str):
        try:
            parsed = tokenizer.parse_response(text, prefix="")
        except Exception as e:  # noqa: BLE001 - the schema's regex or JSON step failed: the call is malformed
            return text.strip(), [ToolFault("bad_json", f"Error: the tool call could not be parsed ({type(e).__name__}: {str(e)[:200]})")]
        if not isinstance(parsed, dict):
            return text.strip(), []
        calls = [call_from_dict(c) for c in parsed.get("tool_calls") or []]
        return (parsed.get("content") or "").strip(), calls

    return parse


PARSERS: dict[str, Callable[[str], tuple[str, list[ToolCall | ToolFault]]]] = {"hermes": hermes, "find": find}


def make_parser(name: str, tokenizer) -> Callable[[str], tuple[str, list[ToolCall | ToolFault]]]:
    """rollout.tool_parser -> a parser for this tokenizer."""
    if name == "auto":
        return schema_parser(tokenizer) if has_response_parser(tokenizer) else hermes
    if name in PARSERS:
        return PARSERS[name]
    if ":" in name:
        from asymre.envs import import_object

        user = import_object(name, "rollout.tool_parser")

        def parse(text: str):
            content, calls = user(text)
            return content, [c if isinstance(c, (ToolCall, ToolFault)) else call_from_dict(c) for c in calls]

        return parse
    raise ValueError(f"rollout.tool_parser={name!r}: expected 'auto', {', '.join(repr(k) for k in PARSERS)} or 'pkg.module:function'")
