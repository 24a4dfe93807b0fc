"""asymre/drift.py: the KL and total variation to the base model on the shipped general prompts."""

import torch

from asymre.drift import drift, general_prompts


def test_drift_is_zero_for_the_base_itself_and_grows_with_a_change(model_path):
    from transformers import AutoModelForCausalLM

    from asymre.models import load_tokenizer

    assert len(general_prompts()) == 32
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    same = drift(model_path, model_path, general_prompts()[:2], max_new_tokens=4, base=base, model=base, tokenizer=load_tokenizer(model_path))
    assert same["kl"] == 0.0 and same["tv"] == 0.0 and same["positions"] == 8.0
    moved = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        moved.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    a = drift(model_path, model_path, general_prompts()[:2], max_new_tokens=4, base=base, model=moved, tokenizer=load_tokenizer(model_path))
    with torch.no_grad():
        moved.model.layers[-1].mlp.down_proj.weight.mul_(2.0)
    b = drift(model_path, model_path, general_prompts()[:2], max_new_tokens=4, base=base, model=moved, tokenizer=load_tokenizer(model_path))
    assert 0 < a["kl"] < b["kl"] and 0 < a["tv"] < b["tv"] <= 1
