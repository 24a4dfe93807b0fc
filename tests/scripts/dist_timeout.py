"""Two learner ranks built by the recipe with a short learner.dist_timeout_s: rank 0 stays away from a barrier
longer than that, rank 1 must fail at the configured timeout (not torch's default) with the recipe's one line.

    PYTHONPATH=. accelerate launch --config_file recipes/accelerate/cpu_ddp2.yaml tests/scripts/dist_timeout.py OUT_DIR TIMEOUT_S
"""

import json
import sys
import time
from pathlib import Path

from asymre.config import load_config
from tests.recipe_utils import load_recipe_module


def main() -> None:
    out, timeout_s = Path(sys.argv[1]), float(sys.argv[2])
    mod = load_recipe_module()
    cfg = load_config(None, [f"learner.dist_timeout_s={timeout_s}", f"logging.run_dir={out}/run"])
    recipe = mod.AsymRERecipe(cfg)  # builds the Accelerator, and with it the process group
    rank = recipe.acc.process_index
    record = {"rank": rank, "world": recipe.acc.num_processes}
    if rank == 0:
        time.sleep(3 * timeout_s + 5)  # away from the barrier well past the timeout
    else:
        t0 = time.monotonic()
        try:
            recipe.acc.wait_for_everyone()
            record["error"] = None
        except Exception as e:  # noqa: BLE001 - what the recipe's main would say about it
            record["error"] = mod.collective_timeout(e, cfg)
        record["waited_s"] = time.monotonic() - t0
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
