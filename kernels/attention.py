"""MMSA joint two-stream attention as Triton kernels: forward, backward, torch.library op.

Semantics: `unigendet.ops.reference.mmsa_attention_ref` (docs/design.md §1, §3). Layout: q (B, T, H, D),
k and v (B, T, Hkv, D), any strides with a unit last stride (others are made contiguous);
query head h reads key/value head h // (H // Hkv) by pointer arithmetic (K/V are never repeated).

How it works (FlashAttention-2 style, no concatenation of the streams, no dense mask, O(T) memory):
- Forward: one launch per present query stream, grid (cdiv(Tq, BLOCK_M), B * H). A program holds
  one query tile and runs ONE online softmax (m_i, l_i, acc in fp32, base-2 exponent) over, in order,
  (1) its own stream's key blocks: causal -> blocks left of the diagonal without any mask, then the
  diagonal blocks with the causal mask; full -> the blocks below len without a mask, then the last
  partial block with the key-length mask; (2) the other stream's key blocks iff the switch (g2d for
  G queries, d2g for D queries) allows it, again unmasked blocks then one length-masked block.
  Forbidden (stream, stream) pairs and key blocks at or past `len` are never visited; query tiles
  at or past `len` visit nothing and write zeros. Writes O (zero rows past len) and the natural-log
  LSE (B, H, T) in fp32, +inf for padded query rows (as FlashAttention does for rows with no keys),
  so that exp(s - lse) = 0 makes every padded row vanish from the backward without extra masks.
- Backward: (a) delta = rowsum(dO * O) - dLSE per query stream (dLSE: the gradient reaching the
  optional lse output; zero when unused); (b) one dK/dV launch per key stream, grid
  (cdiv(Tk, BLOCK_N), B * H): each program owns one key tile and one QUERY head h, reads K/V of
  head h // (H / Hkv) and loops over the query blocks of every query stream that reads this key
  stream (own stream: diagonal blocks causal-masked then unmasked blocks when causal, unmasked then
  one row-masked block when not, and none for a key-only stream, which has no query rows; other
  stream iff its switch reads this one), accumulating dK, dV in fp32 registers; keys past len get
  zeros. With GQA each head writes an fp32 partial (B, Tk, H, D) and the wrapper sums each group
  (fixed order; H / Hkv x the dK/dV memory, still linear in T); looping over the group inside the
  program spilled registers when compiled for sm_90 and gave too few programs. (c) one dQ launch
  per query stream, same iteration as the forward.
  Every output element is written by exactly one program: no atomics, bitwise deterministic, so
  `deterministic=True` costs nothing (the dQ pass recomputes QK^T and dO V^T instead of using
  atomics, FlashAttention-2's Triton design).
- Precision: GPU: matmul operands stay in the input dtype (tensor cores), accumulation in fp32,
  P rounded to V's dtype before P @ V (as FlashAttention); fp32 inputs use IEEE fp32 dots (no
  TF32). Triton interpreter (CPU): tiles are converted to fp32 right after tl.load (it computes
  bf16 on raw bits otherwise, docs/design.md §4.4).
- torch.compile: `torch.library.custom_op` ops unigendet::mmsa_attention_fwd / _bwd with fake
  (meta) implementations and registered autograd, so compiled graphs keep them as opaque nodes.
Head dims: multiples of 16 in [16, 256] (tiles are padded to a power of two, e.g. 96 -> 128).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import (LN2_C, LOG2E, LOG2E_C, NEG_BIG_C, KernelLauncher, cast_out, configs, device_guard,
                     dmask, head_meta, strides3, unit_last, valid_lengths)

# ----------------------------------------------------------------------------- forward


@triton.jit
def _query_tile(LEN_Q, H, GROUP, BLOCK_M: tl.constexpr):
    """This program's query tile (grid: query tiles x B*H): (start_m, batch b, head h, its KV head hk,
    the stream's length len_q for b, active = the tile holds a row before len_q, row offsets).
    A tile wholly past len_q reads nothing and writes zeros (forward) or nothing new (dQ)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    len_q = tl.load(LEN_Q + b)
    return start_m, b, h, hk, len_q, start_m < len_q, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, lo, hi, len_k, offs_m, offs_d, qk_scale,
               MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASK: 0 none, 1 keys < len_k, 2 also causal."""
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ok = d_ok[:, None] if MASK == 0 else d_ok[:, None] & (offs_n[None, :] < len_k)
        v_ok = d_ok[None, :] if MASK == 0 else d_ok[None, :] & (offs_n[:, None] < len_k)
        kt = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=k_ok, other=0.0)  # (D, N)
        v = tl.load(v_base + offs_n[:, None] * svt + offs_d[None, :], mask=v_ok, other=0.0)  # (N, D)
        if UPCAST:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, kt, input_precision=PREC) * qk_scale  # (M, N), log2 units
        if MASK == 1:
            qk = tl.where(offs_n[None, :] < len_k, qk, float("-inf"))
        if MASK == 2:
            qk = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < len_k), qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)  # MMA accumulates
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _mmsa_fwd(Q, K, V, K2, V2, O, LSE, LEN_Q, LEN_K2, qk_scale, T_Q, H, GROUP,
              sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sk2b, sk2t, sk2h, sv2b, sv2t, sv2h,
              sob, sot, soh,
              CAUSAL: tl.constexpr, READ_OTHER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    start_m, b, h, hk, len_q, active, offs_m = _query_tile(LEN_Q, H, GROUP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    row_in = offs_m < T_Q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :],
                mask=row_in[:, None] & d_ok[None, :], other=0.0)  # (M, D)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + NEG_BIG_C
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    # (1) own stream; its key length is len_q (same stream)
    if CAUSAL:
        hi = tl.where(active, start_m, 0)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, 0, hi, len_q, offs_m, offs_d,
                                   qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
        hi = tl.minimum(start_m + BLOCK_M, len_q)  # empty when inactive
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, start_m, hi, len_q, offs_m,
                                   offs_d, qk_scale, 2, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    else:
        full = tl.where(active, (len_q // BLOCK_N) * BLOCK_N, 0)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, 0, full, len_q, offs_m, offs_d,
                                   qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, full, tl.where(active, len_q, 0),
                                   len_q, offs_m, offs_d, qk_scale, 1, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    # (2) the other stream, only when this stream's switch reads it (never causal)
    if READ_OTHER:
        len_k2 = tl.load(LEN_K2 + b)
        k2_base = K2 + b * sk2b + hk * sk2h
        v2_base = V2 + b * sv2b + hk * sv2h
        full = tl.where(active, (len_k2 // BLOCK_N) * BLOCK_N, 0)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k2_base, v2_base, sk2t, sv2t, 0, full, len_k2, offs_m,
                                   offs_d, qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k2_base, v2_base, sk2t, sv2t, full,
                                   tl.where(active, len_k2, 0), len_k2, offs_m, offs_d, qk_scale, 1,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    row_ok = offs_m < len_q
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = tl.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             cast_out(o, O.dtype.element_ty, UPCAST),
             mask=row_in[:, None] & d_ok[None, :])
    lse = tl.where(row_ok, (m_i + tl.math.log2(l_safe)) * LN2_C, float("inf"))
    tl.store(LSE + (b * H + h) * T_Q + offs_m, lse, mask=row_in)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_preprocess(O, DO, DLSE, DELTA, T, H, sob, sot, soh, sdob, sdot, sdoh,
                    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O - dLSE (fp32, (B, H, T))."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & dmask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + (b * H + h) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(DELTA + (b * H + h) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdot, lo, hi, T_Q, offs_n, offs_d,
                qk_scale, MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dK, dV of one key tile over query blocks [lo, hi). MASK: 0 none (rows < len),
    1 rows may pass T (loads masked; rows past len have lse = +inf so p = 0), 2 also causal."""
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = d_ok[:, None] if MASK == 0 else d_ok[:, None] & (offs_m[None, :] < T_Q)
        do_ok = d_ok[None, :] if MASK == 0 else d_ok[None, :] & (offs_m[:, None] < T_Q)
        qt = tl.load(q_base + offs_m[None, :] * sqt + offs_d[:, None], mask=q_ok, other=0.0)  # (D, M)
        do = tl.load(do_base + offs_m[:, None] * sdot + offs_d[None, :], mask=do_ok, other=0.0)  # (M, D)
        if MASK == 0:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        else:
            lse = tl.load(lse_base + offs_m, mask=offs_m < T_Q, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < T_Q, other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        s_t = tl.dot(k, qt, input_precision=PREC) * qk_scale  # (N, M), log2 units
        p_t = tl.math.exp2(s_t - (lse * LOG2E_C)[None, :])
        if MASK == 2:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # (N, M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _mmsa_bwd_dkdv(Q, DO, LSE, DELTA, Q2, DO2, LSE2, DELTA2, K, V, DK, DV, LEN_K, LEN_Q2,
                   qk_scale, sm_scale, T_K, T_Q2, H, GROUP,
                   sqb, sqt, sqh, sdob, sdot, sdoh, sq2b, sq2t, sq2h, sdo2b, sdo2t, sdo2h,
                   skb, skt, skh, svb, svt, svh, sdkb, sdkt, sdkh,
                   CAUSAL: tl.constexpr, OTHER_READS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   UPCAST: tl.constexpr, PREC: tl.constexpr, OWN_READS: tl.constexpr):
    """One key tile of key stream S for ONE query head h: Q/DO/LSE/DELTA are S's own queries (read
    iff OWN_READS: False for a key-only stream, whose Q has no rows), Q2/... the other stream's
    queries (read iff OTHER_READS). Writes dK, dV of head h into DK, DV
    (one shared layout (B, T, H, D)): with GQA the wrapper sums the H / Hkv heads of a group
    (a fixed-order reduction: deterministic, no atomics). Looping over the group's heads inside
    the program instead makes the compiler spill the fp32 dK/dV tiles (sm_90, D=128) and leaves
    B * Hkv * Tk / BLOCK_N programs only, too few to fill the GPU at the published shape."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    len_k = tl.load(LEN_K + b)
    active = start_n < len_k
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    kv_mask = (offs_n < T_K)[:, None] & d_ok[None, :]  # store: padded keys get zero gradients
    ld_mask = (offs_n < len_k)[:, None] & d_ok[None, :]  # load: padded keys read as 0, never their values
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=ld_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=ld_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    full_q = (len_k // BLOCK_M) * BLOCK_M  # own query rows below full_q are all valid
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    lse_base = LSE + (b * H + h) * T_K
    delta_base = DELTA + (b * H + h) * T_K
    if OWN_READS:
        if CAUSAL:
            # diagonal: query rows [start_n, start_n + BLOCK_N) with the causal mask; rows below: none
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdot, start_n,
                                 tl.minimum(start_n + BLOCK_N, len_k), T_K, offs_n, offs_d, qk_scale, 2,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PREC)
            lo = start_n + BLOCK_N
            mid = tl.maximum(lo, full_q)
        else:
            lo = 0
            mid = tl.where(active, full_q, 0)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdot, lo, mid, T_K,
                             offs_n, offs_d, qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqt, sdot, mid,
                             tl.where(active, len_k, 0), T_K, offs_n, offs_d, qk_scale, 1,
                             HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PREC)
    if OTHER_READS:  # the other stream's queries read this key stream (never causal)
        len_q2 = tl.load(LEN_Q2 + b)
        full_q2 = tl.where(active, (len_q2 // BLOCK_M) * BLOCK_M, 0)
        q2_base = Q2 + b * sq2b + h * sq2h
        do2_base = DO2 + b * sdo2b + h * sdo2h
        lse2_base = LSE2 + (b * H + h) * T_Q2
        delta2_base = DELTA2 + (b * H + h) * T_Q2
        dk, dv = _dkdv_inner(dk, dv, k, v, q2_base, do2_base, lse2_base, delta2_base, sq2t, sdo2t, 0,
                             full_q2, T_Q2, offs_n, offs_d, qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_M,
                             UPCAST, PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q2_base, do2_base, lse2_base, delta2_base, sq2t, sdo2t,
                             full_q2, tl.where(active, len_q2, 0), T_Q2, offs_n, offs_d, qk_scale, 1,
                             HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, PREC)
    key_ok = (offs_n < len_k)[:, None]
    out = b * sdkb + h * sdkh + offs_n[:, None] * sdkt + offs_d[None, :]
    tl.store(DK + out, cast_out(tl.where(key_ok, dk * sm_scale, 0.0), DK.dtype.element_ty, UPCAST), mask=kv_mask)
    tl.store(DV + out, cast_out(tl.where(key_ok, dv, 0.0), DV.dtype.element_ty, UPCAST), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, svt, lo, hi, len_k, offs_m, offs_d, qk_scale,
              MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dQ of one query tile over key blocks [lo, hi); MASK as in `_fwd_inner`."""
    d_ok = dmask(offs_d, HEAD_DIM, BLOCK_D)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = d_ok[:, None] if MASK == 0 else d_ok[:, None] & (offs_n[None, :] < len_k)
        kt = tl.load(k_base + offs_n[None, :] * skt + offs_d[:, None], mask=ok, other=0.0)  # (D, N)
        vt = tl.load(v_base + offs_n[None, :] * svt + offs_d[:, None], mask=ok, other=0.0)  # (D, N)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, kt, input_precision=PREC) * qk_scale - lse2[:, None])  # (M, N)
        if MASK == 1:
            p = tl.where(offs_n[None, :] < len_k, p, 0.0)
        if MASK == 2:
            p = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < len_k), p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PREC)
    return dq


