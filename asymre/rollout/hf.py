"""transformers `generate` backend: for machines without vLLM, and the reference for exact resume.

Slower than vLLM (no paged attention, padded batches) but dependable everywhere. It holds its own copy
of the model (the behaviour policy), separate from the learner's, so staleness is real.
"""

from __future__ import annotations

import torch

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.models import load_model, load_tokenizer
from asymre.rollout.base import SamplingSpec, Weights, eos_token_ids, trim_completion
from asymre.rollout.episodes import run_episodes

BATCH_SIZE = 64  # sequences per generate call (asymre.sizing sizes the KV cache of one call)


class HFGenerator:
    sync_methods = ("inprocess", "disk")  # weights by reference in this process, or from a folder

    def __init__(self, model_path: str, dtype: str = "float32", device: str | None = None, max_prompt_tokens: int = 1024,
                 batch_size: int = BATCH_SIZE, chat_template_kwargs: dict | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype).to(self.device).eval()
        self.eos = eos_token_ids(self.tokenizer, self.model.generation_config)
        self.max_prompt_tokens = max_prompt_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.batch_size = batch_size  # sequences per generate call
        self.version = 0

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        return run_episodes(self, prompts, spec)

    @torch.no_grad()
    def sample(self, token_lists: list[list[int]], spec: SamplingSpec, max_new_tokens: list[int] | None = None) -> list[list[Trajectory]]:
        caps = max_new_tokens or [spec.max_new_tokens] * len(token_lists)
        per_call = max(1, self.batch_size // spec.n)
        out: list[list[Trajectory]] = []
        gen = torch.Generator(device="cpu")
        if spec.seed is not None:
            gen.manual_seed(spec.seed)
        for start in range(0, len(token_lists), per_call):
            chunk = token_lists[start : start + per_call]
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) if spec.seed is not None else None
            trajs = self._generate_chunk(chunk, spec, seed, caps[start : start + per_call])
            out += [trajs[j * spec.n : (j + 1) * spec.n] for j in range(len(chunk))]
        return out

    def _generate_chunk(self, chunk: list[list[int]], spec: SamplingSpec, seed: int | None, caps: list[int]) -> list[Trajectory]:
        width = max(len(x) for x in chunk)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=self.device)  # [P, L] left-padded
        attn = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=self.device)  # [P, L]
        greedy = spec.temperature == 0.0
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max(caps), num_return_sequences=spec.n, pad_token_id=pad,
                      eos_token_id=sorted(self.eos), return_dict_in_generate=True, output_scores=spec.logprobs)
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0)
        kwargs.update(spec.extra)
        if "stop_strings" in spec.extra:
            kwargs["tokenizer"] = self.tokenizer  # transformers needs it to match stop strings
        out = self.model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
        new = out.sequences[:, width:]  # [P*n, T]
        logps = None
        if spec.logprobs:
            logps = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # [P*n, T]
        trajs = []
        for row in range(new.shape[0]):
            cap = caps[row // spec.n]  # this row's own cap (the call ran to the chunk's largest)
            comp, reason = trim_completion(new[row, :cap].tolist(), self.eos, pad)
            trajs.append(Trajectory(
                completion_ids=comp, text=self.tokenizer.decode(comp, skip_special_tokens=True), finish_reason=reason,
                logprobs=logps[row, : len(comp)].tolist() if logps is not None else None))
        return trajs

    @torch.no_grad()
    def load_weights(self, weights: Weights | str, version: int) -> None:
        if isinstance(weights, str):
            from asymre.sync import read_weights_folder

            weights = read_weights_folder(weights)
        params = self.model.state_dict()
        seen = 0
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"weight push: parameter {name!r} is not in the engine's model")
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
            seen += 1
        if seen == 0:
            raise ValueError("weight push carried no parameters")
        self.version = version

    def close(self) -> None:
        self.model = None
