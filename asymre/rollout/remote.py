"""A remote vLLM server as a generation worker (multi-node: generation on other hosts).

Start each server with the dev endpoints on (`VLLM_SERVER_DEV_MODE=1 vllm serve MODEL`); generation goes
through its OpenAI-compatible `/v1/completions` with token-id prompts. Weight pushes, then `/reset_prefix_cache`:
- 'disk': `/collective_rpc` -> `reload_weights(weights_path=...)`, from a folder on storage the server can read;
- 'broadcast': streamed, no shared storage: the server runs with asymre's worker extension
  (`--worker-extension-cls asymre.rollout.vllm_receiver.WeightReceiver`), whose worker joins the learner's
  `WeightChannel` and loads the tensors as they arrive (`open_channel`, `receive_broadcast`).
HTTP or HTTPS with the standard library;
with `api_key_env`, the key (read from that environment variable in the worker's own process, so it never
travels in arguments, logs or the run's config) goes in `Authorization: Bearer`, as `vllm serve --api-key`
expects. Every answer is checked (`check_groups`) before it leaves this object: a malformed one is an error
naming the server.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.models import load_tokenizer
from asymre.rollout.base import SamplingSpec, check_groups, derive_seed
from asymre.rollout.episodes import run_episodes

MAX_IN_FLIGHT = 64  # concurrent requests a round keeps open to one server


class RemoteVLLMGenerator:
    sync_methods = ("disk",)  # in this process it loads a folder; a worker process holding it also relays 'broadcast'

    def __init__(self, url: str, model_path: str, max_prompt_tokens: int = 1024, timeout_s: float = 600.0,
                 chat_template_kwargs: dict | None = None, api_key_env: str | None = None, stream_weights: bool = False,
                 sync_timeout_s: float = 300.0):
        self.url = url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"rollout.server_api_key_env={api_key_env}: that environment variable is not set")
            self._headers["Authorization"] = f"Bearer {key}"
        self.tokenizer = load_tokenizer(model_path)
        from transformers import AutoConfig

        self.vocab_size = max(len(self.tokenizer), getattr(AutoConfig.from_pretrained(model_path), "vocab_size", 0) or 0)
        self.max_prompt_tokens = max_prompt_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.timeout_s = timeout_s
        # the channel's requests stay open while the tensors stream; the channel's own timeout (sync.timeout_s) ends a
        # stalled one first, twice over: a server may still be finishing a failed push's wait before it answers
        self.push_timeout_s = 2 * sync_timeout_s + 60
        self.version = 0
        self.model_name = self._post_get("/v1/models")["data"][0]["id"]
        self._check_server_version()
        if stream_weights:
            self._check_receiver()

    def _check_receiver(self) -> None:
        """sync.method=broadcast: the server must run asymre's worker extension, with one worker (the channel has
        one member on the server's side), speaking this protocol."""
        from asymre.rollout.vllm_receiver import PROTOCOL, RECEIVER
        from asymre.sync import torch_cuda_available

        try:
            answers = self._rpc("asymre_receiver")
        except RuntimeError as e:
            fix = ("start it with VLLM_SERVER_DEV_MODE=1 (its /collective_rpc endpoint answered 404)" if "HTTP Error 404" in str(e)
                   else f"start it with --worker-extension-cls {RECEIVER} from an environment where asymre is installed")
            raise RuntimeError(f"sync.method=broadcast streams weights into the server's engine, but vLLM server {self.url} "
                               f"cannot receive them ({e}): {fix}, or use sync.method=disk") from e
        if len(answers) != 1 or not isinstance(answers[0], dict) or answers[0].get("protocol") != PROTOCOL:
            raise RuntimeError(f"vLLM server {self.url}: its asymre receiver answered {answers}, expected one worker's "
                               f"{{'protocol': {PROTOCOL}, ...}} (tensor_parallel_size=1, and the same asymre version as the "
                               f"learner); else use sync.method=disk")
        here = "cuda" if torch_cuda_available() else "cpu"  # the learner's machine: WeightSync picks NCCL on a GPU
        if answers[0].get("device") != here:
            raise RuntimeError(f"vLLM server {self.url} runs on {answers[0].get('device')} but the learner on {here}: a weight "
                               f"channel needs both on GPUs (NCCL) or both on CPUs (gloo); use sync.method=disk")

    def _rpc(self, method: str, *args, timeout_s: float | None = None, **kwargs) -> list:
        """`method` on every worker of the server's engine (vLLM's dev endpoint /collective_rpc,
        vllm/entrypoints/serve/dev/rpc/api_router.py in 0.32: JSON args, {"results": [one per worker]})."""
        body = {"method": method, **({"args": list(args)} if args else {}), **({"kwargs": kwargs} if kwargs else {})}
        answer = self._post_get("/collective_rpc", body, timeout_s)
        return answer.get("results", answer) if isinstance(answer, dict) else answer

    def _check_server_version(self) -> None:
        """The server's vLLM (its /version) must be one the weight-push endpoints were checked against: the dev
        endpoints' arguments change between versions. A server without /version is let through."""
        from asymre.rollout.vllm_engine import SUPPORTED_VLLM, check_vllm_version

        try:
            served = self._post_get("/version").get("version")
        except RuntimeError:
            return
        if isinstance(served, str) and check_vllm_version(served):
            raise RuntimeError(f"vLLM server {self.url} runs vLLM {served}, but asymre's weight pushes (/collective_rpc "
                               f"reload_weights) were checked against vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM)}: "
                               f"serve with vllm=={SUPPORTED_VLLM[-1]}.*")

    def _post_get(self, path: str, body: dict | None = None, timeout_s: float | None = None) -> dict:
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=dict(self._headers), method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:  # an error status: vLLM's JSON body says why
            detail = e.read()[:500].decode(errors="replace").strip()
            raise RuntimeError(f"vLLM server {self.url}{path}: {e}{': ' + detail if detail else ''}") from e
        except (urllib.error.URLError, TimeoutError) as e:
            raise RuntimeError(f"vLLM server {self.url}{path}: {e}") from e
        return json.loads(raw) if raw else {}

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        groups = run_episodes(self, prompts, spec)
        problem = check_groups(groups, prompts, spec, self.vocab_size)
        if problem:
            raise RuntimeError(f"vLLM server {self.url} returned malformed completions: {problem}")
        return groups

    def sample(self, token_lists: list[list[int]], spec: SamplingSpec, max_new_tokens: list[int] | None = None) -> list[list[Trajectory]]:
        """Every request in flight at once (up to MAX_IN_FLIGHT), so the server batches them as its scheduler does for
        concurrent clients; the answers come back in order."""
        if not token_lists:
            return []
        caps = max_new_tokens or [spec.max_new_tokens] * len(token_lists)
        with ThreadPoolExecutor(max_workers=min(MAX_IN_FLIGHT, len(token_lists))) as pool:
            return list(pool.map(lambda args: self._one(*args, spec), zip(range(len(token_lists)), token_lists, caps)))

    def _one(self, index: int, pid: list[int], cap: int, spec: SamplingSpec) -> list[Trajectory]:
        body = {"model": self.model_name, "prompt": pid, "n": spec.n, "max_tokens": cap,
                "temperature": spec.temperature, "top_p": spec.top_p if spec.temperature > 0 else 1.0,
                "return_token_ids": True, "skip_special_tokens": True}
        if spec.seed is not None:
            body["seed"] = derive_seed(spec.seed, index)  # each request its own (as VLLMGenerator.sample)
        if spec.logprobs:
            body["logprobs"] = 0
        body.update(spec.extra)  # vLLM's server takes its extra sampling parameters in the same body
        res = self._post_get("/v1/completions", body)
        if not isinstance(res.get("choices"), list) or not all(isinstance(c, dict) and "text" in c for c in res["choices"]):
            raise RuntimeError(f"vLLM server {self.url}: /v1/completions answered without a list of choices with text")
        trajs = []
        for c in res["choices"]:
            lp = c.get("logprobs", {}) or {}
            trajs.append(Trajectory(completion_ids=list(c.get("token_ids") or []), text=c["text"],
                                    finish_reason="stop" if c.get("finish_reason") == "stop" else "length",
                                    logprobs=lp.get("token_logprobs") if spec.logprobs else None))
        return trajs

    def load_weights(self, weights, version: int) -> None:
        if not isinstance(weights, str):
            raise ValueError("a remote vLLM server loads weights from a folder (sync.method=disk) or from its weight channel "
                             "(sync.method=broadcast), never as tensors in this process")
        # absolute: the server resolves a relative path against its own working directory (or takes it for a hub id)
        path = str(Path(weights).resolve())
        self._rpc("reload_weights", weights_path=path)
        self._loaded(version)

    def open_channel(self, host: str, port: int, backend: str, timeout_s: float, secret: str) -> None:
        """'broadcast': the server's worker joins the learner's WeightChannel (it connects to `host`:`port`, so the
        learner's sync.channel_host must be an address the server reaches)."""
        self._rpc("asymre_open_channel", host, port, backend, timeout_s, secret, timeout_s=self.push_timeout_s)

    def receive_broadcast(self, manifest: dict, version: int) -> None:
        """'broadcast': the server loads the tensors the learner is sending now; returns once they are all in."""
        self._rpc("asymre_receive", manifest, timeout_s=self.push_timeout_s)
        self._loaded(version)

    def _loaded(self, version: int) -> None:
        answer = self._post_get("/reset_prefix_cache", {})
        if answer.get("success") is False:  # vLLM answers 200 with success: false when the cache could not be reset
            raise RuntimeError(f"vLLM server {self.url}/reset_prefix_cache: not reset ({answer}); its cached prefixes would "
                               f"still hold the old weights' keys and values")
        self.version = version

    def close(self) -> None:
        pass