@triton.jit
def _mmsa_bwd_dq(Q, DO, LSE, DELTA, K, V, K2, V2, DQ, LEN_Q, LEN_K2, qk_scale, sm_scale, T_Q, H, GROUP,
                 sqb, sqt, sqh, sdob, sdot, sdoh, skb, skt, skh, svb, svt, svh,
                 sk2b, sk2t, sk2h, sv2b, sv2t, sv2h, sdqb, sdqt, sdqh,
                 CAUSAL: tl.constexpr, READ_OTHER: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    start_m, b, h, hk, len_q, active, offs_m = _query_tile(LEN_Q, H, GROUP, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < T_Q
    mask = row_in[:, None] & dmask(offs_d, HEAD_DIM, BLOCK_D)[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + (b * H + h) * T_Q + offs_m, mask=row_in, other=float("inf")) * LOG2E_C
    delta = tl.load(DELTA + (b * H + h) * T_Q + offs_m, mask=row_in, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, svt, 0, tl.where(active, start_m, 0), len_q,
                       offs_m, offs_d, qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, svt, start_m,
                       tl.minimum(start_m + BLOCK_M, len_q), len_q, offs_m, offs_d, qk_scale, 2,
                       HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    else:
        full = tl.where(active, (len_q // BLOCK_N) * BLOCK_N, 0)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, svt, 0, full, len_q, offs_m, offs_d,
                       qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
        dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, skt, svt, full, tl.where(active, len_q, 0), len_q,
                       offs_m, offs_d, qk_scale, 1, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    if READ_OTHER:
        len_k2 = tl.load(LEN_K2 + b)
        k2_base = K2 + b * sk2b + hk * sk2h
        v2_base = V2 + b * sv2b + hk * sv2h
        full = tl.where(active, (len_k2 // BLOCK_N) * BLOCK_N, 0)
        dq = _dq_inner(dq, q, do, lse2, delta, k2_base, v2_base, sk2t, sv2t, 0, full, len_k2, offs_m, offs_d,
                       qk_scale, 0, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
        dq = _dq_inner(dq, q, do, lse2, delta, k2_base, v2_base, sk2t, sv2t, full, tl.where(active, len_k2, 0),
                       len_k2, offs_m, offs_d, qk_scale, 1, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, PREC)
    # rows past len: lse = +inf made p = 0, so dq is already 0 there
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             cast_out(dq * sm_scale, DQ.dtype.element_ty, UPCAST), mask=mask)


# ----------------------------------------------------------------------------- launch configs

# Under the interpreter the kernels run as Python/NumPy: no autotuning, small fixed tiles chosen so
# that tests with odd lengths cross full, diagonal and partial blocks (BLOCK_M != BLOCK_N on purpose).
INTERPRET = type(_mmsa_fwd).__name__ == "InterpretedFunction"
INTERPRET_BLOCKS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}  # (BLOCK_M, BLOCK_N)


# forward and dQ: BLOCK_M % BLOCK_N == 0 (causal diagonal); dK/dV: BLOCK_N % BLOCK_M == 0.
# Candidates chosen by compiling for sm_90 (bf16, D=128, all switches on); aligned launches spill in a
# few dK/dV ones only: tests/triton_sm90.py prints registers and stack of each, aligned and unaligned.
_FWD_CONFIGS = configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)])
_DKDV_CONFIGS = configs([(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3)])
_DQ_CONFIGS = configs([(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)])
_KEY = ["T_Q", "HEAD_DIM", "CAUSAL", "READ_OTHER"]
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY)(_mmsa_fwd)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY)(_mmsa_bwd_dq)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=["T_K", "T_Q2", "HEAD_DIM", "CAUSAL", "OTHER_READS",
                                                  "OWN_READS"])(_mmsa_bwd_dkdv)
