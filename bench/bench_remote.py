"""One generation round through a remote vLLM server (`rollout.server_urls`) against the same round through an
in-process vLLM engine (issue #14: within 1.5x), in one run on this machine.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_remote [--repeats 3] [--out bench/results/remote.json]

A round is the default task's prompts (16 prompts x G = 4 samples, 32 new tokens at most, temperature 1, the
run's chat template): the server is started as the tests start it (`tests/vllm_server.py`: loopback, its own
working directory, float32, 1 GiB of KV cache), timed through `RemoteVLLMGenerator.generate` after a warm-up
round, then killed; then an in-process engine (`generator_from_config`, backend vllm, the same KV cache) times the
same rounds. Each repeat draws fresh prompts (the same ones on both sides), so neither side answers from its
prefix cache. For the record it also times one round sent the old way, one request per prompt after another.
The engines never run at once. The server runs twice: as started by default, where vLLM's CPU backend binds its
worker process to one core and keeps the other for its scheduler process (reserve_cpu_num=1: on this 2-core
machine, half the cores), and with VLLM_CPU_NUM_OF_RESERVED_CPU=0 (the worker's threads on both cores, like the
in-process engine's); `--variants default` skips the second. With the first server it also times a weight push into
it: through a folder ('disk') and streamed over a gloo channel ('broadcast').
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rounds(gen, rounds, spec) -> list[float]:
    """Seconds per round; the first round (the warm-up) is left out."""
    out = []
    for prompts in rounds:
        t0 = time.perf_counter()
        groups = gen.generate(prompts, spec)
        out.append(time.perf_counter() - t0)
        assert len(groups) == len(prompts) and all(len(g.trajectories) == spec.n for g in groups)
    return out[1:]


def _pushes(remote, model_path: str, scratch: Path) -> dict:
    """Seconds of one weight push into the server (after a first, untimed one each): 'disk' (a safetensors folder
    written, then loaded by the server) and 'broadcast' (streamed over a gloo WeightChannel into the server's worker,
    no folder); the medians of 3."""
    from concurrent.futures import ThreadPoolExecutor

    from asymre.rollout.vllm_receiver import RECEIVER
    from asymre.sync import WeightChannel, read_weights_folder, write_weights_folder

    remote._check_receiver()  # the tests' server runs the receiver (RECEIVER)
    state = dict(read_weights_folder(model_path))
    out: dict = {"push_receiver": RECEIVER}
    disk = []
    for v in range(4):
        t0 = time.perf_counter()
        remote.load_weights(write_weights_folder(state, scratch / "weights"), v + 1)
        disk.append(time.perf_counter() - t0)
    out["push_disk_s"] = disk[1:]
    channel = WeightChannel.listen("gloo", 300.0)
    with ThreadPoolExecutor(1) as pool:
        joined = pool.submit(remote.open_channel, channel.host, channel.port, "gloo", 300.0, channel.secret)
        channel.connect()
        joined.result()
        meta, streamed = WeightChannel.describe(state), []
        for v in range(4):
            t0 = time.perf_counter()
            loaded = pool.submit(remote.receive_broadcast, meta, v + 10)
            channel.send(state, meta)
            loaded.result()
            streamed.append(time.perf_counter() - t0)
    channel.close()
    out["push_broadcast_s"] = streamed[1:]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default="default,reserved0", help="server settings to time: default, reserved0")
    p.add_argument("--out", default="bench/results/remote.json")
    a = p.parse_args()

    from asymre.config import load_config
    from asymre.models import resolve_model
    from asymre.rollout import generator_from_config
    from asymre.rollout.base import SamplingSpec, encode_prompts
    from asymre.tasks import build_task
    from tests.vllm_server import vllm_server

    cfg = load_config(ROOT / "recipes/configs/smollm2_arithmetic_cpu.yaml",
                      ["rollout.backend=vllm", f"rollout.prompts_per_step={a.prompts}", f"rollout.group_size={a.group_size}",
                       f"rollout.max_new_tokens={a.max_new_tokens}"])
    path = resolve_model(cfg.model.name)
    train, _ = build_task(cfg.task)
    rounds = [train[r * a.prompts:(r + 1) * a.prompts] for r in range(a.repeats + 2)]  # warm-up, repeats, one-by-one
    spec = SamplingSpec(n=a.group_size, temperature=1.0, max_new_tokens=a.max_new_tokens, seed=0)
    result: dict = {"date": str(date.today()), "prompts": a.prompts, "group_size": a.group_size, "max_new_tokens": a.max_new_tokens,
                    "repeats": a.repeats}

    for variant in a.variants.split(","):
        env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"} if variant == "reserved0" else {}
        with tempfile.TemporaryDirectory() as cwd, vllm_server(path, Path(cwd), env=env) as url:
            remote = generator_from_config(cfg, path, server_url=url)
            result[f"remote_{variant}_s"] = _rounds(remote, rounds[:-1], spec)
            ids = encode_prompts(remote.tokenizer, rounds[-1], remote.max_prompt_tokens)
            t0 = time.perf_counter()
            for prompt, pid in zip(rounds[-1], ids):  # the old client: one request per prompt, one after another
                remote._one(prompt, pid, spec)
            result[f"remote_{variant}_one_by_one_s"] = time.perf_counter() - t0
            if variant == a.variants.split(",")[0]:
                result.update(_pushes(remote, path, Path(cwd)))
            remote.close()

    local = generator_from_config(cfg, path)
    result["inprocess_s"] = _rounds(local, rounds[:-1], spec)
    local.close()

    inproc = statistics.median(result["inprocess_s"])
    print(f"round of {a.prompts} prompts x {a.group_size} samples, {a.max_new_tokens} new tokens at most (median of {a.repeats}):")
    print(f"  in-process engine: {inproc:.2f} s  {[round(x, 2) for x in result['inprocess_s']]}")
    for variant in a.variants.split(","):
        med = statistics.median(result[f"remote_{variant}_s"])
        result[f"ratio_{variant}"] = med / inproc
        print(f"  server ({variant}), a round at once: {med:.2f} s  {[round(x, 2) for x in result[f'remote_{variant}_s']]}  "
              f"= {med / inproc:.2f}x in-process (target <= 1.5); one request after another: "
              f"{result[f'remote_{variant}_one_by_one_s']:.2f} s")
    print(f"  a weight push into the server: disk {statistics.median(result['push_disk_s']):.2f} s "
          f"{[round(x, 2) for x in result['push_disk_s']]}, broadcast (gloo) {statistics.median(result['push_broadcast_s']):.2f} s "
          f"{[round(x, 2) for x in result['push_broadcast_s']]}")
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
