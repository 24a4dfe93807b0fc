"""Generation workers in their own processes, so generation overlaps learning (async mode).

Each worker process owns one `Generator` (built in the child from a picklable factory), scores its own
groups with the reward functions (off the learner's critical path), and answers: generate; load
weights from a safetensors folder (the 'disk' sync method) or from its `WeightChannel` (the 'broadcast'
method; `asymre.sync.WeightSync` opens the channel with a 'channel' message); evaluate (generate the
held-out prompts unscored: the learner scores them); pause and resume (a paused worker leaves its queued
generation requests alone, so weights lent for an evaluation never generate training groups); stop.
All but generate travel on a control queue that is read before the next queued generation request.
The learner's main process talks to them through a `WorkerPool`, which only passes messages: it notices a
dead or silent worker within `worker_timeout_s`, restarts it up to `max_restarts` times (re-sending its
unfinished requests; the `WeightSync` that pushed last re-sends the latest weights), and otherwise raises
`WorkerError` naming the worker. Nothing here can hang forever: every wait has a deadline.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asymre.data import Prompt, TrajectoryGroup
from asymre.rollout.base import SamplingSpec, check_groups
from asymre.rollout.episodes import episode_metrics, portable


class WorkerError(RuntimeError):
    """A generation worker died, went silent, or raised; the message names it."""


def _next_message(ctrl_q, req_q, paused: bool = False):
    """Control messages (weights, evaluate, pause, stop) jump the queue of generation requests, which a paused
    worker does not read."""
    while True:
        try:
            return ctrl_q.get(timeout=0.05) if paused else ctrl_q.get_nowait()
        except queue.Empty:
            if paused:
                continue
        try:
            return req_q.get(timeout=0.05)
        except queue.Empty:
            continue


def _worker_main(index: int, factory: Callable, factory_args: tuple, factory_kwargs: dict, env: dict, scorer_config,
                 req_q, ctrl_q, out_q) -> None:
    try:
        import os

        os.environ.update(env)  # e.g. CUDA_VISIBLE_DEVICES: this worker's generation GPU, set before any CUDA init
        _forward_logs(index, out_q)
        gen = factory(*factory_args, **factory_kwargs)
        scorer, channel = None, None
        if scorer_config is not None:
            from asymre.rewards import RewardContractError, RewardScorer

            scorer = RewardScorer.from_config(scorer_config)
        out_q.put(("ready", index, None))
        paused = False
        while True:
            msg = _next_message(ctrl_q, req_q, paused)
            kind = msg[0]
            if kind == "stop":
                break
            if kind in ("pause", "resume"):
                paused = kind == "pause"
            if kind == "weights":
                _, path, version = msg
                gen.load_weights(path, version)
                out_q.put(("loaded", index, version))
            elif kind == "channel":
                _, host, port, backend, timeout_s, secret = msg
                if hasattr(gen, "open_channel"):  # a remote server's engine joins the channel itself (no relay here)
                    gen.open_channel(host, port, backend, timeout_s, secret)
                else:
                    from asymre.sync import WeightChannel

                    channel = WeightChannel(host, port, 1, backend, timeout_s, secret=secret).connect()
            elif kind == "weights_broadcast":
                _, manifest, version = msg
                if hasattr(gen, "receive_broadcast"):
                    gen.receive_broadcast(manifest, version)
                else:
                    gen.load_weights(channel.receive(manifest), version)
                out_q.put(("loaded", index, version))
            elif kind == "generate":
                _, rid, prompts, spec, step = msg
                t0 = time.perf_counter()
                groups = gen.generate(prompts, spec)
                gen_s = time.perf_counter() - t0
                metrics: dict[str, float] = {"perf/generation_seconds": gen_s, **episode_metrics(groups)}
                if scorer is not None:
                    try:
                        metrics.update(scorer.score(groups, step))
                    except Exception as e:  # noqa: BLE001 - sent to the learner, which decides
                        kind = "contract" if isinstance(e, RewardContractError) else "failed"
                        out_q.put(("reward_error", index, (rid, (kind, str(e)))))
                        continue
                    for g in groups:
                        g.environments = None  # scored here: the episodes' environments stay in this process
                out_q.put(("groups", index, (rid, groups, metrics)))
            elif kind == "evaluate":
                _, rid, prompts, spec = msg
                out_q.put(("evaluated", index, (rid, portable(gen.generate(prompts, spec)))))
        gen.close()
    except BaseException:  # noqa: BLE001 - anything the worker hits goes to the learner as its traceback
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
    pending: dict[int, tuple] = field(default_factory=dict)  # request id -> (prompts, spec, learner step)
    evals: dict[int, tuple] = field(default_factory=dict)  # evaluation request id -> (prompts, spec)
    paused: bool = False
    last_heard: float = 0.0
    restarts: int = 0
    version: int = 0


class WorkerHandle:
    """One worker process as a weight-push target (`asymre.sync.WeightSync`): it accepts a weight folder ('disk')
    or a stream over its own channel ('broadcast'); the pool carries the messages."""

    sync_methods = ("disk", "broadcast")

    def __init__(self, pool: WorkerPool, index: int):
        self.pool, self.index = pool, index

    @property
    def own_device(self) -> bool:
        """True when the worker was given its own GPU (rollout.devices), or is a remote server's client (the server's
        engine joins the channel, on the server's GPU): NCCL needs one device per rank."""
        return "CUDA_VISIBLE_DEVICES" in self.pool.per_worker[self.index][1] or self.remote

    @property
    def remote(self) -> bool:
        """True for a remote vLLM server's client: the server's engine joins the weight channel itself."""
        return bool(self.pool.per_worker[self.index][0].get("server_url"))

    def load_weights(self, path: str, version: int) -> None:
        self.send(("weights", path, version))
        self.wait_loaded(version)

    def send(self, msg: tuple) -> None:
        """A control message, read ahead of queued generation requests."""
        self.pool.workers[self.index].ctrl_q.put(msg)

    def wait_loaded(self, version: int, timeout_s: float | None = None) -> None:
        self.pool.wait_loaded(self.index, version, timeout_s)

    def on_restart(self, resend: Callable[[WorkerHandle], None]) -> None:
        """`resend(handle)` runs after this pool restarts a worker, before its unfinished requests are re-queued."""
        self.pool.resend_weights = resend

    def recover(self, what: str, error: Exception) -> None:
        self.pool.recover(self.index, what, error)


