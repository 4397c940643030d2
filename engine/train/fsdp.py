"""Fully sharded data parallel with FSDP2 (`train.fsdp = true` under torchrun).

`shard_model` applies `fully_shard` to each MoT block, to the DIGA projector and then to the whole
model: every rank keeps 1/world of each parameter (a DTensor sharded on dim 0), a unit's parameters
are gathered just before it runs and freed after, and gradients are reduce-scattered (averaged) back to the
shards. The optimizer and the EMA then work on shards.

Checkpoints stay the single-process format (full tensors in safetensors, the optimizer state keyed
by parameter index), so a run trained with FSDP resumes with any number of processes, with or
without FSDP, and `eval` / `generate` read it as any other. Gathering and re-sharding go through
the helpers below; each gather is a collective that every rank calls in the same order.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor


def shard_model(model: nn.Module, device: torch.device, param_dtype: torch.dtype = torch.float32) -> None:
    """Shard `model` (a UniGenDet) in place across the default process group: one FSDP unit per block,
    one for the DIGA projector (the phases call it outside the model's forward), and the root unit
    for embeddings and heads. Every unit reshards after its forward, the root too, so outside a
    forward/backward the parameters are always the shards (the EMA update, checkpoints and the
    phases' requires_grad switches rely on that). param_dtype: the dtype parameters are gathered
    and used in (bf16 halves the all-gathers); gradients are reduced in fp32 and the shards stay fp32.
    With fp32 the step's bf16 autocast on GPU casts them after the all-gather, as in data parallel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for unit in (*model.blocks, model.projector, model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=policy)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place updates change the parameter); other tensors as given."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor behind a DTensor (a collective for sharded ones); other tensors as given."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_state(state: Any, *, keep: bool) -> Any:
    """A copy of a (nested dict / list) state whose DTensors are replaced by full CPU tensors.

    A collective: every rank calls it on states of the same structure. Ranks with keep=False take
    part in the gathers, drop each gathered tensor at once and get None back (only the writer of a
    checkpoint holds the whole state)."""
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        if isinstance(x, DTensor):
            whole = x.full_tensor()
            return whole.cpu() if keep else None
        return x

    gathered = walk(state)
    return gathered if keep else None


def shard_like(tensors: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Full tensors of a checkpoint -> the shards that fit `model`'s DTensor parameters (every rank
    read the same file, so each takes its own slice; no communication)."""
    params = dict(model.named_parameters())
    out = {}
    for name, t in tensors.items():
        p = params.get(name)
        if isinstance(p, DTensor):
            t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        out[name] = t
    return out


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After `optimizer.load_state_dict` of a full (single-process) state: make each per-parameter
    tensor of a DTensor parameter (AdamW's moments) the matching shard."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
