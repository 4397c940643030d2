"""Optimizer, learning-rate schedule and EMA of the weights."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import OptimConfig
from ..model.unigendet import OWNERS
from .fsdp import local


def decayed_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters AdamW decays: the weight matrices of the linear layers, wherever they
    sit (blocks, patch projections, timestep MLP, heads, projector). Norm scales, biases, embedding
    tables (class embeddings), registers and the stream embedding are not decayed."""
    return {f"{prefix}.weight" if prefix else "weight" for prefix, module in model.named_modules()
            if isinstance(module, nn.Linear)}


def build_optimizer(model: nn.Module, cfg: OptimConfig, capturable: bool = False) -> torch.optim.AdamW:
    """AdamW with one group per (owner, decay): shared parameters get lr * shared_lr_scale.

    The fused implementation (one kernel per step on CPU and CUDA) is the one that honours a
    device-side `found_inf` flag: a step whose loss or gradients are not finite is skipped without
    the host reading anything (see `Trainer.step`). capturable=True (CUDA graphs): step counts on
    the device and learning rates as device tensors, which the schedule fills in place."""
    groups, decayed = [], decayed_parameters(model)
    for owner, named in model.params_by_owner().items():
        for decay in (True, False):
            params = [p for n, p in named if (n in decayed) == decay]
            if params:
                scale = cfg.shared_lr_scale if owner == "shared" else 1.0
                groups.append({"params": params, "lr": cfg.lr * scale, "owner": owner,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    assert {g["owner"] for g in groups} <= set(OWNERS)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True,
                                  capturable=capturable)
    if capturable:
        device_lrs(optimizer)
    return optimizer


def device_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Make each group's lr a 0-d tensor on its parameters' device (a captured step reads it from
    there; `LRScheduler` then fills it in place). Also after `load_state_dict`, which restores floats."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["lr"] = torch.tensor(float(group["lr"]), device=device, dtype=torch.float32)


def lr_multiplier(cfg: OptimConfig, total_steps: int):
    """step -> factor on each group's lr: linear warm-up, then cosine to min_lr_ratio or constant."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class EMA:
    """Exponential moving average of a model's weights (decay warmed up as min(d, (1+n)/(10+n))).

    The update count n lives on the device and the decay is computed there: `update` has no host
    value that changes between steps, so it can be captured in a CUDA graph."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next(model.parameters()).device
        self._updates = torch.zeros((), device=device, dtype=torch.float64)  # updates so far (exact to 2^53)

    @property
    def updates(self) -> int:
        """Updates so far (reads the device counter)."""
        return int(self._updates.item())

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """ema += (1 - d) * (model - ema); `skip` (0-d, 1.0 = skipped step) zeroes the update on the
        device, so a skipped step leaves the average unchanged without a host sync."""
        self._updates.add_(1.0)
        d = torch.clamp((1.0 + self._updates) / (10.0 + self._updates), max=self.decay)  # fp64, as on the host
        weight = (1.0 - d) if skip is None else (1.0 - d) * (1.0 - skip.double())
        weight = weight.float()
        ema = [local(p) for p in self.model.parameters()]  # (FSDP: this rank's shards; both models are
        cur = [local(p.detach()) for p in model.parameters()]  # sharded alike)
        # ema += weight * (cur - ema). Not _foreach_lerp_: with a 0-d tensor weight it takes the Scalar
        # overload, which reads the weight on the host (a sync that breaks CUDA-graph capture).
        step = torch._foreach_sub(cur, ema)
        torch._foreach_mul_(step, weight)
        torch._foreach_add_(ema, step)

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self._updates.fill_(int(state["updates"]))
