"""Generation workers in their own processes, so generation overlaps learning (async mode).

Each worker process owns one `Generator` (built in the child from a picklable factory), scores its own
groups with the reward functions (off the learner's critical path), and answers: generate; load
weights from a safetensors folder (the 'disk' sync method) or from its `WeightChannel` (the 'broadcast'
method: NCCL on GPUs, gloo on CPU; the channel is opened by a 'channel' message on first use); stop.
Weights and stop travel on a control queue that is read before the next queued generation request. The learner's main
process talks to them through a `WorkerPool`, which notices a dead or silent worker within
`worker_timeout_s`, restarts it up to `max_restarts` times (re-sending its unfinished requests and
the latest weights), and otherwise raises `WorkerError` naming the worker. Nothing here can hang
forever: every wait has a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from asymre.data import Prompt, TrajectoryGroup
from asymre.rollout.base import SamplingSpec, check_groups


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class WorkerError(RuntimeError):
    """A generation worker died, went silent, or raised; the message names it."""


def _next_message(ctrl_q, req_q):
    """Control messages (weights, stop) jump the queue of generation requests."""
    while True:
        try:
            return ctrl_q.get_nowait()
        except queue.Empty:
            pass
        try:
            return req_q.get(timeout=0.05)
        except queue.Empty:
            continue


def _worker_main(index: int, factory: Callable, factory_args: tuple, factory_kwargs: dict, env: dict, scorer_args: dict | None,
                 req_q, ctrl_q, out_q) -> None:
    try:
        import os

        os.environ.update(env)  # e.g. CUDA_VISIBLE_DEVICES: this worker's generation GPU, set before any CUDA init
        _forward_logs(index, out_q)
        gen = factory(*factory_args, **factory_kwargs)
        scorer, channel = None, None
        if scorer_args is not None:
            from asymre.rewards import RewardScorer

            scorer = RewardScorer(**scorer_args)
        out_q.put(("ready", index, None))
        while True:
            msg = _next_message(ctrl_q, req_q)
            kind = msg[0]
            if kind == "stop":
                break
            if kind == "weights":
                _, path, version = msg
                gen.load_weights(path, version)
                out_q.put(("loaded", index, version))
            elif kind == "channel":
                from asymre.sync import WeightChannel

                _, host, port, backend, timeout_s, secret = msg
                channel = WeightChannel(host, port, 1, backend, timeout_s, secret=secret).connect()
            elif kind == "weights_broadcast":
                _, meta, version = msg
                gen.load_weights(channel.receive(meta), version)
                out_q.put(("loaded", index, version))
            elif kind == "generate":
                _, rid, prompts, spec, step = msg
                t0 = time.perf_counter()
                groups = gen.generate(prompts, spec)
                gen_s = time.perf_counter() - t0
                metrics: dict[str, float] = {"perf/generation_seconds": gen_s}
                if scorer is not None:
                    try:
                        metrics.update(scorer.score(groups, step))
                    except Exception as e:  # noqa: BLE001 - sent to the learner, which decides
                        out_q.put(("reward_error", index, (rid, str(e))))
                        continue
                out_q.put(("groups", index, (rid, groups, metrics)))
        gen.close()
    except BaseException:  # noqa: BLE001
        out_q.put(("error", index, traceback.format_exc()))


def _forward_logs(index: int, out_q) -> None:
    """Send this worker's `asymre` warnings (a failing reward's traceback, say) to the learner's process, which
    logs them in the run's log: a spawned worker has no log configuration of its own."""
    import logging

    class ToLearner(logging.Handler):
        def emit(self, record):
            try:
                out_q.put(("log", index, (record.levelno, record.name, self.format(record))))
            except Exception:  # noqa: BLE001 - logging never kills the worker
                pass

    logger = logging.getLogger("asymre")
    logger.addHandler(ToLearner(logging.WARNING))
    logger.propagate = False


@dataclass
class _Worker:
    index: int
    proc: Any = None
    req_q: Any = None
    ctrl_q: Any = None
    channel: Any = None  # learner end of its WeightChannel (sync.method=broadcast), opened on first push
    pending: dict[int, tuple] = field(default_factory=dict)  # request id -> (prompts, spec, learner step)
    last_heard: float = 0.0
    restarts: int = 0
    version: int = 0


class WorkerHandle:
    """What `WeightSync` pushes to: one worker, reached through the pool. `remote` selects the disk method."""

    remote = True

    def __init__(self, pool: "WorkerPool", index: int):
        self.pool, self.index = pool, index

    def load_weights(self, path: str, version: int) -> None:
        self.pool.push_weights(self.index, path, version)

    def broadcast_weights(self, state_dict: dict, version: int, timeout_s: float | None = None) -> None:
        self.pool.broadcast_weights(self.index, state_dict, version, timeout_s)


