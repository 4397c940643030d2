"""`mmsa_attention`: the symbiotic multimodal self-attention of the two streams (docs/design.md §1, §3)."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .attention_cpu import mmsa_attention_sdpa
from .attention_ext import ext_check, mmsa_attention_ext
from .reference import mmsa_attention_ref
from .triton_support import auto_reason, triton_reason

OP = "mmsa_attention"
backends.register(OP, "reference", mmsa_attention_ref)

# ----------------------------------------------------------------------------- triton backend
# kernels/attention.py is imported on first use, so `import unigendet` works without Triton.


def _triton_check(*tensors, **_) -> str | None:
    """None if the Triton kernels can run these inputs (q_g, k_g, v_g, q_d, k_d, v_d), else why not."""
    present = [t for t in tensors if t is not None]
    why = triton_reason(present)
    if why is None and present:
        D = present[0].shape[-1]
        if D % 16 or not 16 <= D <= 256:
            return f"head dim {D} unsupported (multiples of 16 from 16 to 256)"
    return why


def _triton_auto_check(*tensors, **_) -> str | None:
    return auto_reason([t for t in tensors if t is not None])


def _triton_impl(*args, **kwargs):
    from ..kernels.attention import mmsa_attention_triton

    return mmsa_attention_triton(*args, **kwargs)


backends.register(OP, "triton", _triton_impl, check=_triton_check, auto_check=_triton_auto_check)

# ----------------------------------------------------------------------------- sdpa backend (CPU)


def _sdpa_check(*tensors, **_) -> str | None:
    """None if PyTorch's fused CPU attention kernel can run these inputs, else why not."""
    present = [t for t in tensors if t is not None]
    if present and present[0].device.type != "cpu":
        return f"CPU tensors only (got {present[0].device.type}; the Triton backend serves GPUs)"
    if present and not present[0].is_floating_point():
        return f"dtype {present[0].dtype} unsupported (floating point only)"
    return None


backends.register(OP, "sdpa", mmsa_attention_sdpa, check=_sdpa_check)

# ----------------------------------------------------------------------------- ext backend (CPU)
# The C++ kernels (engine/ops/attention_ext.py): ahead of sdpa in auto's order (BACKEND_NAMES). CPU only:
# on CUDA the Triton kernels serve, so a process-wide `ops.backend = "ext"` leaves attention on auto there.
backends.register(OP, "ext", mmsa_attention_ext, check=ext_check, devices=("cpu",))


def _check_stream(name: str, q: Tensor, k: Tensor, v: Tensor, lens: Tensor | None) -> None:
    if k is None or v is None:
        raise ValueError(f"mmsa_attention: stream {name} has q_{name} but k_{name} or v_{name} is None")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"mmsa_attention: q_{name}, k_{name}, v_{name} must be 4-D (B, T, H, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"mmsa_attention: stream {name}: q {tuple(q.shape)} must be (B, T, H, D) and "
                         f"k, v (B, T, Hkv, D); got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"mmsa_attention: stream {name}: H={q.shape[2]} is not a multiple of Hkv={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"mmsa_attention: stream {name}: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if lens is not None:
        if lens.shape != (q.shape[0],) or lens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"mmsa_attention: len_{name} must be an int tensor of shape ({q.shape[0]},); "
                             f"got {lens.dtype} {tuple(lens.shape)}")
        if lens.device.type == "cpu" and (int(lens.min()) < 1 or int(lens.max()) > q.shape[1]):
            # device tensors are not read back here: that would sync the host and break CUDA graphs
            raise ValueError(f"mmsa_attention: len_{name} values must be in [1, {q.shape[1]}]; got {lens.tolist()}")


