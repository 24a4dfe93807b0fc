"""Two CPU processes (gloo) build asymre's `Learner` under accelerate's real FSDP2 plugin with bf16 mixed precision
(the settings of recipes/accelerate/fsdp.yaml: ACCELERATE_USE_FSDP, FSDP_VERSION=2, ACCELERATE_MIXED_PRECISION=bf16,
set by the test) and take one step; each rank writes what it saw. `torchrun --nproc_per_node 2
tests/scripts/fsdp2_learner.py OUT_DIR MODEL_DIR`"""

import inspect
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, InitProcessGroupKwargs, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from asymre.config import load_config
from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.learner import Learner


def main() -> None:
    out, model = sys.argv[1], sys.argv[2]
    acc = Accelerator(cpu=True, mixed_precision="bf16", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=120))])
    # accelerate 1.16 (state.py, AcceleratorState.__init__) turns on FSDP only for MULTI_GPU-like types, never MULTI_CPU:
    # the plugin state that a GPU launch of recipes/accelerate/fsdp.yaml gets is put in place by hand, everything after
    # it (prepare -> _prepare_fsdp2 -> fsdp2_prepare_model -> torch's fully_shard on a gloo CPU mesh) is accelerate's own
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True, state_dict_type="FULL_STATE_DICT")
    plugin.set_mixed_precision("bf16")
    PartialState().distributed_type = acc.state.distributed_type = DistributedType.FSDP  # each AcceleratorState() re-reads PartialState's
    acc.state.fsdp_plugin = plugin
    # several micro-batches a step
    cfg = load_config(None, ["learner.lr=1e-2", "learner.max_grad_norm=0", "model.dtype=bfloat16", "learner.micro_batch_tokens=8"])
    learner = Learner(cfg, model, acc)
    before = {k: v.clone() for k, v in learner.full_state_dict(everywhere=True).items()}
    trajs = [Trajectory([5, 6, 7], "", "stop", reward=1.0), Trajectory([8, 9], "", "stop", reward=0.0)]
    groups = [TrajectoryGroup(Prompt(f"p{acc.process_index}", [{"role": "user", "content": "q"}]), [1, 2, 3], trajs, 0)]
    metrics = learner.train_step(groups)
    after = learner.full_state_dict(everywhere=True)
    # a push from the main process alone, in the engine's dtype: every rank takes part in the all-gathers (a rank that
    # skipped one, e.g. the tied lm_head, would hang the others), the main process keeps bf16 host copies, the other none
    pushed = learner.full_state_dict(dtype=torch.bfloat16)
    # a colocated push's stream: one tensor all-gathered as it is read, left on the device, in the engine's dtype
    stream = learner.stream_state(torch.bfloat16)
    lazy = inspect.isgenerator(stream)
    streamed = dict(stream)
    Path(out, f"rank{acc.process_index}.stream").write_text(json.dumps({
        "lazy": lazy, "names": sorted(streamed), "tied_once": streamed["lm_head.weight"] is streamed["model.embed_tokens.weight"],
        "equal": all(v.dtype == torch.bfloat16 and torch.equal(v, after[k].to(torch.bfloat16)) for k, v in streamed.items())}))
    Path(out, f"rank{acc.process_index}.pushed").write_text(json.dumps({
        "names": sorted(pushed), "bf16": all(v.dtype == torch.bfloat16 for v in pushed.values()),
        "on_host": all(v.device.type == "cpu" for v in pushed.values()),
        "equal": all(torch.equal(pushed[k], after[k].to(torch.bfloat16)) for k in pushed),
        "tied_once": pushed.get("lm_head.weight") is pushed.get("model.embed_tokens.weight") if pushed else None}))
    Path(out, f"rank{acc.process_index}.json").write_text(json.dumps({
        "distributed_type": str(acc.distributed_type), "fsdp2": bool(acc.is_fsdp2), "native_amp": bool(acc.native_amp),
        "loss_finite": bool(torch.isfinite(torch.tensor(metrics["loss/value"]))),
        "sharded": all(isinstance(p, DTensor) for p in learner.model.parameters()), "reduce_each_micro_batch": not learner.skip_sync,
        "micro_batches": metrics["learner/micro_batches"], "changed": sum(not torch.equal(before[k], after[k]) for k in before),
        "tensors": len(before)}))
    acc.end_training()


if __name__ == "__main__":
    main()
