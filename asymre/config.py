"""One typed config tree for every recipe, loaded from YAML with dotted CLI overrides.

Design choice: dataclasses checked by OmegaConf's structured configs (unknown keys and wrong types
fail, naming the key) rather than a home-made parser; the alternative, argparse flags per field,
does not nest. Every field has a default (the paper's, where it has one) and a one-line help.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class InputError(ValueError):
    """Something a user wrote is wrong (a config key, a data file or row, a model name, a run folder): the
    message is one line naming it. The training command prints `<label>: <message>` and exits with code 2."""

    label = "input error"


class ConfigError(InputError):
    """A config file or override is wrong; the message names the key."""

    label = "config error"


def _f(default: Any, help: str, valid: str | None = None) -> Any:
    """A config field: default, one-line help, and `valid`, the allowed interval of a number (or of each
    number of a list) in interval notation, e.g. "(0, 1]" or "[1, inf)", checked by `validate`."""
    metadata = {"help": help, **({"valid": valid} if valid else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class LoraConfig:
    rank: int = _f(0, "LoRA rank through peft (0 = off: full fine-tuning). Weight pushes carry the merged weights.", "[0, inf)")
    alpha: float = _f(32.0, "LoRA alpha: the adapter's update is scaled by alpha / rank.", "(0, inf)")
    dropout: float = _f(0.0, "Dropout on the LoRA branch's input.", "[0, 1)")
    target_modules: list[str] = _f(["all-linear"], "Modules given adapters: peft's 'all-linear' (every linear layer but the LM "
                                   "head) or module names such as q_proj, v_proj.")
    save_merged: bool = _f(False, "Also write the merged full model to final_model/merged/ (final_model/ holds the adapter).")


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "Model: 'smollm2-135m-instruct' (embedded), a hub id, or a local folder.")
    dtype: str = _f("float32", "Weights dtype for learner and engine: float32, bfloat16 or float16 (float32 on CPU).")
    cache_dir: str | None = _f(None, "Where the embedded model is converted to (default $ASYMRE_CACHE or ~/.cache/asymre).")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the learner's forward.")
    chat_template: str | None = _f(None, "Chat template to use instead of the tokenizer's own: 'chatml-tools' (shipped: ChatML with tool "
                                         "calls, for SmolLM2), a .jinja file, or the template text.")
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class FactsConfig:
    num_people: int = _f(64, "Facts task: people in the database (trained and held out), 4 facts each.", "[2, inf)")
    seed: int = _f(0, "Facts task: the database's and the split's seed (the same seed always gives the same database).")
    held_out_share: float = _f(0.5, "Facts task: share of the people held out (never named by a training prompt).", "(0, 1)")
    attributes: list[str] = _f(["birth_date", "birth_place", "address", "occupation"], "Facts task: the attributes asked about.")
    mode: str = _f("in_tool", "Facts task: 'in_tool' (the policy may call lookup(name, attribute): rollout.environment="
                              "asymre.tasks.facts:FactsDatabase) or 'in_weight' (no tool: answered from the weights).")
    eval_on: str = _f("held_out", "Facts task: evaluate on 'held_out' people (never trained on) or 'trained' people (recall).")


@dataclass
class TaskConfig:
    name: str = _f("arithmetic", "Task: 'arithmetic' (built in), 'facts' (built in: people's facts, in-tool or in-weight), 'gsm8k', "
                                 "'math', or 'file'.")
    path: str | None = _f(None, "Dataset (gsm8k, math, file tasks): hub id, local JSONL/parquet file, or folder with train/test files.")
    subset: str | None = _f(None, "Hub dataset config name, e.g. 'main' for openai/gsm8k.")
    eval_path: str | None = _f(None, "Held-out data, if not the 'test' split of task.path.")
    train_size: int = _f(2000, "Number of training prompts (arithmetic task) or cap on rows (others; 0 = all).", "[0, inf)")
    eval_size: int = _f(200, "Number of held-out evaluation prompts.", "[1, inf)")
    max_operand: int = _f(9, "Arithmetic task: operands are drawn from 0..max_operand.", "[0, inf)")
    operations: list[str] = _f(["+"], "Arithmetic task: operators to draw from (+, -, *).")
    template: str = _f("What is {a} {op} {b}? Answer with just the number.", "Arithmetic task: the question, with {a}, {op}, {b}.")
    system_prompt: str | None = _f(None, "Optional system message put before every prompt that has none.")
    prompt_column: str = _f("prompt", "File task: the column holding the prompt: a string, or a list of {role, content} messages (TRL's formats).")
    answer_column: str = _f("answer", "File task: the column holding the reference answer (also passed to rewards as `answer`).")
    chat_template_kwargs: dict[str, Any] = _f({}, "Extra arguments to the tokenizer's chat template, e.g. {enable_thinking: false}.")
    seed: int = _f(0, "Seed for building and shuffling the task's prompts.")
    facts: FactsConfig = field(default_factory=FactsConfig)


@dataclass
class RewardConfig:
    funcs: list[str] = _f(["numeric"], "Reward functions: registry names or dotted paths 'pkg.mod:fn'.")
    weights: list[float] = _f([], "Weight per reward function (empty = all 1.0).")
    scale: str = _f("01", "Binary reward scale: '01' (0/1, the paper's) or 'pm1' (-1/+1).")
    timeout_s: float = _f(10.0, "Per-call timeout of a reward function; samples of a call past it are dropped.", "(0, inf)")
    preflight: bool = _f(True, "At start-up, before the model loads: score reference answers of a few training rows and stop if "
                               "no reference scores above an empty completion (false: for judges, environment rewards).")


@dataclass
class RolloutConfig:
    backend: str = _f("auto", "Generation engine: 'vllm', 'hf' (transformers generate), 'auto' (vllm if installed), or 'pkg.mod:factory'.")
    mode: str = _f("colocated", "'colocated' (generate then train, one device) or 'async' (workers in their own processes).")
    num_workers: int = _f(1, "Async mode: number of generation worker processes.", "[1, inf)")
    prompts_per_step: int = _f(16, "Prompts drawn per generation round (the paper: 16).", "[1, inf)")
    group_size: int = _f(8, "Samples per prompt, G (the paper: 8); the baseline is computed within a group.", "[1, inf)")
    temperature: float = _f(1.0, "Training sampling temperature (the paper: 1.0).", "[0, inf)")
    top_p: float = _f(1.0, "Training sampling top-p (the paper: 1.0).", "(0, 1]")
    max_new_tokens: int = _f(2048, "Completion length cap (the paper: 2048).", "[1, inf)")
    max_prompt_tokens: int = _f(1024, "Prompts longer than this are truncated from the left.", "[1, inf)")
    gpu_memory_utilization: float = _f(0.5, "vLLM on GPU: share of GPU memory the engine may use.", "(0, 1]")
    kv_cache_gb: float = _f(1.0, "vLLM on CPU: KV-cache size in GiB.", "(0, inf)")
    sleep_level: int = _f(0, "Colocated vLLM on a GPU: free the engine's GPU memory while the learner trains (vLLM sleep mode): "
                             "1 offloads its weights to host memory and drops the KV cache, 2 drops both (needs sync.interval=1: "
                             "every round then starts with a push); 0 keeps the engine resident.", "[0, 2]")
    devices: list[int] = _f([], "Async mode on GPUs: device ids for the generation workers (round robin; keep them off the learner's).")
    server_urls: list[str] = _f([], "Async mode: remote vLLM servers (http:// or https://host:port), one worker each, instead of local engines.")
    server_api_key_env: str | None = _f(None, "Name of the environment variable holding the servers' API key (vllm serve --api-key); "
                                              "the key is never written to logs, metrics or config.json.")
    worker_timeout_s: float = _f(600.0, "Async mode: a worker silent for this long is declared dead.", "(0, inf)")
    max_worker_restarts: int = _f(2, "Async mode: restarts allowed per worker before the run stops.", "[0, inf)")
    seed: int = _f(0, "Sampling seed.")
    generation_kwargs: dict[str, Any] = _f({}, "Extra sampling parameters for the engine (vLLM's SamplingParams: top_k, min_p, "
                                                "repetition_penalty, stop, ...; hf: GenerationConfig's, e.g. stop_strings); "
                                                "an unknown key fails at start-up.")
    # ---- multi-turn episodes (docs/episodes.md): TRL's tools= and environment_factory= contract
    tools: list[str] = _f([], "Tool functions the policy may call, 'pkg.module:function' (TRL's tools=: type hints and a Google-style docstring).")
    environment: Any = _f(None, "Environment class, 'pkg.module:Class' (TRL's environment_factory=: one instance per episode, reset(**row), "
                                "its public methods are tools), or {name: 'pkg.module:Class'} chosen by the row's environment_column.")
    environment_column: str = _f("environment", "The dataset column naming a row's environment when rollout.environment maps several.")
    max_turns: int = _f(4, "Episodes: model turns per episode (an episode out of turns with a call still to make ends truncated).", "[1, inf)")
    max_episode_tokens: int = _f(0, "Episodes: completion tokens per episode, the model's and the environment's (0: max_new_tokens x "
                                    "max_turns); rollout.max_new_tokens caps each model turn.", "[0, inf)")
    tool_timeout_s: float = _f(10.0, "Episodes: the longest a turn waits for its tool calls; a call still running is a timeout fault.", "(0, inf)")
    max_tool_result_tokens: int = _f(256, "Episodes: a tool result longer than this many tokens is cut, with a ' ... [truncated]' mark.", "[1, inf)")
    on_bad_tool_call: str = _f("message", "Episodes: a malformed, failing or timed-out call: 'message' (its error is the tool's result), "
                                          "'end' (the episode ends there), 'reward' (ends, with rollout.bad_tool_call_reward).")
    bad_tool_call_reward: float = _f(0.0, "Episodes, on_bad_tool_call=reward: the episode's reward.")
    tool_parser: str = _f("auto", "Episodes: how calls are read from a model turn: 'auto' (the tokenizer's response_template, else "
                                  "hermes), 'hermes' (<tool_call>{json}</tool_call>), or 'pkg.module:function'.")


@dataclass
class BufferConfig:
    capacity: int = _f(256, "Maximum number of groups held; the oldest are dropped past it.", "[1, inf)")
    max_staleness: int = _f(1000, "Groups more than this many policy versions old are evicted (0 = on-policy).", "[0, inf)")
    sampling: str = _f("fifo", "'fifo' (each group used once, oldest first) or 'reuse' (uniform, up to max_reuse uses).")
    max_reuse: int = _f(1, "'reuse' sampling: how many times a group may be trained on.", "[1, inf)")
    min_groups: int = _f(0, "Learner waits until this many groups are buffered (0 = one step's worth).", "[0, inf)")


@dataclass
class LossConfig:
    name: str = _f("asymre", "'asymre' (the paper), 'grpo' (ratio-clipped, needs behaviour log-probs) or 'reinforce' (V = 0).")
    baseline: str = _f("group_mean", "AsymRE baseline: group_mean, leave_one_out, constant, running.")
    delta_v: float = _f(-0.1, "delta_V added to the baseline (the paper: -0.1; >= 0 collapses off-policy).")
    delta_v_final: float | None = _f(None, "If set, delta_V moves linearly to this value over delta_v_steps.")
    delta_v_steps: int = _f(0, "Length of the delta_V schedule in learner steps.", "[0, inf)")
    constant_v: float = _f(0.0, "V for baseline=constant (delta_V is added too).")
    running_momentum: float = _f(0.9, "baseline=running: EMA momentum of the per-prompt reward estimate.", "[0, 1)")
    aggregation: str = _f("seq_mean", "'seq_mean' (sum over tokens, mean over sequences: the paper) or 'token_mean'.")
    clip_eps: float = _f(0.2, "GRPO: ratio clipping epsilon.", "(0, inf)")


@dataclass
class LearnerConfig:
    steps: int = _f(100, "Learner optimiser steps.", "[1, inf)")
    lr: float = _f(6e-8, "AdamW learning rate (the paper: 6e-8 for 3B-8B models).", "(0, inf)")
    weight_decay: float = _f(0.0, "AdamW weight decay.", "[0, inf)")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.", "[0, 1)")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).", "[0, inf)")
    warmup_steps: int = _f(0, "Linear LR warm-up steps.", "[0, inf)")
    lr_schedule: str = _f("constant", "'constant', 'linear' or 'cosine' decay after warm-up.")
    groups_per_step: int = _f(16, "Groups (prompts) per learner step (the paper: 16 x G=8 = 128 trajectories).", "[1, inf)")
    micro_batch_tokens: int = _f(4096, "Token budget of one micro-batch (sequences are packed by length).", "[1, inf)")
    dist_timeout_s: float = _f(1800.0, "Timeout of the learner ranks' collectives (torch.distributed): size it for the longest "
                               "phase one rank runs alone (rank 0's evaluation in async mode, a checkpoint write).", "(0, inf)")
    shared_prompt: str = _f("auto", "Compute each group's prompt once, its G completions attending to it: 'on', 'off', or 'auto' "
                            "(on, except under gradient checkpointing, FSDP or DeepSpeed).")
    seed: int = _f(0, "Seed of the learner and data order.")


@dataclass
class WarmStartConfig:
    steps: int = _f(0, "Supervised warm-start before RL: learner steps on demonstrations, each trained with advantage 1 "
                       "(supervised fine-tuning, through the same learner; 0 = off). Colocated mode.", "[0, inf)")
    data: str = _f("task", "Demonstrations: 'task' (the task's own: the facts task writes expert episodes) or a JSONL file with "
                           "a `messages` column of whole conversations (TRL's conversational SFT format); only assistant "
                           "turns are trained.")
    lr: float = _f(1e-4, "AdamW learning rate of the warm-start steps (the learner's optimiser; its schedule is not stepped).", "(0, inf)")
    batch_size: int = _f(16, "Demonstrations per warm-start step.", "[1, inf)")
    size: int = _f(0, "Demonstrations drawn from the training prompts ('task'; 0 = one per training prompt).", "[0, inf)")


@dataclass
class SyncConfig:
    interval: int = _f(250, "Push learner weights to the engines every N learner steps (the paper's N = 250).", "[1, inf)")
    method: str = _f("auto", "'auto' (inprocess when colocated, else disk), 'inprocess' (colocated engine), 'broadcast' "
                             "(worker processes or remote servers, streamed over NCCL on GPUs / gloo on CPU; a server needs "
                             "asymre's worker extension) or 'disk' (safetensors folder).")
    timeout_s: float = _f(300.0, "A push or wait longer than this fails with an error.", "(0, inf)")
    channel_host: str = _f("127.0.0.1", "Address the 'broadcast' weight channel listens on (loopback: workers run on this machine; "
                                        "a remote server needs an address it reaches); a peer must prove the channel's secret "
                                        "before it joins.")
    bucket_mb: float = _f(64.0, "'broadcast' sends the weights packed into buckets of this many MiB (cast to model.dtype), "
                                 "double-buffered: the next bucket is packed while this one is on the wire. Each end holds two "
                                 "buckets at a time.", "(0, inf)")


@dataclass
class EvalConfig:
    every: int = _f(0, "Evaluate every N learner steps (0 = only at start and end). Async mode evaluates on the generation "
                       "workers; a multiple of sync.interval spares lending them the learner's weights between pushes (and "
                       "the host copy of the behaviour weights kept to give them back).", "[0, inf)")
    at_start: bool = _f(True, "Evaluate before training.")
    at_end: bool = _f(True, "Evaluate after training.")
    preset: str = _f("greedy", "'greedy' or 'paper' (T = 0.1, top-p 0.95).")
    k: int = _f(1, "Samples per prompt for pass@k (1 = pass@1 only).", "[1, inf)")
    max_new_tokens: int = _f(2048, "Completion length cap at evaluation.", "[1, inf)")
    generation_kwargs: dict[str, Any] = _f({}, "Extra sampling parameters at evaluation, on top of the preset (as rollout.generation_kwargs).")


@dataclass
class CheckpointConfig:
    every: int = _f(0, "Checkpoint every N learner steps (0 = no periodic checkpoints).", "[0, inf)")
    keep_last: int = _f(2, "Checkpoints kept in the run folder.", "[1, inf)")
    min_free_gb: float = _f(1.0, "Refuse to start when the run folder's disk has less free space than this (GiB).", "[0, inf)")
    save_final_model: bool = _f(True, "Write the final model (in the model's own dtype) as a Hugging Face folder in the run folder.")
    save_final_checkpoint: bool | None = _f(None, "Write a full checkpoint (weights + optimizer state, ~4x the weights) at the end, "
                                                  "so resume=auto can extend the run; null (auto) = only when checkpoint.every > 0.")


@dataclass
class LoggingConfig:
    run_dir: str = _f("runs/${logging.run_name}", "Run folder: metrics.jsonl, checkpoints, final model.")
    run_name: str = _f("asymre", "Run name (wandb too).")
    verbose: bool = _f(False, "Show the libraries' own log lines (vLLM's engine set-up, transformers' loading bars, deprecation "
                              "notices) and the traceback of a start-up error, not just its one line.")
    overwrite: bool = _f(False, "Start over in a run folder that holds an earlier run: delete its metrics, checkpoints and final model first.")
    report_to: list[str] = _f([], "Trackers besides metrics.jsonl (always written): 'wandb', 'tensorboard' (in RUN_DIR/tensorboard), "
                                  "'trackio', 'mlflow'; each needs its package installed.")
    project: str = _f("asymre", "wandb project (trackio's project, mlflow's experiment).")
    tags: list[str] = _f([], "wandb tags.")
    progress: bool = _f(True, "Show a progress bar.")
    completions_every: int = _f(1, "Write the step's sampled prompts, completions, rewards and advantages to completions.jsonl "
                                   "(and a wandb table) every N learner steps (0 = never).", "[0, inf)")
    collapse_entropy: float = _f(0.05, "Collapse signal: warn when the mean policy entropy on sampled tokens (nats) drops below this.", "[0, inf)")
    collapse_distinct: float = _f(1.05, "Collapse signal: warn when distinct final answers per group drop below this.", "[0, inf)")
    collapse_reward_drop: float = _f(0.3, "Collapse signal: warn when the reward average falls this far below its best.", "[0, inf)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    resume: str = _f("none", "'auto' (newest complete checkpoint in the run folder, else start fresh), 'none', or a checkpoint path.")


_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16"},
    "rollout.mode": {"colocated", "async"},
    "rollout.on_bad_tool_call": {"message", "end", "reward"},
    "buffer.sampling": {"fifo", "reuse"},
    "loss.name": {"asymre", "grpo", "reinforce"},
    "loss.baseline": {"group_mean", "leave_one_out", "constant", "running"},
    "loss.aggregation": {"seq_mean", "token_mean"},
    "learner.lr_schedule": {"constant", "linear", "cosine"},
    "learner.shared_prompt": {"auto", "on", "off"},
    "sync.method": {"auto", "inprocess", "broadcast", "disk"},
    "eval.preset": {"greedy", "paper"},
    "reward.scale": {"01", "pm1"},
    "task.name": {"arithmetic", "facts", "gsm8k", "math", "file"},
    "task.facts.mode": {"in_tool", "in_weight"},
    "task.facts.eval_on": {"held_out", "trained"},
}


def _in(value: float, valid: str) -> bool:
    lo, hi = (float(x) for x in valid[1:-1].split(","))
    return (value >= lo if valid[0] == "[" else value > lo) and (value <= hi if valid[-1] == "]" else value < hi)


def _say(valid: str) -> str:
    """"[1, inf)" -> ">= 1", "(0, inf)" -> "> 0", "(0, 1]" -> "in (0, 1]"."""
    lo, hi = (x.strip() for x in valid[1:-1].split(","))
    if hi == "inf":
        return f"{'>=' if valid[0] == '[' else '>'} {lo}"
    return f"in {valid}"


def _check_ranges(obj: Any, prefix: str = "") -> None:
    """Every number against the `valid` interval declared next to its key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
            continue
        valid = f.metadata.get("valid")
        if valid is None or value is None:
            continue
        for v in value if isinstance(value, list) else [value]:
            if not _in(v, valid):
                raise ConfigError(f"{prefix}{f.name}={value} must be {_say(valid)}")


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_buffer_capacity(cfg: Config, ranks: int = 1) -> None:
    """The buffer must hold one learner step's groups: learner.groups_per_step for each of the `ranks` learner
    ranks it feeds (async mode: the main process's buffer feeds every rank; colocated: each rank has its own),
    and buffer.min_groups. Called at config load (one rank) and when the buffer is built (every rank)."""
    need = max(cfg.learner.groups_per_step * ranks, cfg.buffer.min_groups)
    if cfg.buffer.capacity < need:
        per_rank = f" x {ranks} learner ranks" if ranks > 1 else ""
        raise ConfigError(f"buffer.capacity={cfg.buffer.capacity} cannot hold one step's {need} groups "
                          f"(learner.groups_per_step={cfg.learner.groups_per_step}{per_rank}, buffer.min_groups={cfg.buffer.min_groups})")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate(cfg: Config) -> Config:
    """Checks that types alone cannot express; raises ConfigError naming the key."""
    if cfg.learner.shared_prompt in ("True", "False"):  # YAML reads a bare on/off as a boolean
        cfg.learner.shared_prompt = "on" if cfg.learner.shared_prompt == "True" else "off"
    for key, choices in _CHOICES.items():
        value = _get(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {sorted(choices)}")
    _check_ranges(cfg)
    if cfg.task.name not in ("arithmetic", "facts") and not cfg.task.path:
        raise ConfigError(f"task.name={cfg.task.name} needs task.path (a hub id, or a local JSONL/parquet file or folder)")
    bad_urls = [u for u in cfg.rollout.server_urls if not u.startswith(("http://", "https://"))]
    if bad_urls:
        raise ConfigError(f"rollout.server_urls: {bad_urls[0]!r} is not an http:// or https:// URL")
    if cfg.rollout.backend not in ("auto", "vllm", "hf") and ":" not in cfg.rollout.backend:
        raise ConfigError(f"rollout.backend={cfg.rollout.backend!r} is not one of auto, vllm, hf, or a 'pkg.module:factory' path")
    if (cfg.rollout.devices or cfg.rollout.server_urls) and cfg.rollout.mode != "async":
        raise ConfigError("rollout.devices / rollout.server_urls need rollout.mode=async (separate generation workers)")
    if cfg.sync.method == "broadcast" and cfg.rollout.mode != "async":
        raise ConfigError("sync.method=broadcast streams weights to generation worker processes or remote servers: it needs "
                          "rollout.mode=async")
    if cfg.sync.method == "broadcast" and _is_loopback(cfg.sync.channel_host):
        far = [u for u in cfg.rollout.server_urls if not _is_loopback(urlsplit(u).hostname or "")]
        if far:
            raise ConfigError(f"sync.method=broadcast: server {far[0]} joins the learner's weight channel, but "
                              f"sync.channel_host={cfg.sync.channel_host} listens on loopback only: set it to this machine's "
                              "address on a network that server reaches")
    if cfg.sync.method == "inprocess" and cfg.rollout.mode == "async":
        raise ConfigError("sync.method=inprocess reaches only a colocated engine; with rollout.mode=async use 'broadcast' or 'disk'")
    if cfg.rollout.sleep_level == 2 and cfg.sync.interval != 1:
        raise ConfigError(f"rollout.sleep_level=2 drops the engine's weights while it sleeps, but sync.interval={cfg.sync.interval} "
                          "needs them for the rounds before the next push: use rollout.sleep_level=1 (offload) or sync.interval=1")
    if cfg.buffer.max_staleness < cfg.sync.interval - 1:
        raise ConfigError(f"buffer.max_staleness={cfg.buffer.max_staleness} is below sync.interval - 1 = {cfg.sync.interval - 1}: "
                          "between two weight pushes the engine's groups grow that stale, so the learner would starve")
    check_buffer_capacity(cfg)
    if cfg.warm_start.steps and cfg.rollout.mode != "colocated":
        raise ConfigError("warm_start.steps: the warm-start trains before the first weight push, which only a colocated engine "
                          "waits for (async workers generate from the start): use rollout.mode=colocated, or warm-start in a "
                          "colocated run and start the async run from its final_model")
    if cfg.task.name == "facts" and cfg.task.facts.mode == "in_weight" and (cfg.rollout.tools or cfg.rollout.environment):
        raise ConfigError("task.facts.mode=in_weight trains without a tool, but rollout.tools / rollout.environment give one: "
                          "use task.facts.mode=in_tool, or drop the tool")
    if cfg.reward.weights and len(cfg.reward.weights) != len(cfg.reward.funcs):
        raise ConfigError(f"reward.weights has {len(cfg.reward.weights)} entries for {len(cfg.reward.funcs)} reward.funcs")
    if len(cfg.learner.betas) != 2:
        raise ConfigError(f"learner.betas={cfg.learner.betas} must have two entries")
    if cfg.loss.name == "grpo" and cfg.rollout.group_size < 2:
        raise ConfigError("loss.name=grpo needs rollout.group_size >= 2 (it normalises within a group)")
    if cfg.loss.name == "asymre" and cfg.loss.baseline in GROUP_BASELINES and cfg.rollout.group_size < 2:
        # a group of one is its own mean: every advantage would be -delta_V, whatever the reward (TRL refuses G < 2 too)
        raise ConfigError(f"rollout.group_size={cfg.rollout.group_size}: loss.baseline={cfg.loss.baseline} is computed within "
                          f"a group and needs rollout.group_size >= 2 (with one sample every advantage is -delta_V, whatever "
                          f"its reward); the baselines that accept rollout.group_size=1: constant, running")
    return cfg


GROUP_BASELINES = ("group_mean", "leave_one_out")  # loss.baseline values computed from a group's other samples


def _explain(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return ConfigError(f"{source}: bad config key '{key}': {msg}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides; returns a validated `Config`."""
    base = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        layers.append((_load_yaml(p), str(p)))
    if overrides:
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value (e.g. learner.lr=1e-5)")
        layers.append((_load_overrides(list(overrides)), "command line"))
    try:
        merged = base
        for layer, source in layers:
            try:
                merged = OmegaConf.merge(merged, layer)
            except OmegaConfBaseException as e:
                raise _explain(e, source) from None
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, "config") from None
    return validate(cfg)  # type: ignore[arg-type]


def _load_overrides(overrides: list[str]):
    """The command line's key=value pairs; OmegaConf parses each value as YAML, and a value that is not (an unclosed
    bracket) is one ConfigError naming that pair (the pairs are parsed one by one only to find it)."""
    try:
        return OmegaConf.from_dotlist(overrides)
    except yaml.YAMLError:
        for item in overrides:
            try:
                OmegaConf.from_dotlist([item])
            except yaml.YAMLError as e:
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"command line: {item!r}: the value is not valid YAML: {problem} (quote it, or close "
                                  f"its brackets)") from None
        raise


def _load_yaml(p: Path):
    """The config file as OmegaConf reads it; a file that is not YAML, not text, or not a mapping of keys is one
    ConfigError naming the file, and for a syntax error the line and column and the parser's complaint."""
    try:
        loaded = OmegaConf.load(p)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "not valid YAML"
        if e.context and e.problem and e.context_mark is not None:
            what += f" ({e.context} that starts at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        raise ConfigError(f"{p}{where}: not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{p}: a config file is a mapping of keys (learner: {{lr: ...}}), got a {type(loaded).__name__}")
    return loaded


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


class ConfigKey(NamedTuple):
    """One leaf of the config tree, as `describe` lists it."""

    key: str  # dotted, e.g. "learner.lr"
    default: Any
    help: str
    valid: str | None  # allowed interval in interval notation, e.g. "(0, inf)", or None


def describe(cls: type = Config, prefix: str = "") -> list[ConfigKey]:
    """Every leaf key of the config tree, in declaration order, nested sections walked: the one source of
    `--help` (`help_text`) and docs/config.md (`markdown`). A field declared without a help string is a
    programming error and raises, so neither listing can silently carry an empty line."""
    rows: list[ConfigKey] = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), f"{prefix}{f.name}.")
            continue
        help_ = f.metadata.get("help", "").strip()
        if not help_:
            raise TypeError(f"config field {prefix}{f.name} has no help string: declare it with _f(default, help)")
        rows.append(ConfigKey(f"{prefix}{f.name}", default, help_, f.metadata.get("valid")))
    return rows


