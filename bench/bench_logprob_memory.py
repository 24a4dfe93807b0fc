"""Peak extra memory of the learner's loss path (token log-probs with their backward, plus the entropy metric), as a
multiple of the logits tensor itself, before (plain autograd in float32) and after (asymre.loss's chunked path).

    OMP_NUM_THREADS=2 .venv/bin/python -m bench.bench_logprob_memory [--tokens 4096] [--vocab 151936] [--device cpu]

Each measurement runs in a fresh process: the logits (bf16, the size an LM head gives for `--tokens` completion
positions at Qwen's vocabulary) are made first, then the path runs forward and backward; peak memory is the
process's peak resident set (CPU) or torch's peak allocation (CUDA) above what it held after making the logits.
Results go to bench/results/logprob_memory.json; the numbers in docs/benchmarks.md come from there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status: VmRSS (resident now) or VmHWM (its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(path: str, tokens: int, vocab: int, device: str) -> dict:
    """One path's peak extra memory (run in its own process)."""
    import torch

    from asymre.loss import token_logprobs, token_logprobs_and_entropy

    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(1, tokens, vocab, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), generator=g, device=device)
    logits_bytes = logits.numel() * logits.element_size()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
    t0 = time.perf_counter()
    if path == "plain":
        logp = token_logprobs(logits, labels)
        with torch.no_grad():
            lf = logits.float()
            ent = torch.logsumexp(lf, -1) - (torch.softmax(lf, -1) * lf).sum(-1)
            del lf
    else:
        logp, ent = token_logprobs_and_entropy(logits, labels)
    logp.sum().backward()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")) - base
    return {"path": path, "tokens": tokens, "vocab": vocab, "device": device, "logits_gib": logits_bytes / 2**30,
            "peak_extra_gib": peak / 2**30, "peak_extra_over_logits": peak / logits_bytes, "seconds": seconds,
            "entropy_mean": float(ent.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--device", default="cpu")
    p.add_argument("--paths", nargs="+", default=["chunked", "plain"], choices=["chunked", "plain"])
    p.add_argument("--plain-tokens", type=int, default=None,
                   help="tokens for the plain path (its peak is several logits tensors: a smaller size where memory is short)")
    p.add_argument("--out", default="bench/results/logprob_memory.json")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one path in this process, print JSON
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a.tokens, a.vocab, a.device)))
        return
    res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} CPU cores", "runs": []}
    for path in a.paths:
        tokens = a.plain_tokens if path == "plain" and a.plain_tokens else a.tokens
        r = subprocess.run([sys.executable, "-m", "bench.bench_logprob_memory", "--one", path, "--tokens", str(tokens), "--vocab",
                            str(a.vocab), "--device", a.device], cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            res["runs"].append({"path": path, "tokens": tokens, "error": r.stderr.strip().splitlines()[-1:]})
        else:
            res["runs"].append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(res["runs"][-1]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
