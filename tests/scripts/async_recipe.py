"""The recipe's own `main` (recipes/train.py) under `accelerate launch`, with the learner's processes unable to build a
generation engine: in async mode only the worker processes may (they are spawned, so the refusal set in the `__main__`
block below does not reach them).

    PYTHONPATH=. accelerate launch --config_file recipes/accelerate/cpu_ddp2.yaml tests/scripts/async_recipe.py --config C key=value ...
"""

import sys

import asymre.rollout
from tests.recipe_utils import load_recipe_module


def refuse(backend, *args, **kwargs):
    raise AssertionError(f"a {backend!r} generation engine was built in a learner process")


if __name__ == "__main__":
    asymre.rollout.make_generator = refuse
    sys.exit(load_recipe_module().main(sys.argv[1:]))
