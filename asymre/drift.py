"""How far training moved a model from its base, on fixed general prompts: the forgetting measure of the facts paper
(Houliston et al., arXiv 2508.20755, who report KL and total variation to the base model beside HellaSwag).

For each prompt of a fixed set (asymre/tasks/general_prompts.jsonl: 32 everyday requests, shipped, offline), the base
model's greedy continuation of `max_new_tokens` tokens is the text both models read; at each of its positions the two
next-token distributions p (base) and q (trained) give KL(p || q) = sum p (log p - log q) and TV = 1/2 sum |p - q|,
averaged over every position of every prompt. 0 for an unchanged model; TV is at most 1.

    .venv/bin/python -m asymre.drift BASE TRAINED [--max-new-tokens 32]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS = Path(__file__).with_name("tasks") / "general_prompts.jsonl"


def general_prompts(path: Path = PROMPTS) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def _load(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


@torch.no_grad()
def drift(base_path: str, model_path: str, prompts: list[str] | None = None, max_new_tokens: int = 32, base=None,
          model=None, tokenizer=None) -> dict[str, float]:
    """{'kl', 'tv'}: means over the base's greedy continuations of `prompts` (the shipped set by default)."""
    from asymre.models import load_tokenizer

    tok = tokenizer or load_tokenizer(base_path)
    base = base if base is not None else _load(base_path)
    model = model if model is not None else _load(model_path)
    kls, tvs = [], []
    for text in prompts or general_prompts():
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        x = torch.tensor([list(ids)])
        out = base.generate(x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        n = out.shape[1] - x.shape[1]
        if n == 0:
            continue
        span = slice(x.shape[1] - 1, out.shape[1] - 1)  # the positions that predict the continuation's tokens
        logp = torch.log_softmax(base(out).logits[0, span].float(), -1)  # [n, V]
        logq = torch.log_softmax(model(out).logits[0, span].float(), -1)  # [n, V]
        p = logp.exp()
        kls += (p * (logp - logq)).sum(-1).tolist()
        tvs += (0.5 * (p - logq.exp()).abs().sum(-1)).tolist()
    return {"kl": sum(kls) / max(len(kls), 1), "tv": sum(tvs) / max(len(tvs), 1), "positions": float(len(kls))}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base")
    p.add_argument("trained")
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    print(json.dumps(drift(a.base, a.trained, max_new_tokens=a.max_new_tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
