"""`asymre` command line: train, plot a run, evaluate a checkpoint, run the bandit lab.

    asymre train [--config NAME_OR_FILE] [--accelerate-config NAME_OR_FILE] [--dry-run] [key=value ...]
    asymre plot RUN_DIR [--out FILE]
    asymre show RUN_DIR [--step N] [-n K]
    asymre export CHECKPOINT OUT [--behaviour] [--push-to-hub REPO]
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
    from asymre.rollout import check_episodes, check_rollout_config, generator_from_config
    from asymre.rollout.episodes import episode_spec
    from asymre.tasks import build_task

    overrides = list(a.overrides) + ([f"model.name={a.model}"] if a.model else [])
    cfg = load_config(a.config, overrides)
    scorer = RewardScorer.from_config(cfg)
    _, prompts = build_task(cfg.task, cfg.rollout.tool_parser)
    check_model_name(cfg.model.name)
    check_rollout_config(cfg)
    model_path = resolve_model(cfg.model.name, cfg.model.cache_dir)
    check_episodes(cfg, model_path)
    gen = generator_from_config(cfg, model_path)
    try:
        res = evaluate(gen, prompts, scorer, cfg.eval.preset, cfg.eval.k, cfg.eval.max_new_tokens, seed=cfg.learner.seed,
                       generation_kwargs=dict(cfg.eval.generation_kwargs), episode=episode_spec(cfg))
    finally:
        gen.close()
        scorer.close()
    print(json.dumps({"model": cfg.model.name, "preset": cfg.eval.preset, **res}, indent=1))
    return 0


def show(run_dir: str, step: int | None = None, n: int = 8) -> str:
    """The sampled completions of one step (the latest by default) from RUN_DIR/completions.jsonl, as text."""
    from pathlib import Path

    path = Path(run_dir) / "completions.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no completions logged (logging.completions_every=0, or the run has no step yet)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    step = rows[-1]["step"] if step is None else step
    rows = [r for r in rows if r["step"] == step]
    if not rows:
        raise ValueError(f"{path}: no completions at step {step}")
    out = [f"step {step}: {len(rows)} samples (showing {min(n, len(rows))}), policy version {rows[0]['policy_version']}"]
    for r in rows[:n]:
        scores = ", ".join(f"{k.rsplit(':', 1)[-1]}={v:.2f}" if isinstance(v, (int, float)) else f"{k.rsplit(':', 1)[-1]}=-"
                           for k, v in r["rewards"].items())
        out.append(f"- reward {r['reward']:.2f} ({scores}) advantage {r['advantage']:+.2f} [{r['finish_reason']}, "
                   f"{r['completion_tokens']} tokens]\n  prompt: {r['prompt']!r}\n  completion: {r['completion']!r}")
    return "\n".join(out)


def _train_parser(sub) -> None:
    from asymre.config import help_text
    from asymre.launch import packaged

    pt = sub.add_parser("train", help="train: the packaged recipe under `accelerate launch`", allow_abbrev=False,
                        usage="asymre train [--config C] [--accelerate-config A] [--dry-run] [accelerate launch args] [key=value ...]",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Runs `accelerate launch [--config_file A] <asymre>/recipes/train.py --config C key=value ...`. "
                                    "key=value words are config overrides; any other word goes to accelerate launch (e.g. --num_processes 2).",
                        epilog="Overrides: dotted key=value, e.g. learner.lr=1e-5\n\n" + help_text())
    pt.add_argument("--config", default=None, help=f"YAML config: a file, or a packaged one ({', '.join(packaged('configs'))})")
    pt.add_argument("--accelerate-config", default=None,
                    help=f"accelerate config: a file, or a packaged one ({', '.join(packaged('accelerate'))}); default: cpu without a GPU, "
                         "else accelerate's own default (your `accelerate config`)")
    pt.add_argument("--dry-run", action="store_true", help="print the launch command, run nothing")


def _train(a, words: list[str]) -> int:
    import shlex

    from asymre.config import ConfigError
    from asymre.launch import train_command

    has_gpu = False
    if a.accelerate_config is None:
        import torch

        has_gpu = torch.cuda.is_available()
    try:
        cmd = train_command(a.config, a.accelerate_config, words, has_gpu)
    except ConfigError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        return 2
    print(shlex.join(cmd), file=sys.stdout if a.dry_run else sys.stderr, flush=True)
    if a.dry_run:
        return 0
    os.execv(cmd[0], cmd)  # accelerate launch takes this process's place: its exit code, Ctrl-C and signals are the run's


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="asymre", description="asymre tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    _train_parser(sub)
    pp = sub.add_parser("plot", help="write PNG curves of a run (reward, eval, entropy, staleness, loss)")
    pp.add_argument("run_dir")
    pp.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    pe = sub.add_parser("eval", help="pass@1 / pass@k of a model or checkpoint on a task's held-out prompts")
    pe.add_argument("--config", required=True)
    pe.add_argument("--model", default=None, help="model name, hub id or folder (e.g. RUN/final_model); default: the config's")
    pe.add_argument("overrides", nargs="*")
    ps = sub.add_parser("show", help="print a step's sampled prompts, completions, rewards and advantages")
    ps.add_argument("run_dir")
    ps.add_argument("--step", type=int, default=None, help="learner step (default: the latest logged)")
    ps.add_argument("-n", type=int, default=8, help="samples to print")
    px = sub.add_parser("export", help="a checkpoint -> a Hugging Face model folder (transformers, vLLM, asymre eval --model)")
    px.add_argument("checkpoint", help="RUN_DIR/checkpoints/step-N")
    px.add_argument("out", help="output folder (new or empty)")
    px.add_argument("--behaviour", action="store_true", help="export the engine's behaviour weights kept in the checkpoint")
    px.add_argument("--push-to-hub", default=None, metavar="REPO", help="then upload the folder to this hub repo")
    pb = sub.add_parser("bandit", help="reproduce the paper's bandit figures")
    pb.add_argument("--out", default="runs/bandit")
    a, words = p.parse_known_args(argv)
    if a.cmd == "train":
        return _train(a, words)
    if words:
        p.error(f"unrecognized arguments: {' '.join(words)}")
    if a.cmd == "plot":
        from asymre.plot import plot_run

        print(plot_run(a.run_dir, a.out))
        return 0
    if a.cmd == "export":
        from asymre.export import ExportError, export_checkpoint, push_to_hub

        try:
            out = export_checkpoint(a.checkpoint, a.out, a.behaviour)
        except ExportError as e:
            print(f"{e.label}: {e}", file=sys.stderr)
            return 2
        if a.push_to_hub:
            push_to_hub(out, a.push_to_hub)
        print(out)
        return 0
    if a.cmd == "show":
        try:
            print(show(a.run_dir, a.step, a.n))
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
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
