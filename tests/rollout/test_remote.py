"""The remote vLLM server worker's protocol, against a stand-in HTTP server on loopback that answers
like vLLM's OpenAI-compatible and dev endpoints (a unit test of the client; no engine runs here)."""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from asymre.config import load_config
from asymre.rollout.base import SamplingSpec, derive_seed
from asymre.rollout.remote import RemoteVLLMGenerator
from asymre.rollout.vllm_receiver import PROTOCOL
from asymre.tasks import build_task


class _Handler(BaseHTTPRequestHandler):
    calls: list = []
    in_flight, most_in_flight = 0, 0  # /v1/completions requests being answered at once
    delay = 0.0  # seconds each completion takes
    reset_answer: dict = {}  # what /reset_prefix_cache answers
    reset_status = 200  # and with which HTTP status
    served_version = "0.32.0"  # what /version answers
    auth: list = []  # the Authorization header of every request
    token_ids = [33, 2]  # what /v1/completions answers (a test may make it malformed)
    receiver: list | None = None  # what /collective_rpc asymre_receiver answers; None: vLLM's error for an unknown method

    def log_message(self, *a):
        pass

    def _reply(self, obj, status: int = 200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.auth.append(self.headers.get("Authorization"))
        self.calls.append(("GET", self.path, None))
        if self.path == "/version":
            self._reply({"version": self.served_version})
            return
        self._reply({"data": [{"id": "served-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.auth.append(self.headers.get("Authorization"))
        self.calls.append(("POST", self.path, body))
        if self.path == "/reset_prefix_cache":
            self._reply(self.reset_answer, self.reset_status)
            return
        if self.path == "/collective_rpc" and body["method"] == "asymre_receiver":
            if self.receiver == "404":  # a server without VLLM_SERVER_DEV_MODE has no /collective_rpc
                self._reply({"detail": "Not Found"}, 404)
            elif self.receiver is None:
                self._reply({"error": "Method asymre_receiver is not implemented"}, 500)
            else:
                self._reply({"results": self.receiver})
            return
        if self.path == "/v1/completions":
            type(self).in_flight += 1
            type(self).most_in_flight = max(self.most_in_flight, self.in_flight)
            time.sleep(self.delay)
            type(self).in_flight -= 1
            n = body["n"]
            self._reply({"choices": [{"text": "5", "token_ids": list(self.token_ids), "finish_reason": "stop",
                                      "logprobs": {"token_logprobs": [-0.1, -0.2]}} for _ in range(n)]})
        else:
            self._reply({})


@pytest.fixture
def server():
    _Handler.calls, _Handler.auth, _Handler.in_flight, _Handler.most_in_flight, _Handler.delay, _Handler.reset_answer = [], [], 0, 0, 0.0, {}
    _Handler.reset_status, _Handler.served_version, _Handler.receiver = 200, "0.32.0", None
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_remote_generate_and_weight_push(server, model_path, tmp_path):
    gen = RemoteVLLMGenerator(server, model_path)
    assert gen.model_name == "served-model" and gen.sync_methods == ("disk",)
    train, _ = build_task(load_config().task)
    groups = gen.generate(train[:2], SamplingSpec(n=3, temperature=1.0, max_new_tokens=8, seed=4, logprobs=True))
    assert len(groups) == 2 and all(len(g.trajectories) == 3 for g in groups)
    t = groups[0].trajectories[0]
    assert t.completion_ids == [33, 2] and t.finish_reason == "stop" and t.logprobs == [-0.1, -0.2] and groups[0].version == 0
    reqs = [c[2] for c in _Handler.calls if c[1] == "/v1/completions"]
    # concurrent requests arrive in any order; each group still answers its own prompt
    assert sorted(r["prompt"] for r in reqs) == sorted(g.prompt_ids for g in groups) and groups[0].prompt_ids != groups[1].prompt_ids
    req = reqs[0]
    assert req["n"] == 3 and req["max_tokens"] == 8 and req["logprobs"] == 0
    # each request its own seed, from the round's seed and the prompt's index (copies of a prompt sample apart)
    by_prompt = {tuple(r["prompt"]): r["seed"] for r in reqs}
    assert [by_prompt[tuple(g.prompt_ids)] for g in groups] == [derive_seed(4, 0), derive_seed(4, 1)]

    gen.load_weights(str(tmp_path), version=7)
    rpc = [c for c in _Handler.calls if c[1] == "/collective_rpc"][0][2]
    assert rpc == {"method": "reload_weights", "kwargs": {"weights_path": str(tmp_path)}}
    assert [c[1] for c in _Handler.calls][-1] == "/reset_prefix_cache" and gen.version == 7
    assert [g.version for g in gen.generate(train[:2], SamplingSpec(n=1, max_new_tokens=2))] == [7, 7]  # each group's version
    with pytest.raises(ValueError, match="sync.method=disk"):
        gen.load_weights(iter([]), 8)


def test_unreachable_server_is_named(model_path):
    with pytest.raises(RuntimeError, match="127.0.0.1:9"):
        RemoteVLLMGenerator("http://127.0.0.1:9", model_path, timeout_s=2)


def test_a_round_is_sent_at_once_so_the_server_can_batch_it(server, model_path):
    """One request per prompt, one after another, would leave the server one sequence group at a time."""
    _Handler.delay = 0.3
    gen = RemoteVLLMGenerator(server, model_path)
    train, _ = build_task(load_config().task)
    groups = gen.generate(train[:6], SamplingSpec(n=2, temperature=1.0, max_new_tokens=4, seed=0))
    assert [g.prompt.uid for g in groups] == [p.uid for p in train[:6]]  # in prompt order
    assert _Handler.most_in_flight == 6


def test_weight_folder_goes_absolute_and_a_failed_cache_reset_is_an_error(server, model_path, tmp_path, monkeypatch):
    """The server resolves a relative folder against its own working directory (or takes it for a hub id); a
    prefix cache it could not reset would still serve the old weights' keys and values."""
    gen = RemoteVLLMGenerator(server, model_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run" / "sync").mkdir(parents=True)
    gen.load_weights(os.path.join("run", "sync"), version=1)
    rpc = [c for c in _Handler.calls if c[1] == "/collective_rpc"][-1][2]
    assert rpc["kwargs"]["weights_path"] == str(tmp_path / "run" / "sync")
    _Handler.reset_answer = {"success": False}
    with pytest.raises(RuntimeError, match=rf"vLLM server {server}/reset_prefix_cache: not reset"):
        gen.load_weights(str(tmp_path), version=2)
    _Handler.reset_answer, _Handler.reset_status = {"error": "cache busy"}, 500
    with pytest.raises(RuntimeError, match=rf"vLLM server {server}/reset_prefix_cache: HTTP Error 500.*cache busy"):
        gen.load_weights(str(tmp_path), version=3)
    assert gen.version == 1


def test_a_server_running_an_unchecked_vllm_is_refused_naming_it(server, model_path):
    """The weight pushes call vLLM's dev endpoints (/collective_rpc reload_weights), whose arguments change between
    versions: a server on another vLLM would fail at the first push, or load nothing."""
    _Handler.served_version = "0.10.2"
    with pytest.raises(RuntimeError, match=rf"vLLM server {server} runs vLLM 0.10.2, but asymre's weight pushes .* were "
                                           r"checked against vLLM 0.32.x: serve with vllm==0.32.\*"):
        RemoteVLLMGenerator(server, model_path)


def test_streaming_weights_to_a_server_without_the_receiver_is_refused_at_start(server, model_path):
    """sync.method=broadcast needs asymre's worker extension in the server (one worker, on the learner's kind of device:
    NCCL on GPUs, gloo on CPUs): without it, without the dev endpoints, with two workers, or on a GPU while the learner
    is on a CPU, the generator refuses at start-up, naming what to change; the disk method never asks."""
    with pytest.raises(RuntimeError, match=r"--worker-extension-cls asymre\.rollout\.vllm_receiver\.WeightReceiver"):
        RemoteVLLMGenerator(server, model_path, stream_weights=True)
    RemoteVLLMGenerator(server, model_path)  # disk: no receiver needed
    _Handler.receiver = "404"
    with pytest.raises(RuntimeError, match=r"VLLM_SERVER_DEV_MODE=1 \(its /collective_rpc endpoint answered 404\)"):
        RemoteVLLMGenerator(server, model_path, stream_weights=True)
    _Handler.receiver = [{"protocol": PROTOCOL, "device": "cpu"}] * 2
    with pytest.raises(RuntimeError, match=r"expected one worker's \{'protocol': \d+, \.\.\.\} \(tensor_parallel_size=1"):
        RemoteVLLMGenerator(server, model_path, stream_weights=True)
    _Handler.receiver = [{"protocol": PROTOCOL, "device": "cuda"}]  # this machine (the learner's) has no GPU
    with pytest.raises(RuntimeError, match=r"runs on cuda but the learner on cpu: .* use sync.method=disk"):
        RemoteVLLMGenerator(server, model_path, stream_weights=True)
    _Handler.receiver = [{"protocol": PROTOCOL, "device": "cpu"}]
    assert RemoteVLLMGenerator(server, model_path, stream_weights=True).version == 0
