"""`asymre train`: the packaged training recipe under `accelerate launch`, as torchtune's `tune run` launches its own.

    asymre train --config smollm2_arithmetic_cpu [--accelerate-config cpu] [--dry-run] [LAUNCHER_ARGS] [key=value ...]

runs `python -m accelerate.commands.launch [--config_file A] [LAUNCHER_ARGS] <recipes>/train.py --config C key=value ...`
with this interpreter (so a venv that is not activated works too). `<recipes>` is the `asymre.recipes` package of an
installed wheel (the clone's top-level `recipes/`, shipped as package data: recipes/__init__.py says why), or a clone's
`recipes/` when asymre runs from its source tree. `--config` and `--accelerate-config` take a file or the name of a
packaged one; with no `--accelerate-config` a machine without a GPU gets the packaged `cpu.yaml` and a GPU machine
accelerate's own default (the user's `accelerate config` file, else accelerate's built-in defaults). Words of the form
key=value are the recipe's overrides; every other word goes to `accelerate launch` (`--num_processes 2`).
Alternative left out: running the recipe in this process, which would lose multi-process launches and the user's
accelerate config.
"""

from __future__ import annotations

import sys
from pathlib import Path

from asymre.config import ConfigError


def recipes_dir() -> Path:
    """The folder holding train.py, configs/ and accelerate/: installed (asymre/recipes) or a clone's recipes/."""
    here = Path(__file__).resolve().parent
    for folder in (here / "recipes", here.parent / "recipes"):
        if (folder / "train.py").is_file() and (folder / "configs").is_dir():
            return folder
    raise FileNotFoundError(f"no recipes folder next to {here} (an asymre install without its package data?)")


def packaged(kind: str) -> dict[str, Path]:
    """The packaged YAML files of `kind` ('configs' or 'accelerate'), by name (the file name without .yaml)."""
    return {p.stem: p for p in sorted((recipes_dir() / kind).glob("*.yaml"))}


def resolve_yaml(value: str, kind: str, flag: str) -> str:
    """A file the user names (as typed: the launch runs in this folder), else the packaged file of that name."""
    if Path(value).is_file():
        return value
    named = packaged(kind).get(value.removesuffix(".yaml"))
    if named is None:
        raise ConfigError(f"{flag} {value}: no such file, and not a packaged one ({', '.join(packaged(kind))})")
    return str(named)


def train_command(config: str | None, accelerate_config: str | None, words: list[str], has_gpu: bool) -> list[str]:
    """The `accelerate launch` command line of `asymre train`; `words` are its other arguments, in order."""
    overrides = [w for w in words if "=" in w and not w.startswith("-")]
    launcher = [w for w in words if not ("=" in w and not w.startswith("-"))]
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        cmd += ["--config_file", resolve_yaml(accelerate_config, "accelerate", "--accelerate-config")]
    elif not has_gpu and not any(w.split("=")[0] == "--config_file" for w in launcher):
        cmd += ["--config_file", str(packaged("accelerate")["cpu"])]
    cmd += [*launcher, str(recipes_dir() / "train.py")]
    if config is not None:
        cmd += ["--config", resolve_yaml(config, "configs", "--config")]
    return cmd + overrides
