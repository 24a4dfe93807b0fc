"""`asymre export CHECKPOINT OUT`: a training checkpoint -> a Hugging Face model folder.

A checkpoint holds Accelerate's state (weights, optimizer, RNG) for resuming; users want a folder that
transformers, vLLM and `asymre eval --model` load. Export writes the learner's weights (or, with
`behaviour=True`, the engine's stale behaviour weights the checkpoint also keeps) into the model's own
architecture, dtype, tokenizer and generation config, taken from the run's saved config (a LoRA run's adapters
merged into the base weights). Sharded
FSDP/DeepSpeed states are refused (merge them with `accelerate merge-weights` first).
"""

from __future__ import annotations

import json
from pathlib import Path

from asymre.checkpoint import COMPLETE
from asymre.config import InputError
from asymre.lora import conv1d_modules, is_peft_state, merge_lora, scaling


class ExportError(InputError):
    """The checkpoint cannot be exported as asked; the message says why."""

    label = "export error"


def export_checkpoint(checkpoint: str | Path, out: str | Path, behaviour: bool = False) -> Path:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from asymre.models import load_tokenizer, resolve_model

    ck, out = Path(checkpoint), Path(out)
    if not (ck / COMPLETE).is_file() or not (ck / "trainer_state.json").is_file():
        raise ExportError(f"{ck}: not a complete asymre checkpoint (no {COMPLETE} marker or trainer_state.json)")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: the output folder exists and is not empty")
    trainer_state = json.loads((ck / "trainer_state.json").read_text())
    config = trainer_state["config"]
    weights_file = ck / ("behaviour" if behaviour else "accelerate") / "model.safetensors"
    if not weights_file.is_file():
        if behaviour:
            raise ExportError(f"{ck}: no behaviour weights (the engine held the learner's weights when it was saved: "
                              "export without --behaviour)")
        raise ExportError(f"{ck}: no accelerate/model.safetensors (a sharded FSDP/DeepSpeed state? merge it with "
                          "`accelerate merge-weights` first)")
    path = resolve_model(config["model"]["name"], config["model"].get("cache_dir"))
    own = getattr(AutoConfig.from_pretrained(path), "dtype", None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=own if own is not None else "auto")
    state = load_file(str(weights_file))
    if is_peft_state(state):  # a LoRA run's learner: the adapters merged into the base weights
        lora = config["model"]["lora"]
        state = merge_lora(state, scaling(lora["alpha"], lora["rank"]), conv1d_modules(model))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportError(f"{weights_file}: does not fit {config['model']['name']}: missing {sorted(set(missing) - tied)[:5]}, "
                          f"unexpected {sorted(unexpected)[:5]}")
    if tied:
        model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(path).save_pretrained(out)
    source = {"checkpoint": str(ck.resolve()), "weights": "behaviour" if behaviour else "learner",
              "learner_step": trainer_state["learner_step"], "model": config["model"]["name"]}
    (out / "asymre_export.json").write_text(json.dumps(source, indent=1))
    return out


def push_to_hub(folder: str | Path, repo: str) -> None:
    """Upload an exported folder (the user's hub credentials; not exercised by the tests, which have no hub)."""
    from huggingface_hub import HfApi

    HfApi().upload_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
