"""`bce_diga_loss`: detector BCE + authenticity BCE + DIGA cosine alignment in one op (docs/design.md §1, §3)."""
from __future__ import annotations

from torch import Tensor

from .. import backends
from .reference import LossParts, bce_diga_loss_ref
from .triton_support import auto_reason, triton_reason

OP = "bce_diga_loss"


def _tensors(args) -> list[Tensor]:
    return [t for t in args if isinstance(t, Tensor)]


def _triton_check(*args, **_) -> str | None:
    """None if the fused Triton kernel can run (logits, targets, weights, student, teacher)."""
    return triton_reason(_tensors(args))


def _triton_auto_check(*args, **_) -> str | None:
    return auto_reason(_tensors(args))


def _triton_impl(*args, **kwargs) -> LossParts:
    # imported on first use: `import unigendet` must not need triton, and TRITON_INTERPRET is read
    # when the kernel module is imported
    from ..kernels.loss import bce_diga_loss_triton

    return bce_diga_loss_triton(*args, **kwargs)


backends.register(OP, "reference", bce_diga_loss_ref)
backends.register(OP, "triton", _triton_impl, check=_triton_check, auto_check=_triton_auto_check)


def bce_diga_loss(logits: Tensor | None, targets: Tensor | None, weights: Tensor | None,
                  student: Tensor | None, teacher: Tensor | None, *, w_align: float = 0.5,
                  backend: backends.BackendChoice = "auto") -> LossParts:
    """-> LossParts(total, bce, align), scalars in fp32, differentiable w.r.t. logits and student.

    logits, targets, weights: (N,) (targets in [0, 1]; soft labels allowed), or all None (bce = 0).
    student, teacher: (M, C), or both None (align = 0); the teacher is treated as a constant.
    bce = sum(w * bce_with_logits(z, y)) / max(sum(w), 1e-12); align = mean(1 - cos(s, t)).
    """
    if logits is not None:
        if logits.dim() != 1:
            raise ValueError(f"bce_diga_loss: logits must be (N,), got {tuple(logits.shape)}")
        for name, t in (("targets", targets), ("weights", weights)):
            if t is None:
                raise ValueError(f"bce_diga_loss: logits given but {name} is None")
            if t.shape != logits.shape:
                raise ValueError(f"bce_diga_loss: {name} shape {tuple(t.shape)} != logits shape {tuple(logits.shape)}")
    if (student is None) != (teacher is None):
        raise ValueError("bce_diga_loss: student and teacher must both be given or both be None")
    if student is not None and (student.dim() != 2 or student.shape != teacher.shape):
        raise ValueError(f"bce_diga_loss: student and teacher must both be (M, C); got {tuple(student.shape)}, "
                         f"{tuple(teacher.shape)}")
    if logits is None and student is None:
        raise ValueError("bce_diga_loss: nothing to compute (logits and student are both None)")
    impl = backends.select(OP, backend, logits, targets, weights, student, teacher)
    return impl(logits, targets, weights, student, teacher, w_align=w_align)
