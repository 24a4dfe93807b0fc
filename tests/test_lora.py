"""LoRA through peft: only the adapters train, and what leaves the learner (pushes, final models, exports) is the
merged model under the base model's own names."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from asymre.config import ConfigError
from asymre.lora import merge_lora, scaling
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


def _randomised_adapters(peft_model) -> None:
    """peft starts lora_B (and lora_embedding_A) at zero, so an untrained merge equals the base: give every adapter
    weight random values so a wrong merge shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p))


def _peft_merged(peft_model) -> dict[str, torch.Tensor]:
    import copy

    return {k: v for k, v in copy.deepcopy(peft_model).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("kind", ["gpt2_conv1d", "llama_embedding_tied"])
def test_merge_equals_peft_merge_for_conv1d_and_embedding_adapters(kind):
    """Conv1D layers (GPT-2, weights stored [in, out]: peft's fan_in_fan_out) and embeddings (lora_embedding_A/B) merge
    as peft's own merge_and_unload does, a tied lm_head included: merging them as nn.Linear pushed wrong weights to
    vLLM (or, for a square Conv1D, silently transposed ones). Tiny models made in the test, every adapter random."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from asymre.lora import conv1d_modules, transposed_modules

    torch.manual_seed(0)
    if kind == "gpt2_conv1d":
        model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0))
        targets = ["c_attn", "c_proj", "c_fc"]  # c_proj is square: a missing transpose keeps the shape
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, tie_word_embeddings=True))
        targets = ["embed_tokens", "q_proj"]
    base_conv1d = conv1d_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=kind == "gpt2_conv1d"))
    _randomised_adapters(peft_model)
    transposed = transposed_modules(peft_model)
    assert transposed == (base_conv1d & transposed) and bool(transposed) == (kind == "gpt2_conv1d")
    ours = merge_lora(peft_model.state_dict(), scaling(4, 2), transposed)
    reference = _peft_merged(peft_model)
    assert set(ours) == set(reference), set(ours) ^ set(reference)
    for k in reference:
        assert torch.allclose(ours[k], reference[k], atol=1e-5), k
    if kind == "gpt2_conv1d":
        assert merge_lora(peft_model.state_dict(), scaling(4, 2), base_conv1d).keys() == ours.keys()  # export's way, the same
        with pytest.raises(ValueError, match=r"LoRA merge of transformer\.h\.0\.attn\.c_attn"):
            merge_lora(peft_model.state_dict(), scaling(4, 2))  # merged as linear: refused, never pushed wrong
    else:
        emb, head = "model.embed_tokens.weight", "lm_head.weight"
        assert head in ours and torch.equal(ours[head], ours[emb])  # the tied head got the merged embedding


def test_an_adapter_merge_cannot_compute_is_refused_naming_the_module():
    """A target peft adapts with a layer type asymre's merge does not cover (here a Conv2d) is refused at start-up,
    naming the module, instead of pushing unmerged weights."""
    from peft import LoraConfig, get_peft_model

    from asymre.lora import transposed_modules

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 3)
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules: conv is a Conv2d"):
        transposed_modules(get_peft_model(Net(), LoraConfig(r=1, target_modules=["conv", "lin"])))