class WorkerPool:
    def __init__(self, num_workers: int, factory: Callable, factory_args: tuple, scorer_args: dict | None = None,
                 worker_timeout_s: float = 600.0, max_restarts: int = 2, start_timeout_s: float = 600.0,
                 per_worker: list[tuple[dict, dict]] | None = None, channel_host: str = "127.0.0.1",
                 vocab_size: int | None = None):
        """`per_worker[i]` = (extra factory kwargs, environment) for worker i, e.g. its GPU or server URL.
        `channel_host`: the interface a broadcast weight channel listens on (sync.channel_host)."""
        self.channel_host = channel_host
        self.vocab_size = vocab_size  # token ids coming back are checked against it (the learner's embedding rows)
        self.ctx = mp.get_context("spawn")  # vLLM and torch threads do not survive fork
        self.factory, self.factory_args, self.scorer_args = factory, factory_args, scorer_args
        self.per_worker = per_worker or [({}, {})] * num_workers
        self.worker_timeout_s, self.max_restarts, self.start_timeout_s = worker_timeout_s, max_restarts, start_timeout_s
        self.out_q = self.ctx.Queue()
        self.workers = [_Worker(i) for i in range(num_workers)]
        self.results: list[tuple[int, list[TrajectoryGroup], dict]] = []
        self.reward_errors: list[str] = []
        self.latest_weights: tuple[str, int] | dict | None = None  # (folder, version) or broadcast state
        self._next_rid = 0
        for w in self.workers:
            self._spawn(w)
        self._wait_ready([w.index for w in self.workers])

    @property
    def handles(self) -> list[WorkerHandle]:
        return [WorkerHandle(self, w.index) for w in self.workers]

    def _spawn(self, w: _Worker) -> None:
        w.req_q = self.ctx.Queue()
        w.ctrl_q = self.ctx.Queue()
        w.proc = self.ctx.Process(target=_worker_main, name=f"asymre-worker-{w.index}", daemon=True,
                                  args=(w.index, self.factory, self.factory_args, *self.per_worker[w.index], self.scorer_args,
                                        w.req_q, w.ctrl_q, self.out_q))
        w.proc.start()
        w.last_heard = time.monotonic()

    def _wait_ready(self, indices: list[int]) -> None:
        waiting = set(indices)
        deadline = time.monotonic() + self.start_timeout_s
        while waiting:
            msg = self._get(deadline, f"worker(s) {sorted(waiting)} to start")
            if msg[0] == "ready":
                waiting.discard(msg[1])
            else:
                self._handle(msg)

    def _get(self, deadline: float, what: str):
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f"timed out waiting for {what}")
            try:
                return self.out_q.get(timeout=min(left, 1.0))
            except queue.Empty:
                self._check_health()

    def _handle(self, msg) -> None:
        kind, index, payload = msg
        w = self.workers[index]
        w.last_heard = time.monotonic()
        if kind == "groups":
            rid, groups, metrics = payload
            request = w.pending.pop(rid, None)
            if request is not None:  # else a duplicate from a worker killed mid-send
                problem = check_groups(groups, request[0], request[1], self.vocab_size)
                if problem:
                    raise WorkerError(f"generation worker {index} returned malformed groups for request {rid}: {problem}")
                self.results.append((index, groups, metrics))
        elif kind == "reward_error":
            rid, err = payload
            w.pending.pop(rid, None)
            self.reward_errors.append(err)
        elif kind == "loaded":
            w.version = payload
        elif kind == "log":
            import logging

            level, name, text = payload
            logging.getLogger(name).log(level, "(generation worker %d) %s", index, text)
        elif kind == "error":
            raise WorkerError(f"generation worker {index} raised:\n{payload}")

    def _check_health(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            dead = w.proc.exitcode is not None
            silent = bool(w.pending) and now - w.last_heard > self.worker_timeout_s
            if not (dead or silent):
                continue
            why = f"exited with code {w.proc.exitcode}" if dead else f"silent for {now - w.last_heard:.0f}s (rollout.worker_timeout_s={self.worker_timeout_s})"
            if w.restarts >= self.max_restarts:
                raise WorkerError(f"generation worker {w.index} {why}; restarted {w.restarts} times already "
                                  f"(rollout.max_worker_restarts={self.max_restarts}), stopping")
            self._restart(w, why)

    def _restart(self, w: _Worker, why: str) -> None:
        import logging

        logging.getLogger("asymre").warning("generation worker %d %s: restarting (%d/%d)", w.index, why, w.restarts + 1, self.max_restarts)
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
        w.restarts += 1
        pending = dict(w.pending)
        if w.channel is not None:
            w.channel.close()
            w.channel = None
        w.version = -1  # the new process has its initial weights until it acknowledges a push
        self._spawn(w)
        self._wait_ready([w.index])
        if isinstance(self.latest_weights, tuple):
            w.ctrl_q.put(("weights", *self.latest_weights))
        elif self.latest_weights is not None:  # broadcast: the learner's weights now, tagged with the last push
            latest = self.latest_weights
            self.broadcast_weights(w.index, latest["state"], latest["version"], latest["timeout_s"])
        for rid, request in pending.items():
            w.req_q.put(("generate", rid, *request))

    # ---- the learner's side ----------------------------------------------------------------------
    def outstanding(self, index: int | None = None) -> int:
        if index is not None:
            return len(self.workers[index].pending)
        return sum(len(w.pending) for w in self.workers)

    def submit(self, prompts: list[Prompt], spec: SamplingSpec, step: int = 0) -> int:
        """Queue a generation request on the least busy worker; returns its request id. `step` is the learner
        step its rewards see as `trainer_state.global_step`."""
        w = min(self.workers, key=lambda x: len(x.pending))
        rid = self._next_rid
        self._next_rid += 1
        if not w.pending:
            w.last_heard = time.monotonic()
        w.pending[rid] = (prompts, spec, step)
        w.req_q.put(("generate", rid, prompts, spec, step))
        return rid

    def poll(self, timeout: float = 0.0) -> list[tuple[int, list[TrajectoryGroup], dict]]:
        """Collect finished requests: waits up to `timeout` for at least one when none is ready."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._handle(self.out_q.get(timeout=0.05 if timeout > 0 else 0.001))
                continue
            except queue.Empty:
                pass
            self._check_health()
            if self.results or self.reward_errors or time.monotonic() >= deadline:
                break
        out, self.results = self.results, []
        return out

    def push_weights(self, index: int, path: str, version: int, timeout_s: float | None = None) -> None:
        """Send a weight folder to one worker and wait for its acknowledgement."""
        self.latest_weights = (path, version)
        w = self.workers[index]
        w.ctrl_q.put(("weights", path, version))  # ahead of queued generation requests
        self._wait_loaded(w, version, timeout_s)

    def broadcast_weights(self, index: int, state_dict: dict, version: int, timeout_s: float | None = None) -> None:
        """Stream `state_dict` to one worker over its WeightChannel and wait for its acknowledgement.

        The first push opens the channel (NCCL when this process has a GPU, else gloo). The state dict is
        kept by reference for a worker restarted before the next push (under DDP that is the live weights,
        so a restarted worker may run weights up to sync.interval - 1 steps newer than their version tag)."""
        from asymre.sync import WeightChannel

        timeout_s = timeout_s or self.worker_timeout_s
        self.latest_weights = {"state": state_dict, "version": version, "timeout_s": timeout_s}
        w = self.workers[index]
        try:
            if w.channel is None:
                backend = "nccl" if torch_cuda_available() else "gloo"
                if backend == "nccl" and "CUDA_VISIBLE_DEVICES" not in self.per_worker[index][1]:
                    raise ValueError("sync.method=broadcast on GPUs needs each worker on its own GPU (rollout.devices): "
                                     "NCCL cannot connect two ranks on one device")
                channel = WeightChannel.listen(backend, timeout_s, host=self.channel_host)
                w.ctrl_q.put(("channel", channel.host, channel.port, backend, timeout_s, channel.secret))  # the secret: pipe only
                w.channel = channel.connect()
            meta = WeightChannel.describe(state_dict)
            w.ctrl_q.put(("weights_broadcast", meta, version))
            w.channel.send(state_dict, meta)
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a dead peer or a timeout inside the collective
            if w.channel is not None:
                w.channel.close()
                w.channel = None
            w.proc.join(timeout=10.0)  # a worker that crashed may still be tearing its engine down
            if w.proc.exitcode is None or w.restarts >= self.max_restarts:
                raise WorkerError(f"weight broadcast to generation worker {index} failed "
                                  f"({'still running' if w.proc.exitcode is None else f'exit code {w.proc.exitcode}'}): {e}") from e
            self._restart(w, f"exited with code {w.proc.exitcode} during a weight broadcast")  # re-sends these weights
            return
        self._wait_loaded(w, version, timeout_s)

    def _wait_loaded(self, w: _Worker, version: int, timeout_s: float | None) -> None:
        """Handle the workers' messages until worker `w` acknowledges weights `version`, or time out."""
        deadline = time.monotonic() + (timeout_s or self.worker_timeout_s)
        while w.version != version:
            self._handle(self._get(deadline, f"worker {w.index} to load weights version {version}"))

    def close(self) -> None:
        for w in self.workers:
            try:
                w.ctrl_q.put(("stop",))
            except Exception:  # noqa: BLE001
                pass
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
