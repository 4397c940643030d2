"""Eager PyTorch version of every fused op: CPU fallback, test oracle, benchmark baseline.

These functions define the semantics (docs/design.md §3); every other backend must match them.
They favour clarity over speed but never materialise more than the op inherently needs.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _acc(x: Tensor) -> Tensor:
    """x in its accumulation dtype: fp32 for fp16/bf16/fp32, fp64 stays fp64 (for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- MMSA attention


def _key_mask(t_q: int, t_k: int, causal: bool, lens: Tensor | None, device) -> Tensor | None:
    """Boolean (B or 1, 1, Tq, Tk) mask of readable keys for one (query stream, key stream) pair."""
    mask = None
    if causal:
        qi = torch.arange(t_q, device=device)[:, None]
        ki = torch.arange(t_k, device=device)[None, :]
        mask = (ki <= qi)[None, None]  # (1, 1, Tq, Tk)
    if lens is not None:
        valid = torch.arange(t_k, device=device)[None, :] < lens.to(device)[:, None]  # (B, Tk)
        valid = valid[:, None, None, :]  # (B, 1, 1, Tk)
        mask = valid if mask is None else mask & valid
    return mask


def _expand_kv(x: Tensor, heads: int) -> Tensor:
    """(B, T, Hkv, D) -> (B, H, T, D): query head h reads key/value head h // (H // Hkv)."""
    return x.transpose(1, 2).repeat_interleave(heads // x.shape[2], dim=1)


def mmsa_attention_ref(
    q_g: Tensor | None, k_g: Tensor | None, v_g: Tensor | None,
    q_d: Tensor | None, k_d: Tensor | None, v_d: Tensor | None,
    *, g2d: bool = True, d2g: bool = True, g_causal: bool = False, d_causal: bool = False,
    len_g: Tensor | None = None, len_d: Tensor | None = None, scale: float | None = None,
    return_lse: bool = False,
):
    """Joint two-stream attention: one softmax per query row over the keys its stream may read.

    q_*: (B, T*, H, D); k_*, v_*: (B, T*, Hkv, D). Returns (o_g, o_d) with q's dtype and layout,
    None for an absent stream; with return_lse also (lse_g, lse_d), each (B, H, T*) in fp32.
    A key-only stream (q None, k and v given) is read by the other stream's queries and outputs None.
    Computed per (query stream, key stream) block in fp32; no concatenated dense mask.
    """
    streams = {"g": (q_g, k_g, v_g, g_causal, len_g), "d": (q_d, k_d, v_d, d_causal, len_d)}
    present = {s for s, (q, k, v, _, _) in streams.items() if q is not None}
    if not present:
        raise ValueError("mmsa_attention: both streams are absent")
    for s in present:
        q, k, v, _, _ = streams[s]
        if k is None or v is None:
            raise ValueError(f"mmsa_attention: stream {s!r} has q but not k and v")
    has_keys = {s for s, (_, k, v, _, _) in streams.items() if k is not None and v is not None}
    reads = {("g", "g"): True, ("d", "d"): True, ("g", "d"): g2d, ("d", "g"): d2g}
    outs: dict[str, Tensor | None] = {"g": None, "d": None}
    lses: dict[str, Tensor | None] = {"g": None, "d": None}
    for s in present:
        q, _, _, causal, lens = streams[s]
        B, Tq, H, D = q.shape
        sc = D ** -0.5 if scale is None else scale
        qf = _acc(q.transpose(1, 2))  # (B, H, Tq, D)
        scores, values = [], []
        for o in ("g", "d"):
            if o not in has_keys or not reads[(s, o)]:
                continue
            _, k, v, _, k_lens = streams[o]
            kf, vf = _expand_kv(_acc(k), H), _expand_kv(_acc(v), H)  # (B, H, Tk, D)
            sco = torch.matmul(qf, kf.transpose(-1, -2)) * sc  # (B, H, Tq, Tk)
            mask = _key_mask(Tq, kf.shape[2], causal and o == s, k_lens, q.device)
            if mask is not None:
                sco = sco.masked_fill(~mask, float("-inf"))
            scores.append(sco)
            values.append(vf)
        sco = torch.cat(scores, dim=-1)  # (B, H, Tq, sum Tk)
        lse = torch.logsumexp(sco, dim=-1)  # (B, H, Tq)
        p = torch.exp(sco - lse[..., None])
        out = torch.matmul(p, torch.cat(values, dim=2))  # (B, H, Tq, D)
        if lens is not None:  # padded query rows output 0
            row_ok = torch.arange(Tq, device=q.device)[None, :] < lens.to(q.device)[:, None]  # (B, Tq)
            out = out * row_ok[:, None, :, None]
        outs[s] = out.transpose(1, 2).to(q.dtype)
        lses[s] = lse
    if return_lse:
        return outs["g"], outs["d"], lses["g"], lses["d"]
    return outs["g"], outs["d"]


def mmsa_dense_mask(
    t_g: int, t_d: int, *, g2d: bool, d2g: bool, g_causal: bool, d_causal: bool,
    len_g: Tensor | None = None, len_d: Tensor | None = None, batch: int = 1, device=None,
) -> Tensor:
    """(B, 1, Tg+Td, Tg+Td) boolean mask over the concatenated streams [G; D] (True = may read).

    This is how the published UniGenDet code expresses MMSA (dense mask + SDPA); kept as an
    independent formulation for tests and as the benchmark baseline of the dense path.
    """
    T = t_g + t_d
    idx = torch.arange(T, device=device)
    is_g = idx < t_g
    pos = torch.where(is_g, idx, idx - t_g)
    same = is_g[:, None] == is_g[None, :]
    allowed = torch.where(same, torch.ones(T, T, dtype=torch.bool, device=device),
                          (is_g[:, None] & g2d) | (~is_g[:, None] & d2g))
    causal = torch.where(is_g, torch.tensor(g_causal, device=device), torch.tensor(d_causal, device=device))
    allowed &= ~(same & causal[:, None] & (pos[None, :] > pos[:, None]))
    mask = allowed[None, None].expand(batch, 1, T, T).clone()
    lg = torch.full((batch,), t_g, device=device) if len_g is None else len_g.to(device)
    ld = torch.full((batch,), t_d, device=device) if len_d is None else len_d.to(device)
    key_ok = torch.where(is_g[None, :], pos[None, :] < lg[:, None], pos[None, :] < ld[:, None])  # (B, T)
    return mask & key_ok[:, None, None, :]


def mmsa_attention_dense(q_g, k_g, v_g, q_d, k_d, v_d, *, g2d=True, d2g=True, g_causal=False,
                         d_causal=False, len_g=None, len_d=None, scale=None):
    """MMSA the published way: concatenate the streams, build the dense mask, call SDPA.

    Shapes as in `mmsa_attention_ref`; both streams present. Padded query rows are zeroed after.
    """
    B, Tg, H, D = q_g.shape
    Td = q_d.shape[1]
    mask = mmsa_dense_mask(Tg, Td, g2d=g2d, d2g=d2g, g_causal=g_causal, d_causal=d_causal,
                           len_g=len_g, len_d=len_d, batch=B, device=q_g.device)
    q = torch.cat([q_g, q_d], 1).transpose(1, 2)  # (B, H, T, D)
    k = _expand_kv(torch.cat([k_g, k_d], 1), H)
    v = _expand_kv(torch.cat([v_g, v_d], 1), H)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)
    lg = torch.full((B,), Tg, device=q.device) if len_g is None else len_g.to(q.device)
    ld = torch.full((B,), Td, device=q.device) if len_d is None else len_d.to(q.device)
    row_ok = torch.cat([torch.arange(Tg, device=q.device)[None] < lg[:, None],
                        torch.arange(Td, device=q.device)[None] < ld[:, None]], 1)  # (B, T)
    out = out * row_ok[:, :, None, None]
    return out[:, :Tg], out[:, Tg:]


# ----------------------------------------------------------------------------- MMSA consistency loss


def consistency_valid_rows(B: int, n_tokens: int, g_offset: int, d_offset: int, len_g: Tensor | None,
                           len_d: Tensor | None, device) -> Tensor:
    """(B, N) bool: image token i counts iff its G row g_offset + i < len_g and its D row d_offset + i < len_d."""
    i = torch.arange(n_tokens, device=device)[None, :]  # (1, N)
    ok = torch.ones(B, n_tokens, dtype=torch.bool, device=device)
    if len_g is not None:
        ok = ok & (g_offset + i < len_g.to(device)[:, None])
    if len_d is not None:
        ok = ok & (d_offset + i < len_d.to(device)[:, None])
    return ok


def mmsa_consistency_loss_ref(q_g: Tensor, k_g: Tensor, q_d: Tensor, k_d: Tensor, lse_g: Tensor, lse_d: Tensor,
                              *, n_tokens: int, d_offset: int, g_offset: int = 0, len_g: Tensor | None = None,
                              len_d: Tensor | None = None, scale: float | None = None) -> Tensor:
    """L_MMSA of one layer (definition: `unigendet.ops.consistency`); the oracle of the fused backends.

    q_*: (B, T*, H, D); k_*: (B, T*, Hkv, D); lse_*: (B, H, T*) the attention's per-query lse.
    Image token i is G row g_offset + i and D row d_offset + i, i < n_tokens. Computes the cross
    blocks (B, H, N, T_other) with a matmul and logsumexp (keys past len_* masked), then
    mean over valid (b, h, i) of (exp(lse_cross_gd - lse_g) - exp(lse_cross_dg - lse_d))^2.
    Returns a 0-d tensor in the accumulation dtype (fp32; fp64 for fp64 inputs).
    """
    B, _, H, D = q_g.shape
    N = n_tokens
    sc = D ** -0.5 if scale is None else scale
    valid = consistency_valid_rows(B, N, g_offset, d_offset, len_g, len_d, q_g.device)  # (B, N)
    masses = []
    for q, off, lse, k, k_lens in ((q_g, g_offset, lse_g, k_d, len_d), (q_d, d_offset, lse_d, k_g, len_g)):
        qf = _acc(q[:, off:off + N]).transpose(1, 2)  # (B, H, N, D)
        kf = _expand_kv(_acc(k), H)  # (B, H, Tk, D)
        s = torch.matmul(qf, kf.transpose(-1, -2)) * sc  # (B, H, N, Tk): the cross block only
        mask = _key_mask(N, kf.shape[2], False, k_lens, q.device)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        lse_cross = torch.logsumexp(s, dim=-1)  # (B, H, N)
        log_mass = lse_cross - _acc(lse[..., off:off + N])
        # padded rows (lse may be +inf there) are excluded before exp: no inf - inf, no NaN gradient
        masses.append(torch.exp(torch.where(valid[:, None], log_mass, float("-inf"))))  # (B, H, N)
    sq = (masses[0] - masses[1]).square()
    return sq.sum() / (valid.sum() * H).clamp_min(1)


# ----------------------------------------------------------------------------- BCE + DIGA loss


class LossParts(NamedTuple):
    total: Tensor  # scalar fp32: bce + w_align * align
    bce: Tensor    # scalar fp32: weighted mean BCE-with-logits
    align: Tensor  # scalar fp32: mean (1 - cosine similarity)


def bce_diga_loss_ref(logits: Tensor | None, targets: Tensor | None, weights: Tensor | None,
                      student: Tensor | None, teacher: Tensor | None, *, w_align: float = 0.5,
                      eps: float = 1e-8) -> LossParts:
    """logits/targets/weights: (N,); student/teacher: (M, C). Gradients reach logits and student."""
    zero = None
    if logits is not None:
        z = _acc(logits)
        y = _acc(targets) if targets is not None else torch.zeros_like(z)
        w = _acc(weights) if weights is not None else torch.ones_like(z)
        per_row = F.binary_cross_entropy_with_logits(z, y, reduction="none")  # (N,)
        bce = (w * per_row).sum() / w.sum().clamp_min(1e-12)
        zero = bce.new_zeros(())
    if student is not None:
        s = _acc(student)
        t = _acc(teacher.detach())
        dot = (s * t).sum(-1)
        denom = s.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps)
        align = (1.0 - dot / denom).mean()
        zero = align.new_zeros(())
    if zero is None:
        raise ValueError("bce_diga_loss: both the BCE inputs and the alignment inputs are None")
    bce = bce if logits is not None else zero
    align = align if student is not None else zero
    return LossParts(bce + w_align * align, bce, align)


