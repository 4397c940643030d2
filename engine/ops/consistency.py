"""`mmsa_consistency_loss`: L_MMSA, the attention-consistency regulariser of the detector loss.

Definition. In a detection sample both streams are present and, in an MMSA layer, both cross
directions are on (g2d: G queries read D keys; d2g: D queries read G keys). Image token i is G row
g_offset + i and D row d_offset + i, i < N (N = n_tokens). The D stream also holds R register
tokens: they are never query rows of this loss (the caller gives the image-token range: d_offset =
0 with the registers after the N image tokens, d_offset = R with them in front), but they are D keys
like any other. For head h and image token i:

    lse_cross_gd[i] = logsumexp_{j < len_d} (q_g[i] . k_d[j] * scale)   (all valid D keys)
    lse_cross_dg[i] = logsumexp_{j < len_g} (q_d[i] . k_g[j] * scale)   (all valid G keys)
    m_gd[i] = exp(lse_cross_gd[i] - lse_g[i])   the softmax mass the G query puts on D keys
    m_dg[i] = exp(lse_cross_dg[i] - lse_d[i])   the softmax mass the D query puts on G keys

where lse_g, lse_d are the per-query log-sum-exps the attention returns (over every key the row
reads: its own stream's and the other's), so m = sigmoid(lse_cross - lse_self). Then

    L_MMSA(layer) = mean over (b, h, i valid) of (m_gd - m_dg)^2

and the model-level term is the mean of L_MMSA over the MMSA layers. Query heads read key head
h // (H / Hkv) (GQA) as in the attention; the cross block has no causal mask (causality applies
within a stream), only key lengths. Row i is valid iff g_offset + i < len_g and d_offset + i <
len_d; invalid rows contribute nothing and the mean runs over B_valid * H rows.

Gradients: d lse_cross / d s_j = softmax over the cross block, exp(s_j - lse_cross), into q of the
query stream and k of the key stream; and into lse_g, lse_d (d m / d lse_self = -m), which reach
the attention's q, k through its dlse path (`mmsa_attention(..., return_lse=True)`).

Backends: "reference" (eager matmul + logsumexp over the (B, H, N, T) cross block: the oracle) and
"triton" (kernels/consistency.py: an online log-sum-exp over key tiles of Q K^T, no V, nothing of
size T x T stored; backward recomputes the tiles). "auto" picks Triton on CUDA, as for attention.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .reference import mmsa_consistency_loss_ref
from .triton_support import auto_reason, triton_reason

OP = "mmsa_consistency_loss"
backends.register(OP, "reference", mmsa_consistency_loss_ref)


def _triton_check(*tensors, **_) -> str | None:
    """None if the Triton kernels can run (q_g, k_g, q_d, k_d, lse_g, lse_d), else why not."""
    present = [t for t in tensors if isinstance(t, Tensor)]
    why = triton_reason(present)
    if why is None and present:
        D = present[0].shape[-1]
        if D % 16 or not 16 <= D <= 256:
            return f"head dim {D} unsupported (multiples of 16 from 16 to 256)"
        if any(t.dtype != torch.float32 for t in present[4:6]):
            return "lse_g and lse_d must be float32"
    return why


def _triton_auto_check(*tensors, **_) -> str | None:
    return auto_reason([t for t in tensors if isinstance(t, Tensor)])


def _triton_impl(*args, **kwargs):
    # imported on first use: `import unigendet` must not need triton (TRITON_INTERPRET is read then)
    from ..kernels.consistency import mmsa_consistency_loss_triton

    return mmsa_consistency_loss_triton(*args, **kwargs)


backends.register(OP, "triton", _triton_impl, check=_triton_check, auto_check=_triton_auto_check)


def _check_lens(name: str, lens: Tensor | None, B: int, T: int) -> None:
    if lens is None:
        return
    if lens.shape != (B,) or lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mmsa_consistency_loss: len_{name} must be an int tensor of shape ({B},); "
                         f"got {lens.dtype} {tuple(lens.shape)}")
    if lens.device.type == "cpu" and (int(lens.min()) < 1 or int(lens.max()) > T):
        # device tensors are not read back (a host sync; it would break CUDA graphs)
        raise ValueError(f"mmsa_consistency_loss: len_{name} values must be in [1, {T}]; got {lens.tolist()}")


def mmsa_consistency_loss(q_g: Tensor, k_g: Tensor, q_d: Tensor, k_d: Tensor, lse_g: Tensor, lse_d: Tensor, *,
                          n_tokens: int, d_offset: int, g_offset: int = 0, len_g: Tensor | None = None,
                          len_d: Tensor | None = None, scale: float | None = None,
                          backend: backends.BackendChoice = "auto") -> Tensor:
    """L_MMSA of one MMSA layer: mean over (b, h, image token i) of (m_gd - m_dg)^2 (module docstring).

    q_g: (B, Tg, H, D), k_g: (B, Tg, Hkv, D), q_d: (B, Td, H, D), k_d: (B, Td, Hkv, D): the
    attention's (normed, rotated) queries and keys; lse_g: (B, H, Tg), lse_d: (B, H, Td): its
    per-query lse (`mmsa_attention(..., return_lse=True)`; +inf on padded rows is fine).
    n_tokens: N image tokens; they are G rows [g_offset, g_offset + N) and D rows
    [d_offset, d_offset + N) (d_offset = 0: registers after the image tokens; R: before).
    len_g, len_d: (B,) key/query lengths as in the attention; scale: default D ** -0.5.
    Returns a 0-d fp32 tensor (fp64 for fp64 inputs on the reference), differentiable w.r.t.
    q_g, k_g, q_d, k_d, lse_g and lse_d.
    """
    for name, t, dims in (("q_g", q_g, 4), ("k_g", k_g, 4), ("q_d", q_d, 4), ("k_d", k_d, 4),
                          ("lse_g", lse_g, 3), ("lse_d", lse_d, 3)):
        if not isinstance(t, Tensor) or t.dim() != dims:
            raise ValueError(f"mmsa_consistency_loss: {name} must be a {dims}-D tensor; got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else t!r}")
    B, Tg, H, D = q_g.shape
    Td = q_d.shape[1]
    Hkv = k_g.shape[2]
    if (q_d.shape != (B, Td, H, D) or k_g.shape != (B, Tg, Hkv, D) or k_d.shape != (B, Td, Hkv, D)
            or H % Hkv):
        raise ValueError(f"mmsa_consistency_loss: expected q_g (B, Tg, H, D), k_g (B, Tg, Hkv, D), q_d (B, Td, H, D), "
                         f"k_d (B, Td, Hkv, D) with H a multiple of Hkv; got {tuple(q_g.shape)}, {tuple(k_g.shape)}, "
                         f"{tuple(q_d.shape)}, {tuple(k_d.shape)}")
    if lse_g.shape != (B, H, Tg) or lse_d.shape != (B, H, Td):
        raise ValueError(f"mmsa_consistency_loss: lse_g must be ({B}, {H}, {Tg}) and lse_d ({B}, {H}, {Td}); "
                         f"got {tuple(lse_g.shape)}, {tuple(lse_d.shape)}")
    if not (q_g.dtype == k_g.dtype == q_d.dtype == k_d.dtype):
        raise ValueError(f"mmsa_consistency_loss: q, k dtypes differ ({q_g.dtype}, {k_g.dtype}, {q_d.dtype}, "
                         f"{k_d.dtype})")
    if not (lse_g.is_floating_point() and lse_d.is_floating_point()):
        raise ValueError("mmsa_consistency_loss: lse_g and lse_d must be floating point")
    n_tokens, g_offset, d_offset = int(n_tokens), int(g_offset), int(d_offset)
    if n_tokens < 1 or g_offset < 0 or d_offset < 0 or g_offset + n_tokens > Tg or d_offset + n_tokens > Td:
        raise ValueError(f"mmsa_consistency_loss: image tokens G [{g_offset}, {g_offset + n_tokens}) and "
                         f"D [{d_offset}, {d_offset + n_tokens}) must be non-empty and lie in Tg={Tg}, Td={Td}")
    _check_lens("g", len_g, B, Tg)
    _check_lens("d", len_d, B, Td)
    impl = backends.select(OP, backend, q_g, k_g, q_d, k_d, lse_g, lse_d)
    return impl(q_g, k_g, q_d, k_d, lse_g, lse_d, n_tokens=n_tokens, d_offset=d_offset, g_offset=g_offset,
                len_g=len_g, len_d=len_d, scale=scale)
