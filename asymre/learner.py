"""The learner: an Accelerate-prepared model and optimiser that trains on scored trajectory groups.

DDP, FSDP or DeepSpeed come from the accelerate config file, never from this code. A step computes the
advantages over the whole step batch (asymre/advantages.py), then runs micro-batches (packed up to
`learner.micro_batch_tokens` padded tokens) with gradient accumulation, clips, and steps. Master weights and
optimizer state are float32; the forward runs in model.dtype under autocast. Log-probs and the entropy metric
are computed chunk by chunk (`asymre.loss.token_logprobs_and_entropy`): no float32 copy of the whole logits.

Shared prompts (learner.shared_prompt, on by default): the G samples of a group share their prompt, so each
micro-batch holds whole groups; the prompts run once (left-padded) with a KV cache, the cache is gathered to one
row per sample, and the completions (right-padded, positions continuing after their prompt) run against it, the
gradient flowing back through the cache into the prompt's computation. Loss and gradients equal the one-row-
per-sample path's up to float rounding (tests/test_learner.py), with the prompt's tokens computed once instead
of G times (the default CPU task's prompts are most of its tokens: its speed-up is in docs/benchmarks.md).
Trade-offs: two forward calls per micro-batch (the prompt pass through the bare module, so
a DDP wrapper still sees one call per backward), the cache's keys and values held for backward, and micro-batches
of whole groups (less even packing than by sequence length). Chosen over a block attention mask over
[prompt, c1..cG] in one packed row, which needs 4D masks every attention implementation honours and per-sample
position restarts; over expanding the cache without a copy (`index_select` copies the prompt's keys and values
G times, small beside the completions' activations). Off under gradient checkpointing (no cache in training) and,
until tested there, FSDP and DeepSpeed ('auto'); 'off' gives the row-per-sample path: each sample left-padded,
only the last `max completion length + 1` positions through the LM head (`logits_to_keep`).
Alternative left out: padding-free packing, which needs flash-attention kernels.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from asymre.advantages import ADVANTAGES
from asymre.baselines import RunningBaseline
from asymre.config import Config, ConfigError
from asymre.data import TrajectoryGroup
from asymre.forward import StepBatch, bucket_by_length, group_buckets, padding_frac, sequence_logps, shared_prompt_logps
from asymre.gather import gather_fsdp2, gather_zero3, iter_fsdp2, iter_zero3
from asymre.lora import apply_lora, merge_lora, scaling, transposed_modules
from asymre.loss import LOSSES, NEEDS_BEHAVIOUR_LOGPROBS
from asymre.models import load_model, torch_dtype


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
        return 1.0 - frac if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return f


def _shared_prompt(cfg: Config, accelerator) -> bool:
    """learner.shared_prompt: 'auto' is on except where it is untested (FSDP, DeepSpeed) or where the model keeps no
    KV cache in training (gradient checkpointing)."""
    choice = cfg.learner.shared_prompt
    if choice != "auto":
        return choice == "on"
    distributed = str(accelerator.distributed_type)
    return not (cfg.model.gradient_checkpointing or "FSDP" in distributed or "DEEPSPEED" in distributed)


def _configure_deepspeed(cfg: Config, accelerator) -> None:
    """DeepSpeed's settings that only the learner knows, filled in before `prepare` (accelerate 1.15
    `Accelerator._prepare_deepspeed`). Without a dataloader, 'auto' for train_micro_batch_size_per_gpu cannot be
    resolved there: DeepSpeed's micro-batch becomes one of ours (1 here; the value only feeds DeepSpeed's batch-size
    bookkeeping, ours are token-budgeted by learner.micro_batch_tokens). The learner accumulates over its own
    micro-batches and marks the last one itself (train_step), so DeepSpeed's own accumulation must stay 1; its
    gradient clipping is learner.max_grad_norm. A setting that contradicts ours is refused, never overridden."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if plugin.is_auto("train_micro_batch_size_per_gpu"):
        ds["train_micro_batch_size_per_gpu"] = 1
    accumulation = ds.get("gradient_accumulation_steps", "auto")
    if accumulation not in ("auto", 1):
        raise ConfigError(f"the DeepSpeed config sets gradient_accumulation_steps={accumulation}: asymre accumulates over its own "
                          "micro-batches (learner.micro_batch_tokens) and steps once per learner step; set it to 1 or auto")
    clip = ds.get("gradient_clipping", "auto")
    if clip == "auto":
        ds["gradient_clipping"] = cfg.learner.max_grad_norm
    elif float(clip) != cfg.learner.max_grad_norm:
        raise ConfigError(f"the DeepSpeed config clips gradients at gradient_clipping={clip} but learner.max_grad_norm="
                          f"{cfg.learner.max_grad_norm:g}: DeepSpeed clips inside its step, so make them equal")


