"""The recipes: `train.py` (the AsymRE training recipe), `configs/` (its YAML configs), `accelerate/` (accelerate
configs), `sweep.py` (a clone's sweep runner).

Design choice: this folder stays at the top of a clone, where `accelerate launch recipes/train.py --config
recipes/configs/NAME.yaml` finds it and a user copies a recipe to make a variant (torchtune's layout), and the wheel
ships the same files as the package `asymre.recipes` (pyproject.toml maps this folder there, its YAML files as package
data), which `asymre train` launches (`asymre/launch.py`): one copy of each file, nothing to keep in step. The
alternative, moving the code into `asymre/recipes/` behind a thin `recipes/train.py`, would still need the configs
twice. torchtune ships its top-level `recipes/` the same way, as a top-level `recipes` package; here it sits under
`asymre.` so it cannot clash with another project's `recipes`. `sweep.py` ships too but runs from a clone (its sweep
files name repo paths).
"""