def _check_key_stream(name: str, k: Tensor | None, v: Tensor | None, lens: Tensor | None) -> None:
    """A stream that contributes keys but no queries: q_name None, k and v (B, T, Hkv, D)."""
    if k is None or v is None:
        raise ValueError(f"mmsa_attention: stream {name} has no queries (q_{name} is None) but only one of "
                         f"k_{name}, v_{name}: give both (a key-only stream) or neither (an absent stream)")
    if k.dim() != 4 or k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"mmsa_attention: key-only stream {name}: k_{name}, v_{name} must be (B, T, Hkv, D) of one "
                         f"dtype; got {tuple(k.shape)} {k.dtype}, {tuple(v.shape)} {v.dtype}")
    _check_stream(name, k, k, v, lens)  # the length rules, with k standing in for the (absent) queries


def mmsa_attention(q_g, k_g, v_g, q_d, k_d, v_d, *, g2d: bool = True, d2g: bool = True,
                   g_causal: bool = False, d_causal: bool = False, len_g: Tensor | None = None,
                   len_d: Tensor | None = None, scale: float | None = None, return_lse: bool = False,
                   backend: backends.BackendChoice = "auto"):
    """Joint attention of the generator (G) and detector (D) streams in one softmax per query row.

    q_*: (B, T*, H, D); k_*, v_*: (B, T*, Hkv, D). G queries read G keys (causal if g_causal) and D
    keys iff g2d; D queries read D keys (causal if d_causal) and G keys iff d2g. Keys at index >=
    len_* are never read; query rows at index >= len_* output 0. A stream may be absent (its triple
    None); its output is then None. A stream may also contribute keys only (q_* None, k_*, v_*
    given, len_* its key lengths): the other stream's queries read its keys as the switches say
    (gradients reach its k, v), it has no query rows and its output (and lse) is None. Returns
    (o_g, o_d) with q's dtype and layout; with return_lse
    also (lse_g, lse_d): each query row's natural-log log-sum-exp over the keys it reads, (B, H, T*)
    fp32 and differentiable (None for an absent stream; padded rows: +inf on Triton, finite on the
    reference, so mask them).
    """
    present = [(n, q, k, v, ln) for n, q, k, v, ln in (("g", q_g, k_g, v_g, len_g), ("d", q_d, k_d, v_d, len_d))
               if q is not None]
    if not present:
        raise ValueError("mmsa_attention: both streams are absent (q_g and q_d are None)")
    for n, q, k, v, ln in present:
        _check_stream(n, q, k, v, ln)
    key_only = [(n, k, v, ln) for n, q, k, v, ln in (("g", q_g, k_g, v_g, len_g), ("d", q_d, k_d, v_d, len_d))
                if q is None and (k is not None or v is not None)]
    for n, k, v, ln in key_only:
        _check_key_stream(n, k, v, ln)
        q = present[0][1]  # the other stream's queries (B, Tq, H, D)
        if k.shape[0] != q.shape[0] or k.shape[2:] != present[0][2].shape[2:] or k.dtype != q.dtype:
            raise ValueError(f"mmsa_attention: key-only stream {n} disagrees with the query stream on B, Hkv, D "
                             f"or dtype: k_{n} {tuple(k.shape)} {k.dtype}, q {tuple(q.shape)} {q.dtype}")
    if len(present) == 2:
        qg, qd = q_g, q_d
        if qg.shape[0] != qd.shape[0] or qg.shape[2:] != qd.shape[2:] or k_g.shape[2] != k_d.shape[2]:
            raise ValueError(f"mmsa_attention: streams disagree on B, H, Hkv or D: q_g {tuple(qg.shape)}, "
                             f"q_d {tuple(qd.shape)}, k_g {tuple(k_g.shape)}, k_d {tuple(k_d.shape)}")
        if qg.dtype != qd.dtype:
            raise ValueError(f"mmsa_attention: streams have different dtypes ({qg.dtype}, {qd.dtype})")
    impl = backends.select(OP, backend, q_g, k_g, v_g, q_d, k_d, v_d)
    return impl(q_g, k_g, v_g, q_d, k_d, v_d, g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal,
                len_g=len_g, len_d=len_d, scale=scale, return_lse=return_lse)