class Learner:
    def __init__(self, cfg: Config, model_path: str, accelerator, tokenizer=None):
        self.cfg = cfg
        self.accelerator = accelerator
        from transformers import AutoConfig

        own = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)  # the checkpoint's dtype: final models keep it
        self.save_dtype = getattr(torch, own) if isinstance(own, str) else own
        # Master weights and AdamW state in float32, compute in model.dtype (autocast): bf16 parameters stepped by AdamW
        # lose every update below bf16's resolution (at the paper's lr 6e-8, almost all of them). Under FSDP and
        # DeepSpeed their own mixed-precision settings (the accelerate config's mixed_precision) take over.
        self.compute_dtype = torch_dtype(cfg.model.dtype)
        if self.compute_dtype == torch.float16 and accelerator.mixed_precision != "fp16":
            raise ConfigError("model.dtype=float16 trains with float32 master weights under Accelerate's fp16 mixed precision, "
                              "which scales the loss: set mixed_precision: fp16 in the accelerate config (or use bfloat16)")
        model = load_model(model_path, "float32")
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        self.lora = cfg.model.lora if cfg.model.lora.rank > 0 else None
        self.lora_transposed: frozenset[str] = frozenset()  # adapted Conv1D modules (weights [in, out])
        if self.lora is not None:
            model = apply_lora(model, self.lora)
            self.lora_transposed = transposed_modules(model)  # refuses an adapter merge_lora cannot merge
        if cfg.loss.name not in LOSSES or cfg.loss.name not in ADVANTAGES:
            raise ValueError(f"unknown loss.name {cfg.loss.name!r}; expected one of {sorted(LOSSES)}")
        lc = cfg.learner
        trained = [p for p in model.parameters() if p.requires_grad]  # under LoRA, the adapters alone
        optimizer = torch.optim.AdamW(trained, lr=lc.lr, betas=tuple(lc.betas), weight_decay=lc.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(lc.lr_schedule, lc.warmup_steps, lc.steps))
        _configure_deepspeed(cfg, accelerator)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        bare = self.unwrapped()
        if accelerator.native_amp and "_original_forward" in vars(bare):
            # accelerate 1.16 `prepare_model` (accelerator.py, `if self.native_amp: model._original_forward = ...`) wraps
            # the forward in its autocast and converts every output to float32: a float32 copy of the [tokens, vocab]
            # logits, twice the bf16 tensor the chunked log-probs were built to avoid. The bare forward comes back;
            # `_autocast` enters the same autocast around each call instead. FSDP2 never goes through `prepare_model`
            # (`_prepare_fsdp2` -> fsdp_utils.py `fsdp2_prepare_model`, whose MixedPrecisionPolicy casts instead): its
            # model has no wrapped forward to undo, though `native_amp` is True for bf16 there too.
            bare.forward = bare._original_forward
        self.tokenizer = tokenizer  # saved with the final model
        # left padding: any id works (padded positions are masked); the tokenizer's own pad (or EOS) id reads best
        ids = (tokenizer.pad_token_id, tokenizer.eos_token_id) if tokenizer is not None else ()
        self.pad_id = next((i for i in ids if i is not None), 0)
        self.shared_prompt = _shared_prompt(cfg, accelerator)
        plugin = accelerator.state.deepspeed_plugin
        self.zero3 = plugin is not None and plugin.zero_stage == 3
        self.running = RunningBaseline(cfg.loss.running_momentum)
        # Accumulation without a reduction between micro-batches (accelerate's no_sync) under DDP and ZeRO-1; not under
        # FSDP2, where accelerate 1.16's no_sync is `set_requires_gradient_sync(False)` and torch 2.13 then keeps every
        # gradient unsharded until the last micro-batch (_fsdp_param_group.py post_backward: `if not self.reduce_grads:
        # ... to_accumulated_grad_if_needed()`, an unsharded_accumulated_grad per parameter): a whole model of gradients
        # on each rank. Reduce-scattering each micro-batch keeps them sharded (torchtitan's default) at one
        # reduce-scatter per micro-batch.
        self.skip_sync = accelerator.num_processes > 1 and not accelerator.is_fsdp2
        self.step = 0  # learner version: the number of optimiser steps taken
        self.last_batch: StepBatch | None = None  # the last step's samples and advantages (completions log)

    # ---- advantages over the whole step ----------------------------------------------------------
    def build_batch(self, groups: list[TrajectoryGroup], supervised: bool = False) -> StepBatch:
        """The step's samples and advantages; `supervised`: demonstrations, each with advantage 1 and no baseline (the
        policy-gradient loss is then the negative log-likelihood of their model tokens: supervised fine-tuning)."""
        seqs, comp_lens, rewards, gids, old, uids, refs, masks = [], [], [], [], [], [], [], []
        for group_index, g in enumerate(groups):
            scored = [(j, t) for j, t in enumerate(g.trajectories) if t.reward is not None and t.completion_ids]
            if not scored:
                continue
            gi = len(uids)
            uids.append(g.prompt.uid)
            for j, t in scored:
                refs.append((group_index, j))
                seqs.append(g.prompt_ids + t.completion_ids)
                comp_lens.append(len(t.completion_ids))
                rewards.append(float(t.reward))
                gids.append(gi)
                old.append(t.logprobs)
                masks.append(t.mask)
        if not seqs:
            raise ValueError("learner step got no scored trajectories (every sample was dropped)")
        r = torch.tensor(rewards, dtype=torch.float32)  # [B]
        g = torch.tensor(gids, dtype=torch.long)  # [B]
        lc = self.cfg.loss
        prompt_lens = [len(s) - c for s, c in zip(seqs, comp_lens)]
        if supervised:
            return StepBatch(seqs, comp_lens, r, torch.ones_like(r), torch.zeros_like(r), None, refs, prompt_lens, gids,
                             masks if any(m is not None for m in masks) else None)
        needs_old = lc.name in NEEDS_BEHAVIOUR_LOGPROBS
        if needs_old and any(x is None for x in old):
            raise ValueError(f"loss.name={lc.name} needs behaviour log-probs, but the generation backend returned none")
        a = ADVANTAGES[lc.name](lc, r, g, self.step, self.running, uids)  # [B] advantages, [B] baseline or None
        return StepBatch(seqs, comp_lens, r, a.advantages, a.baseline, old if needs_old else None, refs, prompt_lens, gids,
                         masks if any(m is not None for m in masks) else None)

    # ---- one optimiser step ----------------------------------------------------------------------
    def _autocast(self):
        """The forward in model.dtype over float32 weights: Accelerate's autocast when its config asks for native mixed
        precision, else torch's for model.dtype; none under DeepSpeed (its engine computes in its own dtype)."""
        acc = self.accelerator
        if acc.native_amp:
            return acc.autocast()
        if acc.mixed_precision != "no" or self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=acc.device.type, dtype=self.compute_dtype)

    def _micro_loss(self, batch: StepBatch, idx: list[int], normalizer: float, loss_name: str | None = None):
        dev = self.accelerator.device
        if self.shared_prompt:
            logp, ent, mask, old = shared_prompt_logps(self.model, self.unwrapped(), self._autocast, batch, idx, self.pad_id, dev)
        else:
            logp, ent, mask, old = sequence_logps(self.model, self._autocast, batch, idx, self.pad_id, dev)
        # the entropy on the sampled positions is a collapse signal (no gradient)
        entropy = ((ent * mask).sum() / mask.sum().clamp(min=1)).item()
        sel = torch.tensor(idx)
        lc = self.cfg.loss
        adv = batch.advantages[sel].to(logp.device)  # [b]
        base = batch.baseline[sel].to(logp.device) if batch.baseline is not None else None  # [b]
        loss, m = LOSSES[loss_name or lc.name](logp, mask, adv, base, old, clip_eps=lc.clip_eps, aggregation=lc.aggregation, normalizer=normalizer)
        m["loss/entropy"] = entropy
        return loss, m

    def train_step(self, groups: list[TrajectoryGroup], supervised: bool = False) -> dict[str, float]:
        """One optimiser step on `groups` (this rank's share). Returns metrics. `supervised` (the warm-start,
        asymre/warm_start.py): the groups are demonstrations trained with advantage 1 by the REINFORCE loss (= their
        negative log-likelihood), whatever loss.name; the learner's version and LR schedule do not move."""
        t0 = time.perf_counter()
        batch = self.build_batch(groups, supervised)
        if not supervised:
            self.last_batch = batch
        lc, acc = self.cfg.loss, self.accelerator
        normalizer = len(batch.seqs) if lc.aggregation == "seq_mean" else float(batch.trained_tokens)
        budget = self.cfg.learner.micro_batch_tokens
        micro = group_buckets(batch, budget) if self.shared_prompt else bucket_by_length([len(s) for s in batch.seqs], budget)
        # Every rank must run the same number of backward passes (DDP all-reduces on the last one).
        n_local = torch.tensor([len(micro)], device=acc.device)
        n_max = int(acc.gather(n_local).max().item()) if acc.num_processes > 1 else len(micro)
        plan = [(m, 1.0) for m in micro] + [(micro[-1], 0.0)] * (n_max - len(micro))
        self.model.train()
        sums: dict[str, float] = {}
        total_loss = 0.0
        fwd_bwd = 0.0
        try:
            for k, (idx, weight) in enumerate(plan):
                last = k == len(plan) - 1
                # One optimizer step per learner step under every backend: under DeepSpeed `acc.backward` marks the
                # accumulation boundary from sync_gradients and runs the engine's step there (accelerate 1.15
                # DeepSpeedEngineWrapper.backward), so only the last micro-batch may set it; Accelerate's optimizer
                # wrapper likewise steps only when it is set.
                acc.gradient_state._set_sync_gradients(last)
                ctx = acc.no_sync(self.model) if (not last and self.skip_sync) else nullcontext()
                with ctx:
                    t1 = time.perf_counter()
                    loss, m = self._micro_loss(batch, idx, normalizer, "reinforce" if supervised else lc.name)
                    acc.backward(loss * weight)
                    fwd_bwd += time.perf_counter() - t1
                if weight:
                    total_loss += loss.item()
                    for key, v in m.items():
                        sums[key] = sums.get(key, 0.0) + v * len(idx)
        finally:
            acc.gradient_state._set_sync_gradients(True)
        t_opt = time.perf_counter()
        grad_norm = float("nan")
        if self.cfg.learner.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), self.cfg.learner.max_grad_norm))
        self.optimizer.step()
        if not supervised:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        opt_s = time.perf_counter() - t_opt
        if not supervised:
            self.step += 1
        secs = time.perf_counter() - t0
        metrics = {k: v / len(batch.seqs) for k, v in sums.items()}
        metrics.update({
            "loss/value": total_loss, "learner/grad_norm": grad_norm, "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/trajectories": float(len(batch.seqs)), "learner/micro_batches": float(len(micro)),
            "perf/learner_seconds": secs, "perf/learner_tokens": float(batch.num_tokens),
            "perf/forward_backward_seconds": fwd_bwd, "perf/optimizer_seconds": opt_s,
            "perf/learner_tokens_per_s": batch.num_tokens / secs,
            "learner/padding_frac": padding_frac(batch, micro, self.shared_prompt),
            "learner/optimizer_steps": float(self.optimizer_steps()),
        })
        return metrics

    def optimizer_steps(self) -> int:
        """Updates AdamW has applied so far, read from its own state (under DeepSpeed, the AdamW that ZeRO wraps): the
        check that each learner step is exactly one optimizer step, whatever the backend."""
        opt = self.optimizer
        while not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return max((int(s["step"]) for s in opt.state.values() if "step" in s), default=0)

    # ---- weights out -----------------------------------------------------------------------------
    def full_state_dict(self, everywhere: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Hugging Face-named full weights (gathered under FSDP/DeepSpeed; under LoRA merged into the base model's
        names). Collective: call on every rank. Under ZeRO-3 every rank gets them; under FSDP only the main process,
        unless `everywhere` (each colocated rank's engine needs them). `dtype` (a push's: the engines'): where weights
        are gathered into host copies (FSDP2, ZeRO-3, LoRA's merged layers) those copies are made in it, never in
        float32 first; where the state is the live parameters themselves (DDP, ZeRO-1/2, one process) they are handed
        over as they are, and the engine's loader (or the channel, bucket by bucket) casts them, one tensor at a time.
        Either way the engine ends up with the same weights."""
        if self.lora is not None:  # merged at full precision (W + s * B @ A, then rounded once), as peft's merge is
            return self._as_base_model(self._trained_state(everywhere), dtype)
        return self._trained_state(everywhere, dtype)

    def _as_base_model(self, state: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The trained state under the base model's names: LoRA's adapters merged in (an empty state, FSDP's on other
        ranks than the main one, stays empty); merged weights stored in `dtype` if given."""
        if self.lora is None or not state:
            return state
        return merge_lora(state, scaling(self.lora.alpha, self.lora.rank), self.lora_transposed, dtype)

    def _trained_state(self, everywhere: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The prepared model's own state, gathered (a peft model's names under LoRA); on every rank under ZeRO-3, and
        under FSDP when `everywhere`. Collective. Host copies in `dtype` where it is given (see full_state_dict).

        ZeRO-1/2 keep whole parameters on every rank, so their state is the module's own (references): accelerate
        1.16's get_state_dict would clone every tensor to the host (accelerator.py `get_state_dict`, DeepSpeed branch:
        clone_tensors_for_torch_save), a model's worth of host memory per rank for a push that needs none."""
        if self.zero3:
            return gather_zero3(self.unwrapped(), dtype)
        acc = self.accelerator
        if acc.distributed_type == DistributedType.DEEPSPEED:
            return self.unwrapped().state_dict()
        if acc.num_processes > 1 and acc.distributed_type == DistributedType.FSDP and (everywhere or dtype is not None):
            if not acc.is_fsdp2:
                if everywhere:
                    raise ConfigError("colocated engines on several FSDP ranks each need the whole weights: use fsdp_version: 2 "
                                      "in the accelerate config (FSDP1's full state dict is gathered to rank 0 only here)")
                return acc.get_state_dict(self.model)
            # a push: every rank all-gathers one tensor at a time; the main process alone keeps them unless every rank
            # feeds an engine of its own (get_state_dict would gather float32 to the main process's host)
            return gather_fsdp2(self.unwrapped(), dtype, keep=everywhere or acc.is_main_process)
        return acc.get_state_dict(self.model)

    def stream_state(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]] | None:
        """The full weights one tensor at a time, gathered as they are read and left on the device, floating tensors in
        `dtype`, where the learner shards them over several ranks (FSDP2, ZeRO-3) and no LoRA merge needs a whole
        layer's adapters: a colocated push then never builds a whole copy of the model. None elsewhere (the state is
        the live parameters already, or a merge needs it whole). Collective: every rank must exhaust it."""
        acc = self.accelerator
        if self.lora is not None:
            return None
        if self.zero3:
            return iter_zero3(self.unwrapped(), dtype)
        if acc.num_processes > 1 and acc.distributed_type == DistributedType.FSDP and acc.is_fsdp2:
            return iter_fsdp2(self.unwrapped(), dtype)
        return None

    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def weight_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the full weights, as trained or in `dtype` (a tied tensor once; ZeRO-3 partitions counted whole)."""
        return sum(getattr(p, "ds_numel", p.numel()) * (dtype.itemsize if dtype else p.element_size())
                   for p in self.unwrapped().parameters())

    def save_model(self, folder: str) -> None:
        """A Hugging Face folder in the model's own dtype (a bf16 model trained in fp32 is saved in bf16). Under LoRA:
        peft's adapter folder, and the merged model in `merged/` when model.lora.save_merged asks. Collective."""
        acc = self.accelerator
        state = self._trained_state()  # gathered once: the adapter and the merged model both come from it
        if self.lora is not None:
            if acc.is_main_process:
                self.unwrapped().save_pretrained(folder, state_dict=state, safe_serialization=True)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(folder)
            if not self.lora.save_merged:
                acc.wait_for_everyone()
                return
            folder = str(Path(folder) / "merged")
            state = self._as_base_model(state)
        if acc.is_main_process:
            model, dtype = self.unwrapped(), self.save_dtype
            if self.lora is not None:
                model = model.get_base_model()  # its config; the merged weights come from `state`
            cast = isinstance(dtype, torch.dtype) and dtype != model.dtype
            if cast:
                state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
            model.save_pretrained(folder, state_dict=state, safe_serialization=True)
            if cast:  # save_pretrained records the dtype trained in; the weights are in the model's own
                trained_in, model.config.dtype = model.config.dtype, dtype
                model.config.save_pretrained(folder)
                model.config.dtype = trained_in
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(folder)
        acc.wait_for_everyone()
