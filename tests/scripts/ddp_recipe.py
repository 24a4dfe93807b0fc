"""Run the AsymRE recipe under `accelerate launch` (2 processes) and write each rank's weight checksum.

    PYTHONPATH=. accelerate launch --config_file recipes/accelerate/cpu_ddp2.yaml tests/scripts/ddp_recipe.py OUT_DIR key=value ...
"""

import hashlib
import json
import sys
from pathlib import Path

from asymre.config import load_config
from tests.recipe_utils import load_recipe_module


def checksum(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", sys.argv[2:])
    mod = load_recipe_module()
    recipe = mod.AsymRERecipe(cfg)
    recipe.setup()
    before = checksum(recipe.learner.unwrapped())
    seen = []
    real_step = recipe.learner.train_step

    def recording_step(groups):
        seen.extend(g.prompt.uid for g in groups)
        return real_step(groups)

    recipe.learner.train_step = recording_step
    recipe.train()
    after = checksum(recipe.learner.unwrapped())
    rank = recipe.acc.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": recipe.acc.num_processes, "before": before, "after": after,
                                                       "prompts": seen, "backend": str(recipe.acc.distributed_type),
                                                       "lr": recipe.learner.scheduler.get_last_lr()[0]}))
    recipe.cleanup()


if __name__ == "__main__":
    main()
