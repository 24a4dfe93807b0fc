"""AsymRE off-policy training recipe.

    accelerate launch [--config_file recipes/accelerate/cpu.yaml] recipes/train.py \
        --config recipes/configs/smollm2_arithmetic_cpu.yaml learner.lr=1e-5

Reads top to bottom: `setup()` builds the task, rewards, learner and rollout (the one interface to
generation, `asymre.rollout.modes`: colocated, generate then train on this device; async, worker processes
generate while the learner trains); `train()` alternates taking the rollout's groups with learner steps,
pushes weights every `sync.interval` steps (the paper's N), evaluates and checkpoints; `cleanup()` closes.
What it leaves out: a KL term, a reference model and importance ratios (AsymRE needs none of them).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, parse_flag_from_env, set_seed
from tqdm.auto import tqdm

from asymre.checkpoint import CheckpointError, checkpoint_bytes, load_checkpoint, save_checkpoint, saves_final_checkpoint, warn_if_disk_short
from asymre.config import Config, ConfigError, InputError, help_text, load_config, to_dict
from asymre.evaluate import evaluate
from asymre.learner import Learner
from asymre.models import check_model_name, resolve_model, torch_dtype
from asymre.monitor import CollapseMonitor
from asymre.rewards import RewardError, RewardScorer
from asymre.rewards.preflight import preflight
from asymre.rollout import check_episodes, check_rollout_config, resolve_backend
from asymre.rollout.episodes import episode_spec
from asymre.rollout.modes import Rollout, make_rollout
from asymre.run_dir import RunDirError, open_run_dir
from asymre.sizing import warn_if_memory_short
from asymre.sync import WeightSync
from asymre.tasks import build_task
from asymre.tracking import MetricsLogger, check_trackers
from asymre.warm_start import demonstration_groups, warm_start

log = logging.getLogger("asymre")


class AsymRERecipe:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        _refuse_a_dropped_backend()
        # step_scheduler_with_optimizer=False: one LR-schedule step per learner step (Accelerate would
        # otherwise step it once per process, running the schedule num_processes times too fast).
        # learner.dist_timeout_s bounds every collective of the learner ranks (accelerate 1.15 passes the handler's
        # timeout to torch.distributed.init_process_group when it creates the group)
        # DeepSpeed without a GPU runs on its CPU accelerator (deepspeed 0.19.8 picks it when torch sees no GPU).
        # Accelerator(cpu=True) would silently drop the plugin, and without it accelerate 1.15's PartialState finds no
        # backend and counts one process while DeepSpeed's group holds them all; naming gloo gives both the world.
        cpu_deepspeed = not _has_gpu() and _wants_deepspeed()
        backend = {"backend": "gloo"} if cpu_deepspeed else {}
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.learner.dist_timeout_s), **backend)
        self.acc = Accelerator(cpu=not _has_gpu() and not cpu_deepspeed, step_scheduler_with_optimizer=False, kwargs_handlers=[timeout])
        self.main = self.acc.is_main_process
        self.run_dir = Path(cfg.logging.run_dir)
        lg = cfg.logging
        self.monitor = CollapseMonitor(lg.collapse_entropy, lg.collapse_distinct, lg.collapse_reward_drop)
        self.resumed_from: str | None = None
        self.warm_started: dict[str, float] = {}
        # built by setup(); closed by cleanup(), which also runs after a setup that failed half way
        self.scorer: RewardScorer | None = None
        self.metrics: MetricsLogger | None = None
        self.rollout: Rollout | None = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, acc = self.cfg, self.acc
        set_seed(cfg.learner.seed + acc.process_index)
        # Bad input fails here, before any model loads: reward names, task files, model name, engine settings, run folder.
        self.scorer = RewardScorer.from_config(cfg)
        train, self.eval_prompts = build_task(cfg.task, cfg.rollout.tool_parser)
        if cfg.reward.preflight:  # a reward that can never pay (or breaks the contract) stops here
            t0 = time.perf_counter()
            paid = preflight(self.scorer, train, cfg.task.answer_column if cfg.task.name == "file" else "answer")
            log.info("reward preflight: reference answers scored %s (%.2f s)", paid, time.perf_counter() - t0)
        check_model_name(cfg.model.name)
        check_rollout_config(cfg)
        check_trackers(cfg.logging.report_to)
        resume_from = self._open_run_dir()
        self.metrics = MetricsLogger(self.run_dir, list(cfg.logging.report_to), to_dict(cfg), cfg.logging.project,
                                     cfg.logging.run_name, list(cfg.logging.tags), enabled=self.main, resume=resume_from is not None)

        model_path = resolve_model(cfg.model.name, cfg.model.cache_dir) if self.main else None
        model_path = broadcast_object_list([model_path])[0] if acc.num_processes > 1 else model_path
        if self.main:
            warn_if_memory_short(cfg, model_path, acc)  # on a GPU, before the model loads: a rough estimate, never a stop
        tokenizer = check_episodes(cfg, model_path)  # tools, environments, the chat template's tool turns; also on every rank
        self.learner = Learner(cfg, model_path, acc, tokenizer)
        # the warm-start's demonstrations, rendered now: a bad file or row stops the run before any training
        self.demonstrations = demonstration_groups(cfg, tokenizer, train, acc.process_index, acc.num_processes) \
            if cfg.warm_start.steps else []
        # a colocated rank's engine needs the whole weights on that rank (under FSDP too); gathered in the engines' dtype
        weights = partial(self.learner.full_state_dict, everywhere=cfg.rollout.mode == "colocated", dtype=torch_dtype(cfg.model.dtype))
        self.rollout = make_rollout(cfg, acc, model_path, train, WeightSync.from_config(cfg, self.run_dir), weights,
                                    self.scorer, vocab_size=self.learner.unwrapped().get_input_embeddings().num_embeddings,
                                    stream=partial(self.learner.stream_state, torch_dtype(cfg.model.dtype)))
        if resume_from is not None:
            self._resume(resume_from)
        elif cfg.resume == "auto":
            log.info("resume=auto: no checkpoint in %s, starting fresh", self.run_dir)
        if self.main:
            final_model = self.learner.weight_bytes(self.learner.save_dtype) if cfg.checkpoint.save_final_model else 0
            warn_if_disk_short(cfg, self.run_dir, self._checkpoint_bytes(self.rollout.keeps_behaviour), final_model)
        log.info("setup done: backend=%s mode=%s model=%s run_dir=%s", resolve_backend(cfg.rollout.backend), cfg.rollout.mode, model_path,
                 self.run_dir)

    # ----------------------------------------------------------------------------------- checkpoints
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

    def _checkpoint_bytes(self, with_behaviour: bool) -> int:
        return checkpoint_bytes(self.learner.weight_bytes(), with_behaviour)

    def _save_checkpoint(self) -> None:
        step = self.learner.step
        state = {"learner_step": step, **self.rollout.state_dict(step), "running_baseline": self.learner.running.state_dict(),
                 "collapse_monitor": self.monitor.state_dict(), "config": to_dict(self.cfg)}
        behaviour = self.rollout.behaviour(step)
        save_checkpoint(self.acc, self.run_dir, step, state, behaviour, self.cfg.checkpoint.keep_last,
                        expected_bytes=self._checkpoint_bytes(behaviour is not None))

    def _resume(self, path: Path) -> None:
        """resume=auto|PATH: restore learner, optimiser, schedule, buffer, prompt position and the engines'
        behaviour weights. Colocated, the run continues exactly where the checkpoint left it; in async mode
        the workers restart from the learner's weights at the checkpoint and requests that were in flight
        are not replayed (their prompts are skipped)."""
        state, behaviour = load_checkpoint(self.acc, path)
        self.learner.step = state["learner_step"]
        self.learner.running.load_state_dict(state["running_baseline"])
        if "collapse_monitor" in state:  # (checkpoints written before it was kept restart its averages)
            self.monitor.load_state_dict(state["collapse_monitor"])
        version = self.rollout.load_state_dict(state, behaviour, self.learner.step)
        self.resumed_from = str(path)
        log.info("resumed from %s at learner step %d (engine version %d)", path, self.learner.step, version)

    # ------------------------------------------------------------------------------------------ train
    def _evaluate(self, tag: str) -> dict[str, float]:
        """Evaluate the learner's current weights (the rollout lends an engine holding them)."""
        ec, step = self.cfg.eval, self.learner.step
        out: dict[str, float] = {}
        failed: RewardError | None = None
        with self.rollout.evaluation_engine(step) as engine:
            if self.main:
                try:
                    out = evaluate(engine, self.eval_prompts, self.scorer, ec.preset, ec.k, ec.max_new_tokens, seed=self.cfg.learner.seed,
                                   step=step, generation_kwargs=dict(ec.generation_kwargs), episode=episode_spec(self.cfg))
                    log.info("eval (%s) at step %d: pass@1 = %.3f on %d eval prompts", tag, step, out["eval/pass@1"],
                             len(self.eval_prompts))
                except RewardError as e:  # the other ranks get it too, instead of waiting for the main process
                    failed = e
        if self.acc.num_processes > 1:
            failed = broadcast_object_list([failed])[0]
        if failed is not None:
            raise failed
        self.acc.wait_for_everyone()
        return out

    def _warm_start(self) -> None:
        """warm_start.steps supervised steps on demonstrations (asymre/warm_start.py), then the engine gets the result
        (still version 0: the RL's behaviour policy starts from the warm-started one) and, with eval.at_start, an
        evaluation under warm_start/eval/*: the warm-start's gain and the RL's are reported apart."""
        m = warm_start(self.learner, self.cfg, self.demonstrations)
        m["sync/seconds"] = self.rollout.push(self.learner.step)
        log.info("warm-start: %d steps on %d demonstrations in %.1f s, last loss %.3f", self.cfg.warm_start.steps,
                 len(self.demonstrations), m["warm_start/seconds"], m["warm_start/loss_last"])
        if self.cfg.eval.at_start:
            m.update({f"warm_start/{k}": v for k, v in self._evaluate("after warm-start").items()})
        self.metrics.log(m, step=0)
        self.warm_started = m

    def _stop_on_reward_error(self, e: RewardError) -> RewardError:
        """A reward that broke its contract (or failed on every sample) mid-run: the state of the last learner step is
        checkpointed (collective), so the run continues with resume=auto once the function is fixed; returns the
        one-line error that says so."""
        step = self.learner.step
        try:
            self._save_checkpoint()
        except CheckpointError as ce:
            return type(e)(f"{e}; stopped at learner step {step}, and its checkpoint could not be written ({ce})")
        return type(e)(f"{e}; stopped at learner step {step}, checkpointed in {self.run_dir}: fix the reward and continue "
                       f"with resume=auto")

    def train(self) -> dict[str, float]:
        try:
            return self._train()
        except RewardError as e:  # raised on every rank at once (the rollout and _evaluate share it)
            raise self._stop_on_reward_error(e) from e

    def _train(self) -> dict[str, float]:
        cfg, learner, rollout = self.cfg, self.learner, self.rollout
        first = self._evaluate("start") if cfg.eval.at_start and self.resumed_from is None else {}
        if first:
            self.metrics.log(first, step=0)
        if cfg.warm_start.steps and self.resumed_from is None:  # a resumed run's weights have had it
            self._warm_start()
        bar = tqdm(total=cfg.learner.steps, initial=learner.step, desc="asymre", disable=not (self.main and cfg.logging.progress),
                   dynamic_ncols=True)
        t_start = time.perf_counter()
        while learner.step < cfg.learner.steps:
            t0 = time.perf_counter()
            groups, m = rollout.next_groups(learner.step)
            staleness = [learner.step - g.version for g in groups]
            m.update(learner.train_step(groups))
            every = cfg.logging.completions_every
            if every and learner.step % every == 0:
                self.metrics.log_completions(_completion_rows(groups, learner.last_batch), learner.step)
            if rollout.sync.due(learner.step):
                m["sync/seconds"] = rollout.push(learner.step)
                m["sync/version"] = float(learner.step)
            m.update(rollout.buffer.stats(learner.step))
            m["rollout/staleness_mean"] = sum(staleness) / len(staleness)
            m["rollout/staleness_max"] = float(max(staleness))
            lengths = [len(t.completion_ids) for g in groups for t in g.trajectories]
            m["rollout/completion_len"] = _mean(lengths)
            m["rollout/completion_len_min"], m["rollout/completion_len_max"] = float(min(lengths)), float(max(lengths))
            m["rollout/stop_frac"] = _mean([t.finish_reason == "stop" for g in groups for t in g.trajectories])
            m.update(self.monitor.update(m, groups))
            m["perf/step_seconds"] = time.perf_counter() - t0
            if cfg.eval.every and learner.step % cfg.eval.every == 0 and learner.step < cfg.learner.steps:
                m.update(self._evaluate(f"step {learner.step}"))
            self.metrics.log(m, step=learner.step)
            if cfg.checkpoint.every and learner.step % cfg.checkpoint.every == 0 and learner.step < cfg.learner.steps:
                self._save_checkpoint()
            bar.update(1)
            bar.set_postfix(reward=f"{m.get('reward/mean', float('nan')):.3f}", stale=f"{m['rollout/staleness_mean']:.1f}",
                            loss=f"{m['loss/value']:.3f}")
        bar.close()
        unsaved = None
        try:
            if saves_final_checkpoint(cfg):
                self._save_checkpoint()  # the final state, so a finished run can be extended with resume=auto
        except CheckpointError as e:  # still evaluate and save the final model (smaller), then report it
            log.error("%s; going on to the final evaluation and final model", e)
            unsaved = e
        rollout.finish(learner.step)  # the final policy goes to the engines, for the final evaluation
        last = self._evaluate("end") if cfg.eval.at_end else {}
        if last:
            self.metrics.log(last, step=learner.step)
        if cfg.checkpoint.save_final_model:
            learner.save_model(str(self.run_dir / "final_model"))
        if unsaved is not None:
            raise unsaved
        summary = {"train/seconds": time.perf_counter() - t_start}
        if first and last:
            summary.update({"eval/pass@1_start": first["eval/pass@1"], "eval/pass@1_end": last["eval/pass@1"]})
        if "warm_start/eval/pass@1" in self.warm_started:
            summary["eval/pass@1_after_warm_start"] = self.warm_started["warm_start/eval/pass@1"]
        return summary

    # ---------------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        """Close resources only (also after a failure: a partial model is never saved as final_model)."""
        for part in (self.rollout, self.scorer, self.metrics):  # whichever setup() got to
            if part is not None:
                part.close()


