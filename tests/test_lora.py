"""LoRA through peft: only the adapters train, and what leaves the learner (pushes, final models, exports) is the
merged model under the base model's own names."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from asymre.config import ConfigError
from asymre.lora import merge_lora
from tests.test_learner import _groups, _learner, tiny_model_path  # noqa: F401 - the fixture is used by name
from tests.test_offpolicy_checkpoint import tiny_llm  # noqa: F401 - the fixture is used by name

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


def test_a_lora_run_pushes_merged_weights_and_its_checkpoint_exports_them(tmp_path, tiny_llm):  # noqa: F811
    """The whole recipe with LoRA: every push is plain weights under the base model's names; the final push, the
    merged final model and `asymre export` of the last checkpoint are the same weights."""
    from safetensors.torch import load_file

    from asymre.config import load_config
    from asymre.export import export_checkpoint
    from tests.test_offpolicy_checkpoint import RecordingGenerator, _run

    RecordingGenerator.LOADS.clear()
    run = tmp_path / "run"
    _run(load_config(None, [f"model.name={tiny_llm}", f"rollout.backend={RecordingGenerator.__module__}:RecordingGenerator",
                            "model.lora.rank=4", "model.lora.save_merged=true", "sync.interval=1", "buffer.max_staleness=0",
                            "checkpoint.every=2", "rollout.prompts_per_step=3", "learner.groups_per_step=2", "rollout.group_size=2",
                            "learner.lr=5e-2", "learner.warmup_steps=0", "learner.steps=2", "eval.at_start=false", "eval.at_end=false",
                            "logging.progress=false", f"logging.run_dir={run}"]))
    (loads,) = RecordingGenerator.LOADS
    assert [v for v, _ in loads] == [1, 2]
    names = set(AutoModelForCausalLM.from_pretrained(tiny_llm).state_dict())
    assert all(set(w) == names for _, w in loads)
    assert any(not torch.equal(loads[0][1][k], loads[1][1][k]) for k in names), "the adapters never moved the pushed weights"
    final = loads[-1][1]
    merged = load_file(str(run / "final_model" / "merged" / "model.safetensors"))
    assert all(torch.equal(merged[k], final[k]) for k in merged)
    assert (run / "final_model" / "adapter_model.safetensors").is_file()
    out = export_checkpoint(run / "checkpoints" / "step-000002", tmp_path / "exported")
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == merged.keys() and all(torch.allclose(exported[k], final[k], atol=1e-6) for k in exported)
