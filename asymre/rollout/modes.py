"""The recipe's one interface to generation: a `Rollout` collects scored groups into the replay buffer, pushes
the learner's weights to its engines, keeps the behaviour weights a lagging engine holds, and lends an engine
holding the learner's weights for evaluation. Two implementations, picked by rollout.mode:

- `ColocatedRollout`: one in-process engine per learner rank; generate, then train, on the same device. Each
  rank reads its own shard of the prompts and keeps its own buffer. Between pushes (sync.interval > 1) the
  engine lags the learner, so a host copy of the weights it holds is kept for evaluations and checkpoints.
- `AsyncRollout`: generation worker processes (a `WorkerPool` on the main process) generate and score while
  the learner trains; the main process buffers their groups and deals each rank its share of a step.
  Evaluation runs on the workers' own engines (no model is built in the learner's process: under ZeRO-3 that
  would be a collective of one rank); between pushes they are paused, lent the learner's weights for it and
  given the behaviour weights back before they generate again. The alternative, a dedicated evaluation
  worker, would hold an engine (a GPU) idle between evaluations.

Every method is called on every rank (weight gathers are collectives under FSDP/DeepSpeed).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from accelerate.utils import broadcast_object_list

from asymre.buffer import ReplayBuffer
from asymre.data import Prompt, TrajectoryGroup
from asymre.loss import NEEDS_BEHAVIOUR_LOGPROBS
from asymre.models import torch_dtype
from asymre.rewards import RewardContractError, RewardError, RewardScorer
from asymre.rollout import generator_from_config
from asymre.rollout.base import Generator, SamplingSpec, derive_seed
from asymre.rollout.episodes import episode_metrics, episode_spec
from asymre.rollout.worker import PoolEngine, WorkerPool
from asymre.sync import WeightSync, tensor_identity
from asymre.tasks import PromptStream

Weights = dict  # HF-named full weights, {name: tensor}


def host_copy(state: Weights, dtype=None) -> Weights:
    """Weights kept to be given back to engines later: in host memory, never a second copy on the learner's device;
    floating tensors in `dtype`, the engines' (what they hold, so giving them back is exact, at half the memory of
    float32 masters for bf16). A tensor under two names (a tied lm_head) is copied once."""
    copies = HostCopies(dtype)
    for k, v in state.items():
        copies.add(k, v)
    return copies.out


class HostCopies:
    """`host_copy` one tensor at a time (for weights read as a stream): `out` holds them by name, a tensor under two
    names copied once."""

    def __init__(self, dtype=None):
        self.dtype, self.out, self._seen = dtype, {}, {}

    def add(self, name: str, v: torch.Tensor) -> None:
        key = tensor_identity(v)
        if key not in self._seen:
            cast = self.dtype if self.dtype is not None and v.is_floating_point() else v.dtype
            self._seen[key] = v.detach().to("cpu", cast, copy=True)
        self.out[name] = self._seen[key]


class WeightStream:
    """(name, tensor) pairs read once, in order, as a push's state: `items()` is the stream itself (an in-process
    push reads `state.items()` and nothing else)."""

    def __init__(self, items: Iterator[tuple[str, torch.Tensor]]):
        self._items = items

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._items


@contextmanager
def whole_models(accelerator) -> Iterator[None]:
    """Engines hold whole weights. Under ZeRO-3, transformers' from_pretrained builds a model partitioned over the
    learner ranks (deepspeed.zero.Init, whenever the global HfDeepSpeedConfig that Accelerate registers says stage 3),
    which cannot generate on its own; the config is unregistered while an engine is built. (Accelerate 1.15's
    zero3_init_context_manager(enable=False) re-registers the same stage-3 config, so it does not do this.)"""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


class Rollout:
    """What both modes share: the prompt stream, the buffer, the sampling spec of each round, the weight sync."""

    def __init__(self, cfg, accelerator, train_prompts: list[Prompt], sync: WeightSync, weights: Callable[[], Weights],
                 shard: tuple[int, int], buffer_ranks: int):
        """`weights()` gathers the learner's full weights (a collective: every rank calls it). This rank reads
        prompt shard `shard` = (index, count); its buffer feeds `buffer_ranks` learner ranks."""
        self.cfg, self.acc, self.sync, self.weights = cfg, accelerator, sync, weights
        self.buffer = ReplayBuffer.from_config(cfg, buffer_ranks)
        self.prompts = PromptStream(train_prompts, cfg.task.seed, *shard)
        self.rounds = 0  # generation rounds requested so far: each round's sampling seed follows from it
        self.rank = shard[0]  # this rank's index among the ranks that generate
        ro = cfg.rollout
        self.train_spec = SamplingSpec(n=ro.group_size, temperature=ro.temperature, top_p=ro.top_p, max_new_tokens=ro.max_new_tokens,
                                       logprobs=cfg.loss.name in NEEDS_BEHAVIOUR_LOGPROBS, extra=dict(ro.generation_kwargs),
                                       episode=episode_spec(cfg))

    def _spec(self) -> SamplingSpec:
        self.rounds += 1
        s = self.train_spec
        # the round's seed differs on every rank (each colocated rank samples its own prompts with its own engine)
        return replace(s, seed=derive_seed(self.cfg.rollout.seed, self.rank, self.rounds))

    # ---- the interface -----------------------------------------------------------------------------
    def next_groups(self, learner_step: int) -> tuple[list[TrajectoryGroup], dict[str, float]]:
        """This rank's groups for the next learner step, once enough fresh ones are buffered, and collection
        metrics (main process)."""
        raise NotImplementedError

    def push(self, version: int) -> float:
        """Push the learner's weights (tagged `version`) to every engine; returns seconds taken."""
        raise NotImplementedError

    keeps_behaviour = False  # True when the engines may lag the learner at a checkpoint (it then stores their weights)

    @property
    def engine_version(self) -> int | None:
        """The policy version the engines hold, or None when they always hold the learner's last push."""
        return None

    def behaviour(self, learner_step: int) -> Weights | None:
        """The weights the engines hold when they lag the learner at `learner_step` (a checkpoint stores them),
        else None."""
        return None

    @contextmanager
    def evaluation_engine(self, learner_step: int) -> Iterator[Generator | None]:
        """An engine holding the learner's weights (main process; None elsewhere); afterwards the engines hold
        the behaviour weights again, so evaluation never changes the off-policy regime."""
        raise NotImplementedError
        yield

    def finish(self, learner_step: int) -> None:
        """Training is over: the engines get the final policy (for the final evaluation)."""

    def state_dict(self, learner_step: int) -> dict:
        """The trainer-state fields of collection (JSON): engine version, rounds, buffer, prompt position."""
        version = self.engine_version
        return {"engine_version": learner_step if version is None else version, "rounds": self.rounds,
                "buffer": self.buffer.state_dict(), "prompts": self.prompts.state_dict()}

    def load_state_dict(self, state: dict, behaviour: Weights | None, learner_step: int) -> int:
        """Resume: buffer, prompt position and rounds, and the engines get the behaviour weights the checkpoint
        kept (else the learner's, just restored). Returns the engines' version."""
        self.rounds = state["rounds"]
        self.buffer.load_state_dict(state["buffer"])
        self.prompts.load_state_dict(state["prompts"])
        version = state["engine_version"] if behaviour is not None else learner_step
        self._restore(version, behaviour)
        return version

    def _restore(self, version: int, behaviour: Weights | None) -> None:
        """The engines get `behaviour` (tagged `version`), or the learner's weights where it is None."""
        raise NotImplementedError

    def close(self) -> None:
        self.sync.close()


