"""Two CPU processes (gloo) shard a small model with FSDP2 (`fully_shard`) and gather it with
`asymre.gather.gather_fsdp2`; each rank writes whether it got every weight whole, and whether the tied pair stayed one
tensor. `torchrun --nproc_per_node 2 tests/scripts/fsdp2_gather.py OUT_DIR`"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from asymre.gather import gather_fsdp2


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = Tied()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(model.body, mesh=mesh)
    fully_shard(model, mesh=mesh)
    shard_rows = model.state_dict()["body.weight"].to_local().shape[0]
    whole = gather_fsdp2(model)
    rank = dist.get_rank()
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps({
        "names": sorted(whole), "reference": sorted(reference), "shard_rows": shard_rows,
        "equal": all(torch.equal(whole[k], reference[k]) for k in reference),
        "on_host": all(t.device.type == "cpu" for t in whole.values()),
        "tied_once": whole["head.weight"] is whole["embed.weight"]}))
    # both ranks done before either tears gloo down: a rank leaving while the other still talks aborted it
    # ("terminate called without an active exception", exit -6) about once in three runs
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