def _completion_rows(groups, batch) -> list[dict]:
    """One row per trained sample: what it was asked, what it answered, how each reward scored it, and the
    advantage the learner gave it (this rank's share of the step)."""
    rows = []
    for (gi, ti), adv in zip(batch.refs, batch.advantages.tolist()):
        g = groups[gi]
        t = g.trajectories[ti]
        rows.append({"group": gi, "prompt_uid": g.prompt.uid, "prompt": g.prompt.messages[-1]["content"], "completion": t.text,
                     "reward": t.reward, "rewards": dict(t.scores), "advantage": adv, "policy_version": g.version,
                     "finish_reason": t.finish_reason, "completion_tokens": len(t.completion_ids), **({"extra": t.extras} if t.extras else {}),
                     **(_episode_row(t) if t.episode is not None else {})})
    return rows


def _episode_row(t) -> dict:
    """An episode's messages (the model's turns with their tool calls, the tools' results and errors) and counts."""
    ep = t.episode
    return {"messages": ep.get("messages", []), "turns": ep.get("turns", 0), "tool_calls": ep.get("tool_calls", {}),
            "tool_errors": ep.get("tool_errors", {}), "model_tokens": t.model_tokens}


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
    if not _has_gpu():  # Accelerate's unwrap_model imports deepspeed, whose accelerator detection warns on every CPU run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
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