class ColocatedRollout(Rollout):
    def __init__(self, cfg, accelerator, model_path: str, train_prompts: list[Prompt], sync: WeightSync,
                 weights: Callable[[], Weights], scorer: RewardScorer, stream: Callable[[], WeightStream | None] | None = None):
        super().__init__(cfg, accelerator, train_prompts, sync, weights, (accelerator.process_index, accelerator.num_processes), 1)
        self.scorer = scorer
        self.stream = stream  # the learner's weights one tensor at a time, where it shards them (Learner.stream_state)
        self.keeps_behaviour = cfg.sync.interval > 1
        with whole_models(accelerator):
            self.engine = generator_from_config(cfg, model_path, accelerator.process_index, world=accelerator.num_processes)
        # A host copy of the weights the engine holds, while it lags the learner (sync.interval > 1): evaluations
        # and checkpoints need them back (one model's worth of memory, in the engine's dtype, on the main process
        # only: it alone evaluates and writes checkpoints). The engine starts on the learner's weights.
        self.last_pushed: Weights = self._push_learner(None, to_engine=False, keep=self._keeps())[1] if self.keeps_behaviour else {}

    def _keeps(self) -> bool:
        return self.keeps_behaviour and self.acc.is_main_process

    def _push_learner(self, version: int | None, to_engine: bool, keep: bool) -> tuple[float, Weights]:
        """Push the learner's weights into this rank's engine (if `to_engine`); returns the seconds taken and, if
        `keep`, a host copy of them in the engine's dtype (the behaviour weights). Collective where the learner is
        sharded: there each tensor is gathered, loaded and dropped in turn (no whole copy is built, on the device
        or the host), and every rank reads the stream to its end whatever its engine took (or an exception it
        raised), so the ranks make the same all-gathers."""
        items = self.stream() if self.stream is not None and self.sync.resolve_method([self.engine]) == "inprocess" else None
        if items is None:
            state = self.weights()
            seconds = self.sync.push(state, version, [self.engine]) if to_engine else 0.0
            return seconds, self._copy(state) if keep else {}
        kept = HostCopies()  # the stream is in the engine's dtype already

        def tee():
            for name, t in items:
                if keep:
                    kept.add(name, t)
                yield name, t

        stream = tee()
        try:
            seconds = self.sync.push(WeightStream(stream), version, [self.engine]) if to_engine else 0.0
        finally:
            for _ in stream:  # the rest of the all-gathers (an engine that stopped early, or none here)
                pass
        return seconds, kept.out

    def _copy(self, state: Weights) -> Weights:
        """The engine's weights while it lags the learner, in host memory (on a GPU a device copy would cost a second
        model's worth of the learner's memory; pushes and checkpoints read it from the host), on the main process."""
        return host_copy(state, torch_dtype(self.cfg.model.dtype)) if self.keeps_behaviour and self.acc.is_main_process else {}

    def next_groups(self, learner_step):
        """Generate rounds with the (possibly stale) engine until enough fresh groups are buffered."""
        n = self.cfg.learner.groups_per_step
        metrics: dict[str, float] = {}
        failed: RewardError | None = None
        try:
            while self.buffer.available(learner_step) < max(n, self.cfg.buffer.min_groups):
                t0 = time.perf_counter()
                groups = self.engine.generate(self.prompts.take(self.cfg.rollout.prompts_per_step), self._spec())
                metrics["perf/generation_seconds"] = metrics.get("perf/generation_seconds", 0.0) + time.perf_counter() - t0
                metrics.update(episode_metrics(groups))
                metrics.update(self.scorer.score(groups, learner_step))
                self.buffer.add(groups)
        except RewardError as e:
            failed = e
        failed = agree_on_error(self.acc, failed)  # every rank stops together, on the first rank's error
        if failed is not None:
            raise failed
        if self.cfg.rollout.sleep_level:
            self.engine.sleep()  # the learner trains next: its memory back until the next push or round
        return self.buffer.sample(n, learner_step), metrics

    def push(self, version):
        self.last_pushed = {}  # the old copy freed before the new one is made
        seconds, self.last_pushed = self._push_learner(version, to_engine=True, keep=self._keeps())
        return seconds

    @property
    def engine_version(self):
        return self.engine.version

    def behaviour(self, learner_step):
        return self.last_pushed if self.engine.version != learner_step else None

    @contextmanager
    def evaluation_engine(self, learner_step):
        """The main process's engine, lent the learner's weights if it lags them (the other ranks take part in the
        gather, a collective, and keep their engines as they are: they do not evaluate)."""
        behind = self.engine.version != learner_step
        if behind:
            behaviour_version, behaviour = self.engine.version, self.last_pushed  # the engine copies it in: no clone
            self._push_learner(learner_step, to_engine=self.acc.is_main_process, keep=False)
            behind = self.acc.is_main_process
        try:
            yield self.engine if self.acc.is_main_process else None
        finally:
            if behind:
                self.sync.push(behaviour, behaviour_version, [self.engine])

    def finish(self, learner_step):
        if self.engine.version != learner_step:
            self.last_pushed = {}
            self._push_learner(learner_step, to_engine=True, keep=False)

    def _restore(self, version, behaviour):
        if behaviour is not None:  # every rank's engine gets them; the main process keeps them
            self.sync.push(behaviour, version, [self.engine])
            self.last_pushed = behaviour if self.acc.is_main_process else {}
        else:  # the learner's, gathered once
            self.last_pushed = {}
            _, self.last_pushed = self._push_learner(version, to_engine=True, keep=self._keeps())

    def close(self):
        self.engine.close()
        super().close()