# ----------------------------------------------------------------------------- backbone ops


def fused_add_rmsnorm_ref(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float = 1e-6):
    """res = x + residual; y = res * rsqrt(mean(res^2) + eps) * weight. (N, C) -> ((N, C), (N, C))."""
    res = _acc(x) if residual is None else _acc(x) + _acc(residual)
    y = res * torch.rsqrt(res.pow(2).mean(-1, keepdim=True) + eps) * _acc(weight)
    return y.to(x.dtype), res.to(x.dtype)


def swiglu_ref(gate_up: Tensor) -> Tensor:
    """(N, 2F) -> (N, F): silu(gate) * up, computed in fp32."""
    gate, up = _acc(gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def rmsnorm_rope_ref(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over D then rotate-half RoPE. x: (B, T, H, D); weight: (D,); cos, sin: (T, D/2)."""
    xf = _acc(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * _acc(weight)
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos.to(xf.dtype)[None, :, None, :], sin.to(xf.dtype)[None, :, None, :]  # (1, T, 1, D/2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def qk_rmsnorm_rope_ref(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor,
                        sin: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """q: (B, T, H, D), k: (B, T, Hkv, D) -> both normalised and rotated, same shapes and dtypes."""
    return rmsnorm_rope_ref(q, q_weight, cos, sin, eps), rmsnorm_rope_ref(k, k_weight, cos, sin, eps)
