"""`qk_rmsnorm_rope`: per-head RMSNorm of q and k, then rotate-half RoPE (DESIGN.md 3).

Also builds the 2-D axial RoPE tables the model uses for image tokens: half the frequency pairs
rotate with the token's row, the other half with its column.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .reference import qk_rmsnorm_rope_ref

OP = "qk_rmsnorm_rope"
backends.register(OP, "reference", qk_rmsnorm_rope_ref)
backends.mark_unavailable(OP, "ext", "the C++/CUDA extension unigendet._C is not part of this version")


def qk_rmsnorm_rope(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                    eps: float = 1e-6, backend: str = "auto") -> tuple[Tensor, Tensor]:
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


def axial_rope_tables(grid: int, head_dim: int, base: float = 100.0, prefix: int = 0,
                      device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (prefix + grid*grid, head_dim/2) for tokens on a grid x grid patch grid.

    Token i (after `prefix` position-less tokens, e.g. registers, which get the identity rotation)
    sits at row i // grid, column i % grid. The D/2 rotation pairs are split in two halves: the first
    rotates with the row, the second with the column, each with frequencies base^(-j / (D/4)).
    """
    if head_dim % 4:
        raise ValueError(f"axial_rope_tables: head_dim must be a multiple of 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=device) / quarter)  # (D/4,)
    pos = torch.arange(grid * grid, device=device)
    rows, cols = (pos // grid).double(), (pos % grid).double()
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1)  # (N, D/2)
    angles = torch.cat([angles.new_zeros(prefix, head_dim // 2), angles], dim=0)
    return angles.cos().float(), angles.sin().float()
