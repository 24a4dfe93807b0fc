"""Run the AsymRE recipe under `accelerate launch` (2 processes) and write each rank's weight checksum, its
optimizer step count, and whether its generation engine (transformers, or vLLM: its embedding) holds the learner's
final weights.

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


def _embedding(worker) -> torch.Tensor:
    from asymre.rollout.vllm_engine import _engine_model

    return _engine_model(worker).model.embed_tokens.weight.detach().to("cpu", copy=True)


def _device(worker) -> str:
    return str(getattr(worker, "device", "unknown"))


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
    final = recipe.learner.full_state_dict(everywhere=True)  # every rank's engine got them (under FSDP too)
    engine, executor, engine_device = recipe.rollout.engine, None, None  # after finish(): the final policy, pushed to this rank's engine
    if hasattr(engine, "llm"):  # vLLM: its packed CPU layers cannot be read back, its embedding (loaded in place) can
        embedding = engine.llm.collective_rpc(_embedding)[0]
        expected = final["model.embed_tokens.weight"].to(embedding.dtype)  # a bf16 engine holds float32 master weights rounded
        engine_diff = (embedding.float() - expected.float()).abs().max().item()
        executor = engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend
        engine_device = str(engine.llm.collective_rpc(_device)[0])
    else:
        held = engine.model.state_dict()
        engine_diff = max((held[k].float() - v.float()).abs().max().item() for k, v in final.items())
    rank = recipe.acc.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "world": recipe.acc.num_processes, "before": before,
                                                       "after": checksum(final), "prompts": seen, "backend": str(recipe.acc.distributed_type),
                                                       "lr": recipe.learner.scheduler.get_last_lr()[0],
                                                       "optimizer_steps": recipe.learner.optimizer_steps(), "learner_steps": recipe.learner.step,
                                                       "engine_diff": engine_diff, "executor": executor,
                                                       "engine_device": engine_device,
                                                       "current_device": torch.cuda.current_device() if torch.cuda.is_available() else None}))
    recipe.cleanup()


if __name__ == "__main__":
    main()