class AsyncRollout(Rollout):
    def __init__(self, cfg, accelerator, model_path: str, train_prompts: list[Prompt], sync: WeightSync,
                 weights: Callable[[], Weights], vocab_size: int):
        # one prompt stream and one buffer, on the main process, dealing every rank its share
        super().__init__(cfg, accelerator, train_prompts, sync, weights, (0, 1), accelerator.num_processes)
        self.main = accelerator.is_main_process
        self.pool = None
        if self.main:
            placement = self.placement()
            ro = cfg.rollout
            self.pool = WorkerPool(len(placement), generator_from_config, (cfg, model_path, accelerator.process_index), cfg,
                                   ro.worker_timeout_s, ro.max_worker_restarts, per_worker=placement, vocab_size=vocab_size)
        self.pushed_version = 0  # the weights the workers hold: the last push (every rank keeps it)
        # When evaluations fall between pushes (eval.every not a multiple of sync.interval), the workers are lent the
        # learner's weights for them and given back a host copy of the last push's (one model's worth of memory)
        self.lends = cfg.eval.every > 0 and cfg.eval.every % cfg.sync.interval != 0
        self.last_pushed: Weights = self._copy(weights()) if self.lends else {}  # the workers start on the learner's weights

    def placement(self) -> list[tuple[dict, dict]]:
        """(factory kwargs, environment) per worker: a client of each remote server if rollout.server_urls is set
        (the API key stays in the environment: only its variable's name travels), else rollout.num_workers local
        engines, each pinned to one of rollout.devices (round robin) when the list is set."""
        ro = self.cfg.rollout
        if ro.server_urls:
            return [({"server_url": url}, {}) for url in ro.server_urls]
        return [({}, {"CUDA_VISIBLE_DEVICES": str(ro.devices[i % len(ro.devices)])} if ro.devices else {}) for i in range(ro.num_workers)]

    def _collect(self, learner_step: int, need: int) -> dict[str, float]:
        """Keep every worker busy; wait (with deadlines) until `need` fresh groups are buffered."""
        metrics: dict[str, float] = {}
        pool = self.pool
        while True:
            while pool.outstanding() < 2 * len(pool.workers):
                pool.submit(self.prompts.take(self.cfg.rollout.prompts_per_step), self._spec(), learner_step)
            enough = self.buffer.available(learner_step) >= need
            for _, groups, m in pool.poll(timeout=0.0 if enough else self.cfg.rollout.worker_timeout_s):
                self.buffer.add(groups)
                metrics.update(m)
            if pool.reward_errors:
                kind, said = pool.reward_errors[0]
                raise (RewardContractError if kind == "contract" else RewardError)(said)
            if self.buffer.available(learner_step) >= need:
                return metrics

    def next_groups(self, learner_step):
        ranks = self.acc.num_processes
        n = self.cfg.learner.groups_per_step * ranks
        everything, metrics = None, {}
        failed: RewardError | None = None
        if self.main:
            try:
                metrics = self._collect(learner_step, max(n, self.cfg.buffer.min_groups))
                everything = self.buffer.sample(n, learner_step)
            except RewardError as e:  # the other ranks wait in the broadcast: they get the error instead of groups
                failed = e
        if ranks > 1:
            everything, failed = broadcast_object_list([(everything, failed)])[0]
        if failed is not None:
            raise failed
        return everything[self.acc.process_index :: ranks], metrics

    def _copy(self, state: Weights) -> Weights:
        """A host copy of the weights just pushed, on the main process, when evaluations may need them back."""
        return host_copy(state, torch_dtype(self.cfg.model.dtype)) if self.lends and self.main else {}

    def push(self, version):
        state = self.weights()  # collective under FSDP/DeepSpeed
        seconds = self.sync.push(state, version, self.pool.handles) if self.main else 0.0
        self.pushed_version, self.last_pushed = version, self._copy(state)
        return seconds

    @contextmanager
    def evaluation_engine(self, learner_step):
        """The workers' engines, as one (`PoolEngine`); the other ranks wait for the main process at their next
        collective (learner.dist_timeout_s). Right after a push the workers already hold the learner's weights (a worker
        restarted since got that push again): nothing is gathered or lent."""
        state = self.weights() if self.pushed_version != learner_step else {}  # the same decision on every rank (collective)
        if not self.main:
            yield None
            return
        pool = self.pool
        lent = [h for h in pool.handles if pool.workers[h.index].version != learner_step]
        if lent and not state:
            raise RuntimeError(f"evaluation at step {learner_step}: weights version {learner_step} was pushed, yet generation "
                               f"workers {[h.index for h in lent]} hold another")
        if lent and not self.last_pushed:
            raise RuntimeError(f"evaluation at step {learner_step}: generation workers hold weights version "
                               f"{sorted({pool.workers[h.index].version for h in lent})}, and no copy of them was kept to give back")
        for h in lent:  # they finish the request they are on, then leave the queued ones until resumed
            pool.pause(h.index)
        try:
            if lent:
                self.sync.lend(state, learner_step, lent)
            yield PoolEngine(pool, learner_step)
        finally:
            if lent:
                self.sync.lend(self.last_pushed, self.pushed_version, lent)
            for h in lent:
                pool.resume(h.index)

    def finish(self, learner_step):
        if self.pushed_version != learner_step:  # the same decision on every rank: the gather is a collective
            state = self.weights()
            if self.main:
                self.sync.push(state, learner_step, self.pool.handles)
            self.pushed_version, self.last_pushed = learner_step, {}

    def _restore(self, version, behaviour):
        weights = behaviour if behaviour is not None else self.weights()
        if self.main:
            self.sync.push(weights, version, self.pool.handles)
        self.pushed_version, self.last_pushed = version, self._copy(weights)

    def close(self):
        if self.pool is not None:
            self.pool.close()
        super().close()


def agree_on_error(accelerator, error: RewardError | None) -> RewardError | None:
    """The first rank's reward error, on every rank (one all-gather when there are several ranks, so all of them
    stop at the same point instead of the others waiting out learner.dist_timeout_s in the next step's collective)."""
    if accelerator.num_processes == 1:
        return error
    import torch.distributed as dist

    errors: list = [None] * accelerator.num_processes
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def make_rollout(cfg, accelerator, model_path: str, train_prompts: list[Prompt], sync: WeightSync, weights: Callable[[], Weights],
                 scorer: RewardScorer, vocab_size: int, stream: Callable[[], WeightStream | None] | None = None) -> Rollout:
    """rollout.mode picks the implementation; `stream` (colocated only): the learner's weights one tensor at a time."""
    if cfg.rollout.mode == "async":
        return AsyncRollout(cfg, accelerator, model_path, train_prompts, sync, weights, vocab_size)
    return ColocatedRollout(cfg, accelerator, model_path, train_prompts, sync, weights, scorer, stream)
