// CPU kernels of mmsa_attention: the two-stream joint softmax attention, forward and backward.
//
// One call sees up to two query streams (rows [G; D]) and up to two key streams (columns [G; D]); a
// query row of stream s reads at most two contiguous column ranges: its own stream's keys (up to
// len_s, and up to itself when s is causal) and the other stream's keys (up to its len) when the
// switch allows. The scores of a block of query rows against every key column are materialised in a
// task-local buffer (the key count is a few hundred on CPU; the op's check refuses long sequences), so
// each product is one small matrix product done by one register-blocked micro-kernel:
//   forward,  task (b, h, block of rows):  S = Q K^T, P = exp(scale S - max), O = P V / sum, lse;
//   backward, task (b, kv head):           for each query head of the group, all rows at once:
//     P = exp(scale S - lse), dP = dO V^T, dS = scale P (dP - delta + dlse), dQ = dS K,
//     dV += P^T dO, dK += dS^T Q,
// so dK and dV of a kv head are summed by one task (no atomics, bitwise reproducible). K and V are
// packed once per (b, kv head) in the accumulation type: K^T (D x Np) for the score products, V (Np x
// Dp) for P V; Np, Dp: the key count and head dim rounded up to whole vectors, the padding zero.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <limits>
#include <vector>

#include "vec_io.h"