def _wants_deepspeed() -> bool:
    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")  # as accelerate 1.15 reads the variables `accelerate launch` sets


def _refuse_a_dropped_backend() -> None:
    """`Accelerator(cpu=True)` silently drops an FSDP plugin (and runs plain data parallel): an accelerate config that
    asks for FSDP on a machine without a GPU is refused instead of replaced. DeepSpeed runs there (its CPU accelerator)."""
    if _has_gpu():
        return
    var = "ACCELERATE_USE_FSDP"
    if parse_flag_from_env(var):
        raise ConfigError(f"the accelerate config asks for FSDP ({var}=true), which this run without a GPU would "
                          f"silently drop; launch with recipes/accelerate/cpu.yaml or cpu_ddp2.yaml (or DeepSpeed)")


def collective_timeout(e: BaseException, cfg: Config) -> str | None:
    """One line for a learner collective that waited past learner.dist_timeout_s (a rank stuck or far slower than
    the others), or None for any other error."""
    text = str(e)
    if not isinstance(e, RuntimeError) or not any(s in text for s in ("Timed out", "timed out", "Timeout", "timeout")):
        return None
    return (f"distributed error: a collective of the learner ranks waited past learner.dist_timeout_s={cfg.learner.dist_timeout_s:g} s "
            f"(one rank was stuck or far slower than the others; raise the key if that phase is legitimately long): "
            f"{text.splitlines()[0] if text else type(e).__name__}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="AsymRE off-policy RL training", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides: dotted key=value, e.g. learner.lr=1e-5\n\n" + help_text())
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
    recipe = None
    try:
        recipe = AsymRERecipe(cfg)
        recipe.setup()  # every input a user wrote is checked here, before any model loads
    except BaseException as e:
        if recipe is not None:
            recipe.cleanup()
        if not isinstance(e, (InputError, RewardError)) or cfg.logging.verbose:
            raise
        print(f"{e.label}: {e}", file=sys.stderr)  # one line naming it; the traceback only with logging.verbose=true
        return 2
    try:
        summary = recipe.train()
    except CheckpointError as e:  # the disk filled up: say so plainly, the traceback adds nothing
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 1
    except RewardError as e:  # a bug in a reward function: one line naming it (the state is checkpointed)
        if cfg.logging.verbose:
            raise
        if recipe.main:
            print(f"{e.label}: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        said = collective_timeout(e, cfg) if recipe.acc.num_processes > 1 else None
        if said is None:
            raise
        print(said, file=sys.stderr)
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
