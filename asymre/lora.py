"""LoRA through peft: adapters on the learner's model, and the merged weights every consumer outside it gets.

The learner trains a peft model (`model.lora.rank > 0`): frozen base weights plus low-rank adapters, AdamW over the
adapters alone. Everything that leaves the learner is plain Hugging Face weights, merged: engines receive W + (alpha /
rank) B A under the base model's names, so vLLM, the transformers engine, remote servers, behaviour copies and
`asymre export` need no LoRA support. Alternative considered: vLLM's LoRA adapters (`enable_lora`, a LoRARequest
per generation); it keeps the base weights in place and pushes only the adapter, but it needs the engine built with
LoRA enabled and a maximum rank, caps the targetable modules, and every other backend would still need the merged
weights: one path for all was chosen. `final_model/` holds the adapter (peft's format, loadable with
`peft.AutoPeftModelForCausalLM` or vLLM's `--enable-lora`); `model.lora.save_merged=true` adds the merged model.
"""

from __future__ import annotations

import torch

from asymre.config import ConfigError

PEFT_PREFIX = "base_model.model."  # a peft model's state_dict names: base_model.model.<the base model's name>
ADAPTER = "default"


def apply_lora(model, lora) -> torch.nn.Module:
    """`model` with adapters as `lora` (the model.lora config section) says; the base weights frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ConfigError(f"model.lora.rank={lora.rank} needs the peft package: pip install peft") from e
    targets = lora.target_modules[0] if list(lora.target_modules) == ["all-linear"] else list(lora.target_modules)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # peft names the module it could not find
        raise ConfigError(f"model.lora.target_modules={list(lora.target_modules)}: {e}") from e
    if model.is_gradient_checkpointing:
        peft_model.enable_input_require_grads()  # frozen embeddings: checkpointed layers need an input that wants a gradient
    return peft_model


def scaling(alpha: float, rank: int) -> float:
    """The factor of the adapter's update B A (peft's default, not rsLoRA's)."""
    return alpha / rank


def is_peft_state(state: dict[str, torch.Tensor]) -> bool:
    return any(f".lora_A.{ADAPTER}." in k for k in state)


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft model's state (names under base_model.model., each adapted layer's base_layer, lora_A and lora_B) ->
    the base model's names and W + scale * B @ A, computed in float32 and stored in W's dtype."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if ".lora_A." in name or ".lora_B." in name:
            continue
        module, sep, leaf = name.partition(".base_layer.")
        if not sep:
            out[name] = value
            continue
        if leaf == "weight":
            a = state[f"{PEFT_PREFIX}{module}.lora_A.{ADAPTER}.weight"].float()  # [r, in]
            b = state[f"{PEFT_PREFIX}{module}.lora_B.{ADAPTER}.weight"].float()  # [out, r]
            value = (value.float() + scale * (b @ a)).to(value.dtype)
        out[f"{module}.{leaf}"] = value
    return out
