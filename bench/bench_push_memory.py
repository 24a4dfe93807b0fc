"""Peak host memory of one push, on the learner's side, the embedded model (what docs/scaling.md's table is checked
against). Each way runs in a fresh process (memory freed by one way and kept by the allocator would hide
the next one's), after the float32 model is loaded and every page of it read; its extra memory is the high-water mark
(VmHWM, reset by writing `5` to /proc/self/clear_refs on Linux) above what was resident before it.

    .venv/bin/python -m bench.bench_push_memory [--bucket-mb 64] [--out bench/results/push_memory.json]

Ways: a host copy of the whole model in float32 (what FSDP2/ZeRO-3 gathers and the behaviour copy cost before
issue #27) and in bf16 (now: the engine's dtype); a 'disk' push in bf16 (safetensors file written from a bf16 copy);
a 'broadcast' push in bf16 buckets to a receiver in another process (the sender's extra memory: two buckets).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

from asymre.config import load_config
from asymre.models import resolve_model
from asymre.rollout.modes import host_copy
from asymre.sync import WeightChannel, write_weights_folder


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak(fn) -> int:
    """Extra resident bytes at the peak of `fn()` over what was resident before it."""
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    keep = fn()
    peak = _status("VmHWM") - base
    del keep
    return peak


def _receiver(host, port, secret, manifest) -> None:
    ch = WeightChannel(host, port, 1, "gloo", 600.0, secret=secret).connect()
    for _ in ch.receive(manifest):
        pass
    ch.close()


def _load():
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(resolve_model(load_config().model.name), dtype=torch.float32).state_dict()
    for t in state.values():
        t.float().sum()  # every page resident (a safetensors load may map the file lazily)
    return state


def _measure(way: str, bucket_mb: float, q) -> None:
    torch.set_num_threads(1)
    state = _load()
    if way == "host_copy_float32":
        q.put(_peak(lambda: host_copy(state)))
    elif way == "host_copy_bfloat16":
        q.put(_peak(lambda: host_copy(state, torch.bfloat16)))
    elif way == "disk_push_bfloat16":
        with tempfile.TemporaryDirectory() as d:
            q.put(_peak(lambda: write_weights_folder(state, Path(d) / "latest", torch.bfloat16)))
    else:
        manifest = WeightChannel.describe(state, torch.bfloat16, bucket_mb)
        ch = WeightChannel.listen("gloo", 600.0)
        peer = mp.get_context("spawn").Process(target=_receiver, args=(ch.host, ch.port, ch.secret, manifest))
        peer.start()
        ch.connect()
        q.put(_peak(lambda: ch.send(state, manifest)))
        peer.join(600)
        ch.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--out", default="bench/results/push_memory.json")
    a = p.parse_args()
    state = _load()
    fp32 = sum({t.data_ptr(): t.numel() * 4 for t in state.values()}.values())
    del state
    ctx = mp.get_context("spawn")
    results = {}
    for way in ("host_copy_float32", "host_copy_bfloat16", "disk_push_bfloat16", "broadcast_push_bfloat16"):
        q = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(way, a.bucket_mb, q))
        proc.start()
        results[way] = q.get(timeout=900)
        proc.join(60)
    out = {"model_fp32_bytes": fp32, "bucket_mb": a.bucket_mb, "date": time.strftime("%Y-%m-%d"),
           "extra_peak_bytes": results, "as_share_of_fp32_model": {k: round(v / fp32, 3) for k, v in results.items()}}
    for k, v in results.items():
        print(f"{k:30s} {v / 1e6:9.1f} MB  {v / fp32:6.3f} x fp32 model")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
