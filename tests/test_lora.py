"""LoRA through peft: only the adapters train, and what leaves the learner (pushes, final models, exports) is the
merged model under the base model's own names."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from asymre.config import ConfigError
from asymre.lora import merge_lora
from tests.test_learner import _groups, _learner, tiny_model_path  # noqa: F401 - the fixture is used by name

LORA = {"model.lora.rank": 4, "model.lora.alpha": 8, "learner.lr": 5e-2}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_adapters_train_and_the_merged_weights_are_the_peft_models(tiny_model_path):  # noqa: F811
    learner = _learner(tiny_model_path, **LORA)
    base_before = {k: v.clone() for k, v in learner.unwrapped().get_base_model().state_dict().items() if ".lora_" not in k}
    trained = {id(p) for g in learner.optimizer.param_groups for p in g["params"]}
    named = dict(learner.unwrapped().named_parameters())
    assert trained and all(".lora_" in n for n, p in named.items() if id(p) in trained)
    for seed in range(3):
        learner.train_step(_groups(seed))
    base_after = {k: v for k, v in learner.unwrapped().get_base_model().state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before), "a frozen base weight moved"

    merged = learner.full_state_dict()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    assert set(merged) == set(plain.state_dict())  # the base model's own names, nothing of peft's
    original = _logits(plain, torch.tensor([[1, 5, 9, 13, 17]]))
    plain.load_state_dict(merged)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    learner.unwrapped().eval()
    peft_logits = _logits(learner.unwrapped(), ids)
    assert torch.allclose(_logits(plain, ids), peft_logits, atol=1e-5)
    assert (peft_logits - original).abs().max() > 1e-3, "the adapters never moved: the comparison would prove nothing"


def test_merge_is_w_plus_scaled_b_a():
    w, a, b = torch.randn(3, 2), torch.randn(1, 2), torch.randn(3, 1)
    state = {"base_model.model.lin.base_layer.weight": w, "base_model.model.lin.base_layer.bias": torch.ones(3),
             "base_model.model.lin.lora_A.default.weight": a, "base_model.model.lin.lora_B.default.weight": b,
             "base_model.model.norm.weight": torch.zeros(2)}
    out = merge_lora(state, 0.5)
    assert set(out) == {"lin.weight", "lin.bias", "norm.weight"}
    assert torch.allclose(out["lin.weight"], w + 0.5 * b @ a)


def test_final_model_holds_the_adapter_and_on_request_the_merged_model(tiny_model_path, tmp_path):  # noqa: F811
    learner = _learner(tiny_model_path, **LORA, **{"model.lora.save_merged": "true"})
    learner.train_step(_groups(0))
    learner.save_model(str(tmp_path / "final_model"))
    adapter = tmp_path / "final_model"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged", dtype=torch.float32)
    ids = torch.tensor([[2, 4, 6, 8]])
    learner.unwrapped().eval()
    assert torch.allclose(_logits(merged, ids), _logits(learner.unwrapped(), ids), atol=1e-5)


def test_unknown_target_module_is_refused_naming_the_key(tiny_model_path):  # noqa: F811
    with pytest.raises(ConfigError, match=r"model.lora.target_modules=\['nope_proj'\]"):
        _learner(tiny_model_path, **LORA, **{"model.lora.target_modules": "[nope_proj]"})