def yaml_value(value: Any) -> str:
    """A default as YAML writes it, on one line: null, true/false, '01', 6.0e-08, [0.9, 0.999], {}."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, sort_keys=False).strip()
    return text.removesuffix("...").strip()  # a bare scalar document ends with "..."


def _sections(rows: list[ConfigKey]) -> dict[str, list[ConfigKey]]:
    """Rows grouped by their first key part, in order of first appearance; top-level keys under ""."""
    groups: dict[str, list[ConfigKey]] = {}
    for row in rows:
        section = row.key.split(".")[0] if "." in row.key else ""
        groups.setdefault(section, []).append(row)
    return groups


def help_text(width: int = 120) -> str:
    """Every config key with its default, help and valid range, grouped by section: the training
    command's `--help` epilog (use argparse.RawDescriptionHelpFormatter, which keeps these lines)."""
    rows = describe()
    lefts = {r.key: f"  {r.key} = {yaml_value(r.default)}" for r in rows}
    column = min(max(len(s) for s in lefts.values()), 44) + 2  # help starts here; longer key = default lines wrap
    lines = ["Config keys (set them in the --config YAML file or as key=value overrides), with their defaults:"]
    for section, group in _sections(rows).items():
        lines += ["", f"{section or 'top level'}:"]
        for r in group:
            valid = f" [valid: {r.valid}]".replace(" ", "\xa0") if r.valid else ""  # kept on one line by textwrap
            left = lefts[r.key]
            if len(left) >= column - 1:  # a long default: help goes under it
                lines.append(left)
                left = ""
            wrapped = textwrap.fill(r.help + valid, width=width, initial_indent=left.ljust(column),
                                    subsequent_indent=" " * column, break_long_words=False, break_on_hyphens=False)
            lines += wrapped.replace("\xa0", " ").split("\n")
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{_cell(text)}{pad}{fence}"


def markdown() -> str:
    """docs/config.md: one table per section of every key, its default, valid range and help."""
    out = [
        "# Config reference",
        "",
        ("Generated from `asymre/config.py` by `make docs` (`python -m asymre.config > docs/config.md`); do not edit it "
         "by hand: a test fails when it is out of date."),
        "",
        ("Set a key in the YAML file passed with `--config`, or on the command line as a dotted override "
         "(`learner.lr=1.0e-5`). Defaults are shown as YAML writes them; *valid* is the allowed interval of a number "
         "(or of each number of a list)."),
    ]
    for section, group in _sections(describe()).items():
        out += ["", f"## {section or 'Top level'}", "", "| key | default | valid | help |", "| --- | --- | --- | --- |"]
        for r in group:
            valid = _code(r.valid) if r.valid else ""
            out.append(f"| `{r.key}` | {_code(yaml_value(r.default))} | {valid} | {_cell(r.help)} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":  # python -m asymre.config > docs/config.md  (make docs)
    sys.stdout.write(markdown())
