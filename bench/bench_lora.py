"""LoRA against full fine-tuning on the default job (the embedded model, the arithmetic task, this CPU).

    python -m bench.bench_lora [--lora-lr 2e-4] [--rank 16]

Each run is the README's default job (`recipes/configs/smollm2_arithmetic_cpu.yaml`, accelerate launch on this
CPU) with held-out pass@1 at start and end. The learner's memory is what it holds after a step, counted tensor by
tensor in a separate in-process learner of the same model: weights, gradients and AdamW state (activations come
and go within the step and are the same for both). Results: bench/results/lora.json; docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from bench.launch import ROOT, run_recipe

CONFIG = "recipes/configs/smollm2_arithmetic_cpu.yaml"


def learner_state_bytes(overrides: list[str]) -> dict[str, float]:
    """Weights, gradients and AdamW state a learner holds after one step (MiB each), and its trainable fraction."""
    from accelerate import Accelerator

    from asymre.config import load_config
    from asymre.learner import Learner
    from asymre.models import load_tokenizer, resolve_model
    from tests.test_learner import _groups

    cfg = load_config(str(ROOT / CONFIG), overrides)
    path = resolve_model(cfg.model.name)
    learner = Learner(cfg, path, Accelerator(cpu=True), load_tokenizer(path))
    learner.train_step(_groups(0))
    model = learner.unwrapped()
    mib = 2**20
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # held during the step
    opt = learner.optimizer.optimizer if hasattr(learner.optimizer, "optimizer") else learner.optimizer
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(p.numel() for p in model.parameters())
    return {"weights_mib": weights / mib, "grads_mib": grads / mib, "adamw_mib": state / mib, "trainable_frac": trainable,
            "total_mib": (weights + grads + state) / mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.json"))
    a = p.parse_args()
    lora = [f"model.lora.rank={a.rank}", f"model.lora.alpha={2 * a.rank}", f"learner.lr={a.lora_lr}"]
    runs = {}
    for name, over in (("full", []), ("lora", lora)):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            summary = run_recipe(CONFIG, [*over, "checkpoint.save_final_model=false", "logging.progress=false"], Path(tmp) / "run")
            runs[name] = {"overrides": over, "wall_s": round(time.time() - t0, 1),
                          "pass@1_start": summary.get("eval/pass@1_start"), "pass@1_end": summary.get("eval/pass@1_end"),
                          **learner_state_bytes(over)}
        print(name, json.dumps(runs[name]), flush=True)
    Path(a.out).write_text(json.dumps({"date": str(date.today()), "config": CONFIG, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
