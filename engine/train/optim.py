"""Optimizer, learning-rate schedule and EMA of the weights."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ..config import OptimConfig
from ..model.unigendet import OWNERS


def _decays(name: str, p: nn.Parameter) -> bool:
    """Weight decay on matrices only: not on norms, biases, embeddings, registers."""
    return p.ndim >= 2 and not any(k in name for k in ("embed", "registers", "classes"))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with one group per (owner, decay): shared parameters get lr * shared_lr_scale.

    The fused implementation (one kernel per step on CPU and CUDA) is the one that honours a
    device-side `found_inf` flag: a step whose loss or gradients are not finite is skipped without
    the host reading anything (see `Trainer.step`)."""
    groups = []
    for owner, named in model.params_by_owner().items():
        for decay in (True, False):
            params = [p for n, p in named if _decays(n, p) == decay]
            if params:
                scale = cfg.shared_lr_scale if owner == "shared" else 1.0
                groups.append({"params": params, "lr": cfg.lr * scale, "owner": owner,
                               "weight_decay": cfg.weight_decay if decay else 0.0})
    assert {g["owner"] for g in groups} <= set(OWNERS)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)


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
    """Exponential moving average of a model's weights (decay warmed up as min(d, (1+n)/(10+n)))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, skip: torch.Tensor | None = None) -> None:
        """ema += (1 - d) * (model - ema); `skip` (0-d, 1.0 = skipped step) zeroes the update on the
        device, so a skipped step leaves the average unchanged without a host sync."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = list(self.model.parameters())
        cur = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, cur, 1.0 - d if skip is None else (1.0 - d) * (1.0 - skip))

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
