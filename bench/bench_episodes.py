"""The episode loop's cost over plain generation of the same tokens, on the embedded model with a real vLLM engine.

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_episodes [--prompts 16] [--repeats 3] [--out bench/results/episodes.json]

Episodes of 3 tool calls: every turn is constrained to a `lookup` call (vLLM structured outputs: SmolLM2 never calls a
tool unaided) and `rollout.max_turns=4`, so each episode is call, result, call, result, call, result, call (cut at
max_turns): 4 model turns, 3 tool results. Against it, the same prompts (the same token lists the episodes started
from) generate, in one call each, the same four calls back to back, under the same grammar (a regex of four
calls), capped at the episode's own count of model tokens. Tokens/s counts the policy's tokens only; the loop's extra work is the turns' separate
engine calls, the tool calls, the template's rendering of each result and the re-prefill of the inserted tokens
(vLLM's prefix cache keeps the rest). The two ways alternate within one run, to share this machine's noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REGEX = r'<tool_call>\n\{"name": "lookup", "arguments": \{"name": "(Ada Lovelace|Alan Turing|Grace Hopper)"\}\}\n</tool_call>'


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/episodes.json")
    a = p.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from asymre.data import Prompt
    from asymre.envs.templates import resolve_chat_template
    from asymre.models import resolve_model
    from asymre.rollout.base import SamplingSpec
    from asymre.rollout.episodes import EpisodeSpec, run_episodes
    from asymre.rollout.vllm_engine import VLLMGenerator

    engine = VLLMGenerator(resolve_model("smollm2-135m-instruct"), max_model_len=1024, kv_cache_gb=1.0, max_prompt_tokens=512)
    ep = EpisodeSpec(environment="examples.tool_use.env:PeopleDirectory", max_turns=4, max_tokens=600, tool_timeout_s=5.0,
                     chat_template=resolve_chat_template("chatml-tools"))
    prompts = [Prompt(f"q{i}", [{"role": "user", "content": f"Where does person {i} live? Use the lookup tool."}], {}, True)
               for i in range(a.prompts)]
    spec = SamplingSpec(n=1, temperature=1.0, max_new_tokens=48, seed=0, extra={"structured_outputs": {"regex": REGEX}}, episode=ep)
    run_episodes(engine, prompts[:2], spec)  # warm-up: the grammar compiles, the kernels load
    in_engine = [0.0]
    real_sample = engine.sample

    def timed_sample(*args, **kwargs):  # the engine's share of the loop's time; the rest is the loop's own Python
        t = time.perf_counter()
        try:
            return real_sample(*args, **kwargs)
        finally:
            in_engine[0] += time.perf_counter() - t

    rows = []
    for r in range(a.repeats):
        engine.sample, in_engine[0] = timed_sample, 0.0
        t0 = time.perf_counter()
        groups = run_episodes(engine, prompts, replace(spec, seed=r))
        loop_s = time.perf_counter() - t0
        engine.sample, engine_s = real_sample, in_engine[0]
        model_tokens = [t.model_tokens for g in groups for t in g.trajectories]
        turns = [t.episode["turns"] for g in groups for t in g.trajectories]
        calls = sum(sum(t.episode["tool_calls"].values()) for g in groups for t in g.trajectories)
        starts = [g.prompt_ids for g in groups]  # the very token lists the episodes started from
        engine.llm.reset_prefix_cache()
        # the same grammar work: four calls in one constrained generation, capped at the episode's own token count
        plain = replace(spec, episode=None, seed=r, extra={"structured_outputs": {"regex": "(" + REGEX + "\n){3}" + REGEX}},
                        max_new_tokens=max(model_tokens))
        t0 = time.perf_counter()
        outs = engine.sample(starts, plain, max_new_tokens=model_tokens)
        plain_s = time.perf_counter() - t0
        plain_tokens = sum(len(o[0].completion_ids) for o in outs)
        rows.append({"loop_tokens_per_s": sum(model_tokens) / loop_s, "plain_tokens_per_s": plain_tokens / plain_s,
                     "loop_seconds": loop_s, "loop_engine_seconds": engine_s,
                     "plain_seconds": plain_s, "model_tokens": sum(model_tokens), "plain_tokens": plain_tokens,
                     "turns_mean": sum(turns) / len(turns), "tool_calls": calls})
        print(json.dumps(rows[-1]))
    ratio = statistics.median(r["plain_tokens_per_s"] / r["loop_tokens_per_s"] for r in rows)
    out = {"date": time.strftime("%Y-%m-%d"), "prompts": a.prompts, "repeats": rows,
           "loop_overhead": ratio - 1.0, "command": "OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_episodes"}
    print(f"episode loop: {statistics.median(r['loop_tokens_per_s'] for r in rows):.1f} tok/s, plain generation of the same "
          f"tokens: {statistics.median(r['plain_tokens_per_s'] for r in rows):.1f} tok/s, overhead {100 * (ratio - 1):.1f}%")
    Path(a.out).write_text(json.dumps(out, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
