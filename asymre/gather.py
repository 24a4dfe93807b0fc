"""The learner's sharded weights made whole, for a push to the generation engines: FSDP2's DTensors and ZeRO-3's
partitions all-gathered one tensor (or one module's parameters) at a time, cast to the engines' dtype on the device,
either collected into host copies (`gather_fsdp2`, `gather_zero3`) or streamed to an engine's loader as they are read
(`iter_fsdp2`, `iter_zero3`: `Learner.stream_state`). Every function here is a collective: every rank calls it and
walks it to its end, in the same order."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _host(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A host copy of `t`, floating tensors in `dtype` when given (a gather for a push: the engine's dtype, half the
    host memory of float32 masters for bf16; cast on the device before the copy, so no float32 host copy is made)."""
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.detach().to("cpu", copy=True)


def gather_zero3(module: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ZeRO-3's partitioned weights, whole, on every rank (on the host), one module's parameters gathered at a time.
    DeepSpeed's own consolidation (engine._zero3_consolidated_16bit_state_dict in 0.19.8, which accelerate's
    get_state_dict calls) fills rank 0 alone and needs stage3_gather_16bit_weights_on_model_save. Tied weights keep
    one tensor under both names, as a state_dict does. Collective: call on every rank."""
    return dict(iter_zero3(module, dtype, host=True))


def iter_zero3(module: torch.nn.Module, dtype: torch.dtype | None = None, host: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of ZeRO-3's partitioned weights, one module's parameters gathered at a time (deepspeed
    0.19.8 zero.GatheredParameters, modifier_rank=None: every rank gets them, none writes back); floating tensors
    cast to `dtype` on the device, and copied to the host if `host`. A tied parameter's second name yields the
    tensor yielded under the first (kept until then). Collective: every rank must exhaust the iterator."""
    import deepspeed

    names: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        names[p.ds_id] = names.get(p.ds_id, 0) + 1
    tied: dict[int, torch.Tensor] = {}
    done: set[int] = set()
    for prefix, mod in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        with deepspeed.zero.GatheredParameters(list(mod.parameters(recurse=False)), modifier_rank=None):
            for name, p in mod.named_parameters(recurse=False):
                if p.ds_id in done:
                    yield dot + name, tied[p.ds_id]
                    continue
                done.add(p.ds_id)
                t = _cast(p, dtype, host)
                if names[p.ds_id] > 1:  # outlives the gather: its own memory (an uncast one shares the gathered buffer)
                    tied[p.ds_id] = t = t if host or t.data_ptr() != p.data_ptr() else t.clone()
                yield dot + name, t
        for name, buf in mod.named_buffers(recurse=False):
            if name not in mod._non_persistent_buffers_set:
                yield dot + name, _cast(buf, dtype, host)


def _cast(t: torch.Tensor, dtype: torch.dtype | None, host: bool) -> torch.Tensor:
    """`t` detached, a floating tensor in `dtype`, on the host (a copy: `_host`) or on its device (no copy where the
    dtype is already right: the consumer reads it before the next tensor is gathered)."""
    if host:
        return _host(t, dtype)
    return t.detach().to(dtype if dtype is not None and t.is_floating_point() else t.dtype)


def gather_fsdp2(module: torch.nn.Module, dtype: torch.dtype | None = None, keep: bool = True) -> dict[str, torch.Tensor]:
    """FSDP2's sharded weights (DTensors), whole, on every rank (on the host), one tensor all-gathered at a time:
    accelerate 1.16's get_state_dict under FSDP2 (accelerator.py, Accelerator.get_state_dict) asks torch for
    StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True), which fills rank 0 alone, but
    each colocated rank's engine needs them. A tensor under two names (tied embeddings) is gathered once. Collective:
    call on every rank, which walk the same state dict in the same order. `dtype`: floating tensors kept in it (each
    whole tensor is cast on the device before its host copy); `keep=False`: this rank takes part in the all-gathers and
    keeps nothing (a push from the main process only: the other ranks hold no host copy at all)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in iter_fsdp2(module, dtype, host=keep):
        if keep:
            out[name] = t
    return out


def iter_fsdp2(module: torch.nn.Module, dtype: torch.dtype | None = None, host: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) of FSDP2's sharded weights, one DTensor all-gathered at a time (torch 2.13
    DTensor.full_tensor), floating tensors cast to `dtype` on the device, copied to the host if `host`. Which names
    are one parameter (tied) is decided from the module's structure, the same on every rank (a rank's empty shard
    could not tell), so every rank makes the same all-gathers; a tied second name yields the tensor yielded under
    the first. Collective: every rank must exhaust the iterator."""
    from torch.distributed.tensor import DTensor

    first: dict[int, str] = {}
    alias = {name: first.setdefault(id(p), name) for name, p in module.named_parameters(remove_duplicate=False)}
    shared = {a for n, a in alias.items() if a != n}  # names whose tensor a later name reuses
    tied: dict[str, torch.Tensor] = {}
    gathered: set[str] = set()  # not what a caller kept: a rank that keeps nothing skips the same tied names as the others
    for name, t in module.state_dict().items():
        if alias.get(name, name) != name and alias[name] in gathered:
            yield name, tied.get(alias[name])
            continue
        gathered.add(name)
        if isinstance(t, DTensor) and t.device.type != t.device_mesh.device_type:
            t = t.to(t.device_mesh.device_type)  # offloaded shards (fsdp_offload_params) gather on the mesh's device
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        out = _cast(whole, dtype, host)
        del whole
        if name in shared:
            tied[name] = out
        yield name, out
