"""asymre vs TRL's GRPOTrainer vs a bare PyTorch loop, on this machine, in one run.

    make bench-trl        # = pip install trl==1.16.0, then:
    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_trl [--steps 3] [--learn-steps 12] [--seeds 0]

Part 1, trained tokens/s. Same model (embedded SmolLM2-135M, float32, CPU), same prompts (8 arithmetic
prompts), same samples per step (G = 8, 64 trajectories), same completion cap (16 tokens):
- asymre: `Learner.train_step` (AsymRE loss, delta_V = -0.1) on groups sampled once;
- TRL: `GRPOTrainer` with its fastest settings here (beta = 0: no KL, no reference model; one
  iteration per generation; the whole batch in one forward/backward); generation time, measured
  around its `_generate_and_score_completions`, is subtracted so only training is counted;
- bare: a hand-written forward/backward/AdamW step over the very same token batch as asymre
  (right-padded, one micro-batch): the limit.
  asymre is measured with each group's prompt computed once (learner.shared_prompt=on, the default) and with
  one row per sample (off); the fraction of the machine's peak FLOP/s its learner reaches counts 6 x parameters
  FLOPs per computed token (forward + backward) against a float32 matmul's FLOP/s measured in the same run.
Part 1b, whole steps, what a user waits for: generation + scoring + learning + weight push, asymre's recipe
(default CPU config: vLLM engine, colocated, `perf/step_seconds`) against TRL's GRPOTrainer (its own generation;
the wall time between two of its `on_step_end` callbacks), same prompts per step, G and completion cap.
Part 2, learning at equal budget: held-out greedy accuracy (50 problems) after the same number of
steps x samples, asymre (the CPU default config, delta_V = -0.1) vs TRL GRPO (same lr, prompts, G),
for each seed.
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


def bare_step(model, opt, groups, pad_id) -> tuple[float, int]:
    """Forward/backward/AdamW over the same sequences, the simplest way: one right-padded batch."""
    import torch

    seqs, comp = [], []
    for g in groups:
        for t in g.trajectories:
            seqs.append(g.prompt_ids + t.completion_ids)
            comp.append(len(t.completion_ids))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(seqs), width - 1)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        mask[i, len(s) - 1 - comp[i] : len(s) - 1] = 1
    adv = torch.randn(len(seqs))
    t0 = time.perf_counter()
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    loss = -(adv[:, None] * logp * mask).sum() / len(seqs)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, sum(map(len, seqs))


def trl_trainer(model_path, prompts, steps, seed, out_dir, lr):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from asymre.rewards.builtin import numeric

    ds = Dataset.from_list([{"prompt": p.messages, "answer": p.columns["answer"]} for p in prompts])
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=64, num_generations=8, max_completion_length=16,
                      max_steps=steps, learning_rate=lr, beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0,
                      use_cpu=True, bf16=False, report_to="none", logging_steps=1, save_strategy="no", seed=seed,
                      gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                      adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, dataloader_num_workers=0, disable_tqdm=True)
    from transformers import TrainerCallback

    timing = {"gen": [], "step": [], "tokens": [], "ends": []}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timing["ends"].append(time.perf_counter())

    trainer = GRPOTrainer(model=model_path, reward_funcs=[numeric], args=args, train_dataset=ds, callbacks=[StepEnds()])
    real_gen, real_step = trainer._generate_and_score_completions, trainer.training_step

    def gen(batch):
        t0 = time.perf_counter()
        out = real_gen(batch)
        timing["gen"].append(time.perf_counter() - t0)
        timing["tokens"].append(int(out["prompt_mask"].sum() + out["completion_mask"].sum()))
        return out

    def step(*a, **k):
        t0 = time.perf_counter()
        out = real_step(*a, **k)
        timing["step"].append(time.perf_counter() - t0)
        return out

    trainer._generate_and_score_completions, trainer.training_step = gen, step
    return trainer, timing


def evaluate_model(model_path_or_model, prompts, tokenizer_path):
    from asymre.evaluate import evaluate
    from asymre.rewards import RewardScorer
    from asymre.rollout.hf import HFGenerator

    gen = HFGenerator(tokenizer_path, "float32")
    if not isinstance(model_path_or_model, str):
        gen.load_weights(iter(model_path_or_model.state_dict().items()), 1)
    return evaluate(gen, prompts, RewardScorer(["numeric"]), "greedy", 1, 16)["eval/pass@1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per system (after one warm-up)")
    p.add_argument("--learn-steps", type=int, default=12, help="steps for the equal-budget learning comparison (0 = skip)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--out", default="bench/results/trl.json")
    a = p.parse_args()
    import torch
    from accelerate import Accelerator

    from asymre.config import load_config
    from asymre.learner import Learner
    from asymre.models import load_model, resolve_model
    from asymre.rewards import RewardScorer
    from asymre.rollout.base import SamplingSpec
    from asymre.rollout.hf import HFGenerator
    from asymre.tasks import build_task
    from bench.launch import run_recipe

    cfg_path = ROOT / "recipes/configs/smollm2_arithmetic_cpu.yaml"
    cfg = load_config(cfg_path)
    path = resolve_model(cfg.model.name)
    train, held_out = build_task(cfg.task)
    prompts = train[:8]
    res: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
                 "prompts_per_step": 8, "group_size": 8, "max_new_tokens": 16}

    # ---- part 1: trained tokens/s -------------------------------------------------------------------
    hf = HFGenerator(path, "float32")
    groups = hf.generate(prompts, SamplingSpec(n=8, temperature=1.0, max_new_tokens=16, seed=0))
    RewardScorer(["numeric"]).score(groups)
    n_params = sum(p.numel() for p in load_model(path).parameters())  # a tied LM head once: its matmul uses these
    computed = {"on": sum(len(g.prompt_ids) for g in groups) + sum(len(t.completion_ids) for g in groups for t in g.trajectories),
                "off": sum(len(g.prompt_ids) + len(t.completion_ids) for g in groups for t in g.trajectories)}
    for shared in ("on", "off"):
        learner = Learner(load_config(cfg_path, [f"learner.shared_prompt={shared}"]), path, Accelerator(cpu=True), hf.tokenizer)
        rates, flops = [], []
        for i in range(a.steps + 1):
            m = learner.train_step(groups)
            if i:
                rates.append(m["perf/learner_tokens_per_s"])
                flops.append(6 * n_params * computed[shared] / m["perf/forward_backward_seconds"])
        key = "asymre" if shared == "on" else "asymre_unshared"
        res[f"{key}_tokens_per_s"] = statistics.median(rates)
        res[f"{key}_learner_flops_per_s"] = statistics.median(flops)
        del learner
    res["asymre_tokens_per_step"] = m["perf/learner_tokens"]
    res["asymre_shared_over_unshared"] = res["asymre_tokens_per_s"] / res["asymre_unshared_tokens_per_s"]
    size = 2048
    x = torch.randn(size, size)
    torch.mm(x, x)
    t0 = time.perf_counter()
    for _ in range(5):
        torch.mm(x, x)
    res["matmul_peak_flops_per_s"] = 5 * 2 * size**3 / (time.perf_counter() - t0)
    res["asymre_learner_share_of_peak"] = res["asymre_learner_flops_per_s"] / res["matmul_peak_flops_per_s"]

    model = load_model(path)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    bare = []
    for i in range(a.steps + 1):
        secs, toks = bare_step(model, opt, groups, hf.tokenizer.pad_token_id)
        if i:
            bare.append(toks / secs)
    res["bare_tokens_per_s"] = statistics.median(bare)
    del model, opt

    with tempfile.TemporaryDirectory() as tmp:
        trainer, timing = trl_trainer(path, prompts, a.steps + 1, 0, tmp, 2e-5)
        trainer.train()
        trl_rates = [tok / (s - g) for tok, s, g in zip(timing["tokens"], timing["step"], timing["gen"])][1:]
        ends = timing["ends"]
        trl_whole = [b - a_ for a_, b in zip(ends, ends[1:])]  # after the first (warm-up) step
    res["trl_tokens_per_s"] = statistics.median(trl_rates)
    res["trl_tokens_per_step"] = statistics.median(timing["tokens"])
    res["trl_whole_step_seconds"] = statistics.median(trl_whole)
    with tempfile.TemporaryDirectory() as tmp:
        out = run_recipe(cfg_path, [f"learner.steps={a.steps + 1}", "eval.at_start=false", "eval.at_end=false",
                                    "checkpoint.save_final_model=false", "logging.progress=false"], tmp)
        whole = [r["perf/step_seconds"] for r in out["rows"] if "perf/step_seconds" in r][1:]
    res["asymre_whole_step_seconds"] = statistics.median(whole)
    res["trl_over_asymre_whole_step"] = res["trl_whole_step_seconds"] / res["asymre_whole_step_seconds"]
    res["asymre_vs_trl"] = res["asymre_tokens_per_s"] / res["trl_tokens_per_s"]
    res["asymre_vs_bare"] = res["asymre_tokens_per_s"] / res["bare_tokens_per_s"]
    print(json.dumps(res, indent=1), flush=True)

    # ---- part 2: learning at equal budget -----------------------------------------------------------
    if a.learn_steps:
        res["learning"] = []
        for seed in a.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                own = [f"learner.steps={a.learn_steps}", f"learner.seed={seed}", f"rollout.seed={seed}", "checkpoint.save_final_model=false",
                       "logging.progress=false"]
                rcfg = load_config(cfg_path, own)
                summary = run_recipe(cfg_path, own, tmp)
                samples = sum(m.get("learner/trajectories", 0) for m in summary["rows"])
            with tempfile.TemporaryDirectory() as tmp:
                trl_prompts = [train[i % len(train)] for i in range(8 * a.learn_steps)]
                trainer, _ = trl_trainer(path, trl_prompts, a.learn_steps, seed, tmp, rcfg.learner.lr)
                trl_before = evaluate_model(trainer.model, held_out, path)
                trainer.train()
                trl_after = evaluate_model(trainer.model, held_out, path)
            row = {"seed": seed, "steps": a.learn_steps, "samples": samples, "asymre_before": summary["eval/pass@1_start"],
                   "asymre_after": summary["eval/pass@1_end"], "trl_grpo_before": trl_before, "trl_grpo_after": trl_after}
            res["learning"].append(row)
            print(json.dumps(row), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