class PoolEngine:
    """The workers as the one engine `asymre.evaluate` runs on (the `generate` side of a `Generator`): prompts go to
    them as evaluation requests and come back in order, from weights `version` (the learner's, lent if need be)."""

    def __init__(self, pool: WorkerPool, version: int):
        self.pool, self.version = pool, version

    def generate(self, prompts: list[Prompt], spec: SamplingSpec) -> list[TrajectoryGroup]:
        return self.pool.evaluate(prompts, spec, self.version)


class WorkerPool:
    def __init__(self, num_workers: int, factory: Callable, factory_args: tuple, scorer_config=None,
                 worker_timeout_s: float = 600.0, max_restarts: int = 2, start_timeout_s: float = 600.0,
                 per_worker: list[tuple[dict, dict]] | None = None, vocab_size: int | None = None):
        """Worker i runs `factory(*factory_args, **per_worker[i][0])` with environment `per_worker[i][1]` (its GPU
        or server URL) and, given a `Config` as `scorer_config`, scores its groups with its reward functions."""
        self.vocab_size = vocab_size  # token ids coming back are checked against it (the learner's embedding rows)
        self.ctx = mp.get_context("spawn")  # vLLM and torch threads do not survive fork
        self.factory, self.factory_args, self.scorer_config = factory, factory_args, scorer_config
        self.per_worker = per_worker or [({}, {})] * num_workers
        self.worker_timeout_s, self.max_restarts, self.start_timeout_s = worker_timeout_s, max_restarts, start_timeout_s
        self.out_q = self.ctx.Queue()
        self.workers = [_Worker(i) for i in range(num_workers)]
        self.results: list[tuple[int, list[TrajectoryGroup], dict]] = []
        self.eval_results: dict[int, list[TrajectoryGroup]] = {}
        self.reward_errors: list[str] = []
        self.resend_weights: Callable[[WorkerHandle], None] | None = None  # set by the WeightSync that pushes
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
                                  args=(w.index, self.factory, self.factory_args, *self.per_worker[w.index], self.scorer_config,
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
        elif kind == "evaluated":
            rid, groups = payload
            request = w.evals.pop(rid, None)
            if request is not None:
                problem = check_groups(groups, *request, self.vocab_size)
                if problem:
                    raise WorkerError(f"generation worker {index} returned malformed groups for evaluation request {rid}: {problem}")
                self.eval_results[rid] = groups
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
            silent = bool(w.pending or w.evals) and now - w.last_heard > self.worker_timeout_s
            if not (dead or silent):
                continue
            why = (f"exited with code {w.proc.exitcode}" if dead
                   else f"silent for {now - w.last_heard:.0f}s (rollout.worker_timeout_s={self.worker_timeout_s})")
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
        # the new process has its initial weights (version 0) until it acknowledges the latest push, if there was one
        w.version = -1 if self.resend_weights is not None else 0
        self._spawn(w)
        self._wait_ready([w.index])
        if w.paused:
            w.ctrl_q.put(("pause",))
        if self.resend_weights is not None:
            self.resend_weights(WorkerHandle(self, w.index))
        for rid, request in w.evals.items():  # answered with the weights it now holds: `evaluate` checks their version
            w.ctrl_q.put(("evaluate", rid, *request))
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

    def pause(self, index: int) -> None:
        """Worker `index` leaves its queued generation requests alone (control messages still run) until `resume`."""
        self.workers[index].paused = True
        self.workers[index].ctrl_q.put(("pause",))

    def resume(self, index: int) -> None:
        self.workers[index].paused = False
        self.workers[index].ctrl_q.put(("resume",))

    def evaluate(self, prompts: list[Prompt], spec: SamplingSpec, version: int) -> list[TrajectoryGroup]:
        """Generate `prompts` with `spec` on the workers (split in contiguous shares, one per worker, sent ahead of
        their queued generation requests; nothing scored there) and return the groups in the order of the prompts.
        Every answer must come from weights `version`, else `WorkerError` (a worker restarted mid-evaluation onto
        other weights)."""
        share = max(1, -(-len(prompts) // len(self.workers)))  # ceil: the last worker(s) may get fewer, or none
        rids = []
        for w, start in zip(self.workers, range(0, len(prompts), share)):
            rid = self._next_rid
            self._next_rid += 1
            if not (w.pending or w.evals):
                w.last_heard = time.monotonic()
            w.evals[rid] = (prompts[start : start + share], spec)
            w.ctrl_q.put(("evaluate", rid, *w.evals[rid]))
            rids.append(rid)
        while any(rid not in self.eval_results for rid in rids):  # a silent worker is restarted (or reported) first
            self._handle(self._get(time.monotonic() + 2 * self.worker_timeout_s, f"evaluation requests {rids}"))
        groups = [g for rid in rids for g in self.eval_results.pop(rid)]
        other = sorted({g.version for g in groups} - {version})
        if other:
            raise WorkerError(f"evaluation of policy version {version}: a generation worker answered with weights version "
                              f"{other[0]} instead (a worker restarted mid-evaluation is given the last push back); not scored")
        return groups

    def recover(self, index: int, what: str, error: Exception) -> None:
        """After a failed weight transfer to worker `index`: restart it if it died and restarts are left (the
        restart re-sends the latest weights), else raise `WorkerError` naming it."""
        w = self.workers[index]
        w.proc.join(timeout=10.0)  # a worker that crashed may still be tearing its engine down
        if w.proc.exitcode is None or w.restarts >= self.max_restarts:
            state = "still running" if w.proc.exitcode is None else f"exit code {w.proc.exitcode}"
            raise WorkerError(f"{what} ({state}): {error}") from error
        self._restart(w, f"exited with code {w.proc.exitcode} during a weight transfer")

    def wait_loaded(self, index: int, version: int, timeout_s: float | None = None) -> None:
        """Handle the workers' messages until worker `index` acknowledges weights `version`, or time out."""
        w = self.workers[index]
        deadline = time.monotonic() + (timeout_s or self.worker_timeout_s)
        while w.version != version:
            self._handle(self._get(deadline, f"worker {w.index} to load weights version {version}"))

    def close(self) -> None:
        for w in self.workers:
            try:
                w.ctrl_q.put(("stop",))
            except Exception:  # noqa: BLE001 - a worker already gone has no queue left to stop
                pass
        for w in self.workers:
            w.proc.join(timeout=10)
            if w.proc.is_alive():
                w.proc.kill()
