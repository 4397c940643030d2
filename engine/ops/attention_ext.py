"""The "ext" backend of `mmsa_attention` on CPU: the C++ kernels of csrc/cpu/attention.h (docs/design.md §3).

`torch.ops.unigendet.mmsa_attention` runs both streams in one call (one softmax per query row over the key
columns [G; D] the switches, causal flags and lengths allow) and returns each row's lse, which the backward
op reads to recompute the probabilities; `mmsa_attention_backward` folds the lse gradient into dS. Both are
custom ops with fake kernels, so torch.compile traces them without a graph break. This module registers
their fake kernels and autograd, and the backend's wrapper: as in the sdpa backend, a query stream that does
not read the other stream's keys gets a call of its own without them, so its output has no autograd path to
them (the reference's None gradients, not zeros).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .attention_cpu import call_groups
from .ext_support import acc_dtype, ext_reason, register_ext_op

EXT_OP = "mmsa_attention"  # torch.ops.unigendet.<EXT_OP> and its backward op
# Scores of one head (all query rows x all key columns) are materialised per thread; above this many the
# backend refuses (auto then falls back to sdpa, whose flash kernel is linear in memory).
MAX_SCORES = 1 << 22


def mmsa_attention_ext(q_g, k_g, v_g, q_d, k_d, v_d, *, g2d: bool = True, d2g: bool = True,
                       g_causal: bool = False, d_causal: bool = False, len_g: Tensor | None = None,
                       len_d: Tensor | None = None, scale: float | None = None, return_lse: bool = False):
    """Same contract as `mmsa_attention_ref`; lse of padded query rows is finite (as on the reference)."""
    qs = {"g": q_g, "d": q_d}
    kvs = {"g": (k_g, v_g), "d": (k_d, v_d)}
    sc = (q_g if q_g is not None else q_d).shape[-1] ** -0.5 if scale is None else scale
    outs: dict[str, Tensor | None] = {"g": None, "d": None}
    lses: dict[str, Tensor | None] = {"g": None, "d": None}
    for queries, keys in call_groups(qs, kvs, g2d, d2g):
        args = []
        for s in "gd":
            args += [qs[s] if s in queries else None, *(kvs[s] if s in keys else (None, None))]
        o_g, o_d, l_g, l_d = torch.ops.unigendet.mmsa_attention(*args, len_g, len_d, g2d, d2g, g_causal, d_causal,
                                                                float(sc))
        for s, o, lse in (("g", o_g, l_g), ("d", o_d, l_d)):
            if s in queries:
                outs[s], lses[s] = o, lse
    if return_lse:
        return outs["g"], outs["d"], lses["g"], lses["d"]
    return outs["g"], outs["d"]


def ext_check(*tensors, **_) -> str | None:
    """None if the C++ CPU kernels can run these inputs (q_g, k_g, v_g, q_d, k_d, v_d), else why not."""
    present = [t for t in tensors if t is not None]
    why = ext_reason(*present)
    if why is not None or not present:
        return why
    if present[0].device.type != "cpu":
        return f"CPU tensors only (got {present[0].device.type}; the Triton backend serves GPUs)"
    rows = sum(t.shape[1] for t in tensors[0::3] if t is not None)  # query rows of q_g, q_d
    cols = sum(t.shape[1] for t in tensors[1::3] if t is not None)  # key columns of k_g, k_d
    if rows * cols > MAX_SCORES:
        return f"{rows} query rows x {cols} keys per head exceed the kernel's score buffer ({MAX_SCORES})"
    return None


# ----------------------------------------------------------------------------- fake kernels and autograd


def _like(q_g, q_d) -> Tensor:
    return q_g if q_g is not None else q_d


def _fake(q_g, k_g, v_g, q_d, k_d, v_d, len_g, len_d, g2d, d2g, g_causal, d_causal, scale):
    like = _like(q_g, q_d)
    acc = acc_dtype(like.dtype)
    outs = [like.new_empty(q.shape) if q is not None else like.new_empty(0) for q in (q_g, q_d)]
    lses = [like.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=acc) if q is not None
            else like.new_empty(0, dtype=acc) for q in (q_g, q_d)]
    return outs[0], outs[1], lses[0], lses[1]


def _fake_backward(grad_o_g, grad_o_d, grad_lse_g, grad_lse_d, q_g, k_g, v_g, q_d, k_d, v_d, o_g, o_d, lse_g,
                   lse_d, len_g, len_d, g2d, d2g, g_causal, d_causal, scale):
    like = _like(q_g, q_d)
    return tuple(like.new_empty(t.shape) if t is not None else like.new_empty(0)
                 for t in (q_g, k_g, v_g, q_d, k_d, v_d))


def _setup_context(ctx, inputs, output):
    q_g, k_g, v_g, q_d, k_d, v_d, len_g, len_d, *flags = inputs
    ctx.save_for_backward(q_g, k_g, v_g, q_d, k_d, v_d, *output, len_g, len_d)
    ctx.flags = flags  # g2d, d2g, g_causal, d_causal, scale


def _backward(ctx, grad_o_g, grad_o_d, grad_lse_g, grad_lse_d):
    q_g, k_g, v_g, q_d, k_d, v_d, o_g, o_d, lse_g, lse_d, len_g, len_d = ctx.saved_tensors
    if q_g is None:
        grad_o_g = grad_lse_g = None
    if q_d is None:
        grad_o_d = grad_lse_d = None
    grads = torch.ops.unigendet.mmsa_attention_backward(
        grad_o_g, grad_o_d, grad_lse_g, grad_lse_d, q_g, k_g, v_g, q_d, k_d, v_d, o_g, o_d, lse_g, lse_d, len_g,
        len_d, *ctx.flags)
    inputs = (q_g, k_g, v_g, q_d, k_d, v_d)
    return (*(g if x is not None else None for g, x in zip(grads, inputs)), None, None, None, None, None, None, None)


if register_ext_op(EXT_OP, _fake, _setup_context, _backward):
    register_ext_op(EXT_OP + "_backward", _fake_backward)
