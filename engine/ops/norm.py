"""`fused_add_rmsnorm`: residual add + RMSNorm in one op (DESIGN.md 3)."""
from __future__ import annotations

from torch import Tensor

from .. import backends
from .reference import fused_add_rmsnorm_ref

OP = "fused_add_rmsnorm"
backends.register(OP, "reference", fused_add_rmsnorm_ref)
backends.mark_unavailable(OP, "ext", "the C++/CUDA extension unigendet._C is not part of this version")


def fused_add_rmsnorm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float = 1e-6,
                      backend: str = "auto") -> tuple[Tensor, Tensor]:
    """x, residual: (..., C); weight: (C,) -> (y, res) with res = x + residual (x if residual is None),
    y = res * rsqrt(mean(res^2, -1) + eps) * weight, computed in fp32, both in x's dtype."""
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"fused_add_rmsnorm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"fused_add_rmsnorm: weight shape {tuple(weight.shape)} != ({x.shape[-1]},)")
    impl = backends.select(OP, backend, x, residual, weight)
    return impl(x, residual, weight, eps)
