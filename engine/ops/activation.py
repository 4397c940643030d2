"""`swiglu`: the gated activation of the MLP (DESIGN.md 3)."""
from __future__ import annotations

from torch import Tensor

from .. import backends
from .reference import swiglu_ref

OP = "swiglu"
backends.register(OP, "reference", swiglu_ref)
backends.mark_unavailable(OP, "ext", "the C++/CUDA extension unigendet._C is not part of this version")


def swiglu(gate_up: Tensor, backend: str = "auto") -> Tensor:
    """(..., 2F) -> (..., F): silu(gate_up[..., :F]) * gate_up[..., F:]."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even (gate and up halves), got {gate_up.shape[-1]}")
    impl = backends.select(OP, backend, gate_up)
    return impl(gate_up)
