"""The "sdpa" backend of `mmsa_attention`: PyTorch's fused CPU flash-attention kernel, one call.

The reference materialises every score matrix per (query stream, key stream) block, masks it with
`masked_fill` and concatenates the blocks. Here the present query streams and the key streams they
read are concatenated ([G; D]) and one call of the flash CPU kernel
(`aten._scaled_dot_product_flash_attention_for_cpu`, which never materialises the scores and returns
each row's log-sum-exp) runs them under an additive block mask: -inf on a switched-off cross block,
above the diagonal of a causal stream's own block and on keys past len_*. With a switch off, each
query stream gets its own call over the keys it reads (so its output depends on nothing else, in
autograd too). One call over [G; D] beat one call per (query stream, key stream) block merged by
log-sum-exps on the tiny_cpu shapes (the kernel's fixed cost per call, its backward most, dominates
there; docs/profile.md).

The kernel's lse output has no gradient in autograd, so the call is an `autograd.Function` whose
backward is the kernel's own backward (it recomputes P = exp(S - L) from the saved lse and D =
rowsum(dO * O)). The gradient through the returned lse (the L_MMSA loss reads it) adds dlse_i * P_ij
to dS_ij; it is folded into the same backward call by one extra head-dim column: q and k get a 0
(scores unchanged), v gets a 1 and O a 0, and dO gets dlse, so dP_ij gains dlse_i while D does not.

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


class _MaskedAttention(torch.autograd.Function):
    """Softmax attention with an additive key mask, returning the per-row lse with its gradient.

    q: (B, H, Tq, D); k, v: (B, H, Tk, D); bias: (B or 1, 1, Tq, Tk) additive (0 / -inf) or None.
    Returns O (B, H, Tq, D) and L (B, H, Tq) (natural log, the dtype of q).
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float):
        out, lse = _flash_fwd(q, k, v, 0.0, False, attn_mask=bias, scale=scale)  # (B,H,Tq,D), (B,H,Tq)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        if d_lse is None:
            dq, dk, dv = _flash_bwd(d_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=ctx.scale)
            return dq, dk, dv, None, None
        # the extra column of the module docstring: q, k get 0 (scores unchanged), v gets 1, O gets 0
        d_out = torch.cat([d_out, d_lse.to(d_out.dtype)[..., None]], -1)
        q, k, out, v = _pad_column(q, 0.0), _pad_column(k, 0.0), _pad_column(out, 0.0), _pad_column(v, 1.0)
        dq, dk, dv = _flash_bwd(d_out, q, k, v, out, lse, 0.0, False, attn_mask=bias, scale=ctx.scale)
        return dq[..., :-1], dk[..., :-1], dv[..., :-1], None, None


def _expand_heads(x: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """(B, T, Hkv, D) -> (B, H, T, D) in `dtype`: query head h reads key/value head h // (H // Hkv)."""
    x = x.to(dtype).transpose(1, 2)
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _mmsa_bias(queries: list, keys: list, reads: dict, causal: dict, lens: dict, batch: int,
               dtype: torch.dtype, device) -> Tensor | None:
    """Additive (B or 1, 1, sum Tq, sum Tk) mask over the concatenated query and key streams (0: may
    read, -inf: may not); None when every query reads every key. queries / keys: [(stream, T)]."""
    per_sample = any(lens[o] is not None for o, _ in keys)
    blocked = any(s != o and not reads[(s, o)] for s, _ in queries for o, _ in keys)
    if not (per_sample or blocked or any(causal[s] for s, _ in queries if s in dict(keys))):
        return None  # decided from the arguments alone: no host read of a tensor (torch.compile traces it)
    ok = torch.ones(batch if per_sample else 1, 1, sum(t for _, t in queries), sum(t for _, t in keys),
                    dtype=torch.bool, device=device)
    r0 = 0
    for s, tq in queries:
        c0 = 0
        for o, tk in keys:
            block = ok[:, :, r0:r0 + tq, c0:c0 + tk]  # (B or 1, 1, Tq, Tk) view
            if s != o and not reads[(s, o)]:
                block.fill_(False)
            else:
                if s == o and causal[s]:
                    block &= torch.ones(tq, tk, dtype=torch.bool, device=device).tril()
                if lens[o] is not None:
                    block &= (torch.arange(tk, device=device)[None, :] < lens[o][:, None])[:, None, None, :]
            c0 += tk
        r0 += tq
    return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))


