"""`swiglu`: the gated activation of the MLP (docs/design.md §3)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .ext_support import ext_reason, register_ext_op
from .reference import swiglu_ref

OP = "swiglu"


def swiglu(gate_up: Tensor, backend: backends.BackendChoice = "auto") -> Tensor:
    """(..., 2F) -> (..., F): silu(gate_up[..., :F]) * gate_up[..., F:]."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: last dim must be even (gate and up halves), got {gate_up.shape[-1]}")
    impl = backends.select(OP, backend, gate_up)
    return impl(gate_up)


# ----------------------------------------------------------------------------- ext backend


def swiglu_ext(gate_up: Tensor) -> Tensor:
    return torch.ops.unigendet.swiglu(gate_up)


def _fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def _fake_backward(grad_out, gate_up):
    return torch.empty_like(gate_up)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_out):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.unigendet.swiglu_backward(grad_out, gate_up)


backends.register(OP, "reference", swiglu_ref)
if register_ext_op(OP, _fake, _setup_context, _backward):
    register_ext_op(OP + "_backward", _fake_backward)
backends.register(OP, "ext", swiglu_ext, check=lambda *args: ext_reason(*args))
