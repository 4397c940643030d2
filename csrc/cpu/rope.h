// CPU kernels of rmsnorm_rope: RMSNorm over the head dimension D, then rotate-half RoPE, for one of
// q or k. Rows are (b, t, h); the input may be a strided view (e.g. q split out of a fused qkv
// projection): only unit stride along D is required. Output and gradients are contiguous.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vec_io.h"

namespace unigendet {
namespace cpu {

struct RopeShape {
  int64_t batch, seq, heads, head_dim;
  int64_t stride_b, stride_t, stride_h;  // of the input x, in elements
  int64_t rows() const { return batch * seq * heads; }
};

// Walks rows r = (b * seq + t) * heads + h in order from a starting row, keeping (b, t, h) without
// integer divisions per row (they cost as much as the arithmetic of a D = 64 row).
struct RowCursor {
  const RopeShape& s;
  int64_t b, t, h;
  RowCursor(const RopeShape& shape, int64_t row)
      : s(shape), b(row / (shape.heads * shape.seq)), t((row / shape.heads) % shape.seq), h(row % shape.heads) {}
  int64_t offset() const { return b * s.stride_b + t * s.stride_t + h * s.stride_h; }  // of x, in elements
  void next() {
    if (++h == s.heads) {
      h = 0;
      if (++t == s.seq) {
        t = 0;
        ++b;
      }
    }
  }
};

// x: strided (B, T, H, D); weight (D,), cos/sin (T, D/2) fp32; out contiguous; rstd (B*T*H,) fp32.
template <typename T, typename A = acc_t<T>>
void rmsnorm_rope_fwd(const T* x, const RopeShape& s, const A* weight, const A* cos,
                      const A* sin, T* out, A* rstd, float eps) {
  using V = AccVec<T>;
  constexpr int64_t kV = lanes<T>();
  const int64_t D = s.head_dim, half = D / 2;
  const bool nt = use_stream_stores(s.rows() * D * int64_t(sizeof(T)));
  at::parallel_for(0, s.rows(), row_grain(D), [&](int64_t begin, int64_t end) {
    RowCursor cur(s, begin);
    for (int64_t r = begin; r < end; ++r, cur.next()) {
      const T* xr = x + cur.offset();
      V sq(A(0));
      for (int64_t j = 0; j < D; j += kV) {
        const V v = load_acc(xr + j, std::min<int64_t>(kV, D - j));
        sq = at::vec::fmadd(v, v, sq);
      }
      const A inv = A(1) / std::sqrt(hsum(sq) / static_cast<A>(D) + eps);
      rstd[r] = inv;
      const V vinv(inv);
      const A* c = cos + cur.t * half;
      const A* sn = sin + cur.t * half;
      T* o = out + r * D;
      for (int64_t j = 0; j < half; j += kV) {
        const int64_t n = std::min<int64_t>(kV, half - j);
        const V n1 = load_acc(xr + j, n) * vinv * load_acc(weight + j, n);
        const V n2 = load_acc(xr + half + j, n) * vinv * load_acc(weight + half + j, n);
        const V cj = load_acc(c + j, n), sj = load_acc(sn + j, n);
        store_out(o + j, n1 * cj - n2 * sj, n, nt);
        store_out(o + half + j, n2 * cj + n1 * sj, n, nt);
      }
    }
    stream_fence();
  });
}

// grad_out, grad_x contiguous (B, T, H, D); x strided as in `s`. The rotation is orthogonal, so the
// gradient of the normalised row is the inverse rotation of grad_out:
//   du1 = do1 * cos + do2 * sin,   du2 = do2 * cos - do1 * sin;
// then with n = x * rstd and dn = du * weight: grad_x = rstd * (dn - n * mean(dn * n)),
// grad_weight = sum over rows of du * n (fixed-order partial sums).
template <typename T, typename A = acc_t<T>>
void rmsnorm_rope_bwd(const T* grad_out, const T* x, const RopeShape& s, const A* weight,
                      const A* cos, const A* sin, const A* rstd, T* grad_x,
                      A* grad_weight) {
  using V = AccVec<T>;
  constexpr int64_t kV = lanes<T>();
  const int64_t D = s.head_dim, half = D / 2, rows = s.rows();
  const bool nt = use_stream_stores(rows * D * int64_t(sizeof(T)));
  const int64_t block = rows_per_partial(rows);
  const int64_t num_partials = (rows + block - 1) / block;
  std::vector<A> partial(num_partials * D, A(0));  // (num_partials, D)
  at::parallel_for(0, num_partials, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p) {
      A* dw = partial.data() + p * D;
      RowCursor cur(s, p * block);
      for (int64_t r = p * block; r < std::min(rows, (p + 1) * block); ++r, cur.next()) {
        const T* xr = x + cur.offset();
        const T* go = grad_out + r * D;
        const A* c = cos + cur.t * half;
        const A* sn = sin + cur.t * half;
        const V inv(rstd[r]);
        // Pass 1: sum(dn * n). Pass 2: grad_x and the weight gradient (du is recomputed: cheaper
        // than a scratch row, everything is in L1).
        V dot(A(0));
        for (int64_t j = 0; j < half; j += kV) {
          const int64_t n = std::min<int64_t>(kV, half - j);
          const V do1 = load_acc(go + j, n), do2 = load_acc(go + half + j, n);
          const V cj = load_acc(c + j, n), sj = load_acc(sn + j, n);
          const V du1 = do1 * cj + do2 * sj, du2 = do2 * cj - do1 * sj;
          dot = at::vec::fmadd(du1 * load_acc(weight + j, n), load_acc(xr + j, n), dot);
          dot = at::vec::fmadd(du2 * load_acc(weight + half + j, n), load_acc(xr + half + j, n), dot);
        }
        const V cc(hsum(dot) * rstd[r] / static_cast<A>(D));
        T* gx = grad_x + r * D;
        for (int64_t j = 0; j < half; j += kV) {
          const int64_t n = std::min<int64_t>(kV, half - j);
          const V do1 = load_acc(go + j, n), do2 = load_acc(go + half + j, n);
          const V cj = load_acc(c + j, n), sj = load_acc(sn + j, n);
          const V du1 = do1 * cj + do2 * sj, du2 = do2 * cj - do1 * sj;
          const V n1 = load_acc(xr + j, n) * inv, n2 = load_acc(xr + half + j, n) * inv;
          store_out(gx + j, inv * (du1 * load_acc(weight + j, n) - n1 * cc), n, nt);
          store_out(gx + half + j, inv * (du2 * load_acc(weight + half + j, n) - n2 * cc), n, nt);
          at::vec::fmadd(du1, n1, V::loadu(dw + j, n)).store(dw + j, n);
          at::vec::fmadd(du2, n2, V::loadu(dw + half + j, n)).store(dw + half + j, n);
        }
      }
    }
    stream_fence();
  });
  sum_partials(partial.data(), num_partials, D, grad_weight);
}

}  // namespace cpu
}  // namespace unigendet
