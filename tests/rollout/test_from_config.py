"""Engines built from the run's config (`generator_from_config`): what reaches a backend's factory."""

from types import SimpleNamespace

import pytest

from asymre.config import ConfigError, load_config
from asymre.rollout import check_rollout_config, generator_from_config

BUILT = []


def factory(model_path, dtype="float32", seed=0, chat_template_kwargs=None):
    """A user's backend factory (rollout.backend='pkg.mod:factory') that records its arguments."""
    BUILT.append({"model_path": model_path, "dtype": dtype, "seed": seed, "chat_template_kwargs": chat_template_kwargs})
    return SimpleNamespace(version=0)


def old_factory(model_path, dtype="float32", seed=0):
    return SimpleNamespace(version=0)


def test_custom_backend_gets_the_runs_dtype_rank_seed_and_chat_template_kwargs():
    BUILT.clear()
    cfg = load_config(None, [f"rollout.backend={__name__}:factory", "rollout.seed=7", "model.dtype=bfloat16",
                             "task.chat_template_kwargs={enable_thinking: false}"])
    check_rollout_config(cfg)
    generator_from_config(cfg, "/models/m", rank=2)
    assert BUILT == [{"model_path": "/models/m", "dtype": "bfloat16", "seed": 9, "chat_template_kwargs": {"enable_thinking": False}}]
    generator_from_config(load_config(None, [f"rollout.backend={__name__}:old_factory"]), "/models/m")  # none set: not passed


def test_custom_backend_that_cannot_take_chat_template_kwargs_is_refused_at_start_up():
    cfg = load_config(None, [f"rollout.backend={__name__}:old_factory", "task.chat_template_kwargs={enable_thinking: false}"])
    with pytest.raises(ConfigError, match="old_factory: the factory takes no chat_template_kwargs"):
        check_rollout_config(cfg)
    with pytest.raises(ConfigError, match="cannot load the factory"):
        check_rollout_config(load_config(None, [f"rollout.backend={__name__}:missing", "task.chat_template_kwargs={a: 1}"]))
