"""The "sdpa" backend of `mmsa_attention`: PyTorch's fused CPU flash-attention kernel per stream block.

The reference materialises every score matrix, masks it with `masked_fill` and concatenates the blocks.
Here each query stream runs the flash CPU kernel (`aten._scaled_dot_product_flash_attention_for_cpu`,
which never materialises the scores and returns each row's log-sum-exp) once per key stream it may read,
and the blocks are merged by their log-sum-exps:

    L = logsumexp_i lse_i,   O = sum_i exp(lse_i - L) * O_i

The kernel's lse output has no gradient in autograd, so the merge is one `autograd.Function` whose
backward calls the kernel's own backward per block with the *merged* O and L: that backward recomputes
P = exp(S - L) and D = rowsum(dO * O), which with the merged O and L are exactly the probabilities and
the softmax correction of the joint softmax; so each block's (dq, dk, dv) is exact and dq sums over
blocks. The gradient through the returned lse (the L_MMSA loss reads it) adds dlse_i * P_ij to dS_ij;
it is folded into the same backward call by one extra head-dim column: q and k get a 0 (scores
unchanged), v gets a 1 and O a 0, and dO gets dlse, so dP_ij gains dlse_i while D does not.

Inputs are computed in fp32 (fp64 stays fp64), like the reference: one rounding to q's dtype at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _key_bias(lens: Tensor | None, t_k: int, dtype: torch.dtype) -> Tensor | None:
    """Additive (B, 1, 1, Tk) bias: 0 for keys < lens, -inf after (None without lengths)."""
    if lens is None:
        return None
    valid = torch.arange(t_k, device=lens.device)[None, :] < lens[:, None]  # (B, Tk)
    bias = torch.zeros(valid.shape, dtype=dtype, device=lens.device).masked_fill(~valid, float("-inf"))
    return bias[:, None, None, :]


def _pad_column(x: Tensor, value: float) -> Tensor:
    """(..., D) -> (..., D + 1) with `value` in the new column."""
    return F.pad(x, (0, 1), value=value)


class _BlockAttention(torch.autograd.Function):
    """Softmax over the union of up to two key blocks for one query stream.

    q: (B, H, Tq, D); each block (k, v): (B, H, Tk, D) (kv already expanded to H heads), with its own
    causal flag and additive key bias (B, 1, 1, Tk) or None. Returns O (B, H, Tq, D) and L (B, H, Tq).
    """

    @staticmethod
    def forward(ctx, q, k1, v1, k2, v2, bias1, bias2, causal1: bool, scale: float):
        blocks = [(k1, v1, bias1, causal1)] + ([(k2, v2, bias2, False)] if k2 is not None else [])
        outs, lses = [], []
        for k, v, bias, causal in blocks:
            o, lse = _flash_fwd(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)  # (B,H,Tq,D), (B,H,Tq)
            outs.append(o)
            lses.append(lse)
        if len(blocks) == 1:
            out, lse = outs[0], lses[0]
        else:
            lse = torch.logaddexp(lses[0], lses[1])  # (B, H, Tq)
            out = outs[0] * torch.exp(lses[0] - lse)[..., None] + outs[1] * torch.exp(lses[1] - lse)[..., None]
        ctx.save_for_backward(q, k1, v1, k2, v2, bias1, bias2, out, lse)
        ctx.causal1, ctx.scale = causal1, scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k1, v1, k2, v2, bias1, bias2, out, lse = ctx.saved_tensors
        if d_out is None:
            d_out = torch.zeros_like(out)
        d_out = d_out.contiguous()
        if d_lse is not None:  # the extra column of the module docstring
            d_out = torch.cat([d_out, d_lse.to(d_out.dtype)[..., None]], -1)
            out = _pad_column(out, 0.0)
            q = _pad_column(q, 0.0)
        extra = d_lse is not None
        blocks = [(k1, v1, bias1, ctx.causal1)] + ([(k2, v2, bias2, False)] if k2 is not None else [])
        dq, dkv = None, []
        for k, v, bias, causal in blocks:
            if extra:
                k, v = _pad_column(k, 0.0), _pad_column(v, 1.0)
            gq, gk, gv = _flash_bwd(d_out, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=ctx.scale)
            if extra:
                gq, gk, gv = gq[..., :-1], gk[..., :-1], gv[..., :-1]
            dq = gq if dq is None else dq + gq
            dkv += [gk, gv]
        if len(dkv) == 2:
            dkv += [None, None]
        return dq, *dkv, None, None, None, None


def _expand_heads(x: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """(B, T, Hkv, D) -> (B, H, T, D) in `dtype`: query head h reads key/value head h // (H // Hkv)."""
    x = x.to(dtype).transpose(1, 2)
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def mmsa_attention_sdpa(q_g, k_g, v_g, q_d, k_d, v_d, *, g2d: bool = True, d2g: bool = True,
                        g_causal: bool = False, d_causal: bool = False, len_g: Tensor | None = None,
                        len_d: Tensor | None = None, scale: float | None = None, return_lse: bool = False):
    """Same contract as `mmsa_attention_ref` (shapes, switches, key-only and absent streams, lse)."""
    streams = {"g": (q_g, k_g, v_g, g_causal, len_g), "d": (q_d, k_d, v_d, d_causal, len_d)}
    reads = {("g", "d"): g2d, ("d", "g"): d2g}
    outs: dict[str, Tensor | None] = {"g": None, "d": None}
    lses: dict[str, Tensor | None] = {"g": None, "d": None}
    for s, other in (("g", "d"), ("d", "g")):
        q, k, v, causal, lens = streams[s]
        if q is None:
            continue
        B, Tq, H, D = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        sc = D ** -0.5 if scale is None else scale
        qf = q.to(acc).transpose(1, 2)  # (B, H, Tq, D)
        k1, v1 = _expand_heads(k, H, acc), _expand_heads(v, H, acc)  # (B, H, Tq, D)
        bias1 = _key_bias(lens, Tq, acc)
        _, k_o, v_o, _, lens_o = streams[other]
        k2 = v2 = bias2 = None
        if reads[(s, other)] and k_o is not None and v_o is not None:
            k2, v2 = _expand_heads(k_o, H, acc), _expand_heads(v_o, H, acc)  # (B, H, To, D)
            bias2 = _key_bias(lens_o, k2.shape[2], acc)
        out, lse = _BlockAttention.apply(qf, k1, v1, k2, v2, bias1, bias2, causal, sc)
        if lens is not None:  # padded query rows output 0
            row_ok = torch.arange(Tq, device=q.device)[None, :] < lens[:, None]  # (B, Tq)
            out = out * row_ok[:, None, :, None]
        outs[s] = out.transpose(1, 2).to(q.dtype)  # (B, Tq, H, D)
        lses[s] = lse
    if return_lse:
        return outs["g"], outs["d"], lses["g"], lses["d"]
    return outs["g"], outs["d"]