_FIXED = {"fwd": _FWD_CONFIGS[-1], "dkdv": _DKDV_CONFIGS[-1], "dq": _DQ_CONFIGS[-1]}


_launch = KernelLauncher(INTERPRET, INTERPRET_BLOCKS, _FIXED)


def _common_meta(q: Tensor) -> dict:
    return head_meta(q, INTERPRET)


# ----------------------------------------------------------------------------- launchers


def _fwd_stream(q, k, v, k2, v2, len_q, len_k2, causal: bool, read_other: bool, scale: float):
    """O (B, T, H, D) in q's dtype and LSE (B, H, T) fp32 for one query stream."""
    B, T, H, D = q.shape
    o = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_fwd_tuned, _mmsa_fwd, "fwd", grid, q, k, v, k2, v2, o, lse, len_q, len_k2, scale * LOG2E, T, H,
            H // k.shape[2], *strides3(q), *strides3(k), *strides3(v), *strides3(k2), *strides3(v2), *strides3(o),
            CAUSAL=causal, READ_OTHER=read_other, **_common_meta(q))
    return o, lse


def _delta(o, do, dlse):
    B, T, H, D = o.shape
    delta = torch.empty((B, H, T), dtype=torch.float32, device=o.device)
    if T:
        meta = _common_meta(o)
        _bwd_preprocess[(triton.cdiv(T, 64), B * H)](
            o, do, dlse if dlse is not None else delta, delta, T, H, *strides3(o), *strides3(do),
            HAS_DLSE=dlse is not None, HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=64)
    return delta


