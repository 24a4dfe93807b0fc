"""Weight sync: every `sync.interval` learner steps (the paper's N) push the learner's weights into every
engine and bump the policy version.

Methods: 'inprocess' hands tensors to a colocated engine by reference; 'broadcast' streams them to
worker processes over a `WeightChannel` (a torch.distributed process group per worker: NCCL when the
learner is on a GPU, so the weights go GPU to GPU; gloo on CPU); 'disk' writes one safetensors folder
(atomically) that worker processes or remote vLLM servers load, the portable fallback.
Every push runs under `sync.timeout_s`: past it, a `SyncTimeout` (or the channel's own timeout) names the
engine, never a silent hang.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DEFAULT_BUCKET_MB = 64.0  # sync.bucket_mb's default


def _bucket_bytes(bucket_mb: float) -> int:
    """A bucket's size in bytes, a multiple of 16 (so every element size divides a bucket's start)."""
    return max(16, int(bucket_mb * 2**20) // 16 * 16)


def tensor_identity(t: torch.Tensor) -> tuple:
    """What makes two names one tensor (a tied lm_head): same storage, place, shape, strides and dtype (a transposed
    view of a weight is another tensor)."""
    return (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _bucket_plan(manifest: dict) -> tuple[int, list[tuple[int, int, list]]]:
    """(the largest bucket's bytes, [(start, end, [(name, shape, dtype, offset, nbytes) overlapping it])] per bucket)
    from a `WeightChannel.describe` manifest: the same on both ends of the channel."""
    size = int(manifest["bucket_bytes"])
    stream = []
    for name, shape, dtype, alias, offset in manifest["tensors"]:
        nbytes = _numel(shape) * getattr(torch, dtype).itemsize
        if alias is None and nbytes:
            stream.append((name, shape, dtype, offset, nbytes))
    total = max((e[3] + e[4] for e in stream), default=0)
    spans, j = [], 0
    for lo in range(0, total, size):
        hi = min(lo + size, total)
        while j < len(stream) and stream[j][3] + stream[j][4] <= lo:
            j += 1
        members, m = [], j
        while m < len(stream) and stream[m][3] < hi:
            members.append(stream[m])
            m += 1
        spans.append((lo, hi, members))
    return min(size, total), spans


class SyncTimeout(TimeoutError):
    """A weight push or acknowledgement did not finish within sync.timeout_s."""


def write_weights_folder(state_dict: dict[str, torch.Tensor], folder: str | Path, dtype: torch.dtype | None = None) -> str:
    """Atomically write `state_dict` as `folder/model.safetensors`, floating tensors in `dtype` if given (the engine's:
    it would cast them on loading anyway, so it holds the same weights from half the bytes of float32 masters)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    # Every name is written, a tied lm_head too (as its own copy: safetensors refuses shared storage): a remote
    # server loads the folder with vLLM's reload_weights, which on CPU re-packs the LM head only when an
    # explicit lm_head.weight arrives.
    tensors, seen = {}, set()
    for k, v in state_dict.items():
        ptr = v.data_ptr()
        t = v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
        tensors[k] = t.clone() if ptr in seen and t.data_ptr() == ptr else t
        seen.add(ptr)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return str(folder)


def read_weights_folder(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in weight folder {folder}")
    for f in files:
        yield from load_file(str(f)).items()


class ChannelAuthError(RuntimeError):
    """A peer tried to join a weight channel without its secret; the channel is closed, nothing was sent."""


def _proof(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def _listening_socket(host: str) -> tuple[int, int]:
    """A TCP socket bound to `host` only, listening, handed to the store by file descriptor: torch's TCPStore
    binds every interface whatever host it is given (measured: `*:PORT`), this one binds just `host`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    return sock.detach(), port  # the store owns the descriptor from here on


def _address_toward(host: str) -> str:
    """This machine's address on the route to `host` (a UDP connect sends nothing; it only picks the interface): a
    peer on another machine cannot bind the learner's address, and binding every interface is what we avoid."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


class WeightChannel:
    """A two-member process group, learner (rank 0) -> one worker process (rank 1), for weight pushes.

    Built from its own TCPStore, outside torch.distributed's default group, so it never touches the
    learners' DDP/FSDP group and a restarted worker only rebuilds its own channel. Backend 'nccl' (the
    weights travel GPU to GPU; the worker receives into its generation GPU) or 'gloo' (CPU). The learner
    side is made in two halves: `listen()` opens the store (its port goes to the worker), `connect()`
    then meets the worker; every collective fails after `timeout_s` instead of hanging.

    Nothing listens beyond `host` (default 127.0.0.1, `sync.channel_host`): the store's socket and gloo's
    pair sockets are bound to it. The store itself has no authentication, so before either side joins the
    group the worker proves it holds the channel's secret (sent to a local worker over its multiprocessing pipe,
    never over the network; to a remote server's worker in its /collective_rpc request): HMAC-SHA256 of a nonce the
    learner puts in the store. A wrong proof closes the
    channel with `ChannelAuthError` before any weight is sent. NCCL's own bootstrap sockets follow
    NCCL_SOCKET_IFNAME (set it to `lo` on one host). On NCCL the group is built so that a failure raises here and
    costs this channel only (`nccl_channel_group`); `connect` runs one tiny broadcast, so the communicator's init
    (lazy in torch) happens, bounded, before the first push."""

    def __init__(self, host: str, port: int, rank: int, backend: str, timeout_s: float, store=None, secret: str = ""):
        import torch.distributed as dist

        self.host, self.rank, self.backend, self.timeout_s, self.secret = host, rank, backend, timeout_s, secret
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.store = store if store is not None else dist.TCPStore(host, port, world_size=2, is_master=False,
                                                                    timeout=timedelta(seconds=timeout_s))
        self.port = self.store.port
        self.group = None

    @classmethod
    def listen(cls, backend: str, timeout_s: float, host: str = "127.0.0.1", secret: str | None = None,
               join_timeout_s: float | None = None) -> WeightChannel:
        """`join_timeout_s` (default `timeout_s`): how long the learner waits for the peer to join."""
        import torch.distributed as dist

        fd, port = _listening_socket(host)
        store = dist.TCPStore(host, port, world_size=2, is_master=True, timeout=timedelta(seconds=join_timeout_s or timeout_s),
                              wait_for_workers=False, master_listen_fd=fd)
        channel = cls(host, store.port, 0, backend, timeout_s, store=store, secret=secret or secrets.token_hex(16))
        channel.store.set("asymre/nonce", secrets.token_hex(16))
        return channel

    def _authenticate(self) -> None:
        """Worker: publish the proof of the secret. Learner: check it, or close the channel."""
        nonce = self.store.get("asymre/nonce").decode()
        if self.rank == 1:
            self.store.set("asymre/proof", _proof(self.secret, nonce))
            return
        got = self.store.get("asymre/proof").decode()  # waits up to timeout_s for the peer
        if not hmac.compare_digest(got, _proof(self.secret, nonce)):
            self.close()
            raise ChannelAuthError(f"weight channel on {self.host}:{self.port}: a peer joined with a wrong secret; "
                                   "refused before any weight was sent")

    def connect(self) -> WeightChannel:
        try:
            return self._connect()
        except BaseException:
            self.close()  # a half-made group (an NCCL communicator mid-init) is aborted, not left to the collector
            raise

    def _connect(self) -> WeightChannel:
        import torch.distributed as dist

        timeout = timedelta(seconds=self.timeout_s)
        self._authenticate()
        if self.backend == "gloo":
            opts = dist.ProcessGroupGloo._Options()
            # pair sockets on one interface only: the learner's on `host`, the peer's on its own address toward it
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self.host if self.rank == 0 else _address_toward(self.host))]
            opts._timeout = timeout
            self.group = dist.ProcessGroupGloo(self.store, self.rank, 2, opts)
        elif self.backend == "nccl":
            self.group = nccl_channel_group(self.store, self.rank, timeout)
            self._broadcast(torch.zeros(1, device=self.device))  # the communicator's init, bounded here, not at the first push
        else:
            raise ValueError(f"weight channel backend {self.backend!r}: expected 'nccl' or 'gloo'")
        return self

    @staticmethod
    def describe(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | str | None = None,
                 bucket_mb: float = DEFAULT_BUCKET_MB) -> dict:
        """What a push sends, for both ends to agree on: the bucket size and, per name, (name, shape, dtype on the wire,
        alias, byte offset). Floating tensors travel in `dtype` (the engine's: it would cast them anyway, so what it
        holds is the same; half the bytes of float32 masters for bf16) and the others as they are. The tensors are laid
        end to end in one byte stream (each at an offset its element size divides) cut into buckets of `bucket_mb`; a
        tensor may span buckets. A tensor shared under two names (a tied lm_head) is sent once: the later name is its
        alias, with no offset."""
        wire = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        first: dict[tuple, str] = {}
        tensors, end = [], 0
        for name, t in state_dict.items():
            key = tensor_identity(t)
            out = wire if wire is not None and t.is_floating_point() else t.dtype
            alias = first.get(key)
            offset = None
            if alias is None:
                first[key] = name
                offset = -(-end // out.itemsize) * out.itemsize
                end = offset + t.numel() * out.itemsize
            tensors.append((name, tuple(t.shape), str(out).removeprefix("torch."), alias, offset))
        return {"bucket_bytes": _bucket_bytes(bucket_mb), "tensors": tensors}

    def _broadcast(self, t: torch.Tensor) -> None:
        # wait(timeout) blocks this thread until the tensor is through (for NCCL too, whose plain wait()
        # only orders the CUDA stream), so a dead or stalled peer ends in an error here, not a hang later
        self.group.broadcast(t, 0).wait(timedelta(seconds=self.timeout_s))

    def send(self, state_dict: dict[str, torch.Tensor], manifest: dict) -> None:
        """Send the buckets `manifest` describes, double-buffered: bucket k+1 is packed (the cast to the wire dtype
        included, on the channel's device: the learner's GPU under NCCL) while bucket k is on the wire, so the extra
        memory is two buckets, never a cast copy of the model."""
        size, spans = _bucket_plan(manifest)
        buffers: list[torch.Tensor | None] = [None, None]
        timeout = timedelta(seconds=self.timeout_s)
        in_flight = None
        for k, (lo, hi, members) in enumerate(spans):
            if buffers[k % 2] is None:
                buffers[k % 2] = torch.empty(size, dtype=torch.uint8, device=self.device)
            buf = buffers[k % 2][: hi - lo]
            for name, _shape, dtype, offset, nbytes in members:
                wire = getattr(torch, dtype)
                a, b = max(offset, lo), min(offset + nbytes, hi)
                src = state_dict[name].detach().reshape(-1)[(a - offset) // wire.itemsize : (b - offset) // wire.itemsize]
                buf[a - lo : b - lo].view(wire).copy_(src)  # cast and (under NCCL) host-to-device copy in one
            if in_flight is not None:
                in_flight.wait(timeout)
            in_flight = self.group.broadcast(buf, 0)
        if in_flight is not None:
            in_flight.wait(timeout)

    def receive(self, manifest: dict) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) as each arrives, so the engine loads while the rest is in flight: bucket k+1 is posted
        before bucket k's tensors are yielded (views into it; a fresh bucket each time, so nothing yielded is
        overwritten). A tensor spanning buckets is assembled in a tensor of its own. Only a tensor that a later name
        aliases is kept (one model's worth of extra memory would not fit a GPU)."""
        size, spans = _bucket_plan(manifest)
        entries = [tuple(m) for m in manifest["tensors"]]
        needed = {m[3] for m in entries if m[3] is not None}
        kept: dict[str, torch.Tensor] = {}
        timeout = timedelta(seconds=self.timeout_s)

        def post(k):
            lo, hi, _ = spans[k]
            buf = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)
            return buf, self.group.broadcast(buf, 0)

        i, pending, partial = 0, post(0) if spans else None, None
        for k, (lo, hi, _) in enumerate(spans):
            buf, work = pending
            work.wait(timeout)
            pending = post(k + 1) if k + 1 < len(spans) else None
            while i < len(entries):
                name, shape, dtype, alias, offset = entries[i]
                if alias is not None:
                    yield name, kept[alias]
                    i += 1
                    continue
                wire = getattr(torch, dtype)
                nbytes = _numel(shape) * wire.itemsize
                if offset >= hi and nbytes:
                    break
                if lo <= offset and offset + nbytes <= hi:
                    t = buf[offset - lo : offset - lo + nbytes].view(wire).view(shape)
                    if name in needed:
                        t = t.clone()  # not a view: it would keep its whole bucket alive
                else:  # spans buckets: this bucket's part of it
                    if partial is None:
                        partial = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                    a, b = max(offset, lo), min(offset + nbytes, hi)
                    partial[a - offset : b - offset].copy_(buf[a - lo : b - lo])
                    if offset + nbytes > hi:
                        break
                    t, partial = partial.view(wire).view(shape), None
                if name in needed:
                    kept[name] = t
                yield name, t
                del t  # this generator's frame must not be what keeps it alive
                i += 1
            del buf
        for name, shape, dtype, alias, _ in entries[i:]:  # what no bucket holds: aliases, empty tensors
            yield name, kept[alias] if alias is not None else torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)

    def close(self) -> None:
        """Abort the group (frees a NCCL communicator stuck on a dead peer) and drop it."""
        group, self.group, self.store = self.group, None, None
        abort = getattr(group, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # noqa: BLE001 - best effort on an already broken group
                pass


# What a WeightChannel's NCCL group is built under (torch 2.13, ProcessGroupNCCL.cpp: its constructor reads these per
# instance into blockingWait_ and asyncErrorHandling_, ProcessGroupNCCL.hpp), so that a dead or stalled peer costs
# only the channel, never the learner:
# - TORCH_NCCL_BLOCKING_WAIT=1: the group starts no watchdog thread (nor its heartbeat monitor); an error surfaces
#   only in our `wait(timeout)`. The watchdog is what tears the process down on a timeout: torchrun's agent (which
#   `accelerate launch` runs) sets TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (TearDown) for the whole process, and any
#   watchdog-detected error also raises the process-wide dump signal on which the default group's heartbeat monitor
#   terminates the process after TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC.
# - TORCH_NCCL_ASYNC_ERROR_HANDLING=2 (CleanUpOnly): abort this group's communicators on an error, never tear down.
# - TORCH_NCCL_DUMP_ON_TIMEOUT=0: no flight-recorder dump signal from this group.
# The variables are restored right after, so the learners' own groups keep their settings. The communicator is
# initialised non-blocking (Options.config.blocking = 0), so its init, which otherwise blocks in
# ncclCommInitRankConfig with no timeout when the peer never comes, is bounded by TORCH_NCCL_NONBLOCKING_TIMEOUT
# (read once per process; set to sync.timeout_s unless the user set it). WorkNCCL::wait(timeout) blocks the calling
# thread, aborts the communicator and raises DistBackendError (a RuntimeError) past the timeout.
NCCL_CHANNEL_ENV = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}


