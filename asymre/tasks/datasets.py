"""Dataset tasks: GSM8K, MATH and any prompt/answer file, through `datasets`.

`path` is a hub id (for users with network) or a local JSONL/JSON/parquet/CSV file or folder (tests, and
machines without a hub). Rows keep every column, so reward functions can read them as keyword lists.
A row without the prompt or answer column fails with the file, row and column named. The file task reads
TRL's prompt formats: a prompt string (standard) or a list of chat messages (conversational).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from asymre.config import InputError
from asymre.data import Prompt

MATH_INSTRUCTION = "Solve the problem. Put the final answer in \\boxed{}."
GSM8K_INSTRUCTION = "Solve the problem step by step. End with '#### ' followed by the final number."
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(InputError):
    """A dataset file or row is unusable; the message names the file, row and column."""

    label = "data error"


def _check_file(p: Path) -> None:
    """An empty file, or a JSON Lines file with a line that is not JSON, named with its line, before `datasets`
    reads it (its own errors name neither). One pass over a JSON Lines file."""
    empty = DataError(f"{p}: empty file (no rows)")
    if p.stat().st_size == 0:
        raise empty
    if p.suffix.lower() == ".parquet":
        return
    if p.suffix.lower() != ".jsonl":
        if not p.read_text(errors="replace").strip():
            raise empty
        return
    rows = 0
    with p.open(errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}, line {n}: a row must be a JSON object, got {type(row).__name__}")
            rows += 1
    if not rows:
        raise empty


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _looks_like_a_path(path: str) -> bool:
    """A local path rather than a hub id ('org/name', or a legacy 'name'): absolute, relative with ./ ../ ~,
    a data file's extension, or more than one '/'."""
    return path.startswith(("/", "./", "../", "~")) or Path(path).suffix.lower() in _BUILDERS or path.count("/") > 1


def load_rows(path: str, split: str, subset: str | None = None) -> tuple[list[dict], str]:
    """Rows of `split` from a local file/folder or a hub id, and a label naming the source."""
    from datasets import load_dataset

    p = Path(path).expanduser()
    if p.is_file():
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"{p}: unsupported file type {p.suffix!r}; expected one of {sorted(_BUILDERS)}")
        _check_file(p)
        import datasets

        shown = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a local file loads in a blink; its bars would bury a data error's one line
        try:
            ds = load_dataset(builder, data_files={split: str(p)}, split=split)
        except Exception as e:
            raise DataError(f"{p}: cannot be read as {builder}: {_first_line(e)}") from e
        finally:
            if shown:
                datasets.enable_progress_bars()
        return [dict(r) for r in ds], str(p)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in _BUILDERS and split in f.stem)
        if not files:
            raise DataError(f"{p}: no {split} file (*{split}*.jsonl/.json/.parquet/.csv) in this folder")
        return load_rows(str(files[0]), split)
    if _looks_like_a_path(path):
        raise DataError(f"{path}: no such file or folder")
    try:
        ds = load_dataset(path, subset, split=split)
    except Exception as e:  # noqa: BLE001 - the hub (or its cache) could not give it: one line
        raise DataError(f"{path}: not a local file or folder, and the hub dataset could not be loaded (this machine may "
                        f"have no hub access; HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {_first_line(e)}") from None
    return [dict(r) for r in ds], f"{path}[{split}]"


def _require(row: dict, col: str, source: str, i: int) -> str:
    value = row.get(col)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{source}, row {i} (0-based): missing column {col!r} (columns: {sorted(row)})")
    return str(value)


def _messages(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": text}]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces matched."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def gsm8k(rows: list[dict], source: str, system_prompt: str | None = None, offset: int = 0) -> list[Prompt]:
    """GSM8K rows {question, answer: '...#### 72'} -> prompts whose `answer` column is the final number."""
    out = []
    for i, r in enumerate(rows, start=offset):
        q = _require(r, "question", source, i)
        full = _require(r, "answer", source, i)
        if "####" not in full:
            raise DataError(f"{source}, row {i} (0-based): column 'answer' has no '#### <number>' final answer")
        out.append(Prompt(f"gsm8k:{i}", _messages(f"{q}\n{GSM8K_INSTRUCTION}", system_prompt),
                          {**r, "answer": full.split("####")[-1].strip().replace(",", ""), "solution": full}))
    return out


def math(rows: list[dict], source: str, system_prompt: str | None = None, offset: int = 0) -> list[Prompt]:
    """MATH rows {problem, solution (with \\boxed{}), level, type} -> prompts whose `answer` is the boxed answer.
    A row that already has an `answer` column (MATH-500 style) keeps it."""
    out = []
    for i, r in enumerate(rows, start=offset):
        q = _require(r, "problem", source, i)
        ans = r.get("answer")
        if not ans:
            sol = _require(r, "solution", source, i)
            ans = last_boxed(sol)
            if ans is None:
                raise DataError(f"{source}, row {i} (0-based): column 'solution' has no \\boxed{{...}} answer")
        out.append(Prompt(f"math:{i}", _messages(f"{q}\n{MATH_INSTRUCTION}", system_prompt), {**r, "answer": str(ans)}))
    return out


def chat_messages(value, system_prompt: str | None, where: str) -> list[dict[str, str]]:
    """A conversational prompt (TRL's format: a list of {"role", "content"} messages) checked and copied;
    `system_prompt` goes first only when the messages have no system message. `where` names the file,
    row and column in errors."""
    if not value:
        raise DataError(f"{where}: empty prompt (an empty list of messages)")
    messages = []
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {k} is {type(m).__name__} {m!r}, expected a dict with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise DataError(f"{where}: message {k} has no 'role' (keys: {sorted(m)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {k} ({role}) has no text 'content' (got {type(content).__name__})")
        messages.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{where}: empty prompt (every message's content is empty)")
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_file(rows: list[dict], source: str, prompt_column: str, answer_column: str, system_prompt: str | None = None,
                offset: int = 0) -> list[Prompt]:
    """Rows in TRL's prompt-only formats: the prompt column holds a string (standard) or a list of chat
    messages (conversational); the answer column (e.g. `answer`, `solution`) is also copied to `answer`,
    and the other columns ride along for rewards. `offset` is the first row's number in its file (for
    error messages and uids)."""
    out = []
    for i, r in enumerate(rows, start=offset):
        value = r.get(prompt_column)
        a = _require(r, answer_column, source, i)
        if isinstance(value, (list, tuple)):
            where = f"{source}, row {i} (0-based), column {prompt_column!r}"
            out.append(Prompt(f"file:{i}", chat_messages(value, system_prompt, where), {**r, "answer": a}, conversational=True))
        elif value is None or isinstance(value, str):
            q = _require(r, prompt_column, source, i)
            out.append(Prompt(f"file:{i}", _messages(q, system_prompt), {**r, "answer": a}))
        else:
            raise DataError(f"{source}, row {i} (0-based), column {prompt_column!r}: a prompt is a string or a list of "
                            f"{{role, content}} messages, got {type(value).__name__}")
    return out