def _dkdv_stream(own, other, k, v, len_k, len_q2, causal: bool, other_reads: bool, scale: float):
    """dK, dV (B, Tk, Hkv, D) of one key stream. own/other: (q, do, lse, delta) of the query streams;
    own q with no rows (B, 0, H, D) while Tk > 0: a key-only stream, read by the other stream only."""
    B, T, Hkv, D = k.shape
    q, do, lse, delta = own
    q2, do2, lse2, delta2 = other
    H = q.shape[2]
    group = H // Hkv
    # per query head: the final tensors (Hkv = H), or fp32 partials summed over each group below
    shape, dtype = ((B, T, H, D), torch.float32) if group > 1 else ((B, T, Hkv, D), k.dtype)
    dk = torch.empty(shape, dtype=dtype, device=k.device)
    dv = torch.empty_like(dk)
    if T:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)  # noqa: E731
        _launch(_dkdv_tuned, _mmsa_bwd_dkdv, "dkdv", grid, q, do, lse, delta, q2, do2, lse2, delta2, k, v, dk,
                dv, len_k, len_q2, scale * LOG2E, scale, T, q2.shape[1], H, group,
                *strides3(q), *strides3(do), *strides3(q2), *strides3(do2), *strides3(k), *strides3(v), *strides3(dk),
                CAUSAL=causal, OTHER_READS=other_reads, OWN_READS=q.shape[1] > 0, **_common_meta(q))
    if group > 1:  # (B, T, Hkv, group, D) -> (B, T, Hkv, D): fixed-order sum, deterministic
        dk = dk.view(B, T, Hkv, group, D).sum(3).to(k.dtype)
        dv = dv.view(B, T, Hkv, group, D).sum(3).to(k.dtype)
    return dk, dv


