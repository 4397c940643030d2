"""THE functional API that model code calls for every hot op (docs/design.md §3).

Each op validates its inputs, then `unigendet.backends` picks the implementation: a fused backend
when one can run the inputs, else the eager reference in `unigendet.ops.reference`.
"""
from .. import backends
from ..backends import BackendError, set_default_backend
from .attention import mmsa_attention
from .consistency import mmsa_consistency_loss
from .loss import bce_diga_loss
from .reference import LossParts
from .rmsnorm import fused_add_rmsnorm
from .rope import axial_rope_tables, qk_rmsnorm_rope
from .swiglu import swiglu


def available_backends(verbose: bool = False):
    """{op: [backends that can run here, fastest first]}; verbose -> {op: {backend: "ok" | reason}}."""
    table = backends.availability()
    if verbose:
        return table
    return {op: [name for name, why in row.items() if why == "ok"] for op, row in table.items()}


__all__ = [
    "mmsa_attention", "mmsa_consistency_loss", "bce_diga_loss", "fused_add_rmsnorm", "swiglu", "qk_rmsnorm_rope",
    "axial_rope_tables", "available_backends", "set_default_backend", "BackendError", "LossParts",
]
