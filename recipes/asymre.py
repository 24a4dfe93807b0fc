"""AsymRE off-policy training recipe.

    accelerate launch [--config_file recipes/accelerate/cpu.yaml] recipes/asymre.py \
        --config recipes/configs/smollm2_arithmetic_cpu.yaml learner.lr=1e-5

Reads top to bottom: `setup()` builds the task, rewards, learner, generation workers, buffer and weight
sync; `train()` alternates collecting scored groups (colocated: generate then train on this device;
async: worker processes generate while the learner trains) with learner steps, pushes weights every
`sync.interval` steps (the paper's N), and evaluates; `cleanup()` saves and closes.
What it leaves out: a KL term, a reference model and importance ratios (AsymRE needs none of them).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

# Run as a script, this file's folder heads sys.path and `recipes/asymre.py` would shadow the package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm

from asymre.buffer import ReplayBuffer
from asymre.checkpoint import CheckpointError, GiB, load_checkpoint, save_checkpoint
from asymre.config import Config, ConfigError, InputError, load_config, to_dict
from asymre.evaluate import evaluate
from asymre.learner import Learner
from asymre.models import check_model_name, load_tokenizer, resolve_model
from asymre.monitor import CollapseMonitor
from asymre.rewards import RewardError, RewardScorer
from asymre.rollout import make_generator, resolve_backend
from asymre.rollout.base import SamplingSpec, generation_kwargs_problem
from asymre.rollout.worker import WorkerPool
from asymre.run_dir import RunDirError, open_run_dir
from asymre.sync import WeightSync
from asymre.tasks import PromptStream, build_task
from asymre.tracking import MetricsLogger

log = logging.getLogger("asymre")


class AsymRERecipe:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        _refuse_a_dropped_backend()
        # step_scheduler_with_optimizer=False: one LR-schedule step per learner step (Accelerate would
        # otherwise step it once per process, running the schedule num_processes times too fast).
        self.acc = Accelerator(cpu=not _has_gpu(), step_scheduler_with_optimizer=False)
        self.main = self.acc.is_main_process
        self.run_dir = Path(cfg.logging.run_dir)

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, acc = self.cfg, self.acc
        set_seed(cfg.learner.seed + acc.process_index)
        # Bad input fails here, before any model loads: reward names, task files, run folder.
        self.scorer = RewardScorer(list(cfg.reward.funcs), list(cfg.reward.weights), cfg.reward.timeout_s, cfg.reward.scale,
                                   cfg.learner.steps)
        train, self.eval_prompts = build_task(cfg.task)
        check_model_name(cfg.model.name)
        engine_kind = "remote" if cfg.rollout.server_urls else resolve_backend(cfg.rollout.backend)
        for key, kwargs in (("rollout.generation_kwargs", cfg.rollout.generation_kwargs), ("eval.generation_kwargs", cfg.eval.generation_kwargs)):
            problem = generation_kwargs_problem(engine_kind, dict(kwargs))
            if problem:
                raise ConfigError(f"{key}: {problem}")
        key_env = cfg.rollout.server_api_key_env
        if cfg.rollout.server_urls and key_env and not os.environ.get(key_env):
            raise ConfigError(f"rollout.server_api_key_env={key_env}: that environment variable is not set")
        self.async_mode = cfg.rollout.mode == "async"
        shard, shards = (0, 1) if self.async_mode else (acc.process_index, acc.num_processes)
        self.prompts = PromptStream(train, cfg.task.seed, shard, shards)
        self.resume_from = self._open_run_dir()
        self.metrics = MetricsLogger(self.run_dir, list(cfg.logging.report_to), to_dict(cfg), cfg.logging.project,
                                     cfg.logging.run_name, list(cfg.logging.tags), enabled=self.main, resume=self.resume_from is not None)

        self.model_path = resolve_model(cfg.model.name, cfg.model.cache_dir) if self.main else None
        self.model_path = broadcast_object_list([self.model_path])[0] if acc.num_processes > 1 else self.model_path
        self.tokenizer = load_tokenizer(self.model_path)
        self.learner = Learner(cfg, self.model_path, acc)
        self.learner.pad_id = self.tokenizer.pad_token_id
        need = max(cfg.learner.groups_per_step * (acc.num_processes if cfg.rollout.mode == "async" else 1), cfg.buffer.min_groups)
        if cfg.buffer.capacity < need:
            raise ConfigError(f"buffer.capacity={cfg.buffer.capacity} cannot hold one step's {need} groups "
                              f"(learner.groups_per_step x ranks, or buffer.min_groups)")
        self.buffer = ReplayBuffer(cfg.buffer.capacity, cfg.buffer.max_staleness, cfg.buffer.sampling, cfg.buffer.max_reuse, cfg.learner.seed)
        self.sync = WeightSync(cfg.sync.interval, cfg.sync.method, cfg.sync.timeout_s, self.run_dir / "sync")

        ro = cfg.rollout
        self.backend = resolve_backend(ro.backend)
        need_logprobs = cfg.loss.name == "grpo"
        self.train_spec = SamplingSpec(n=ro.group_size, temperature=ro.temperature, top_p=ro.top_p,
                                       max_new_tokens=ro.max_new_tokens, logprobs=need_logprobs, extra=dict(ro.generation_kwargs))
        gen_args = (self.backend, self.model_path, cfg.model.dtype, ro.seed + acc.process_index,
                    ro.max_prompt_tokens + max(ro.max_new_tokens, cfg.eval.max_new_tokens), ro.max_prompt_tokens,
                    ro.gpu_memory_utilization, ro.kv_cache_gb)
        self.pool = None
        if self.async_mode:
            if self.main:
                scorer_args = dict(specs=list(cfg.reward.funcs), weights=list(cfg.reward.weights), timeout_s=cfg.reward.timeout_s,
                                   scale=cfg.reward.scale, max_steps=cfg.learner.steps)
                self.pool = WorkerPool(len(self._worker_placement()), make_generator, gen_args, scorer_args, ro.worker_timeout_s,
                                       ro.max_worker_restarts, per_worker=self._worker_placement(), channel_host=cfg.sync.channel_host,
                                       vocab_size=self.learner.unwrapped().get_input_embeddings().num_embeddings)
            self.generator = None
        else:
            self.generator = make_generator(*gen_args, chat_template_kwargs=dict(cfg.task.chat_template_kwargs))
        lg = cfg.logging
        self.monitor = CollapseMonitor(lg.collapse_entropy, lg.collapse_distinct, lg.collapse_reward_drop)
        self.rounds = 0
        self.resumed_from = self._maybe_resume()
        if self.main:
            self._warn_if_disk_short()
        log.info("setup done: backend=%s mode=%s model=%s run_dir=%s", self.backend, ro.mode, self.model_path, self.run_dir)

    # ----------------------------------------------------------------------------------- checkpoints
    def _trainer_state(self) -> dict:
        engine_version = self.generator.version if self.generator is not None else self.learner.step
        return {"learner_step": self.learner.step, "engine_version": engine_version, "rounds": self.rounds,
                "buffer": self.buffer.state_dict(), "prompts": self.prompts.state_dict(),
                "running_baseline": self.learner.running.state_dict(), "config": to_dict(self.cfg)}

    def _checkpoint_bytes(self, with_behaviour: bool) -> int:
        """Estimated size of one checkpoint: weights and AdamW's two moments (and the behaviour weights)."""
        return self.learner.weight_bytes() * (4 if with_behaviour else 3)

    def _save_checkpoint(self) -> None:
        state = self._trainer_state()
        behind = state["engine_version"] != self.learner.step
        save_checkpoint(self.acc, self.run_dir, self.learner.step, state, self.last_pushed if behind else None,
                        self.cfg.checkpoint.keep_last, expected_bytes=self._checkpoint_bytes(behind))

    def _open_run_dir(self) -> Path | None:
        """The main process makes the run folder this run's own (or refuses, naming the folder or key); every
        rank gets its decision: the checkpoint to continue from, or None."""
        cfg, decision = self.cfg, [None, None]
        if self.main:
            try:
                path = open_run_dir(self.run_dir, cfg.resume, cfg.logging.overwrite, to_dict(cfg), cfg.checkpoint.min_free_gb)
                decision = [str(path) if path else None, None]
            except RunDirError as e:
                decision = [None, str(e)]
        if self.acc.num_processes > 1:
            decision = broadcast_object_list([decision])[0]
        if decision[1]:
            raise RunDirError(decision[1])
        return Path(decision[0]) if decision[0] else None

    def _saves_final_checkpoint(self) -> bool:
        ck = self.cfg.checkpoint
        return ck.save_final_checkpoint if ck.save_final_checkpoint is not None else ck.every > 0

    def _warn_if_disk_short(self) -> None:
        """Say what the run writes, and warn when its checkpoints and final model may not fit on its disk
        (an estimate; the exact check runs before each checkpoint)."""
        ck, steps = self.cfg.checkpoint, self.cfg.learner.steps
        final_ck = self._saves_final_checkpoint()
        count = ((steps - 1) // ck.every if ck.every else 0) + int(final_ck)  # periodic ones, then the final one
        one = self._checkpoint_bytes(self.async_mode or self.cfg.sync.interval > 1)
        final = self.learner.weight_bytes(self.learner.save_dtype) if ck.save_final_model else 0
        need = min(count, ck.keep_last + 1) * one + final  # rotation deletes the oldest after writing the new one
        log.info("this run writes %s%s", f"checkpoints of about {one / GiB:.2f} GiB each ({count} in all, the last "
                 f"{ck.keep_last} kept)" if count else "no checkpoint (checkpoint.every=0; checkpoint.save_final_checkpoint=true "
                 "keeps a final one for resume=auto)", f" and a final model of {final / GiB:.2f} GiB" if final else "")
        free = shutil.disk_usage(self.run_dir).free
        if free < need:
            log.warning("run folder %s: %.2f GiB free, this run may write up to %.2f GiB (checkpoints of about %.2f GiB, "
                        "checkpoint.keep_last=%d, final model %.2f GiB); a checkpoint that does not fit stops the run "
                        "with the earlier ones intact", self.run_dir, free / GiB, need / GiB, one / GiB, ck.keep_last, final / GiB)

    def _maybe_resume(self) -> str | None:
        """resume=auto|PATH: restore learner, optimiser, schedule, buffer, prompt position and the engine's
        behaviour weights. Colocated, the run continues exactly where the checkpoint left it; in async mode
        the workers restart from the learner's weights at the checkpoint and requests that were in flight
        are not replayed (their prompts are skipped)."""
        path = self.resume_from
        if path is None:
            if self.cfg.resume == "auto":
                log.info("resume=auto: no checkpoint in %s, starting fresh", self.run_dir)
            return None
        state, behaviour = load_checkpoint(self.acc, path)
        self.learner.step = state["learner_step"]
        self.rounds = state["rounds"]
        self.buffer.load_state_dict(state["buffer"])
        self.prompts.load_state_dict(state["prompts"])
        self.learner.running.load_state_dict(state["running_baseline"])
        weights = behaviour if behaviour is not None else self.learner.full_state_dict()
        version = state["engine_version"] if behaviour is not None else self.learner.step
        if self.async_mode:
            if self.main:
                self.sync.push(weights, version, self.pool.handles)
        else:
            self.sync.push(weights, version, [self.generator])
        self.last_pushed = behaviour if behaviour is not None else self._behaviour_copy()
        log.info("resumed from %s at learner step %d (engine version %d)", path, self.learner.step, version)
        return str(path)

    def _worker_placement(self) -> list[tuple[dict, dict]]:
        """(factory kwargs, env) per worker: remote servers if given, else num_workers local engines,
        each pinned to one of rollout.devices (round robin) when the list is set."""
        ro = self.cfg.rollout
        fmt = {"chat_template_kwargs": dict(self.cfg.task.chat_template_kwargs)}
        if ro.server_urls:  # the API key stays in the environment: only its variable's name is passed
            return [({"server_url": url, "api_key_env": ro.server_api_key_env, **fmt}, {}) for url in ro.server_urls]
        env = [{"CUDA_VISIBLE_DEVICES": str(ro.devices[i % len(ro.devices)])} if ro.devices else {} for i in range(ro.num_workers)]
        return [(dict(fmt), e) for e in env]

    # ------------------------------------------------------------------------------------------ train
    def _spec(self) -> SamplingSpec:
        self.rounds += 1
        s = self.train_spec
        return SamplingSpec(s.n, s.temperature, s.top_p, s.max_new_tokens, self.cfg.rollout.seed * 1000003 + self.rounds, s.logprobs,
                            s.extra)

    def _collect_colocated(self, need: int) -> dict[str, float]:
        """Generate rounds with the (possibly stale) colocated engine until `need` fresh groups are buffered."""
        metrics: dict[str, float] = {}
        while self.buffer.available(self.learner.step) < need:
            t0 = time.perf_counter()
            groups = self.generator.generate(self.prompts.take(self.cfg.rollout.prompts_per_step), self._spec())
            metrics["perf/generation_seconds"] = metrics.get("perf/generation_seconds", 0.0) + time.perf_counter() - t0
            metrics.update(self.scorer.score(groups, self.learner.step))
            self.buffer.add(groups)
        return metrics

    def _collect_async(self, need: int) -> dict[str, float]:
        """Keep every worker busy; wait (with deadlines) until `need` fresh groups are buffered."""
        metrics: dict[str, float] = {}
        per_round = self.cfg.rollout.prompts_per_step
        while True:
            while self.pool.outstanding() < 2 * len(self.pool.workers):
                self.pool.submit(self.prompts.take(per_round), self._spec(), self.learner.step)
            enough = self.buffer.available(self.learner.step) >= need
            for _, groups, m in self.pool.poll(timeout=0.0 if enough else self.cfg.rollout.worker_timeout_s):
                self.buffer.add(groups)
                metrics.update(m)
            if self.pool.reward_errors:
                raise RuntimeError(self.pool.reward_errors[0])
            if self.buffer.available(self.learner.step) >= need:
                return metrics

    def _next_groups(self) -> tuple[list, dict[str, float]]:
        """This rank's groups for the next step, and collection metrics (main process)."""
        n = self.cfg.learner.groups_per_step
        if not self.async_mode:
            m = self._collect_colocated(max(n, self.cfg.buffer.min_groups))
            return self.buffer.sample(n, self.learner.step), m
        everything, m = None, {}
        if self.main:
            m = self._collect_async(max(n * self.acc.num_processes, self.cfg.buffer.min_groups))
            everything = self.buffer.sample(n * self.acc.num_processes, self.learner.step)
        if self.acc.num_processes > 1:
            everything = broadcast_object_list([everything])[0]
        return everything[self.acc.process_index :: self.acc.num_processes], m

    def _push_weights(self) -> float:
        state = self.learner.full_state_dict()  # collective under FSDP/DeepSpeed
        version = self.learner.step
        if self.async_mode:
            return self.sync.push(state, version, self.pool.handles) if self.main else 0.0
        return self.sync.push(state, version, [self.generator])

    def _evaluate(self, tag: str) -> dict[str, float]:
        """Evaluate the learner's current weights: the engine gets them for the evaluation, then the
        behaviour weights back (so evaluation never changes the off-policy regime)."""
        ec = self.cfg.eval
        out: dict[str, float] = {}
        if not self.async_mode:
            engine, behind = self.generator, self.generator.version != self.learner.step
            if behind:
                behaviour_version = engine.version
                behaviour = self.last_pushed  # the engine copies it in, so no clone is needed
                self.sync.push(self.learner.full_state_dict(), self.learner.step, [engine])
        else:
            behind = False
            engine = self.eval_engine()
        if self.main:
            out = evaluate(engine, self.eval_prompts, self.scorer, ec.preset, ec.k, ec.max_new_tokens, seed=self.cfg.learner.seed,
                           step=self.learner.step, generation_kwargs=dict(ec.generation_kwargs))
            log.info("eval (%s) at step %d: pass@1 = %.3f on %d held-out prompts", tag, self.learner.step, out["eval/pass@1"], len(self.eval_prompts))
        if not self.async_mode and behind:
            self.sync.push(behaviour, behaviour_version, [engine])
        self.acc.wait_for_everyone()
        return out

    def _behaviour_copy(self) -> dict:
        """A host copy of the weights just pushed to the colocated engine: between pushes the engine lags the
        learner, and evaluations and checkpoints need the behaviour weights back (one model's worth of memory)."""
        if self.async_mode or self.cfg.sync.interval == 1:
            return {}
        return {k: v.detach().clone() for k, v in self.learner.full_state_dict().items()}

    def eval_engine(self):
        """Async mode: an in-process engine for evaluation on the main process, built on first use, loaded
        with the learner's weights (gathered on every rank: a collective under FSDP/DeepSpeed)."""
        state = self.learner.full_state_dict()
        if not self.main:
            return None
        if getattr(self, "_eval_gen", None) is None:
            self._eval_gen = make_generator("hf", self.model_path, self.cfg.model.dtype,
                                            chat_template_kwargs=dict(self.cfg.task.chat_template_kwargs))
        self._eval_gen.load_weights(iter(state.items()), self.learner.step)
        return self._eval_gen

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        if not hasattr(self, "last_pushed"):
            self.last_pushed = self._behaviour_copy()
        first = self._evaluate("start") if cfg.eval.at_start and self.resumed_from is None else {}
        if first:
            self.metrics.log(first, step=0)
        bar = tqdm(total=cfg.learner.steps, initial=self.learner.step, desc="asymre", disable=not (self.main and cfg.logging.progress),
                   dynamic_ncols=True)
        t_start = time.perf_counter()
        while self.learner.step < cfg.learner.steps:
            t0 = time.perf_counter()
            groups, m = self._next_groups()
            staleness = [self.learner.step - g.version for g in groups]
            m.update(self.learner.train_step(groups))
            every = cfg.logging.completions_every
            if every and self.learner.step % every == 0:
                self.metrics.log_completions(_completion_rows(groups, self.learner.last_batch), self.learner.step)
            if self.sync.due(self.learner.step):
                m["sync/seconds"] = self._push_weights()
                m["sync/version"] = float(self.learner.step)
                self.last_pushed = self._behaviour_copy()
            m.update(self.buffer.stats(self.learner.step))
            m["rollout/staleness_mean"] = sum(staleness) / len(staleness)
            m["rollout/staleness_max"] = float(max(staleness))
            lengths = [len(t.completion_ids) for g in groups for t in g.trajectories]
            m["rollout/completion_len"] = _mean(lengths)
            m["rollout/completion_len_min"], m["rollout/completion_len_max"] = float(min(lengths)), float(max(lengths))
            m["rollout/stop_frac"] = _mean([t.finish_reason == "stop" for g in groups for t in g.trajectories])
            m.update(self.monitor.update(m, groups))
            m["perf/step_seconds"] = time.perf_counter() - t0
            if cfg.eval.every and self.learner.step % cfg.eval.every == 0 and self.learner.step < cfg.learner.steps:
                m.update(self._evaluate(f"step {self.learner.step}"))
            self.metrics.log(m, step=self.learner.step)
            if cfg.checkpoint.every and self.learner.step % cfg.checkpoint.every == 0 and self.learner.step < cfg.learner.steps:
                self._save_checkpoint()
            bar.update(1)
            bar.set_postfix(reward=f"{m.get('reward/mean', float('nan')):.3f}", stale=f"{m['rollout/staleness_mean']:.1f}",
                            loss=f"{m['loss/value']:.3f}")
        bar.close()
        unsaved = None
        try:
            if self._saves_final_checkpoint():
                self._save_checkpoint()  # the final state, so a finished run can be extended with resume=auto
        except CheckpointError as e:  # still evaluate and save the final model (smaller), then report it
            log.error("%s; going on to the final evaluation and final model", e)
            unsaved = e
        if not self.async_mode and self.generator.version != self.learner.step:
            self._push_weights()  # the final policy goes to the engine, for the final evaluation
            self.last_pushed = {}
        last = self._evaluate("end") if cfg.eval.at_end else {}
        if last:
            self.metrics.log(last, step=self.learner.step)
        if cfg.checkpoint.save_final_model:
            self.learner.save_model(str(self.run_dir / "final_model"), self.tokenizer)
        if unsaved is not None:
            raise unsaved
        summary = {"train/seconds": time.perf_counter() - t_start}
        if first and last:
            summary.update({"eval/pass@1_start": first["eval/pass@1"], "eval/pass@1_end": last["eval/pass@1"]})
        return summary

    # ---------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Close resources only (also after a failure: a partial model is never saved as final_model)."""
        if self.pool is not None:
            self.pool.close()
        if self.generator is not None:
            self.generator.close()
        self.scorer.close()
        self.metrics.close()


def _completion_rows(groups, batch) -> list[dict]:
    """One row per trained sample: what it was asked, what it answered, how each reward scored it, and the
    advantage the learner gave it (this rank's share of the step)."""
    rows = []
    for (gi, ti), adv in zip(batch.refs, batch.advantages.tolist()):
        g = groups[gi]
        t = g.trajectories[ti]
        rows.append({"group": gi, "prompt_uid": g.prompt.uid, "prompt": g.prompt.messages[-1]["content"], "completion": t.text,
                     "reward": t.reward, "rewards": dict(t.scores), "advantage": adv, "policy_version": g.version,
                     "finish_reason": t.finish_reason, "completion_tokens": len(t.completion_ids), **({"extra": t.extras} if t.extras else {})})
    return rows


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _quiet(verbose: bool) -> None:
    """asymre's own lines, the progress bar and real warnings; the libraries' start-up chatter (vLLM's engine
    config and environment advice, transformers' loading bars, deprecation notices) only with
    logging.verbose=true. Set before vLLM is imported (here, and in worker processes through the environment)."""
    noisy = ("vllm", "transformers", "accelerate", "httpx", "datasets", "math_verify")
    if verbose:
        for name in noisy:
            logging.getLogger(name).setLevel(logging.INFO)
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    for name in noisy:
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _refuse_a_dropped_backend() -> None:
    """`Accelerator(cpu=True)` silently drops a DeepSpeed or FSDP plugin (and runs plain data parallel): an
    accelerate config that asks for one on a machine without a GPU is refused instead of replaced."""
    if _has_gpu():
        return
    for var, name in (("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP")):
        if os.environ.get(var, "false").lower() in ("true", "1"):
            raise ConfigError(f"the accelerate config asks for {name} ({var}=true), which this run without a GPU would "
                              f"silently drop; launch with recipes/accelerate/cpu.yaml or cpu_ddp2.yaml")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="AsymRE off-policy RL training", epilog="Overrides: dotted key=value, e.g. learner.lr=1e-5")
    p.add_argument("--config", help="YAML config (recipes/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    _quiet(cfg.logging.verbose)
    try:
        recipe = AsymRERecipe(cfg)
        recipe.setup()  # every input a user wrote is checked here, before any model loads
    except (InputError, RewardError) as e:  # one line naming it; the traceback only with logging.verbose=true
        if cfg.logging.verbose:
            raise
        print(f"{e.label}: {e}", file=sys.stderr)
        return 2
    try:
        summary = recipe.train()
    except CheckpointError as e:  # the disk filled up: say so plainly, the traceback adds nothing
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 1
    finally:
        recipe.cleanup()
    if recipe.main and "eval/pass@1_start" in summary:
        print(f"held-out accuracy (pass@1, {cfg.eval.preset}): {summary['eval/pass@1_start']:.1%} before -> "
              f"{summary['eval/pass@1_end']:.1%} after {cfg.learner.steps} steps in {summary['train/seconds']:.0f}s; "
              f"run folder {recipe.run_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.exit(main())