def _dq_stream(q, do, lse, delta, k, v, k2, v2, len_q, len_k2, causal: bool, read_other: bool, scale: float):
    B, T, H, D = q.shape
    dq = torch.empty((B, T, H, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return dq
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _launch(_dq_tuned, _mmsa_bwd_dq, "dq", grid, q, do, lse, delta, k, v, k2, v2, dq, len_q, len_k2,
            scale * LOG2E, scale, T, H, H // k.shape[2],
            *strides3(q), *strides3(do), *strides3(k), *strides3(v), *strides3(k2), *strides3(v2), *strides3(dq),
            CAUSAL=causal, READ_OTHER=read_other, **_common_meta(q))
    return dq


# ----------------------------------------------------------------------------- torch.library ops
# Absent streams arrive as (B, 0, H, D) tensors with their switches off; lengths are int32 (B,).


@torch.library.custom_op("unigendet::mmsa_attention_fwd", mutates_args=())
def mmsa_attention_fwd(q_g: Tensor, k_g: Tensor, v_g: Tensor, q_d: Tensor, k_d: Tensor, v_d: Tensor,
                       len_g: Tensor, len_d: Tensor, g2d: bool, d2g: bool, g_causal: bool, d_causal: bool,
                       scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (o_g, o_d, lse_g, lse_d): outputs (B, T, H, D) contiguous, lse (B, H, T) fp32."""
    q_g, k_g, v_g, q_d, k_d, v_d = map(unit_last, (q_g, k_g, v_g, q_d, k_d, v_d))
    with device_guard(q_g):
        o_g, lse_g = _fwd_stream(q_g, k_g, v_g, k_d, v_d, len_g, len_d, g_causal, g2d, scale)
        o_d, lse_d = _fwd_stream(q_d, k_d, v_d, k_g, v_g, len_d, len_g, d_causal, d2g, scale)
    return o_g, o_d, lse_g, lse_d


@mmsa_attention_fwd.register_fake
def _(q_g, k_g, v_g, q_d, k_d, v_d, len_g, len_d, g2d, d2g, g_causal, d_causal, scale):
    B, Tg, H, _ = q_g.shape
    Td = q_d.shape[1]
    return (q_g.new_empty(q_g.shape), q_d.new_empty(q_d.shape),
            q_g.new_empty((B, H, Tg), dtype=torch.float32), q_d.new_empty((B, H, Td), dtype=torch.float32))


@torch.library.custom_op("unigendet::mmsa_attention_bwd", mutates_args=())
def mmsa_attention_bwd(do_g: Tensor, do_d: Tensor, dlse_g: Tensor | None, dlse_d: Tensor | None,
                       q_g: Tensor, k_g: Tensor, v_g: Tensor, q_d: Tensor, k_d: Tensor, v_d: Tensor,
                       o_g: Tensor, o_d: Tensor, lse_g: Tensor, lse_d: Tensor, len_g: Tensor, len_d: Tensor,
                       g2d: bool, d2g: bool, g_causal: bool, d_causal: bool,
                       scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq_g, dk_g, dv_g, dq_d, dk_d, dv_d); deterministic (no atomics)."""
    q_g, k_g, v_g, q_d, k_d, v_d, do_g, do_d = map(unit_last, (q_g, k_g, v_g, q_d, k_d, v_d, do_g, do_d))
    dlse_g = None if dlse_g is None else dlse_g.contiguous()
    dlse_d = None if dlse_d is None else dlse_d.contiguous()
    with device_guard(q_g):
        delta_g, delta_d = _delta(o_g, do_g, dlse_g), _delta(o_d, do_d, dlse_d)
        qs_g, qs_d = (q_g, do_g, lse_g, delta_g), (q_d, do_d, lse_d, delta_d)
        dk_g, dv_g = _dkdv_stream(qs_g, qs_d, k_g, v_g, len_g, len_d, g_causal, d2g, scale)
        dk_d, dv_d = _dkdv_stream(qs_d, qs_g, k_d, v_d, len_d, len_g, d_causal, g2d, scale)
        dq_g = _dq_stream(*qs_g, k_g, v_g, k_d, v_d, len_g, len_d, g_causal, g2d, scale)
        dq_d = _dq_stream(*qs_d, k_d, v_d, k_g, v_g, len_d, len_g, d_causal, d2g, scale)
    return dq_g, dk_g, dv_g, dq_d, dk_d, dv_d


@mmsa_attention_bwd.register_fake
def _(do_g, do_d, dlse_g, dlse_d, q_g, k_g, v_g, q_d, k_d, v_d, *rest):
    return tuple(x.new_empty(x.shape) for x in (q_g, k_g, v_g, q_d, k_d, v_d))


def _setup_context(ctx, inputs, output):
    *tensors, g2d, d2g, g_causal, d_causal, scale = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.flags = (g2d, d2g, g_causal, d_causal, scale)


def _backward(ctx, do_g, do_d, dlse_g, dlse_d):
    q_g, k_g, v_g, q_d, k_d, v_d, len_g, len_d, o_g, o_d, lse_g, lse_d = ctx.saved_tensors
    grads = mmsa_attention_bwd(do_g, do_d, dlse_g, dlse_d, q_g, k_g, v_g, q_d, k_d, v_d, o_g, o_d, lse_g, lse_d,
                               len_g, len_d, *ctx.flags)
    return (*grads, None, None, None, None, None, None, None)


mmsa_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry


def mmsa_attention_triton(q_g, k_g, v_g, q_d, k_d, v_d, *, g2d: bool = True, d2g: bool = True,
                          g_causal: bool = False, d_causal: bool = False, len_g: Tensor | None = None,
                          len_d: Tensor | None = None, scale: float | None = None,
                          return_lse: bool = False, deterministic: bool = True):
    """MMSA with the Triton kernels; same contract as `ops.reference.mmsa_attention_ref`.

    q_*: (B, T*, H, D); k_*, v_*: (B, T*, Hkv, D); a stream may be absent (its triple None) or
    key-only (q None; it runs as a stream with no query rows: its dK/dV come from the other stream's
    queries alone). Returns (o_g, o_d) (None for a stream without queries), with return_lse also (lse_g, lse_d), each
    (B, H, T*) fp32 and differentiable; lse is +inf on padded query rows. `deterministic` is
    accepted for API parity: the backward never uses atomics, so it is always deterministic.
    """
    del deterministic  # always honoured (module docstring)
    ref = q_g if q_g is not None else q_d
    rk = k_g if q_g is not None else k_d
    B, _, H, D = ref.shape
    has_g, has_d = q_g is not None, q_d is not None  # query rows
    keys_g, keys_d = k_g is not None, k_d is not None  # keys (a key-only stream has these only)
    empty = lambda: (ref.new_empty((B, 0, H, D)), rk.new_empty((B, 0) + rk.shape[2:]),  # noqa: E731
                     rk.new_empty((B, 0) + rk.shape[2:]))  # an absent stream: T = 0, its switches off
    if not keys_g:
        q_g, k_g, v_g = empty()
    elif not has_g:
        q_g = ref.new_empty((B, 0, H, D))  # key-only: (B, Tg, Hkv, D) keys, no query rows
    if not keys_d:
        q_d, k_d, v_d = empty()
    elif not has_d:
        q_d = ref.new_empty((B, 0, H, D))
    sc = float(D ** -0.5 if scale is None else scale)
    # a cross switch is on only when its query stream has rows and the other stream has keys
    o_g, o_d, lse_g, lse_d = mmsa_attention_fwd(
        q_g, k_g, v_g, q_d, k_d, v_d, valid_lengths(len_g, B, k_g.shape[1], ref.device),
        valid_lengths(len_d, B, k_d.shape[1], ref.device), bool(g2d and has_g and keys_d),
        bool(d2g and has_d and keys_g), bool(g_causal), bool(d_causal), sc)
    outs = (o_g if has_g else None, o_d if has_d else None)
    if return_lse:
        return outs + (lse_g if has_g else None, lse_d if has_d else None)
    return outs