namespace unigendet {
namespace cpu {

// One stream of a call. Inputs have unit stride along D; outputs are contiguous.
template <typename T>
struct AttnStream {
  using A = acc_t<T>;
  const T* q = nullptr;  // (B, tq, H, D), strides q_s[0..2] for b, t, h; null: no queries
  int64_t tq = 0, q_s[3] = {0, 0, 0};
  const T* k = nullptr;  // (B, tk, Hkv, D); null: no keys
  const T* v = nullptr;
  int64_t tk = 0, k_s[3] = {0, 0, 0}, v_s[3] = {0, 0, 0};
  const int64_t* lens = nullptr;  // (B,) valid length, or null (all valid)
  bool causal = false;
  T* o = nullptr;  // forward: (B, tq, H, D); backward: the saved output (read)
  A* lse = nullptr;  // (B, H, tq); backward: read
  const T* dout = nullptr;  // backward: (B, tq, H, D) contiguous
  const A* dlse = nullptr;  // backward: (B, H, tq) or null
  T* dq = nullptr;  // backward outputs: (B, tq, H, D), (B, tk, Hkv, D) contiguous
  T* dk = nullptr;
  T* dv = nullptr;
};

template <typename T>
struct AttnProblem {
  int64_t B = 0, H = 0, Hkv = 0, D = 0;
  double scale = 1.0;
  bool reads[2][2] = {{true, true}, {true, true}};  // reads[s][o]: queries of s read keys of o
  AttnStream<T> s[2];
};

// ------------------------------------------------------------------ micro-kernel
// The identity epilogue: a product's results are stored as they are.
struct NoEpilogue {
  template <typename V>
  V operator()(int64_t, int64_t, const V& x) const { return x; }
};

// C (m x n) (+)= A (m x K) . B (K x n): A's element (r, k) at a[r * ars + k * aks] (so A may be read
// transposed), B row-major with leading dimension ldb, n a multiple of the vector width. MR rows by NV
// vectors of accumulators stay in registers over the whole K loop; epi(row, column, x) maps each result
// vector (row and column relative to the product's C) before it is stored.
template <typename A, int MR, int NV, bool ACC, typename Epi>
inline void micro_kernel(const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb, A* c, int64_t ldc,
                         int64_t K, int64_t row0, int64_t col0, const Epi& epi) {
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  V acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = ACC ? V::loadu(c + r * ldc + j * W) : V(A(0));
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = V::loadu(b + k * ldb + j * W);
    for (int r = 0; r < MR; ++r) {
      const V ar(a[r * ars + k * aks]);
      for (int j = 0; j < NV; ++j) acc[r][j] = at::vec::fmadd(ar, bv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NV; ++j) epi(row0 + r, col0 + j * W, acc[r][j]).store(c + r * ldc + j * W);
}

template <typename A, int MR, bool ACC, typename Epi>
inline void micro_row(int nv, const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb, A* c, int64_t ldc,
                      int64_t K, int64_t row0, int64_t col0, const Epi& epi) {
  switch (nv) {
    case 1: return micro_kernel<A, MR, 1, ACC>(a, ars, aks, b, ldb, c, ldc, K, row0, col0, epi);
    case 2: return micro_kernel<A, MR, 2, ACC>(a, ars, aks, b, ldb, c, ldc, K, row0, col0, epi);
    default: return micro_kernel<A, MR, 3, ACC>(a, ars, aks, b, ldb, c, ldc, K, row0, col0, epi);
  }
}

// The whole product, tiled by 4 rows x 3 vectors (12 accumulators of the 16 AVX2 registers).
template <typename A, bool ACC, typename Epi = NoEpilogue>
void gemm(int64_t m, int64_t n, int64_t K, const A* a, int64_t ars, int64_t aks, const A* b, int64_t ldb, A* c,
          int64_t ldc, const Epi& epi = Epi()) {
  constexpr int64_t W = at::vec::Vectorized<A>::size();
  constexpr int MR = 4, NV = 3;
  const int64_t nvec = n / W;
  for (int64_t j = 0; j < nvec; j += NV) {
    const int nv = static_cast<int>(std::min<int64_t>(NV, nvec - j));
    const A* bj = b + j * W;
    A* cj = c + j * W;
    int64_t r = 0;
    for (; r + MR <= m; r += MR)
      micro_row<A, MR, ACC>(nv, a + r * ars, ars, aks, bj, ldb, cj + r * ldc, ldc, K, r, j * W, epi);
    switch (m - r) {
      case 1: micro_row<A, 1, ACC>(nv, a + r * ars, ars, aks, bj, ldb, cj + r * ldc, ldc, K, r, j * W, epi); break;
      case 2: micro_row<A, 2, ACC>(nv, a + r * ars, ars, aks, bj, ldb, cj + r * ldc, ldc, K, r, j * W, epi); break;
      case 3: micro_row<A, 3, ACC>(nv, a + r * ars, ars, aks, bj, ldb, cj + r * ldc, ldc, K, r, j * W, epi); break;
      default: break;
    }
  }
}

// ------------------------------------------------------------------ geometry of a call
inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

struct KeyRanges {
  int n = 0;
  int64_t lo[2], hi[2];  // sorted, disjoint column ranges [lo, hi)
  int64_t end() const { return n ? hi[n - 1] : 0; }
};

template <typename T>
struct AttnGeometry {
  int64_t M, N, Np, Dp, koff[2], roff[2];
  explicit AttnGeometry(const AttnProblem<T>& p) {
    constexpr int64_t W = lanes<T>();
    roff[0] = 0;
    roff[1] = p.s[0].tq;
    M = p.s[0].tq + p.s[1].tq;
    koff[0] = 0;
    koff[1] = p.s[0].tk;
    N = p.s[0].tk + p.s[1].tk;
    Np = round_up(std::max<int64_t>(N, 1), W);
    Dp = round_up(p.D, W);
  }
  // query row r of the call -> (stream, index in the stream)
  std::pair<int, int64_t> row(int64_t r) const {
    return r < roff[1] ? std::pair<int, int64_t>{0, r} : std::pair<int, int64_t>{1, r - roff[1]};
  }
};

template <typename T>
inline KeyRanges key_ranges(const AttnProblem<T>& p, const AttnGeometry<T>& g, int64_t b, int s, int64_t i) {
  KeyRanges kr;
  for (int o = 0; o < 2; ++o) {
    const auto& so = p.s[o];
    if (so.tk == 0 || !p.reads[s][o]) continue;
    int64_t e = so.lens ? so.lens[b] : so.tk;
    if (o == s && so.causal) e = std::min<int64_t>(e, i + 1);
    if (e <= 0) continue;
    kr.lo[kr.n] = g.koff[o];
    kr.hi[kr.n] = g.koff[o] + e;
    ++kr.n;
  }
  return kr;
}

template <typename T>
inline bool row_valid(const AttnProblem<T>& p, int s, int64_t b, int64_t i) {
  return p.s[s].lens == nullptr || i < p.s[s].lens[b];
}

// Zero a row's columns [0, Np) outside its ranges.
template <typename A>
inline void zero_gaps(A* row, const KeyRanges& kr, int64_t Np) {
  int64_t c = 0;
  for (int t = 0; t < kr.n; ++t) {
    std::fill(row + c, row + kr.lo[t], A(0));
    c = kr.hi[t];
  }
  std::fill(row + c, row + Np, A(0));
}

// K or V of kv head (b, hk), key columns [G keys; D keys], in the accumulation type: as rows (Np x Dp)
// or, transposed, as K^T / V^T (D x Np); padding rows and columns zero.
template <typename T, typename A = acc_t<T>>
void pack_keys(const AttnProblem<T>& p, const AttnGeometry<T>& g, int64_t b, int64_t hk, bool values,
               bool transposed, A* out) {
  const int64_t key_step = transposed ? 1 : g.Dp, dim_step = transposed ? g.Np : 1;
  std::fill(out, out + g.Np * (transposed ? p.D : g.Dp), A(0));
  for (int o = 0; o < 2; ++o) {
    const auto& so = p.s[o];
    if (so.tk == 0) continue;
    const T* base = values ? so.v : so.k;
    const int64_t* st = values ? so.v_s : so.k_s;
    for (int64_t j = 0; j < so.tk; ++j) {
      const T* src = base + b * st[0] + j * st[1] + hk * st[2];
      A* dst = out + (g.koff[o] + j) * key_step;
      for (int64_t d = 0; d < p.D; ++d) dst[d * dim_step] = static_cast<A>(src[d]);
    }
  }
}

// Rows [r0, r1) of a (B, tq, H, D) tensor of the query streams (x: q when null, else the given per-stream
// contiguous tensors), head h, into out (rows x Dp) in the accumulation type; rows with zero_invalid and
// an index past len are zero.
template <typename T, typename A = acc_t<T>>
void pack_rows(const AttnProblem<T>& p, const AttnGeometry<T>& g, int64_t b, int64_t h, int64_t r0, int64_t r1,
               const T* const* contiguous, bool zero_invalid, A* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const auto [s, i] = g.row(r);
    A* dst = out + (r - r0) * g.Dp;
    std::fill(dst, dst + g.Dp, A(0));
    if (zero_invalid && !row_valid(p, s, b, i)) continue;
    const auto& ss = p.s[s];
    const T* src = contiguous ? contiguous[s] + ((b * ss.tq + i) * p.H + h) * p.D
                              : ss.q + b * ss.q_s[0] + i * ss.q_s[1] + h * ss.q_s[2];
    for (int64_t d = 0; d < p.D; ++d) dst[d] = static_cast<A>(src[d]);
  }
}

// 2^t for fp32 lanes, t <= 128 (the softmax arguments are <= 0 up to rounding): t = n + f with n the nearest
// integer (the 1.5 * 2^23 rounding constant, which also leaves n + 127 in the low bits: the exponent field
// of 2^n after a shift by 23) and |f| <= 1/2, 2^f by a degree-6 polynomial (fitted for relative error on
// the interval: under 2 ulp in fp32 arithmetic, against 4 for the Taylor coefficients). t is clamped to
// [-127, 128]: below, the result is 0 (the smallest normal is 2^-126); 128 gives inf; NaN stays NaN.
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
inline at::vec::Vectorized<float> exp2_f32(const at::vec::Vectorized<float>& x) {
  // max/min return their second operand when one is NaN: a NaN argument stays NaN
  const __m256 t = _mm256_min_ps(_mm256_set1_ps(128.f), _mm256_max_ps(_mm256_set1_ps(-127.f), x));
  const __m256 magic = _mm256_set1_ps(12582912.f + 127.f);  // 1.5 * 2^23 + exponent bias
  const __m256 y = _mm256_add_ps(t, magic);
  const __m256 f = _mm256_sub_ps(t, _mm256_sub_ps(y, magic));
  __m256 p = _mm256_set1_ps(1.5345806605182588e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399930903688073e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618489071726799e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328642129898e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646248340607e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471824645996e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(y), 23));
  return _mm256_mul_ps(p, two_n);
}
#else
inline at::vec::Vectorized<float> exp2_f32(const at::vec::Vectorized<float>& x) {
  return (x * at::vec::Vectorized<float>(0.69314718055994531f)).exp_u20();
}
#endif

// exp(scale x - m) of a vector of scores x and a row's shift m (the row max, or its lse). fp32: computed as
// 2^(x c - m'), c = scale log2(e) and m' = m log2(e) folded once (one fma and exp2_f32 per vector); fp64
// (gradcheck): at::vec's accurate exp of scale x - m.
template <typename A>
struct ScaledExp {
  using V = at::vec::Vectorized<A>;
  static constexpr bool kBase2 = std::is_same_v<A, float>;
  static constexpr double kLog2e = 1.4426950408889634;
  V mul;
  explicit ScaledExp(double scale) : mul(static_cast<A>(kBase2 ? scale * kLog2e : scale)) {}
  A shift(A m) const { return static_cast<A>(kBase2 ? m * kLog2e : m); }
  V operator()(const V& x, const V& shift) const {
    if constexpr (kBase2) {
      return exp2_f32(at::vec::fmsub(x, mul, shift));
    } else {
      return at::vec::fmsub(x, mul, shift).exp();
    }
  }
};

// ------------------------------------------------------------------ forward
constexpr int64_t kFwdRows = 32;  // query rows per forward task

template <typename T>
void mmsa_attention_fwd(const AttnProblem<T>& p) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const AttnGeometry<T> g(p);
  const int64_t group = p.H / p.Hkv, D = p.D, Np = g.Np, Dp = g.Dp;
  const A scale = static_cast<A>(p.scale);
  const ScaledExp<A> sexp(p.scale);
  // packed K^T and V per (b, kv head)
  const int64_t per_head = D * Np + Np * Dp;
  std::vector<A> packed(p.B * p.Hkv * per_head);
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      A* base = packed.data() + t * per_head;
      pack_keys(p, g, t / p.Hkv, t % p.Hkv, false, true, base);
      pack_keys(p, g, t / p.Hkv, t % p.Hkv, true, false, base + D * Np);
    }
  });
  const int64_t blocks = (g.M + kFwdRows - 1) / kFwdRows;
  at::parallel_for(0, p.B * p.H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> qbuf(kFwdRows * Dp), sbuf(kFwdRows * Np), obuf(kFwdRows * Dp);
    std::vector<KeyRanges> ranges(kFwdRows);
    std::vector<A> inv(kFwdRows);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (p.H * blocks), h = (t / blocks) % p.H, blk = t % blocks;
      const int64_t r0 = blk * kFwdRows, r1 = std::min(g.M, r0 + kFwdRows), m = r1 - r0;
      const A* kt = packed.data() + (b * p.Hkv + h / group) * per_head;
      const A* vp = kt + D * Np;
      pack_rows<T>(p, g, b, h, r0, r1, nullptr, false, qbuf.data());
      gemm<A, false>(m, Np, D, qbuf.data(), Dp, 1, kt, Np, sbuf.data(), Np);
      int64_t kmax = 0;
      for (int64_t r = 0; r < m; ++r) {
        const auto [s, i] = g.row(r0 + r);
        const KeyRanges kr = key_ranges(p, g, b, s, i);
        ranges[r] = kr;
        kmax = std::max(kmax, kr.end());
        A* row = sbuf.data() + r * Np;
        // max of scale S over the row's ranges, then e = exp(scale S - max) in place and its sum: full
        // vectors two at a time (independent chains), a range's last partial vector masked
        const V vsc(scale), ninf(-std::numeric_limits<A>::infinity());
        V vmax0(ninf), vmax1(ninf);
        for (int tr = 0; tr < kr.n; ++tr) {
          const int64_t hi = kr.hi[tr];
          int64_t c = kr.lo[tr];
          for (; c + 2 * W <= hi; c += 2 * W) {
            vmax0 = at::vec::maximum(vmax0, V::loadu(row + c) * vsc);
            vmax1 = at::vec::maximum(vmax1, V::loadu(row + c + W) * vsc);
          }
          if (c + W <= hi) {
            vmax0 = at::vec::maximum(vmax0, V::loadu(row + c) * vsc);
            c += W;
          }
          if (c < hi) vmax1 = at::vec::maximum(vmax1, V::set(ninf, V::loadu(row + c, hi - c) * vsc, hi - c));
        }
        const A mx = at::vec::vec_reduce_all<A>([](V& a, V& bb) { return at::vec::maximum(a, bb); },
                                                at::vec::maximum(vmax0, vmax1));
        V vsum0(A(0)), vsum1(A(0));
        const V vmx(sexp.shift(mx));
        for (int tr = 0; tr < kr.n; ++tr) {
          const int64_t hi = kr.hi[tr];
          int64_t c = kr.lo[tr];
          for (; c + 2 * W <= hi; c += 2 * W) {
            const V e0 = sexp(V::loadu(row + c), vmx), e1 = sexp(V::loadu(row + c + W), vmx);
            e0.store(row + c);
            e1.store(row + c + W);
            vsum0 = vsum0 + e0;
            vsum1 = vsum1 + e1;
          }
          if (c + W <= hi) {
            const V e = sexp(V::loadu(row + c), vmx);
            e.store(row + c);
            vsum0 = vsum0 + e;
            c += W;
          }
          if (c < hi) {
            const int64_t n = hi - c;
            const V e = V::set(V(A(0)), sexp(V::loadu(row + c, n), vmx), n);
            e.store(row + c, n);
            vsum1 = vsum1 + e;
          }
        }
        const V vsum = vsum0 + vsum1;
        zero_gaps(row, kr, Np);
        const A sum = hsum(vsum);
        inv[r] = A(1) / sum;
        p.s[s].lse[(b * p.H + h) * p.s[s].tq + i] = mx + std::log(sum);
      }
      gemm<A, false>(m, Dp, kmax, sbuf.data(), Np, 1, vp, Dp, obuf.data(), Dp);
      for (int64_t r = 0; r < m; ++r) {
        const auto [s, i] = g.row(r0 + r);
        const auto& ss = p.s[s];
        T* dst = ss.o + ((b * ss.tq + i) * p.H + h) * D;
        const V f(row_valid(p, s, b, i) ? inv[r] : A(0));
        for (int64_t d = 0; d < D; d += W) {
          const int64_t n = std::min<int64_t>(W, D - d);
          store_acc(dst + d, V::loadu(obuf.data() + r * Dp + d) * f, n);
        }
      }
    }
  });
}

