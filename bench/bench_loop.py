"""Benchmark the off-policy loop's parts on the default model and this machine.

    .venv/bin/python -m bench.bench_loop [--repeats 3] [--steps 6] [--out bench/results/loop.json]
    .venv/bin/python -m bench.bench_loop --push-only --repeats 7 --out bench/results/push.json

Reports: learner tokens/s; generation tokens/s through the framework vs the raw vLLM engine on the same
token ids and sampling parameters; weight-push seconds (in-process, through a safetensors folder, and vLLM's own reload_weights for reference;
and into an engine in a worker process, by broadcast (gloo here) and by folder);
and, over a real run of the recipe, the share of step time spent outside generation, forward/backward,
the optimiser step (and the weight push). All numbers come from one run, so ratios are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _timed_vllm_reload(gen, state) -> float:
    t0 = time.perf_counter()
    gen.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items()), "is_checkpoint_format": True})
    gen.llm.reset_prefix_cache()
    return time.perf_counter() - t0


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each part (after one warm-up)")
    p.add_argument("--steps", type=int, default=6, help="recipe steps for the overhead measurement")
    p.add_argument("--out", default="bench/results/loop.json", help="where to write the JSON results")
    p.add_argument("--push-only", action="store_true",
                   help="only the in-process push against vLLM's reload_weights (a one-minute check of the push target)")
    a = p.parse_args()

    from accelerate import Accelerator
    from vllm import SamplingParams

    from asymre.config import load_config
    from asymre.learner import Learner
    from asymre.models import resolve_model
    from asymre.rewards import RewardScorer
    from asymre.rollout.base import SamplingSpec, encode_prompts
    from asymre.rollout.vllm_engine import VLLMGenerator
    from asymre.sync import WeightSync
    from asymre.tasks import build_task
    from bench.launch import run_recipe

    cfg_path = ROOT / "recipes/configs/smollm2_arithmetic_cpu.yaml"
    cfg = load_config(cfg_path)
    path = resolve_model(cfg.model.name)
    train, _ = build_task(cfg.task)
    prompts = train[: cfg.rollout.prompts_per_step]
    ro = cfg.rollout
    res: dict = {"machine": f"{os.cpu_count()} CPU cores", "date": time.strftime("%Y-%m-%d"), "model": cfg.model.name,
                 "prompts": len(prompts), "group_size": ro.group_size, "max_new_tokens": ro.max_new_tokens}

    gen = VLLMGenerator(path, "float32", ro.max_prompt_tokens + ro.max_new_tokens, 0, kv_cache_gb=ro.kv_cache_gb,
                        max_prompt_tokens=ro.max_prompt_tokens)
    if not a.push_only:
        # --- generation: framework vs raw engine, same ids and params, alternated to share the noise
        ids = encode_prompts(gen.tokenizer, prompts, ro.max_prompt_tokens)
        fw_rates, raw_rates = [], []
        for r in range(a.repeats + 1):
            spec = SamplingSpec(n=ro.group_size, temperature=1.0, top_p=1.0, max_new_tokens=ro.max_new_tokens, seed=r)
            t0 = time.perf_counter()
            groups = gen.generate(prompts, spec)
            fw_s = time.perf_counter() - t0
            fw_tok = sum(len(t.completion_ids) for g in groups for t in g.trajectories)
            params = SamplingParams(n=ro.group_size, temperature=1.0, top_p=1.0, max_tokens=ro.max_new_tokens, seed=r)
            t0 = time.perf_counter()
            outs = gen.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
            raw_s = time.perf_counter() - t0
            raw_tok = sum(len(o.token_ids) for out in outs for o in out.outputs)
            if r:  # first round is warm-up
                fw_rates.append(fw_tok / fw_s)
                raw_rates.append(raw_tok / raw_s)
        res["generation_tokens_per_s_framework"] = statistics.median(fw_rates)
        res["generation_tokens_per_s_raw_engine"] = statistics.median(raw_rates)
        res["generation_framework_vs_raw"] = res["generation_tokens_per_s_framework"] / res["generation_tokens_per_s_raw_engine"]

    # --- learner
    learner = Learner(cfg, path, Accelerator(cpu=True), gen.tokenizer)
    if not a.push_only:
        RewardScorer(list(cfg.reward.funcs)).score(groups)
        rates, fb = [], []
        for r in range(a.repeats + 1):
            m = learner.train_step(groups)
            if r:
                rates.append(m["perf/learner_tokens_per_s"])
                fb.append(m["perf/learner_tokens"] / (m["perf/forward_backward_seconds"] + m["perf/optimizer_seconds"]))
        res["learner_tokens_per_s"] = statistics.median(rates)
        res["learner_tokens_per_s_fwd_bwd_opt_only"] = statistics.median(fb)
        res["learner_tokens_per_step"] = m["perf/learner_tokens"]

    # --- weight push
    with tempfile.TemporaryDirectory() as tmp:
        inproc = WeightSync(1, "inprocess", 120, tmp)
        disk = WeightSync(1, "disk", 120, tmp)
        ip = [inproc.push(learner.full_state_dict(), 10 + i, [gen]) for i in range(a.repeats + 1)][1:]
        dk = [disk.push(learner.full_state_dict(), 20 + i, [gen]) for i in range(a.repeats + 1)][1:]
        # reference: the same weights through vLLM's own reload_weights (what our push replaces)
        vr = [_timed_vllm_reload(gen, learner.full_state_dict()) for _ in range(a.repeats + 1)][1:]
    res["push_seconds_inprocess"] = statistics.median(ip)
    res["push_seconds_disk"] = statistics.median(dk)
    res["push_seconds_vllm_reload_weights"] = statistics.median(vr)
    res["push_fast_path"] = bool(gen.fast_refresh)
    gen.close()
    del gen
    if a.push_only:
        _report(res, a.out)
        return

    # --- weight push into a vLLM engine in a worker process (async mode): broadcast vs disk
    from asymre.rollout import generator_from_config
    from asymre.rollout.worker import WorkerPool

    pool = WorkerPool(1, generator_from_config, (load_config(cfg_path, ["rollout.backend=vllm"]), path), None, worker_timeout_s=300)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bc = WeightSync(1, "broadcast", 120, tmp)
            dk = WeightSync(1, "disk", 120, tmp)
            wb = [bc.push(learner.full_state_dict(), 30 + i, pool.handles) for i in range(a.repeats + 1)][1:]
            wd = [dk.push(learner.full_state_dict(), 40 + i, pool.handles) for i in range(a.repeats + 1)][1:]
    finally:
        pool.close()
    res["push_seconds_worker_broadcast"] = statistics.median(wb)
    res["push_seconds_worker_disk"] = statistics.median(wd)
    del learner

    # --- the recipe's own loop: where a step's time goes
    with tempfile.TemporaryDirectory() as tmp:
        out = run_recipe(cfg_path, [f"learner.steps={a.steps}", "eval.at_start=false", "eval.at_end=false",
                                    "checkpoint.save_final_model=false", "logging.progress=false"], tmp)
        rows = [m for m in out["rows"] if "perf/step_seconds" in m][1:]  # skip the first (warm-up) step
    step = sum(m["perf/step_seconds"] for m in rows)
    gen_s = sum(m.get("perf/generation_seconds", 0.0) for m in rows)
    fwd = sum(m["perf/forward_backward_seconds"] for m in rows)
    opt = sum(m["perf/optimizer_seconds"] for m in rows)
    push = sum(m.get("sync/seconds") or 0.0 for m in rows)
    res.update({
        "loop_steps_measured": len(rows), "loop_step_seconds_mean": step / len(rows),
        "loop_share_generation": gen_s / step, "loop_share_forward_backward": fwd / step, "loop_share_optimizer": opt / step,
        "loop_share_weight_push": push / step, "loop_share_other_overhead": (step - gen_s - fwd - opt - push) / step,
        "loop_share_outside_gen_fwd_bwd_opt": (step - gen_s - fwd - opt) / step,
    })
    _report(res, a.out)


def _report(res: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))
    for k, v in res.items():
        print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")


if __name__ == "__main__":
    main()
