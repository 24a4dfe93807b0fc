"""Run the recipe scripts (`recipes/train.py`, `recipes/sweep.py`) in this process, for tests that reach into them."""

import runpy
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def load_recipe_module(name: str = "train") -> SimpleNamespace:
    """The names `recipes/<name>.py` defines, run as a script is (with runpy), short of its `__main__` block."""
    return SimpleNamespace(**runpy.run_path(str(ROOT / "recipes" / f"{name}.py"), run_name=f"recipes_{name}"))


def run_recipe(cfg) -> dict:
    """setup -> train -> cleanup of the AsymRE recipe in this process; returns train()'s summary."""
    recipe = load_recipe_module().AsymRERecipe(cfg)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


def worker_pool(model_path, backend: str, **kw):
    """One generation worker process with `backend` (a real one, or a fake from tests/fakes.py) on the
    embedded model, small enough for CPU tests."""
    from functools import partial

    from asymre.rollout import make_generator
    from asymre.rollout.worker import WorkerPool

    return WorkerPool(1, partial(make_generator, backend, model_path, max_model_len=256, max_prompt_tokens=128, kv_cache_gb=0.5), (),
                      None, **kw)


def lend_engine(engine, max_prompt_tokens: int = 128, chat_template_kwargs: dict | None = None):
    """The shared engine back at the embedded model's weights (version 0), set up as a fresh one would be."""
    engine.load_weights(iter(engine.original.items()), 0)
    engine.max_prompt_tokens = max_prompt_tokens
    engine.chat_template_kwargs = dict(chat_template_kwargs or {})
    engine.close = lambda: None  # a borrower's cleanup must not shut the session's engine down
    return engine
