"""`qk_rmsnorm_rope`: per-head RMSNorm of q and k, then rotate-half RoPE (docs/design.md §3).

Also builds the 2-D axial RoPE tables the model uses for image tokens: half the frequency pairs
rotate with the token's row, the other half with its column.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .ext_support import acc_dtype, ext_reason, register_ext_op
from .reference import qk_rmsnorm_rope_ref

OP = "qk_rmsnorm_rope"


def qk_rmsnorm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                    eps: float = 1e-6, backend: backends.BackendChoice = "auto") -> tuple[Tensor, Tensor]:
    """q: (B, T, H, D), k: (B, T, Hkv, D); q_weight, k_weight: (D,); cos, sin: (T, D/2)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"qk_rmsnorm_rope: q must be (B, T, H, D) and k (B, T, Hkv, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}")
    T, D = q.shape[1], q.shape[3]
    if D % 2 or cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"qk_rmsnorm_rope: cos and sin must be (T, D/2) = ({T}, {D // 2}); got "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"qk_rmsnorm_rope: q_weight and k_weight must be ({D},)")
    impl = backends.select(OP, backend, q, k, q_weight, k_weight, cos, sin)
    return impl(q, k, q_weight, k_weight, cos, sin, eps)


# ----------------------------------------------------------------------------- ext backend


def qk_rmsnorm_rope_ext(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                        eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    q2, k2, _q_rstd, _k_rstd = torch.ops.unigendet.qk_rmsnorm_rope(q, k, q_weight, k_weight, cos, sin, eps)
    return q2, k2


def _ext_check(q=None, k=None, q_weight=None, k_weight=None, cos=None, sin=None) -> str | None:
    if (cos is not None and cos.requires_grad) or (sin is not None and sin.requires_grad):
        return "cos and sin are constants for the ext kernels (they require grad here)"
    return ext_reason(q, k, q_weight, k_weight, cos, sin)


def _fake(q, k, q_weight, k_weight, cos, sin, eps):
    acc = acc_dtype(q.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(q.shape[:3], dtype=acc),
            k.new_empty(k.shape[:3], dtype=acc))


def _fake_backward(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd):
    return q.new_empty(q.shape), k.new_empty(k.shape), torch.empty_like(q_weight), torch.empty_like(k_weight)


def _setup_context(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, _eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin, output[2], output[3])


def _backward(ctx, grad_q, grad_k, _grad_q_rstd, _grad_k_rstd):
    q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd = ctx.saved_tensors
    grad_q = torch.zeros_like(q) if grad_q is None else grad_q
    grad_k = torch.zeros_like(k) if grad_k is None else grad_k
    dq, dk, dqw, dkw = torch.ops.unigendet.qk_rmsnorm_rope_backward(
        grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd)
    return dq, dk, dqw, dkw, None, None, None


backends.register(OP, "reference", qk_rmsnorm_rope_ref)
if register_ext_op(OP, _fake, _setup_context, _backward):
    register_ext_op(OP + "_backward", _fake_backward)
backends.register(OP, "ext", qk_rmsnorm_rope_ext, check=_ext_check)


def axial_rope_tables(grid: int, head_dim: int, base: float = 100.0, prefix: int = 0,
                      device=None, suffix: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (prefix + grid*grid + suffix, head_dim/2) for tokens on a grid x grid patch grid.

    Token i (after `prefix` position-less tokens, which get the identity rotation) sits at row
    i // grid, column i % grid; `suffix` position-less tokens (e.g. registers) follow the grid. The D/2
    rotation pairs are split in two halves: the first rotates with the row, the second with the column,
    each with frequencies base^(-j / (D/4)).
    """
    if head_dim % 4:
        raise ValueError(f"axial_rope_tables: head_dim must be a multiple of 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (D/4,)
    pos = torch.arange(grid * grid, device=device)
    rows, cols = (pos // grid).double(), (pos % grid).double()
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, D/2)
    angles = torch.cat([angles.new_zeros(prefix, head_dim // 2), angles, angles.new_zeros(suffix, head_dim // 2)])
    return angles.cos().float(), angles.sin().float()
