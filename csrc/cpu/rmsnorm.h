// CPU kernels of fused_add_rmsnorm: residual add + RMSNorm over the last dimension.
//
// Forward, per row of C: pass 1 reads x and residual, writes res and sums res^2; pass 2 recomputes
// res in fp32 (the row is still in L1/L2) and writes y. Eager PyTorch takes about six passes over
// memory for the same result.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "vec_io.h"

namespace unigendet {
namespace cpu {

// x, residual (nullable), y, res: (rows, cols) contiguous; weight (cols,) fp32; rstd (rows,) fp32.
template <typename T, typename A = acc_t<T>>
void fused_add_rmsnorm_fwd(const T* x, const T* residual, const A* weight, T* y, T* res,
                           A* rstd, int64_t rows, int64_t cols, float eps) {
  using V = AccVec<T>;
  constexpr int64_t kV = lanes<T>();
  const bool nt = use_stream_stores(2 * rows * cols * int64_t(sizeof(T)));
  at::parallel_for(0, rows, row_grain(cols), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * cols;
      const T* rr = residual ? residual + r * cols : nullptr;
      T* resr = res + r * cols;
      T* yr = y + r * cols;
      V sq(A(0));
      for (int64_t j = 0; j < cols; j += kV) {
        const int64_t n = std::min<int64_t>(kV, cols - j);
        V s = load_acc(xr + j, n);
        if (rr) s = s + load_acc(rr + j, n);
        store_out(resr + j, s, n, nt);
        sq = at::vec::fmadd(s, s, sq);
      }
      const A inv = A(1) / std::sqrt(hsum(sq) / static_cast<A>(cols) + eps);
      rstd[r] = inv;
      const V vinv(inv);
      for (int64_t j = 0; j < cols; j += kV) {
        const int64_t n = std::min<int64_t>(kV, cols - j);
        V s = load_acc(xr + j, n);
        if (rr) s = s + load_acc(rr + j, n);
        store_out(yr + j, s * vinv * load_acc(weight + j, n), n, nt);
      }
    }
    stream_fence();
  });
}

// grad_y, grad_res (nullable), res, grad_x: (rows, cols); weight (cols,), rstd (rows,) fp32;
// grad_weight (cols,) fp32. With n = res * rstd and dn = grad_y * weight:
//   grad_x = rstd * (dn - n * mean(dn * n)) + grad_res,   grad_weight = sum_rows grad_y * n.
template <typename T, typename A = acc_t<T>>
void fused_add_rmsnorm_bwd(const T* grad_y, const T* grad_res, const T* res, const A* weight,
                           const A* rstd, T* grad_x, A* grad_weight, int64_t rows, int64_t cols) {
  using V = AccVec<T>;
  constexpr int64_t kV = lanes<T>();
  const int64_t block = rows_per_partial(rows);
  const bool nt = use_stream_stores(rows * cols * int64_t(sizeof(T)));
  const int64_t num_partials = (rows + block - 1) / block;
  std::vector<A> partial(num_partials * cols, A(0));  // (num_partials, cols)
  at::parallel_for(0, num_partials, 1, [&](int64_t pbegin, int64_t pend) {
    for (int64_t p = pbegin; p < pend; ++p) {
      A* dw = partial.data() + p * cols;
      for (int64_t r = p * block; r < std::min(rows, (p + 1) * block); ++r) {
        const T* gy = grad_y + r * cols;
        const T* rs = res + r * cols;
        const V inv(rstd[r]);
        V dot(A(0));  // sum(grad_y * weight * res); mean(dn * n) = dot * rstd / cols
        for (int64_t j = 0; j < cols; j += kV) {
          const int64_t n = std::min<int64_t>(kV, cols - j);
          dot = at::vec::fmadd(load_acc(gy + j, n) * load_acc(weight + j, n), load_acc(rs + j, n), dot);
        }
        const V c(hsum(dot) * rstd[r] / static_cast<A>(cols));
        T* gx = grad_x + r * cols;
        const T* gr = grad_res ? grad_res + r * cols : nullptr;
        for (int64_t j = 0; j < cols; j += kV) {
          const int64_t n = std::min<int64_t>(kV, cols - j);
          const V g = load_acc(gy + j, n);
          const V nrm = load_acc(rs + j, n) * inv;
          V out = inv * (g * load_acc(weight + j, n) - nrm * c);
          if (gr) out = out + load_acc(gr + j, n);
          store_out(gx + j, out, n, nt);
          at::vec::fmadd(g, nrm, V::loadu(dw + j, n)).store(dw + j, n);
        }
      }
    }
    stream_fence();
  });
  sum_partials(partial.data(), num_partials, cols, grad_weight);
}

}  // namespace cpu
}  // namespace unigendet
