"""Run the AsymRE recipe under `accelerate launch` (2 processes) and write each rank's weight checksum, its
optimizer step count, and whether its generation engine (transformers backend) holds the learner's final weights.

    PYTHONPATH=. accelerate launch --config_file recipes/accelerate/cpu_ddp2.yaml tests/scripts/ddp_recipe.py OUT_DIR key=value ...
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from asymre.config import load_config
from tests.recipe_utils import load_recipe_module


def checksum(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, p in sorted(state.items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())  # any dtype (bf16 under DeepSpeed)
    return h.hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", sys.argv[2:])
    mod = load_recipe_module()
    recipe = mod.AsymRERecipe(cfg)
    recipe.setup()
    before = checksum(recipe.learner.full_state_dict())  # a collective: gathered under ZeRO-3
    seen = []
    real_step = recipe.learner.train_step

    def recording_step(groups):
        seen.extend(g.prompt.uid for g in groups)
        return real_step(groups)

    recipe.learner.train_step = recording_step
    recipe.train()
    final = recipe.learner.full_state_dict()
    engine = recipe.rollout.engine.model.state_dict()  # after finish(): the final policy, pushed to this rank's engine
    engine_diff = max((engine[k].float() - v.float()).abs().max().item() for k, v in final.items())
    rank = recipe.acc.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": recipe.acc.num_processes, "before": before,
                                                       "after": checksum(final), "prompts": seen, "backend": str(recipe.acc.distributed_type),
                                                       "lr": recipe.learner.scheduler.get_last_lr()[0],
                                                       "optimizer_steps": recipe.learner.optimizer_steps(), "learner_steps": recipe.learner.step,
                                                       "engine_diff": engine_diff}))
    recipe.cleanup()


if __name__ == "__main__":
    main()
