"""L_MMSA (the attention-consistency loss) as Triton kernels: forward, backward, torch.library op.

Semantics and definition: `unigendet.ops.consistency` (oracle: `ops.reference.mmsa_consistency_loss_ref`).
Layout as the attention: q (B, T, H, D), k (B, T, Hkv, D) with a unit last stride; query head h
reads key head h // (H / Hkv) by pointer arithmetic; lse (B, H, T) fp32 from the attention.

- Forward `_fwd`: grid (cdiv(N, BLOCK_M), B * H); one program takes BLOCK_M image tokens of one
  head and runs two online log-sum-exps (running max and sum, base 2, fp32) over key tiles of Q K^T
  only (no V, no output accumulator): the G query rows g_offset + i over the D keys [0, len_d), then
  the D query rows d_offset + i over the G keys [0, len_g) (full tiles unmasked, then the last
  partial tile with the key-length mask; no causal mask: the cross block has none). It then reads
  the attention's lse of those rows and writes lse_cross (2, B, H, N) and the masses
  m = exp(lse_cross - lse) (2, B, H, N), 0 on invalid rows. The scalar loss, sum((m_gd - m_dg)^2)
  / (H * valid rows), is one deterministic torch reduction of (B, H, N) values. Memory: O(B H N).
- Backward: with c = dL / count (a device scalar: no host sync), c * w_gd and c * w_dg, where
  w_gd = 2 (m_gd - m_dg) m_gd and w_dg = -2 (m_gd - m_dg) m_dg, are dL / d lse_cross per row (torch,
  (B, H, N)); dL / d lse_g = -c w_gd on the G image rows (0 elsewhere), likewise lse_d, so the
  gradient reaches the attention through its dlse input. Per direction, `_bwd_dq` (grid
  (cdiv(N, BLOCK_M), B * H)) recomputes the tiles and accumulates dq = c * scale * sum_j w p_j k_j
  with p_j = exp(s_j - lse_cross) (rows outside the image range get 0), and `_bwd_dk` (grid
  (cdiv(Tk, BLOCK_N), B * H)) owns one key tile and one query head, looping over the image-token
  blocks: dk = c * scale * sum_i w_i p_ij q_i; keys past len get 0. c multiplies the accumulated
  tile at the end, not w: the 16-bit dot operand w p then stays O(p) (with c = 1 / count folded in,
  it could fall into fp16's subnormal range at realistic B H N). With GQA
  each head writes an fp32 partial and the wrapper sums each group in a fixed order, as the
  attention's dK/dV does. No atomics: bitwise deterministic.
- Precision: as the attention kernels: fp32 accumulation, 16-bit dot operands on the GPU, IEEE
  fp32 dots for fp32 inputs; under the CPU interpreter the loaded tiles are converted to fp32.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (LN2_C, LOG2E, LOG2E_C, NEG_BIG_C, KernelLauncher, cast_out, configs, device_guard, dmask,
                     head_meta, strides3, unit_last, valid_lengths)

# ----------------------------------------------------------------------------- forward


@triton.jit
def _lse_inner(m_i, l_i, q, k_base, skt, lo, hi, len_k, offs_d, qk_scale, MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               PREC: tl.constexpr):
    """Online log-sum-exp (base 2) of the rows of q (M, D) over key tiles [lo, hi); MASK: keys < len_k."""
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ok = d_ok[:, None] if MASK == 0 else d_ok[:, None] & (offs_n[None, :] < len_k)
        kt = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=k_ok, other=0.0)  # (D, N)
        if UPCAST:
            kt = kt.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PREC) * qk_scale  # (M, N), log2 units
        if MASK == 1:
            qk = tl.where(offs_n[None, :] < len_k, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        l_i = l_i * tl.math.exp2(m_i - m_ij) + tl.sum(tl.math.exp2(qk - m_ij[:, None]), 1)
        m_i = m_ij
    return m_i, l_i


@triton.jit
def _cross_lse(q, k_base, skt, len_k, offs_d, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Natural-log lse (M,) of q (M, D) over keys [0, len_k): full tiles unmasked, then the partial one."""
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_BIG_C
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full = (len_k // BLOCK_N) * BLOCK_N
    m_i, l_i = _lse_inner(m_i, l_i, q, k_base, skt, 0, full, len_k, offs_d, qk_scale, 0,
                          HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    m_i, l_i = _lse_inner(m_i, l_i, q, k_base, skt, full, len_k, len_k, offs_d, qk_scale, 1,
                          HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    return (m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))) * LN2_C


@triton.jit
def _fwd(QG, KG, QD, KD, LSE_G, LSE_D, LEN_G, LEN_D, LSEC_G, LSEC_D, MASS_G, MASS_D,
         qk_scale, N, T_G, T_D, G_OFF, D_OFF, H, GROUP,
         sqgb, sqgt, sqgh, skgb, skgt, skgh, sqdb, sqdt, sqdh, skdb, skdt, skdh,
         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         UPCAST: tl.constexpr, PREC: tl.constexpr):
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # image-token indices
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    len_g = tl.load(LEN_G + b)
    len_d = tl.load(LEN_D + b)
    row_in = offs_i < N
    valid = row_in & (G_OFF + offs_i < len_g) & (D_OFF + offs_i < len_d)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = row_in[:, None] & dmask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    # G queries of the image tokens against the D keys
    q = tl.load(QG + b * sqgb + h * sqgh + (G_OFF + offs_i)[:, None] * sqgt + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse_gd = _cross_lse(q, KD + b * skdb + hk * skdh, skdt, len_d, offs_d, qk_scale,
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, PREC)
    # D queries of the same image tokens against the G keys
    q = tl.load(QD + b * sqdb + h * sqdh + (D_OFF + offs_i)[:, None] * sqdt + offs_d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse_dg = _cross_lse(q, KG + b * skgb + hk * skgh, skgt, len_g, offs_d, qk_scale,
                        HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, UPCAST, PREC)
    # the attention's lse of those rows; invalid rows are skipped before exp (theirs may be +inf)
    lt_g = tl.load(LSE_G + (b * H + h) * T_G + G_OFF + offs_i, mask=valid, other=0.0)
    lt_d = tl.load(LSE_D + (b * H + h) * T_D + D_OFF + offs_i, mask=valid, other=0.0)
    m_gd = tl.where(valid, tl.exp(tl.where(valid, lse_gd - lt_g, 0.0)), 0.0)
    m_dg = tl.where(valid, tl.exp(tl.where(valid, lse_dg - lt_d, 0.0)), 0.0)
    out = (b * H + h) * N + offs_i
    tl.store(LSEC_G + out, lse_gd, mask=row_in)
    tl.store(LSEC_D + out, lse_dg, mask=row_in)
    tl.store(MASS_G + out, m_gd, mask=row_in)
    tl.store(MASS_D + out, m_dg, mask=row_in)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _dq_inner(dq, q, lse2, w, k_base, skt, lo, hi, len_k, offs_d, qk_scale, MASK: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              PREC: tl.constexpr):
    """dq += sum over key tiles [lo, hi) of (w p) K, p = exp2(s - lse2); MASK: keys < len_k."""
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ok = d_ok[None, :] if MASK == 0 else d_ok[None, :] & (offs_n[:, None] < len_k)
        k = tl.load(k_base + offs_n[:, None] * skt + offs_d[None, :], mask=k_ok, other=0.0)  # (N, D)
        if UPCAST:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (M, N), log2 units
        p = tl.math.exp2(qk - lse2[:, None])
        if MASK == 1:
            p = tl.where(offs_n[None, :] < len_k, p, 0.0)
        dq = tl.dot((p * w[:, None]).to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq(Q, K, LSEC, W, COEF, DQ, LEN_K, qk_scale, sm_scale, N, Q_OFF, H, GROUP,
            sqb, sqt, sqh, skb, skt, skh, sdqb, sdqt, sdqh,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One block of image-token query rows Q_OFF + i of one head against all valid keys of K."""
    offs_i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    len_k = tl.load(LEN_K + b)
    row_in = offs_i < N
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_in[:, None] & dmask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    rows = (Q_OFF + offs_i)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + rows * sqt + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse2 = tl.load(LSEC + (b * H + h) * N + offs_i, mask=row_in, other=float("inf")) * LOG2E_C
    w = tl.load(W + (b * H + h) * N + offs_i, mask=row_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    full = (len_k // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, lse2, w, k_base, skt, 0, full, len_k, offs_d, qk_scale, 0,
                   HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    dq = _dq_inner(dq, q, lse2, w, k_base, skt, full, len_k, len_k, offs_d, qk_scale, 1,
                   HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    dq = dq * (sm_scale * tl.load(COEF))
    tl.store(DQ + b * sdqb + h * sdqh + rows * sdqt + offs_d[None, :], cast_out(dq, DQ.dtype.element_ty, UPCAST),
             mask=mask)


@triton.jit
def _bwd_dk(Q, K, LSEC, W, COEF, DK, LEN_K, qk_scale, sm_scale, N, T_K, Q_OFF, H, GROUP,
            sqb, sqt, sqh, skb, skt, skh, sdkb, sdkt, sdkh,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One key tile of K for ONE query head h over all image-token query rows Q_OFF + i of that head."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    len_k = tl.load(LEN_K + b)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    key_ok = offs_n < len_k
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :],
                mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (N, D); padded keys read as 0
    if UPCAST:
        k = k.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    q_base = Q + b * sqb + h * sqh
    row_base = (b * H + h) * N
    hi = tl.where(start_n < len_k, N, 0)  # a tile wholly past len_k reads nothing
    for start_m in range(0, hi, BLOCK_M):
        offs_i = start_m + tl.arange(0, BLOCK_M)
        row_in = offs_i < N
        qt = tl.load(q_base + (Q_OFF + offs_i)[None, :] * sqt + offs_d[:, None],
                     mask=d_ok[:, None] & row_in[None, :], other=0.0)  # (D, M)
        if UPCAST:
            qt = qt.to(tl.float32)
        lse2 = tl.load(LSEC + row_base + offs_i, mask=row_in, other=float("inf")) * LOG2E_C
        w = tl.load(W + row_base + offs_i, mask=row_in, other=0.0)
        s_t = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (N, M), log2 units
        ds_t = tl.math.exp2(s_t - lse2[None, :]) * w[None, :]
        ds_t = tl.where(key_ok[:, None], ds_t, 0.0)
        dk = tl.dot(ds_t.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             cast_out(dk * (sm_scale * tl.load(COEF)), DK.dtype.element_ty, UPCAST),
             mask=(offs_n < T_K)[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launch configs

# Interpreter: small fixed tiles, BLOCK_M != BLOCK_N so that odd test shapes cross full and partial tiles.
INTERPRET = type(_fwd).__name__ == "InterpretedFunction"
INTERPRET_BLOCKS = {"fwd": (16, 32), "dq": (32, 16), "dk": (16, 32)}  # (BLOCK_M, BLOCK_N)


# Not yet tuned on a GPU (no timing has been run): the attention's forward / dQ / dK-dV shapes,
# which need fewer registers here (no V tile, no output accumulator in the forward).
_FWD_CONFIGS = configs([(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)])
_DQ_CONFIGS = configs([(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)])
_DK_CONFIGS = configs([(64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)])
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=["N", "T_G", "T_D", "HEAD_DIM"])(_fwd)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=["N", "HEAD_DIM"])(_bwd_dq)
_dk_tuned = triton.autotune(_DK_CONFIGS, key=["N", "T_K", "HEAD_DIM"])(_bwd_dk)
_FIXED = {"fwd": _FWD_CONFIGS[-1], "dq": _DQ_CONFIGS[-1], "dk": _DK_CONFIGS[-1]}


_launch = KernelLauncher(INTERPRET, INTERPRET_BLOCKS, _FIXED)


def _meta(q: Tensor) -> dict:
    return head_meta(q, INTERPRET)


def _count(B: int, H: int, n: int, g_off: int, d_off: int, len_g: Tensor, len_d: Tensor) -> Tensor:
    """H * number of valid (b, i), at least 1, as a 0-d fp32 device tensor (no host sync)."""
    rows = torch.minimum(len_g - g_off, len_d - d_off).clamp(0, n)  # (B,)
    return (rows.sum() * H).clamp_min(1).to(torch.float32)


# ----------------------------------------------------------------------------- torch.library ops
# lengths arrive as int32 (B,) tensors (full lengths when the caller gave none).


@torch.library.custom_op("unigendet::mmsa_consistency_fwd", mutates_args=())
def mmsa_consistency_fwd(q_g: Tensor, k_g: Tensor, q_d: Tensor, k_d: Tensor, lse_g: Tensor, lse_d: Tensor,
                         len_g: Tensor, len_d: Tensor, n_tokens: int, g_offset: int, d_offset: int,
                         scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """-> (loss () fp32, lse_cross (2, B, H, N) fp32, mass (2, B, H, N) fp32: [G->D, D->G])."""
    q_g, k_g, q_d, k_d = map(unit_last, (q_g, k_g, q_d, k_d))
    lse_g, lse_d = lse_g.contiguous(), lse_d.contiguous()
    B, Tg, H, _ = q_g.shape
    Td, N = q_d.shape[1], n_tokens
    lse_c = torch.empty((2, B, H, N), dtype=torch.float32, device=q_g.device)
    mass = torch.empty((2, B, H, N), dtype=torch.float32, device=q_g.device)
    with device_guard(q_g):
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
        _launch(_fwd_tuned, _fwd, "fwd", grid, q_g, k_g, q_d, k_d, lse_g, lse_d, len_g, len_d, lse_c[0], lse_c[1],
                mass[0], mass[1], scale * LOG2E, N, Tg, Td, g_offset, d_offset, H, H // k_g.shape[2],
                *strides3(q_g), *strides3(k_g), *strides3(q_d), *strides3(k_d), **_meta(q_g))
    loss = (mass[0] - mass[1]).square().sum() / _count(B, H, N, g_offset, d_offset, len_g, len_d)
    return loss, lse_c, mass


@mmsa_consistency_fwd.register_fake
def _(q_g, k_g, q_d, k_d, lse_g, lse_d, len_g, len_d, n_tokens, g_offset, d_offset, scale):
    B, _, H, _ = q_g.shape
    f32 = dict(dtype=torch.float32)
    rows = (2, B, H, n_tokens)
    return q_g.new_empty((), **f32), q_g.new_empty(rows, **f32), q_g.new_empty(rows, **f32)


def _dq(q, k, lse_c, w, coef, len_k, q_off: int, scale: float) -> Tensor:
    """(B, Tq, H, D) in q's dtype: rows [q_off, q_off + N) from the kernel, zeros elsewhere."""
    B, Tq, H, D = q.shape
    N = w.shape[-1]
    dq = torch.zeros((B, Tq, H, D), dtype=q.dtype, device=q.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_dq_tuned, _bwd_dq, "dq", grid, q, k, lse_c, w, coef, dq, len_k, scale * LOG2E, scale, N, q_off, H,
            H // k.shape[2], *strides3(q), *strides3(k), *strides3(dq), **_meta(q))
    return dq


def _dk(q, k, lse_c, w, coef, len_k, q_off: int, scale: float) -> Tensor:
    """(B, Tk, Hkv, D) in k's dtype; GQA: fp32 per-head partials summed over each group (fixed order)."""
    B, Tk, Hkv, D = k.shape
    H, N = q.shape[2], w.shape[-1]
    group = H // Hkv
    shape, dtype = ((B, Tk, H, D), torch.float32) if group > 1 else ((B, Tk, Hkv, D), k.dtype)
    dk = torch.empty(shape, dtype=dtype, device=k.device)
    grid = lambda meta: (triton.cdiv(Tk, meta["BLOCK_N"]), B * H)  # noqa: E731
    _launch(_dk_tuned, _bwd_dk, "dk", grid, q, k, lse_c, w, coef, dk, len_k, scale * LOG2E, scale, N, Tk, q_off, H,
            group, *strides3(q), *strides3(k), *strides3(dk), **_meta(q))
    if group > 1:  # (B, Tk, Hkv, group, D) -> (B, Tk, Hkv, D)
        dk = dk.view(B, Tk, Hkv, group, D).sum(3).to(k.dtype)
    return dk


@torch.library.custom_op("unigendet::mmsa_consistency_bwd", mutates_args=())
def mmsa_consistency_bwd(grad: Tensor, q_g: Tensor, k_g: Tensor, q_d: Tensor, k_d: Tensor, lse_g: Tensor,
                         lse_d: Tensor, len_g: Tensor, len_d: Tensor, lse_c: Tensor, mass: Tensor, n_tokens: int,
                         g_offset: int, d_offset: int,
                         scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq_g, dk_g, dq_d, dk_d, dlse_g, dlse_d); grad: the 0-d gradient of the loss."""
    q_g, k_g, q_d, k_d = map(unit_last, (q_g, k_g, q_d, k_d))
    B, Tg, H, _ = q_g.shape
    Td, N = q_d.shape[1], n_tokens
    coef = (grad.float() / _count(B, H, N, g_offset, d_offset, len_g, len_d)).reshape(1)  # (1,), on the device
    diff = mass[0] - mass[1]  # (B, H, N); 0 on invalid rows
    w_gd = (2.0 * diff * mass[0]).contiguous()   # dL / d lse_cross_gd, over coef
    w_dg = (-2.0 * diff * mass[1]).contiguous()  # dL / d lse_cross_dg, over coef
    dlse_g = torch.zeros((B, H, Tg), dtype=lse_g.dtype, device=lse_g.device)
    dlse_d = torch.zeros((B, H, Td), dtype=lse_d.dtype, device=lse_d.device)
    dlse_g[..., g_offset:g_offset + N] = -coef * w_gd  # d m / d lse_self = -m
    dlse_d[..., d_offset:d_offset + N] = -coef * w_dg
    with device_guard(q_g):
        dq_g = _dq(q_g, k_d, lse_c[0], w_gd, coef, len_d, g_offset, scale)
        dk_d = _dk(q_g, k_d, lse_c[0], w_gd, coef, len_d, g_offset, scale)
        dq_d = _dq(q_d, k_g, lse_c[1], w_dg, coef, len_g, d_offset, scale)
        dk_g = _dk(q_d, k_g, lse_c[1], w_dg, coef, len_g, d_offset, scale)
    return dq_g, dk_g, dq_d, dk_d, dlse_g, dlse_d


@mmsa_consistency_bwd.register_fake
def _(grad, q_g, k_g, q_d, k_d, lse_g, lse_d, *rest):
    return tuple(x.new_empty(x.shape) for x in (q_g, k_g, q_d, k_d, lse_g, lse_d))


def _setup_context(ctx, inputs, output):
    *tensors, n_tokens, g_offset, d_offset, scale = inputs
    _, lse_c, mass = output
    ctx.save_for_backward(*tensors, lse_c, mass)
    ctx.args = (n_tokens, g_offset, d_offset, scale)


def _backward(ctx, grad, _g_lse_c, _g_mass):
    q_g, k_g, q_d, k_d, lse_g, lse_d, len_g, len_d, lse_c, mass = ctx.saved_tensors
    grads = mmsa_consistency_bwd(grad, q_g, k_g, q_d, k_d, lse_g, lse_d, len_g, len_d, lse_c, mass, *ctx.args)
    return (*grads, None, None, None, None, None, None)


mmsa_consistency_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry


def mmsa_consistency_loss_triton(q_g: Tensor, k_g: Tensor, q_d: Tensor, k_d: Tensor, lse_g: Tensor, lse_d: Tensor,
                                 *, n_tokens: int, d_offset: int, g_offset: int = 0,
                                 len_g: Tensor | None = None, len_d: Tensor | None = None,
                                 scale: float | None = None) -> Tensor:
    """The `triton` backend of `ops.mmsa_consistency_loss` (same arguments and semantics as the
    reference). Returns a 0-d fp32 tensor, differentiable w.r.t. q_g, k_g, q_d, k_d, lse_g, lse_d."""
    B, Tg, _, D = q_g.shape
    sc = float(D ** -0.5 if scale is None else scale)
    loss, _, _ = mmsa_consistency_fwd(q_g, k_g, q_d, k_d, lse_g, lse_d, valid_lengths(len_g, B, Tg, q_g.device),
                                      valid_lengths(len_d, B, q_d.shape[1], q_g.device), int(n_tokens), int(g_offset),
                                      int(d_offset), sc)
    return loss
