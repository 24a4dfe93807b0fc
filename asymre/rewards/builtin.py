"""Built-in reward functions. Each has TRL's shape: f(prompts, completions, **columns) -> list[float | None].

`prompts` and `completions` are strings (completion text only); dataset columns (e.g. `answer`) come
as keyword lists aligned with them. `None` means "not applicable" and drops the sample from that
function's vote. Completions in TRL's conversational form (a list of {"role", "content"} messages) are
accepted too, so these functions also plug into TRL's trainers.
"""

from __future__ import annotations

import logging
import re
import threading

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _texts(completions: list) -> list[str]:
    """Plain strings, or TRL conversational completions [[{"role": "assistant", "content": ...}], ...]."""
    return [c if isinstance(c, str) else "".join(m.get("content", "") for m in c) for c in completions]


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_number(text: str) -> float | None:
    """GSM8K style: the number after '####' if there is one, else the last number in the text."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    return _to_number(found[-1]) if found else None


def _first_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    return _to_number(found[0]) if found else None


def _match_numbers(name: str, completions: list, answer: list[str] | None, pick) -> list[float | None]:
    """1.0 where pick(completion) equals the reference's number, 0.0 where not, None without a reference number."""
    if answer is None:
        raise ValueError(f"reward {name!r} needs an 'answer' column")
    out: list[float | None] = []
    for c, a in zip(_texts(completions), answer):
        ref, got = extract_number(str(a)), pick(c)
        out.append(None if ref is None else float(got is not None and abs(got - ref) < 1e-6))
    return out


def numeric(prompts: list[str], completions: list[str], answer: list[str] | None = None, **_) -> list[float | None]:
    """1.0 if the completion's final number (after '####' if present) equals the reference answer's, else 0.0."""
    return _match_numbers("numeric", completions, answer, extract_number)


def first_number(prompts: list[str], completions: list[str], answer: list[str] | None = None, **_) -> list[float | None]:
    """1.0 if the *first* number in the completion equals the reference: the answer must come first, as
    "answer with just the number" asks ("5" or "5." pass; "2 + 3 = 5" does not)."""
    return _match_numbers("first_number", completions, answer, _first_number)


def math_verify(prompts: list[str], completions: list[str], answer: list[str] | None = None, **_) -> list[float | None]:
    """MATH answers: the completion's boxed/final answer checked against the reference with `math-verify`
    (symbolic equivalence: \\frac{1}{2} == 0.5, \\sqrt{8} == 2\\sqrt{2}).

    math-verify bounds its own parsing and comparison with SIGALRM, which only works on a process's main
    thread; the scorer calls rewards on a helper thread (in the learner and in generation workers), where
    those timeouts raise on every sample. Off the main thread they are turned off and the scorer's
    `reward.timeout_s` bounds the call instead (TRL's `accuracy_reward` does the same)."""
    completions = _texts(completions)
    from math_verify import parse, verify

    if answer is None:
        raise ValueError("reward 'math_verify' needs an 'answer' column")
    on_main = threading.current_thread() is threading.main_thread()
    parse_timeout, verify_timeout = (5, 5) if on_main else (None, None)
    if not on_main:  # math-verify warns "Timeout is disabled" once per process: intended here
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    out: list[float | None] = []
    for c, a in zip(completions, answer):
        ref_text = str(a) if "$" in str(a) or "\\boxed" in str(a) else f"${a}$"
        gold = parse(ref_text, parsing_timeout=parse_timeout)
        if not gold:
            out.append(None)
            continue
        pred = parse(c, parsing_timeout=parse_timeout)
        out.append(float(bool(pred) and verify(gold, pred, timeout_seconds=verify_timeout)))
    return out


_BOXED = re.compile(r"\\boxed\{.+\}", re.S)


def boxed_format(prompts: list[str], completions: list[str], **_) -> list[float | None]:
    """1.0 if the completion puts a final answer in \\boxed{...}, else 0.0."""
    completions = _texts(completions)
    return [float(bool(_BOXED.search(c))) for c in completions]


def just_number_format(prompts: list[str], completions: list[str], **_) -> list[float | None]:
    """1.0 if the completion is only a number (the arithmetic task's instruction), else 0.0."""
    completions = _texts(completions)
    return [float(bool(re.fullmatch(r"\s*-?\d+(?:\.\d+)?\s*\.?\s*", c))) for c in completions]


def length_penalty(prompts: list[str], completions: list[str], max_chars: int = 2000, **_) -> list[float | None]:
    """-len/max_chars, clipped to [-1, 0]: pair with a weight to discourage rambling."""
    completions = _texts(completions)
    return [-min(len(c) / max_chars, 1.0) for c in completions]


def facts(prompts: list[str], completions: list, answer: list[str] | None = None, **kw) -> list[float | None]:
    """The facts task's reward (asymre/tasks/facts.py): the attribute's value appears in the final answer, normalised."""
    from asymre.tasks.facts import facts_reward

    return facts_reward(prompts, completions, answer, **kw)


REGISTRY = {
    "numeric": numeric,
    "facts": facts,
    "first_number": first_number,
    "math_verify": math_verify,
    "boxed_format": boxed_format,
    "just_number_format": just_number_format,
    "length_penalty": length_penalty,
}
BINARY = {"facts", "numeric", "first_number", "math_verify", "boxed_format", "just_number_format"}
