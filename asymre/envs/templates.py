"""Chat templates for episodes: the shipped tool-capable template, the environment's tokens as the template's own
continuation of the conversation, and the start-up check that this is sound for the run's model.

The environment's tokens (a turn of tool results, then the next assistant header) are the template's rendering of
the new messages, taken as a suffix: render a probe conversation ending in an assistant turn, cut it just after that
turn's end-of-turn token (the token the engine stopped on), render it again with the tool messages and the
generation prompt, and keep what follows the cut. The model's own tokens are never decoded and re-encoded. This is
right only if the template renders a conversation's earlier turns the same way whatever follows them (the prefix
property); `check_template` probes it once at start-up. Tokens the template puts between the model's end-of-turn and
the tool turn (ChatML's newline) are inside the suffix, so they are masked like every environment token. A template
that breaks the property (one that drops an earlier turn's reasoning once a later turn exists, or renders an
assistant turn differently when a tool turn follows) is refused, naming the model and the template: asymre does not
split such episodes into rows.
"""

from __future__ import annotations

from pathlib import Path

from asymre.config import ConfigError

SHIPPED = {"chatml-tools": Path(__file__).with_name("chatml_tools.jinja")}
_PROBE_USER = {"role": "user", "content": "What is the weather in Paris?"}
_PROBE_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
_PROBE_ASSISTANT = {"role": "assistant", "content": "Let me check.", "tool_calls": [_PROBE_CALL]}
_PROBE_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                               "required": ["city"]}}}


def resolve_chat_template(value: str | None) -> str | None:
    """model.chat_template -> template text: a shipped name ('chatml-tools'), a .jinja file, or the template itself."""
    if not value:
        return None
    if value in SHIPPED:
        return SHIPPED[value].read_text()
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    raise ConfigError(f"model.chat_template={value!r}: not a shipped template ({', '.join(SHIPPED)}), a template file, or "
                      "a Jinja template")


def render(tokenizer, messages, *, tools=None, generation_prompt: bool, template: str | None = None, kwargs: dict | None = None) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=False, chat_template=template, **(kwargs or {}))
    return list(ids)


def _cut_after_last(ids: list[int], eos: set[int]) -> int | None:
    """Length of `ids` up to and including its last end-of-turn token, or None."""
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] in eos:
            return i + 1
    return None


def environment_suffix(tokenizer, tool_messages: list[dict], eos: set[int], template: str | None = None,
                       kwargs: dict | None = None, call: dict | None = None) -> list[int]:
    """The tokens the template puts after a model turn that ended on an end-of-turn token: `tool_messages` and the
    next assistant header (the generation prompt)."""
    assistant = dict(_PROBE_ASSISTANT, tool_calls=[call or _PROBE_CALL])
    head = render(tokenizer, [_PROBE_USER, assistant], generation_prompt=False, template=template, kwargs=kwargs)
    cut = _cut_after_last(head, eos)
    full = render(tokenizer, [_PROBE_USER, assistant, *tool_messages], generation_prompt=True, template=template, kwargs=kwargs)
    if cut is None or full[:cut] != head[:cut]:
        raise ValueError("the chat template does not continue the conversation after the model's turn (checked at start-up)")
    return full[cut:]


def check_template(tokenizer, eos: set[int], model: str, template: str | None = None, kwargs: dict | None = None,
                   shows_tools: bool = True) -> None:
    """Start-up: the template renders tool turns as a continuation (the prefix property), for `model`'s tokenizer; and,
    unless the prompt teaches the call syntax itself (`shows_tools=False`: the `find` parser), it shows the tools."""
    name = "model.chat_template" if template else f"{model}'s own chat template"
    tool = {"role": "tool", "name": "get_weather", "content": "sunny, 21 C"}
    try:
        prompt = render(tokenizer, [_PROBE_USER], tools=[_PROBE_TOOL], generation_prompt=True, template=template, kwargs=kwargs)
        head = render(tokenizer, [_PROBE_USER, _PROBE_ASSISTANT], generation_prompt=False, template=template, kwargs=kwargs)
        with_tool = render(tokenizer, [_PROBE_USER, _PROBE_ASSISTANT, tool], generation_prompt=True, template=template, kwargs=kwargs)
        later = render(tokenizer, [_PROBE_USER, _PROBE_ASSISTANT, tool, {"role": "assistant", "content": "It is sunny."}],
                       generation_prompt=False, template=template, kwargs=kwargs)
    except Exception as e:
        raise ConfigError(f"{name} cannot render a tool call and a tool turn for {model} ({type(e).__name__}: {e}); set "
                          "model.chat_template to a tool-capable template (chatml-tools for ChatML models such as SmolLM2)") from e
    if shows_tools and "get_weather" not in tokenizer.decode(prompt):
        raise ConfigError(f"{name} does not show the tools to {model} (apply_chat_template(tools=...) renders no schema): set "
                          "model.chat_template to a tool-capable template (chatml-tools for ChatML models such as SmolLM2)")
    if tokenizer.decode(with_tool).count("sunny, 21 C") != 1:
        raise ConfigError(f"{name} does not render tool results for {model} (a `tool` message left no trace): set "
                          "model.chat_template to a tool-capable template (chatml-tools for ChatML models such as SmolLM2)")
    cut = _cut_after_last(head, eos)
    if cut is None:
        raise ConfigError(f"{name} ends an assistant turn of {model} with no end-of-turn token the engine stops on "
                          f"(ids {sorted(eos)}): the environment's tokens cannot follow the model's own")
    if with_tool[:cut] != head[:cut]:
        raise ConfigError(f"{name} renders an assistant turn of {model} differently once a tool turn follows it, so the "
                          "tool's tokens cannot be appended to the model's own: use a template with the prefix property "
                          "(model.chat_template)")
    if later[:len(with_tool)] != with_tool:
        raise ConfigError(f"{name} re-renders earlier turns of {model} once a later assistant turn exists (e.g. it drops "
                          "their reasoning): an episode's tokens would not be what the model saw; use a template with the "
                          "prefix property (model.chat_template)")
