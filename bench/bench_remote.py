"""One generation round through a real vLLM server against the same round through an in-process vLLM engine.

    python -m bench.bench_remote [--prompts 16] [--group 4] [--tokens 32]

The server is `python -m vllm.entrypoints.openai.api_server` on the embedded model (tests/vllm_server.py: loopback,
float32, 1 GiB KV cache, max length 256), reached through asymre's remote backend (a round's requests in flight at
once; also timed one request at a time, as the client sent them before). The in-process engine is asymre's
VLLMGenerator with the same settings, started after the server is gone (two engines at once would share this
machine's cores). Each side: one warm-up round, then the mean of `--rounds` timed rounds of the default task's
prompts. Results: bench/results/remote.json; docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.launch import ROOT


def _time_rounds(engine, prompts, spec, rounds: int) -> float:
    engine.generate(prompts, spec)  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        engine.generate(prompts, spec)
    return (time.perf_counter() - t0) / rounds


def main() -> None:
    from asymre.config import load_config
    from asymre.models import resolve_model
    from asymre.rollout.base import SamplingSpec
    from asymre.rollout.remote import RemoteVLLMGenerator
    from asymre.rollout.vllm_engine import VLLMGenerator
    from asymre.tasks import build_task
    from tests.vllm_server import vllm_server

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "remote.json"))
    a = p.parse_args()
    path = resolve_model("smollm2-135m-instruct")
    train, _ = build_task(load_config(str(ROOT / "recipes/configs/smollm2_arithmetic_cpu.yaml")).task)
    prompts = train[: a.prompts]
    spec = SamplingSpec(n=a.group, temperature=1.0, max_new_tokens=a.tokens, seed=0)
    import asymre.rollout.remote as remote_module

    with tempfile.TemporaryDirectory() as cwd, vllm_server(path, Path(cwd)) as url:
        client = RemoteVLLMGenerator(url, path, max_prompt_tokens=128)
        remote = _time_rounds(client, prompts, spec, a.rounds)
        remote_module.MAX_IN_FLIGHT = 1  # the old client: one request at a time
        sequential = _time_rounds(client, prompts, spec, a.rounds)
    engine = VLLMGenerator(path, "float32", max_model_len=256, seed=0, kv_cache_gb=1.0, max_prompt_tokens=128)
    local = _time_rounds(engine, prompts, spec, a.rounds)
    engine.close()
    result = {"date": str(date.today()), "prompts": a.prompts, "group": a.group, "max_new_tokens": a.tokens, "rounds": a.rounds,
              "remote_round_s": round(remote, 3), "remote_one_request_at_a_time_round_s": round(sequential, 3),
              "in_process_round_s": round(local, 3), "remote_over_in_process": round(remote / local, 3)}
    print(json.dumps(result))
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
