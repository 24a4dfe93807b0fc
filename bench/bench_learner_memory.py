"""The learner's peak GPU memory against asymre.sizing's estimate (docs/scaling.md, "Checked on a GPU").

    python -m bench.bench_learner_memory              # one GPU: every run, each in its own process
    python -m bench.bench_learner_memory --estimate   # anywhere: the estimates alone
    python -m bench.bench_learner_memory --per-layer  # one GPU: the per-token, per-layer constants of the formula

Qwen2.5-3B-Instruct's shapes (hidden 2048, MLP 11,008, 16 heads, 2 KV heads, 151,936-token vocabulary, tied) cut
to a few layers with random weights; the real `Learner` under Accelerate's bf16 mixed precision (as
recipes/accelerate/single_gpu.yaml); two steps on two groups of 8 samples, prompts of 256 tokens, completions of
1,792 tokens (ragged: 1,792 down to 392, so rows are padded and masked). The peak is the second step's (AdamW's
moments resident, as in every step after the first), from torch.cuda.max_memory_allocated. Results go to
bench/results/learner_memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
             tie_word_embeddings=True)
PROMPT, COMPLETION = 256, 1792
# (model.gradient_checkpointing, learner.micro_batch_tokens, layers, learner.shared_prompt, ragged completions)
RUNS = [(True, 16384, 4, "auto", False), (True, 16384, 8, "auto", False), (True, 8192, 4, "auto", False), (True, 16384, 4, "auto", True),
        (False, 16384, 4, "off", False), (False, 16384, 8, "off", False), (False, 16384, 4, "auto", False)]


def _setup(run):
    from transformers import AutoConfig

    from asymre.config import Config

    gc, tokens, layers, shared, _ = run
    cfg = Config()
    cfg.model.dtype, cfg.model.gradient_checkpointing = "bfloat16", gc
    cfg.learner.micro_batch_tokens, cfg.learner.shared_prompt = tokens, shared
    cfg.rollout.max_prompt_tokens, cfg.rollout.max_new_tokens = PROMPT, COMPLETION
    return cfg, AutoConfig.for_model("qwen2", num_hidden_layers=layers, **SHAPE)


def measure(run) -> dict:
    """One run's peak (in its own process)."""
    import tempfile

    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    import asymre.learner
    from asymre.data import Prompt, Trajectory, TrajectoryGroup

    cfg, config = _setup(run)
    folder = tempfile.mkdtemp()
    config.save_pretrained(folder)  # the learner reads the checkpoint's config; the weights are random
    asymre.learner.load_model = lambda path, dtype: AutoModelForCausalLM.from_config(config)
    learner = asymre.learner.Learner(cfg, folder, Accelerator(mixed_precision="bf16"))
    lengths = [COMPLETION - 200 * i if run[4] else COMPLETION for i in range(8)]
    groups = [TrajectoryGroup(Prompt(f"p{g}", []), [5] * PROMPT, [Trajectory([7] * n, "", "length", reward=float(i % 2))
                                                                  for i, n in enumerate(lengths)], 0) for g in range(2)]
    learner.train_step(groups)
    torch.cuda.reset_peak_memory_stats()
    m = learner.train_step(groups)
    return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved(),
            "micro_batches": m["learner/micro_batches"]}


def saved_per_token_layer(bf16_weights: bool, checkpointing: bool, rows: int = 4, width: int = 1024) -> float:
    """Bytes a Llama layer (hidden 1024, MLP 2816, 8 heads, 2 KV heads) keeps for backward per token: the tensors
    autograd saves in a forward over 4 layers less those over 2 (parameters and their bf16 casts excluded), with a
    padding mask, under bf16 autocast over float32 weights or in a bf16 model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    def saved(layers: int) -> int:
        config = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=2,
                                      num_hidden_layers=layers, vocab_size=512)
        model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16 if bf16_weights else torch.float32).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        sizes = {p.numel() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params and not (t.dim() == 2 and t.numel() in sizes):  # not a weight's cast
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 512, (rows, width), device="cuda")
        mask = torch.ones_like(ids)
        mask[:, :7] = 0  # left padding: the attention gets a mask
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", torch.bfloat16, enabled=not bf16_weights):
            model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        return sum(kept.values())

    return (saved(4) - saved(2)) / 2 / (rows * width)


def estimate(run) -> dict:
    from asymre.sizing import ModelShape, Sharding, estimate

    cfg, config = _setup(run)
    est = estimate(cfg, ModelShape.from_config(config), Sharding("single", 1, "bf16"), 0.0)
    return {"estimate": est.total, "breakdown": est.breakdown()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--estimate", action="store_true", help="print the estimates only (no GPU needed)")
    p.add_argument("--per-layer", action="store_true", help="the per-token, per-layer bytes the formula uses, measured")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.per_layer:
        for bf16, ckpt in ((False, False), (True, False), (False, True), (True, True)):
            print(json.dumps({"bf16_weights": bf16, "gradient_checkpointing": ckpt, "bytes": saved_per_token_layer(bf16, ckpt)}), flush=True)
        return
    if a.one is not None:
        print(json.dumps(measure(RUNS[a.one])))
        return
    rows = []
    for i, run in enumerate(RUNS):
        row = dict(zip(("gradient_checkpointing", "micro_batch_tokens", "layers", "shared_prompt", "ragged"), run))
        if not a.estimate:
            out = subprocess.run([sys.executable, "-m", "bench.bench_learner_memory", "--one", str(i)], cwd=ROOT, capture_output=True,
                                 text=True)
            row.update(json.loads(out.stdout.splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-2000:]})
        try:
            row.update(estimate(run))
        except ImportError:  # a checkout without asymre.sizing measures only
            pass
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not a.estimate:
        (ROOT / "bench" / "results").mkdir(exist_ok=True)
        (ROOT / "bench" / "results" / "learner_memory.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
