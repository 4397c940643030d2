"""Losses of the method (docs/design.md §1): flow, detector BCE, DIGA (alignment + authenticity).

All BCE rows of a step (detector rows and authenticity rows) and the alignment pair go through ONE
`ops.bce_diga_loss` call. Each group of BCE rows carries its own weight in the total; the op
computes a weighted mean, so the group weights are folded into per-row weights and the result is
rescaled (see `combined_bce_align`). Every part is also returned by name for logging.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .rng import Gen, batch_randn


def sample_flow_inputs(x0: Tensor, generator: Gen = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rectified-flow training inputs: t = sigmoid(n), n ~ N(0, 1); x_t = (1 - t) x0 + t eps.

    x0: (B, 3, S, S) -> (x_t (B, 3, S, S), t (B,), eps (B, 3, S, S)).
    """
    B = x0.shape[0]
    t = torch.sigmoid(batch_randn((B,), generator, device=x0.device))
    eps = batch_randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    tb = t.view(B, 1, 1, 1).to(x0.dtype)
    return (1 - tb) * x0 + tb * eps, t, eps


def flow_loss(v_hat: Tensor, x0: Tensor, eps: Tensor, row_weights: Tensor | None = None) -> Tensor:
    """L_flow = mean (v_hat - (eps - x0))^2, in fp32. With `row_weights` (B,) summing to 1 it is the
    weighted mean of the per-sample means instead (rows of weight 0 contribute nothing)."""
    sq = (v_hat.float() - (eps.float() - x0.float())).pow(2)  # (B, 3, S, S)
    if row_weights is None:
        return sq.mean()
    return (sq.flatten(1).mean(1) * row_weights).sum()


def one_step_estimate(x_t: Tensor, t: Tensor, v_hat: Tensor) -> Tensor:
    """x0_hat = x_t - t * v_hat: where one Euler step to t = 0 lands. (B, 3, S, S)."""
    return x_t - t.view(-1, 1, 1, 1).to(x_t.dtype) * v_hat.to(x_t.dtype)


def mmsa_consistency(layers, g_tokens: tuple[int, int], d_tokens: tuple[int, int]) -> Tensor:
    """L_MMSA: the mean over MMSA layers of `ops.mmsa_consistency_loss` (definition: `ops.consistency`).

    layers: per layer (q_g, k_g, q_d, k_d, lse_g, lse_d) (`DetOutput.attention`); g_tokens, d_tokens:
    (offset, count) of the image tokens in the G and D sequences. -> 0-d fp32 tensor."""
    (g_off, n), (d_off, n_d) = g_tokens, d_tokens
    if not layers or n != n_d:
        raise ValueError(f"mmsa_consistency: needs at least one MMSA layer (got {len(layers or ())}) and as many "
                         f"image tokens in G as in D (got {n}, {n_d})")
    per_layer = [ops.mmsa_consistency_loss(*st, n_tokens=n, d_offset=d_off, g_offset=g_off).float() for st in layers]
    return torch.stack(per_layer).mean()


@dataclass
class BCEGroup:
    """Rows of BCE-with-logits that enter the total with weight `weight` (as a mean over the group)."""
    name: str
    logits: Tensor   # (n,)
    targets: Tensor  # (n,) in [0, 1]
    weight: float
    row_weights: Tensor | None = None  # (n,) summing to 1: a weighted mean over the group, not a plain one


@dataclass
class LossTerms:
    total: Tensor                                          # scalar to backpropagate
    parts: dict[str, Tensor] = field(default_factory=dict)  # scalars by name, detached, for logging


def combined_bce_align(groups: list[BCEGroup], student: Tensor | None, teacher: Tensor | None,
                       align_weight: float, align_scale: Tensor | None = None) -> LossTerms:
    """sum_g weight_g * mean BCE(g) + align_weight * align_scale * mean(1 - cos(student, teacher)), one op call.

    The op returns bce = sum(w_i l_i) / sum(w_i) and align = mean(1 - cos). With per-row weights
    w_i = weight_g / n_g (or weight_g * row_weights_g) the numerator is the wanted sum, so the loss
    is sum(w_i) * bce + align_weight * align. sum(w_i) is summed on the device: it is sum_g weight_g
    except when a group's row weights are all 0 (a generator phase on a batch without a real image),
    which then adds nothing (a host-side sum of the group weights would rescale the other groups).
    `align_scale` (a 0-d tensor, default 1) rescales the alignment mean on the device: the
    generator phases blank the rows of external fakes (teacher = student, loss and gradient 0) and
    scale by rows / kept rows, so the mean runs over the kept rows without a data-dependent shape.
    """
    groups = [g for g in groups if g.weight > 0]
    if student is not None and align_weight <= 0:
        student = teacher = None
    if not groups and student is None:
        raise ValueError("combined_bce_align: no loss terms (all weights are zero)")
    logits = targets = weights = None
    if groups:
        logits = torch.cat([g.logits.float() for g in groups])
        targets = torch.cat([g.targets.float() for g in groups])
        weights = torch.cat([g.weight * g.row_weights.float() if g.row_weights is not None else
                             torch.full_like(g.logits, g.weight / g.logits.numel(), dtype=torch.float32)
                             for g in groups])  # (sum_g n_g,)
    parts = ops.bce_diga_loss(logits, targets, weights, student, teacher, w_align=align_weight)
    total = parts.bce * weights.sum() if groups else parts.bce.new_zeros(())
    if student is not None:
        total = total + align_weight * (parts.align if align_scale is None else align_scale * parts.align)
    terms = LossTerms(total)
    with torch.no_grad():
        for g in groups:
            rows = F.binary_cross_entropy_with_logits(g.logits.float(), g.targets.float(), reduction="none")
            terms.parts[g.name] = rows.mean() if g.row_weights is None else (rows * g.row_weights).sum()
        if student is not None:
            terms.parts["align"] = parts.align.detach() * (1.0 if align_scale is None else align_scale)
    return terms