def nccl_channel_group(store, rank: int, timeout: timedelta):
    """A two-member ProcessGroupNCCL whose failures raise in the caller and cost only this group (see NCCL_CHANNEL_ENV)."""
    import torch.distributed as dist

    os.environ.setdefault("TORCH_NCCL_NONBLOCKING_TIMEOUT", str(max(1, int(timeout.total_seconds()))))
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    opts.config.blocking = 0
    saved = {k: os.environ.get(k) for k in NCCL_CHANNEL_ENV}
    os.environ.update(NCCL_CHANNEL_ENV)
    try:
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_with_timeout(fn, timeout_s: float, what: str):
    """Run fn() and raise SyncTimeout naming `what` if it exceeds timeout_s.

    On the main thread a SIGALRM timer interrupts it (the call stays on this thread: vLLM's CPU backend
    binds its OpenMP threads to the main thread, and the same reload is much slower on a helper thread:
    docs/benchmarks.md, "The off-policy loop's parts"). Elsewhere fn runs on a helper thread that is abandoned on timeout."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            raise SyncTimeout(f"weight push to {what} did not finish within sync.timeout_s={timeout_s}s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    th = threading.Thread(target=target, name=f"sync:{what}", daemon=True)
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise SyncTimeout(f"weight push to {what} did not finish within sync.timeout_s={timeout_s}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def sync_methods(engine) -> tuple[str, ...]:
    """The push methods an engine accepts (`Generator.sync_methods`; an in-process engine that does not say
    takes 'inprocess' and 'disk')."""
    return tuple(getattr(engine, "sync_methods", IN_PROCESS_METHODS))


IN_PROCESS_METHODS = ("inprocess", "disk")


def torch_cuda_available() -> bool:
    return torch.cuda.is_available()


class WeightSync:
    """Decides when to push, picks the method, and owns the transport: the safetensors folder (disk), the
    per-worker `WeightChannel`s (broadcast), and the latest weights, re-sent to a worker process that was
    restarted. Engines are `Generator`s (in this process) or `WorkerHandle`s (a worker process, reached
    through its pool, which only passes messages); each declares the methods it accepts (`sync_methods`)."""

    def __init__(self, interval: int, method: str = "auto", timeout_s: float = 300.0, folder: str | Path | None = None,
                 channel_host: str = "127.0.0.1", dtype: torch.dtype | str | None = None, bucket_mb: float = DEFAULT_BUCKET_MB):
        self.interval = interval
        # the engines' dtype (model.dtype): what 'broadcast' and 'disk' send floating tensors in ('inprocess' hands the
        # tensors over as they are: the engine's loader casts each as it copies it in)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.bucket_mb = bucket_mb
        self.method = method
        self.timeout_s = timeout_s
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="asymre-sync-"))
        self.channel_host = channel_host  # the interface a broadcast channel listens on (sync.channel_host)
        self.channels: dict[int, WeightChannel] = {}  # worker index -> its open channel (broadcast)
        self.latest: tuple[str, object, int] | None = None  # (method, folder or state dict, version): for a restarted worker
        self.pushes = 0

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path) -> WeightSync:
        s = cfg.sync
        return cls(s.interval, s.method, s.timeout_s, Path(run_dir) / "sync", s.channel_host, cfg.model.dtype, s.bucket_mb)

    def due(self, learner_step: int) -> bool:
        return learner_step > 0 and learner_step % self.interval == 0

    def resolve_method(self, engines: list) -> str:
        if self.method != "auto":
            return self.method
        return "inprocess" if all("inprocess" in sync_methods(e) for e in engines) else "disk"

    def push(self, state_dict: dict[str, torch.Tensor], version: int, engines: list) -> float:
        """Push `state_dict` into every engine and set their version; returns seconds taken."""
        t0 = time.perf_counter()
        self._load(state_dict, version, engines, lent=False)
        self.pushes += 1
        return time.perf_counter() - t0

    def lend(self, state_dict: dict[str, torch.Tensor], version: int, engines: list) -> None:
        """Load `state_dict` into `engines` for a while (the learner's weights for an evaluation between pushes, then
        the behaviour weights back), as a push does, except that a restarted worker still gets the last push, and
        'disk' writes a folder of its own (removed once every engine has loaded it), leaving the last push's alone."""
        self._load(state_dict, version, engines, lent=True)

    def _load(self, state_dict: dict[str, torch.Tensor], version: int, engines: list, lent: bool) -> None:
        method = self.resolve_method(engines)
        if method not in ("inprocess", "broadcast", "disk"):
            raise ValueError(f"sync.method={method!r}: expected 'inprocess', 'broadcast' or 'disk'")
        for i, e in enumerate(engines):
            if method not in sync_methods(e):
                if method == "broadcast":
                    raise ValueError(f"sync.method=broadcast reaches worker processes (and the remote servers they "
                                     f"reach) only; engine {i} ({type(e).__name__}) takes 'inprocess' or 'disk'")
                raise ValueError("sync.method=inprocess cannot reach a worker process or remote server; use 'disk'")
        if method == "inprocess":
            for i, e in enumerate(engines):
                run_with_timeout(lambda e=e: e.load_weights(iter(state_dict.items()), version), self.timeout_s,
                                 f"engine {i} ({type(e).__name__})")
            return
        # broadcast: kept by reference for a worker restarted before the next push (under DDP that is the live weights,
        # so a restarted worker may run weights up to sync.interval - 1 steps newer than their version tag)
        payload = state_dict
        if method == "disk":
            payload = write_weights_folder(state_dict, self.folder / ("lent" if lent else "latest"), self.dtype)
        if not lent:
            self.latest = (method, payload, version)
            for e in engines:
                self._watch_restarts(e)
        for i, e in enumerate(engines):
            if method == "disk":
                run_with_timeout(lambda e=e: e.load_weights(payload, version), self.timeout_s, f"engine {i} ({type(e).__name__})")
            else:
                self._broadcast(e, state_dict, version)
        if lent and method == "disk":
            shutil.rmtree(payload, ignore_errors=True)

    # ---- worker processes ------------------------------------------------------------------------
    def _watch_restarts(self, handle) -> None:
        """A worker process restarted by its pool gets the latest weights from here (its channel is rebuilt)."""
        if hasattr(handle, "on_restart"):
            handle.on_restart(self._resend)

    def _resend(self, handle) -> None:
        old = self.channels.pop(handle.index, None)
        if old is not None:
            old.close()
        if self.latest is None:
            return
        method, payload, version = self.latest
        if method == "disk":
            # waited for: the worker reads control messages first only once they are through their pipe, and its
            # re-queued requests travel on another queue, so without the acknowledgement one could come first
            handle.send(("weights", payload, version))
            handle.wait_loaded(version, self.timeout_s)
        else:  # the learner's weights now, tagged with the last push
            self._broadcast(handle, payload, version)

    def _broadcast(self, handle, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """Stream `state_dict` to one worker over its WeightChannel and wait for its acknowledgement. The first
        push opens the channel: NCCL when this process has a GPU (the weights go GPU to GPU), else gloo."""
        try:
            channel = self.channels.get(handle.index)
            if channel is None:
                backend = "nccl" if torch_cuda_available() else "gloo"
                if backend == "nccl" and not handle.own_device:
                    raise ValueError("sync.method=broadcast on GPUs needs each worker on its own GPU (rollout.devices): "
                                     "NCCL cannot connect two ranks on one device")
                # a remote server's worker may still be waiting out a failed push's stream (up to sync.timeout_s) before
                # it reads the request to join: it gets twice as long
                join = self.timeout_s * (2 if getattr(handle, "remote", False) else 1)
                channel = WeightChannel.listen(backend, self.timeout_s, host=self.channel_host, join_timeout_s=join)
                handle.send(("channel", channel.host, channel.port, backend, self.timeout_s, channel.secret))  # the secret: pipe only
                self.channels[handle.index] = channel = channel.connect()
            manifest = WeightChannel.describe(state_dict, self.dtype, self.bucket_mb)
            handle.send(("weights_broadcast", manifest, version))
            channel.send(state_dict, manifest)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a dead peer or a timeout inside the collective
            dead = self.channels.pop(handle.index, None)
            if dead is not None:
                dead.close()
            handle.recover(f"weight broadcast to generation worker {handle.index} failed", e)  # a restart re-sends these weights
            return
        handle.wait_loaded(version, self.timeout_s)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