// ------------------------------------------------------------------ backward
template <typename T>
void mmsa_attention_bwd(const AttnProblem<T>& p) {
  using A = acc_t<T>;
  using V = at::vec::Vectorized<A>;
  constexpr int64_t W = V::size();
  const AttnGeometry<T> g(p);
  const int64_t group = p.H / p.Hkv, D = p.D, Np = g.Np, Dp = g.Dp, M = g.M;
  const A scale = static_cast<A>(p.scale);
  const ScaledExp<A> sexp(p.scale);
  const T* douts[2] = {p.s[0].dout, p.s[1].dout};
  const T* outs[2] = {p.s[0].o, p.s[1].o};
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> kt(D * Np), vt(D * Np), kp(Np * Dp), dk(Np * Dp), dv(Np * Dp);
    std::vector<A> qp(M * Dp), dop(M * Dp), op(M * Dp), sb(M * Np), dpb(M * Np), dq(M * Dp);
    std::vector<KeyRanges> ranges(M);
    std::vector<A> lrow(M), shift(M);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / p.Hkv, hk = t % p.Hkv;
      pack_keys(p, g, b, hk, false, true, kt.data());
      pack_keys(p, g, b, hk, true, true, vt.data());
      pack_keys(p, g, b, hk, false, false, kp.data());
      std::fill(dk.begin(), dk.end(), A(0));
      std::fill(dv.begin(), dv.end(), A(0));
      int64_t kmax = 0;
      for (int64_t r = 0; r < M; ++r) {
        const auto [s, i] = g.row(r);
        ranges[r] = key_ranges(p, g, b, s, i);
        kmax = std::max(kmax, ranges[r].end());
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        pack_rows<T>(p, g, b, h, 0, M, nullptr, false, qp.data());
        pack_rows<T>(p, g, b, h, 0, M, douts, true, dop.data());
        pack_rows<T>(p, g, b, h, 0, M, outs, true, op.data());
        for (int64_t r = 0; r < M; ++r) {  // lse and shift = delta - dlse of each row
          const auto [s, i] = g.row(r);
          const auto& ss = p.s[s];
          const int64_t li = (b * p.H + h) * ss.tq + i;
          V vdelta(A(0));
          for (int64_t d = 0; d < Dp; d += W)
            vdelta = at::vec::fmadd(V::loadu(dop.data() + r * Dp + d), V::loadu(op.data() + r * Dp + d), vdelta);
          lrow[r] = sexp.shift(ss.lse[li]);
          shift[r] = hsum(vdelta) - (ss.dlse ? ss.dlse[li] : A(0));
        }
        // P = exp(scale S - lse), S = Q K^T; then dS = scale P (dP - shift), dP = dO V^T (columns a row does
        // not read are zeroed after)
        const V vs(scale);
        gemm<A, false>(M, Np, D, qp.data(), Dp, 1, kt.data(), Np, sb.data(), Np,
                       [&](int64_t r, int64_t, const V& x) { return sexp(x, V(lrow[r])); });
        gemm<A, false>(M, Np, D, dop.data(), Dp, 1, vt.data(), Np, dpb.data(), Np,
                       [&](int64_t r, int64_t c, const V& x) {
                         return V::loadu(sb.data() + r * Np + c) * (x - V(shift[r])) * vs;
                       });
        for (int64_t r = 0; r < M; ++r) {
          zero_gaps(sb.data() + r * Np, ranges[r], Np);
          zero_gaps(dpb.data() + r * Np, ranges[r], Np);
        }
        gemm<A, true>(Np, Dp, M, sb.data(), 1, Np, dop.data(), Dp, dv.data(), Dp);    // dV += P^T dO
        gemm<A, true>(Np, Dp, M, dpb.data(), 1, Np, qp.data(), Dp, dk.data(), Dp);    // dK += dS^T Q
        gemm<A, false>(M, Dp, kmax, dpb.data(), Np, 1, kp.data(), Dp, dq.data(), Dp);  // dQ = dS K
        for (int64_t r = 0; r < M; ++r) {
          const auto [s, i] = g.row(r);
          const auto& ss = p.s[s];
          T* dst = ss.dq + ((b * ss.tq + i) * p.H + h) * D;
          for (int64_t d = 0; d < D; d += W)
            store_acc(dst + d, V::loadu(dq.data() + r * Dp + d), std::min<int64_t>(W, D - d));
        }
      }
      for (int o = 0; o < 2; ++o) {
        const auto& so = p.s[o];
        for (int64_t j = 0; j < so.tk; ++j) {
          const int64_t off = ((b * so.tk + j) * p.Hkv + hk) * D;
          const A* sk = dk.data() + (g.koff[o] + j) * Dp;
          const A* sv = dv.data() + (g.koff[o] + j) * Dp;
          for (int64_t d = 0; d < D; d += W) {
            const int64_t n = std::min<int64_t>(W, D - d);
            store_acc(so.dk + off + d, V::loadu(sk + d), n);
            store_acc(so.dv + off + d, V::loadu(sv + d), n);
          }
        }
      }
    }
  });
}

}  // namespace cpu
}  // namespace unigendet