def call_groups(qs: dict, kvs: dict, g2d: bool, d2g: bool) -> list[tuple[list[str], list[str]]]:
    """(query streams, key streams) of each attention call of a CPU backend: one call for both query
    streams when each reads the other's keys; else one call per query stream, so that a stream's output
    depends (in autograd too) only on the keys it reads, as in the reference. qs: {"g"|"d": q or None};
    kvs: {"g"|"d": (k, v) or (None, None)}."""
    reads = {("g", "d"): g2d, ("d", "g"): d2g}
    present = [s for s in "gd" if qs[s] is not None]
    has_keys = [o for o in "gd" if kvs[o][0] is not None]
    joint = len(present) == 2 and g2d and d2g
    return [(queries, [o for o in has_keys if any(s == o or reads[(s, o)] for s in queries)])
            for queries in ([present] if joint else [[s] for s in present])]


def mmsa_attention_sdpa(q_g, k_g, v_g, q_d, k_d, v_d, *, g2d: bool = True, d2g: bool = True,
                        g_causal: bool = False, d_causal: bool = False, len_g: Tensor | None = None,
                        len_d: Tensor | None = None, scale: float | None = None, return_lse: bool = False):
    """Same contract as `mmsa_attention_ref` (shapes, switches, key-only and absent streams, lse)."""
    qs = {"g": q_g, "d": q_d}
    kvs = {"g": (k_g, v_g), "d": (k_d, v_d)}
    lens = {"g": len_g, "d": len_d}
    reads = {("g", "d"): g2d, ("d", "g"): d2g}
    present = [s for s in "gd" if qs[s] is not None]
    q0 = qs[present[0]]
    B, _, H, D = q0.shape
    acc = torch.promote_types(q0.dtype, torch.float32)
    sc = D ** -0.5 if scale is None else scale
    outs: dict[str, Tensor | None] = {"g": None, "d": None}
    lses: dict[str, Tensor | None] = {"g": None, "d": None}
    for queries, keys in call_groups(qs, kvs, g2d, d2g):
        q = torch.cat([qs[s].to(acc).transpose(1, 2) for s in queries], 2)  # (B, H, sum Tq, D)
        k = torch.cat([_expand_heads(kvs[o][0], H, acc) for o in keys], 2)  # (B, H, sum Tk, D)
        v = torch.cat([_expand_heads(kvs[o][1], H, acc) for o in keys], 2)
        bias = _mmsa_bias([(s, qs[s].shape[1]) for s in queries], [(o, kvs[o][0].shape[1]) for o in keys],
                          reads, {"g": g_causal, "d": d_causal}, lens, B, acc, q0.device)
        out, lse = _MaskedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), bias, sc)
        r0 = 0
        for s in queries:
            tq = qs[s].shape[1]
            o_s = out[:, :, r0:r0 + tq]  # (B, H, Tq, D)
            if lens[s] is not None:  # padded query rows output 0
                row_ok = torch.arange(tq, device=q0.device)[None, :] < lens[s][:, None]  # (B, Tq)
                o_s = o_s * row_ok[:, None, :, None]
            outs[s] = o_s.transpose(1, 2).to(qs[s].dtype)  # (B, Tq, H, D)
            lses[s] = lse[:, :, r0:r0 + tq]
            r0 += tq
    if return_lse:
        return outs["g"], outs["d"], lses["g"], lses["d"]
    return outs["g"], outs["d"]
