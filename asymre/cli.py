"""`asymre` command line: plot a run, evaluate a checkpoint, run the bandit lab.

    asymre plot RUN_DIR [--out FILE]
    asymre eval --config CONFIG [--model PATH_OR_NAME] [key=value ...]
    asymre bandit [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _eval(a) -> int:
    from asymre.config import load_config
    from asymre.evaluate import evaluate
    from asymre.models import check_model_name, resolve_model
    from asymre.rewards import RewardScorer
    from asymre.rollout import make_generator
    from asymre.tasks import build_task

    overrides = list(a.overrides) + ([f"model.name={a.model}"] if a.model else [])
    cfg = load_config(a.config, overrides)
    scorer = RewardScorer(list(cfg.reward.funcs), list(cfg.reward.weights), cfg.reward.timeout_s, cfg.reward.scale,
                          cfg.learner.steps)
    _, prompts = build_task(cfg.task)
    check_model_name(cfg.model.name)
    path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    ro = cfg.rollout
    gen = make_generator(ro.backend, path, cfg.model.dtype, ro.seed, ro.max_prompt_tokens + cfg.eval.max_new_tokens,
                         ro.max_prompt_tokens, ro.gpu_memory_utilization, ro.kv_cache_gb,
                         chat_template_kwargs=dict(cfg.task.chat_template_kwargs))
    try:
        res = evaluate(gen, prompts, scorer, cfg.eval.preset, cfg.eval.k, cfg.eval.max_new_tokens, seed=cfg.learner.seed,
                       generation_kwargs=dict(cfg.eval.generation_kwargs))
    finally:
        gen.close()
        scorer.close()
    print(json.dumps({"model": cfg.model.name, "preset": cfg.eval.preset, **res}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="asymre", description="asymre tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("plot", help="write PNG curves of a run (reward, eval, entropy, staleness, loss)")
    pp.add_argument("run_dir")
    pp.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    pe = sub.add_parser("eval", help="pass@1 / pass@k of a model or checkpoint on a task's held-out prompts")
    pe.add_argument("--config", required=True)
    pe.add_argument("--model", default=None, help="model name, hub id or folder (e.g. RUN/final_model); default: the config's")
    pe.add_argument("overrides", nargs="*")
    pb = sub.add_parser("bandit", help="reproduce the paper's bandit figures")
    pb.add_argument("--out", default="runs/bandit")
    a = p.parse_args(argv)
    if a.cmd == "plot":
        from asymre.plot import plot_run

        print(plot_run(a.run_dir, a.out))
        return 0
    if a.cmd == "eval":
        from asymre.config import InputError

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            return _eval(a)
        except InputError as e:  # a bad config, data file or model name: one line, exit code 2
            print(f"{e.label}: {e}", file=sys.stderr)
            return 2
    from asymre.bandit import main as bandit_main

    bandit_main(["--out", a.out])
    return 0


if __name__ == "__main__":
    sys.exit(main())
