"""Push time per GB over the 'broadcast' weight channel (gloo: the CPU channel; learner and peer in two threads of
one process, a real two-member process group), the embedded model's weights.

    .venv/bin/python -m bench.bench_push [--repeats 5] [--bucket-mb 256] [--out bench/results/push_channel.json]

Three ways, one run (so the ratios compare): the channel as it was before buckets (one blocking broadcast per
tensor, float32 as the learner's masters are), buckets in float32, and buckets in the engine's bf16 (what a
model.dtype=bfloat16 run sends). Seconds per GB are per GB of the float32 weights, the same model each time, so
they compare the time a push of one model takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

from asymre.config import load_config
from asymre.models import resolve_model
from asymre.sync import WeightChannel


def _per_tensor_send(ch: WeightChannel, state, timeout) -> None:
    """The channel before buckets: each tensor its own blocking collective, in its own dtype."""
    for name, _, _, alias, _ in WeightChannel.describe(state)["tensors"]:
        if alias is None:
            ch.group.broadcast(state[name].contiguous(), 0).wait(timeout)


def _per_tensor_receive(ch: WeightChannel, manifest, timeout) -> None:
    for _, shape, dtype, alias, _ in manifest["tensors"]:
        if alias is None:
            buf = torch.empty(shape, dtype=getattr(torch, dtype))
            ch.group.broadcast(buf, 0).wait(timeout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--out", default="bench/results/push_channel.json")
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(resolve_model(load_config().model.name), dtype=torch.float32).state_dict()
    gb = sum({t.data_ptr(): t.numel() * 4 for t in state.values()}.values()) / 1e9
    ch = WeightChannel.listen("gloo", 600.0)
    peer: dict = {}
    th = threading.Thread(target=lambda: peer.setdefault("ch", WeightChannel(ch.host, ch.port, 1, "gloo", 600.0, secret=ch.secret).connect()))
    th.start()
    ch.connect()
    th.join()
    timeout = timedelta(seconds=600)
    ways = {
        "per_tensor_float32 (before)": (None, None),
        "buckets_float32": (None, a.bucket_mb),
        "buckets_bfloat16": (torch.bfloat16, a.bucket_mb),
    }
    results = {}
    for way, (dtype, bucket_mb) in ways.items():
        manifest = WeightChannel.describe(state, dtype, bucket_mb or 64.0)
        times = []
        for _ in range(a.repeats + 1):  # one warm-up
            if bucket_mb is None:
                recv = threading.Thread(target=_per_tensor_receive, args=(peer["ch"], manifest, timeout))
            else:
                recv = threading.Thread(target=lambda m=manifest: [None for _ in peer["ch"].receive(m)])
            t0 = time.perf_counter()
            recv.start()
            if bucket_mb is None:
                _per_tensor_send(ch, state, timeout)
            else:
                ch.send(state, manifest)
            recv.join()
            times.append(time.perf_counter() - t0)
        median = statistics.median(times[1:])
        wire = sum(m[4] is not None and torch.Size(m[1]).numel() * getattr(torch, m[2]).itemsize or 0 for m in manifest["tensors"])
        results[way] = {"seconds": round(median, 4), "seconds_per_gb_fp32_weights": round(median / gb, 4), "wire_gb": round(wire / 1e9, 4)}
        print(f"{way:30s} {median:7.3f} s  {median / gb:7.3f} s/GB  wire {wire / 1e9:.3f} GB")
    base = results["per_tensor_float32 (before)"]["seconds"]
    for r in results.values():
        r["speedup_vs_before"] = round(base / r["seconds"], 2)
    out = {"model_fp32_gb": round(gb, 4), "bucket_mb": a.bucket_mb, "repeats": a.repeats, "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    peer["ch"].close()
    ch.close()


if __name__ == "__main__":
    main()
