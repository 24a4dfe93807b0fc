"""Load `recipes/asymre.py` (a script, not a package module) for in-process tests."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_recipe_module():
    spec = importlib.util.spec_from_file_location("asymre_recipe", ROOT / "recipes" / "asymre.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    from asymre.rollout import make_generator
    from asymre.rollout.worker import WorkerPool

    return WorkerPool(1, make_generator, (backend, model_path, "float32", 0, 256, 128, 0.5, 0.5), None, **kw)


def lend_engine(engine, max_prompt_tokens: int = 128, chat_template_kwargs: dict | None = None):
    """The shared engine back at the embedded model's weights (version 0), set up as a fresh one would be."""
    engine.load_weights(iter(engine.original.items()), 0)
    engine.max_prompt_tokens = max_prompt_tokens
    engine.chat_template_kwargs = dict(chat_template_kwargs or {})
    engine.close = lambda: None  # a borrower's cleanup must not shut the session's engine down
    return engine
