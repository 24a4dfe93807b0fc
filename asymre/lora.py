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
    return any(f".lora_A.{ADAPTER}." in k or f".lora_embedding_A.{ADAPTER}" in k for k in state)


def transposed_modules(peft_model) -> frozenset[str]:
    """The adapted modules (base-model names) whose weight is stored [in, out] (peft's `fan_in_fan_out`: GPT-2-style
    Conv1D; peft 0.21 sets it for every Conv1D it adapts, tuners/lora/model.py `_create_new_module`), and a refusal of
    any adapter `merge_lora` cannot merge exactly, naming the module. Mergeable: peft's lora.Linear (nn.Linear and
    Conv1D) and lora.Embedding (peft 0.21 tuners/lora/layer.py; their get_delta_weight: B @ A, transposed for
    fan_in_fan_out, and (B @ A)^T for embeddings). Called at start-up on the learner's peft model."""
    from peft.tuners.lora import layer

    out = set()
    for name, module in peft_model.named_modules():
        if not isinstance(module, layer.LoraLayer):
            continue
        base = name.removeprefix(PEFT_PREFIX)
        if type(module) not in (layer.Linear, layer.Embedding):
            raise ConfigError(f"model.lora.target_modules: {base} is a {type(module.get_base_layer()).__name__} (peft's "
                              f"{type(module).__name__} adapter), whose merged weights asymre does not compute; target "
                              "linear, Conv1D or embedding layers")
        if getattr(module, "use_dora", {}).get(ADAPTER, False):
            raise ConfigError(f"model.lora: {base} has a DoRA adapter, whose merged weights asymre does not compute")
        if getattr(module, "fan_in_fan_out", False):
            out.add(base)
    return frozenset(out)


def conv1d_modules(model) -> frozenset[str]:
    """The base model's GPT-2-style Conv1D modules (weights [in, out]): what `transposed_modules` names, found without
    the peft model (`asymre export` merges a checkpoint's state into a freshly loaded base model)."""
    from transformers.pytorch_utils import Conv1D

    return frozenset(name for name, module in model.named_modules() if isinstance(module, Conv1D))


def merge_lora(state: dict[str, torch.Tensor], scale: float, transposed: frozenset[str] = frozenset(),
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A peft model's state (names under base_model.model., each adapted layer's base_layer and its lora_A / lora_B,
    or lora_embedding_A / lora_embedding_B) -> the base model's names and W + scale * delta, computed in float32 and
    stored in W's dtype: delta = B @ A for a linear layer, (B @ A)^T for a module in `transposed` (Conv1D) and for an
    embedding (peft's get_delta_weight). A tensor stored under another name too (a tied lm_head) gets the merged value
    there as well, as peft's own merge gives it. A delta whose shape is not W's raises, naming the module. `dtype`: the
    merged weights are stored in it instead of W's (rounded once, from the float32 sum)."""
    out: dict[str, torch.Tensor] = {}
    merged_by_storage: dict[int, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if any(f".{part}." in name or name.endswith(f".{part}") for part in LORA_PARTS):
            continue
        module, sep, leaf = name.partition(".base_layer.")
        if not sep:
            out[name] = value
            continue
        if leaf == "weight":
            merged = (value.float() + scale * _delta(state, module, module in transposed)).to(dtype or value.dtype)
            merged_by_storage[value.data_ptr()] = merged
            value = merged
        out[f"{module}.{leaf}"] = value
    for name, value in out.items():  # a tied copy of an adapted weight (lm_head beside an adapted embedding)
        if ".base_layer." not in name and value.data_ptr() in merged_by_storage and value is not merged_by_storage[value.data_ptr()]:
            out[name] = merged_by_storage[value.data_ptr()]
    return out


LORA_PARTS = (f"lora_A.{ADAPTER}", f"lora_B.{ADAPTER}", f"lora_embedding_A.{ADAPTER}", f"lora_embedding_B.{ADAPTER}")


def _delta(state: dict[str, torch.Tensor], module: str, transposed: bool) -> torch.Tensor:
    """B @ A of one adapted module, in float32 and in its weight's layout."""
    w = state[f"{PEFT_PREFIX}{module}.base_layer.weight"]
    if f"{PEFT_PREFIX}{module}.lora_embedding_A.{ADAPTER}" in state:
        a = state[f"{PEFT_PREFIX}{module}.lora_embedding_A.{ADAPTER}"].float()  # [r, vocab]
        b = state[f"{PEFT_PREFIX}{module}.lora_embedding_B.{ADAPTER}"].float()  # [dim, r]
        delta = (b @ a).T  # [vocab, dim]
    else:
        a = state[f"{PEFT_PREFIX}{module}.lora_A.{ADAPTER}.weight"].float()  # [r, in]
        b = state[f"{PEFT_PREFIX}{module}.lora_B.{ADAPTER}.weight"].float()  # [out, r]
        delta = (b @ a).T if transposed else b @ a  # [in, out] for Conv1D, else [out, in]
    if delta.shape != w.shape:
        raise ValueError(f"LoRA merge of {module}: the adapter's update is {tuple(delta.shape)}, its weight {tuple(w.shape)} "
                         f"({'a transposed' if transposed else 'an untransposed'} layout; a Conv1D module must be named as transposed)")
    return delta
