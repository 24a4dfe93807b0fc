"""One source for the config reference: `describe()` lists every key of the tree with its default, help and
valid range; `--help` (`help_text`) and docs/config.md (`markdown`) are both rendered from it, and the
checked-in docs/config.md must equal a fresh rendering."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from asymre import config
from asymre.config import Config, ConfigKey, describe, help_text, markdown, yaml_value

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "config.md"
REGENERATE = "make docs  (or: python -m asymre.config > docs/config.md)"


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf field of the tree, found from the type annotations (not the way `describe` walks it)."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, dataclasses.Field]] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f))
    return out


def _value(cfg: Config, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_describe_covers_every_field_in_declaration_order():
    assert [r.key for r in describe()] == [key for key, _ in _leaves(Config)]


def test_describe_rows_carry_the_fields_default_help_and_valid():
    fields = dict(_leaves(Config))
    defaults = Config()
    for row in describe():
        assert isinstance(row, ConfigKey)
        assert row.default == _value(defaults, row.key), row.key
        assert row.help == fields[row.key].metadata["help"], row.key
        assert row.valid == fields[row.key].metadata.get("valid"), row.key


def test_every_field_has_a_help_string():
    missing = [key for key, f in _leaves(Config) if not f.metadata.get("help", "").strip()]
    assert not missing, f"config fields without help (declare them with _f(default, help)): {missing}"


def test_describe_refuses_a_field_without_help():
    @dataclasses.dataclass
    class Section:
        documented: int = config._f(1, "Has help.")
        bare: int = 2

    with pytest.raises(TypeError, match=r"sec\.bare has no help"):
        describe(Section, "sec.")


def test_yaml_value_renders_defaults_as_yaml_writes_them():
    assert [yaml_value(v) for v in (None, True, False, "01", "auto", 6e-8, [0.9, 0.999], ["+"], {}, [])] == [
        "null", "true", "false", "'01'", "auto", "6.0e-08", "[0.9, 0.999]", "[+]", "{}", "[]"]
    for row in describe():  # and every rendered default reads back as the default
        assert yaml.safe_load(yaml_value(row.default)) == row.default, row.key


def test_help_text_names_every_key_with_its_default_and_valid_range():
    text = help_text()
    lines = text.splitlines()
    for row in describe():
        head = f"  {row.key} = {yaml_value(row.default)}"
        at = [i for i, line in enumerate(lines) if line == head or line.startswith(head + " ")]
        assert len(at) == 1, f"{row.key}: no single line starting {head!r}"
        if row.valid:  # the range closes the entry: the key's line and the help's indented continuation lines
            more = itertools.takewhile(lambda line: line.startswith(" " * 10), lines[at[0] + 1:])
            entry = " ".join(line.strip() for line in [lines[at[0]], *more])
            assert entry.endswith(f"[valid: {row.valid}]"), row.key
    assert max(len(line) for line in lines) <= 120
    for section in ("model:", "learner:", "logging:", "top level:"):
        assert section in lines


def test_docs_config_md_is_current():
    """docs/config.md is generated; when this fails, regenerate it rather than editing it."""
    want = markdown()
    have = DOC.read_text() if DOC.is_file() else ""
    if have != want:
        diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True),
                                                 "docs/config.md", "markdown()"))[:40])
        pytest.fail(f"docs/config.md is out of date with asymre/config.py; regenerate it with: {REGENERATE}\n{diff}")


def test_markdown_escapes_pipes_in_cells(monkeypatch):
    rows = [ConfigKey("sec.key", "a|b", "Either x | y.", "[0, 1]"), ConfigKey("top", None, "Top.", None)]
    monkeypatch.setattr(config, "describe", lambda: rows)
    md = markdown()
    assert "| `sec.key` | `a\\|b` | `[0, 1]` | Either x \\| y. |" in md
    assert "## sec" in md and "## Top level" in md and "| `top` | `null` |  | Top. |" in md
    assert "python -m asymre.config > docs/config.md" in md and "make docs" in md


def test_python_m_asymre_config_prints_the_markdown_and_import_is_silent():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "asymre.config"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert run.stdout == markdown() and not run.stderr
    imp = subprocess.run([sys.executable, "-c", "import asymre.config"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert imp.stdout == "" and imp.stderr == ""


def test_training_command_help_lists_every_config_key(capsys):
    """`recipes/train.py --help` shows describe()'s listing: every key with its default and its help."""
    from tests.recipe_utils import load_recipe_module

    with pytest.raises(SystemExit) as e:
        load_recipe_module().main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out
    flat = " ".join(out.split())  # the help text wraps
    for row in describe():
        assert f"  {row.key} = {yaml_value(row.default)}" in out, row.key
        assert " ".join(row.help.split()) in flat, row.key
