// fused_add_rmsnorm forward and backward (see launch.h for the contract).
//
// Layout (both directions): a row of `cols` elements is split into chunks of W elements (W = 16 bytes
// worth when cols % W == 0 and every activation pointer is 16-byte aligned, else W = 1) and handled
// by a row group of `tpr` threads (a power of two). Thread o of the group owns chunks o, o + tpr,
// ..., o + (K-1)*tpr, i.e. columns (o + k*tpr)*W + i: each warp-wide access is contiguous.
// CACHED: the whole row stays in registers (K chunks per thread, K*W = kFwdElems / kBwdElems), one
// pass over global memory. Rows longer than 1024*K*W elements take the !CACHED path: one group of
// 1024 threads per row, reading the row twice (the second read mostly hits L2).
// A block holds rpb = blockDim/tpr groups (blockDim = max(tpr, 256)) and walks the rows with a
// block-uniform grid-stride loop, so the shuffles / __syncthreads of the reductions are legal.
#include "common.cuh"

namespace unigendet {
namespace cuda {
namespace {

constexpr int kFwdElems = 16;  // fp32 values cached per thread per row (forward: r)
constexpr int kBwdElems = 8;   // backward caches n, dn and the weight-gradient accumulator
constexpr int kMaxTpr = 1024;

struct RowLayout {
  int tpr, block;
  bool cached;
};

// chunks = cols / W; K chunks per thread when cached.
RowLayout row_layout(int64_t chunks, int K) {
  const int64_t per_group = ceil_div<int64_t>(chunks, K);
  RowLayout l;
  l.cached = per_group <= kMaxTpr;
  l.tpr = l.cached ? next_pow2(per_group) : kMaxTpr;
  l.block = l.tpr > 256 ? l.tpr : 256;
  return l;
}

// ---------------------------------------------------------------- forward
// grid: min(ceil(rows / rpb), one wave); block: max(tpr, 256); each group: one row per iteration.
template <typename T, int W, int K, bool CACHED>
__global__ void __launch_bounds__(1024)
    rmsnorm_fwd_kernel(const T* x, const T* residual, const float* weight, T* y, T* res,
                       float* rstd, int64_t rows, int64_t cols, int tpr, float eps) {
  __shared__ float red[32];
  const int rpb = blockDim.x / tpr, g = threadIdx.x / tpr, o = threadIdx.x % tpr;
  const int64_t chunks = cols / W;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rpb; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rpb) {
    const int64_t row = base + g;
    const bool active = row < rows;
    const int64_t off = row * cols;
    float ss = 0.f;
    float v[CACHED ? K : 1][W];  // r = x + residual in fp32 (CACHED only)
    if constexpr (CACHED) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = (o + static_cast<int64_t>(k) * tpr) * W;
        if (active && c < cols) {
          load_f<T, W>(x + off + c, v[k]);
          if (residual != nullptr) {
            float b[W];
            load_f<T, W>(residual + off + c, b);
#pragma unroll
            for (int i = 0; i < W; ++i) v[k][i] += b[i];
          }
#pragma unroll
          for (int i = 0; i < W; ++i) ss += v[k][i] * v[k][i];
        }
      }
    } else {  // pass 1: sum of squares only (res is written in pass 2, so res may alias x)
      for (int64_t ch = o; active && ch < chunks; ch += tpr) {
        float a[W], b[W];
        load_f<T, W>(x + off + ch * W, a);
        if (residual != nullptr) load_f<T, W>(residual + off + ch * W, b);
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const float r = residual != nullptr ? a[i] + b[i] : a[i];
          ss += r * r;
        }
      }
    }
    ss = row_group_sum(ss, tpr, red);
    const float rs = rsqrtf(ss / static_cast<float>(cols) + eps);
    if (active && o == 0) rstd[row] = rs;
    if (!active) continue;  // no reduction below: the loop stays block-uniform (base is shared)
    if constexpr (CACHED) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = (o + static_cast<int64_t>(k) * tpr) * W;
        if (c < cols) {
          float w[W], out[W];
          load_param<W>(weight + c, w);
#pragma unroll
          for (int i = 0; i < W; ++i) out[i] = v[k][i] * rs * w[i];
          if (res != nullptr) store_f<T, W>(res + off + c, v[k]);
          store_f<T, W>(y + off + c, out);
        }
      }
    } else {  // pass 2: re-read x (+ residual), recompute r in fp32, store res and y
      for (int64_t ch = o; ch < chunks; ch += tpr) {
        const int64_t c = ch * W;
        float a[W], b[W], w[W], out[W];
        load_f<T, W>(x + off + c, a);
        if (residual != nullptr) {
          load_f<T, W>(residual + off + c, b);
#pragma unroll
          for (int i = 0; i < W; ++i) a[i] += b[i];
        }
        load_param<W>(weight + c, w);
#pragma unroll
        for (int i = 0; i < W; ++i) out[i] = a[i] * rs * w[i];
        if (res != nullptr) store_f<T, W>(res + off + c, a);
        store_f<T, W>(y + off + c, out);
      }
    }
  }
}

template <typename T, int W>
void launch_fwd(const T* x, const T* residual, const float* weight, T* y, T* res, float* rstd,
                int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  constexpr int K = kFwdElems / W;
  const RowLayout l = row_layout(cols / W, K);
  const int64_t groups = ceil_div<int64_t>(rows, l.block / l.tpr);
  if (l.cached) {
    auto kern = rmsnorm_fwd_kernel<T, W, K, true>;
    launch(kern, grid_for(kern, l.block, groups), l.block, stream, x, residual, weight, y, res, rstd, rows,
           cols, l.tpr, eps);
  } else {
    auto kern = rmsnorm_fwd_kernel<T, W, K, false>;
    launch(kern, grid_for(kern, l.block, groups), l.block, stream, x, residual, weight, y, res, rstd, rows,
           cols, l.tpr, eps);
  }
}

// ---------------------------------------------------------------- backward
// grid: exactly num_partials blocks; block b accumulates grad_weight over its rows (row groups
// b*rpb + g, then + num_partials*rpb, ...) in registers, combines its groups in a fixed order and
// writes partial[b, :]. !CACHED (rpb == 1): each thread owns its columns of partial[b, :] and
// accumulates there directly (read-modify-write by one thread only: deterministic, no atomics).
template <typename T, int W, int K, bool CACHED>
__global__ void __launch_bounds__(1024)
    rmsnorm_bwd_kernel(const T* grad_y, const T* grad_res, const T* res, const float* weight,
                       const float* rstd, T* grad_x, float* partial, int64_t rows, int64_t cols,
                       int tpr) {
  __shared__ float red[32];
  __shared__ float buf[CACHED ? 256 * K * W : 1];  // group combine (only used when rpb > 1)
  const int rpb = blockDim.x / tpr, g = threadIdx.x / tpr, o = threadIdx.x % tpr;
  const int64_t chunks = cols / W;
  float* prow = partial + static_cast<int64_t>(blockIdx.x) * cols;
  float acc[CACHED ? K : 1][W] = {};
  if constexpr (!CACHED) {
    const float zero[W] = {};
    for (int64_t ch = o; ch < chunks; ch += tpr) store_f<float, W>(prow + ch * W, zero);
  }

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rpb; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rpb) {
    const int64_t row = base + g;
    const bool active = row < rows;
    const int64_t off = row * cols;
    const float rs = active ? rstd[row] : 0.f;
    float dot = 0.f;
    float n[CACHED ? K : 1][W], dn[CACHED ? K : 1][W];
    Pack<T, W> gr[CACHED ? K : 1];  // grad_res, loaded early to overlap its latency
    if constexpr (CACHED) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = (o + static_cast<int64_t>(k) * tpr) * W;
        if (active && c < cols) {
          float gy[W], w[W];
          load_f<T, W>(grad_y + off + c, gy);
          load_f<T, W>(res + off + c, n[k]);
          if (grad_res != nullptr) gr[k] = load_pack<Pack<T, W>>(grad_res + off + c);
          load_param<W>(weight + c, w);
#pragma unroll
          for (int i = 0; i < W; ++i) {
            n[k][i] *= rs;
            dn[k][i] = gy[i] * w[i];
            dot += dn[k][i] * n[k][i];
            acc[k][i] += gy[i] * n[k][i];
          }
        }
      }
    } else {  // pass 1: dot and the weight gradient
      for (int64_t ch = o; active && ch < chunks; ch += tpr) {
        const int64_t c = ch * W;
        float gy[W], r[W], w[W], pw[W];
        load_f<T, W>(grad_y + off + c, gy);
        load_f<T, W>(res + off + c, r);
        load_param<W>(weight + c, w);
        load_f<float, W>(prow + c, pw);
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const float nn = r[i] * rs;
          dot += gy[i] * w[i] * nn;
          pw[i] += gy[i] * nn;
        }
        store_f<float, W>(prow + c, pw);
      }
    }
    dot = row_group_sum(dot, tpr, red);
    const float cc = dot / static_cast<float>(cols);
    if (!active) continue;
    if constexpr (CACHED) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t c = (o + static_cast<int64_t>(k) * tpr) * W;
        if (c < cols) {
          float gx[W];
#pragma unroll
          for (int i = 0; i < W; ++i) {
            gx[i] = rs * (dn[k][i] - n[k][i] * cc);
            if (grad_res != nullptr) gx[i] += to_float(gr[k].v[i]);
          }
          store_f<T, W>(grad_x + off + c, gx);
        }
      }
    } else {  // pass 2: re-read and write grad_x
      for (int64_t ch = o; ch < chunks; ch += tpr) {
        const int64_t c = ch * W;
        float gy[W], r[W], w[W], gx[W];
        load_f<T, W>(grad_y + off + c, gy);
        load_f<T, W>(res + off + c, r);
        load_param<W>(weight + c, w);
        float b[W] = {};
        if (grad_res != nullptr) load_f<T, W>(grad_res + off + c, b);
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const float nn = r[i] * rs;
          gx[i] = rs * (gy[i] * w[i] - nn * cc) + b[i];
        }
        store_f<T, W>(grad_x + off + c, gx);
      }
    }
  }

  if constexpr (CACHED) {
    // 1) groups narrower than a warp: lanes l and l ^ m (m >= tpr) own the same columns.
    if (tpr < 32)
#pragma unroll
      for (int k = 0; k < K; ++k)
#pragma unroll
        for (int i = 0; i < W; ++i)
          for (int m = tpr; m < 32; m <<= 1) acc[k][i] += __shfl_xor_sync(0xffffffffu, acc[k][i], m);
    // 2) copies of each column across the block: span S = max(tpr, 32) threads, M = blockDim/S copies.
    const int S = tpr < 32 ? 32 : tpr, M = blockDim.x / S, s = threadIdx.x % S, m = threadIdx.x / S;
    if (M == 1) {
      if (s < tpr)
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int64_t c = (o + static_cast<int64_t>(k) * tpr) * W;
          if (c < cols) store_f<float, W>(prow + c, acc[k]);
        }
    } else {  // blockDim == 256 here, so M * tpr * K * W <= 256 * K * W = size of buf
      if (s < tpr)
#pragma unroll
        for (int e = 0; e < K * W; ++e) buf[(m * K * W + e) * tpr + s] = acc[e / W][e % W];
      __syncthreads();
      for (int idx = threadIdx.x; idx < tpr * K * W; idx += blockDim.x) {
        const int e = idx / tpr, so = idx % tpr;
        const int64_t c = (so + static_cast<int64_t>(e / W) * tpr) * W + e % W;
        float sum = 0.f;
        for (int mm = 0; mm < M; ++mm) sum += buf[(mm * K * W + e) * tpr + so];
        if (c < cols) prow[c] = sum;
      }
    }
  }
}

template <typename T, int W>
void launch_bwd(const T* grad_y, const T* grad_res, const T* res, const float* weight,
                const float* rstd, T* grad_x, float* partial, int64_t num_partials,
                float* grad_weight, int64_t rows, int64_t cols, cudaStream_t stream) {
  constexpr int K = kBwdElems / W;
  const RowLayout l = row_layout(cols / W, K);
  const unsigned grid = static_cast<unsigned>(num_partials);
  if (l.cached)
    launch(rmsnorm_bwd_kernel<T, W, K, true>, grid, l.block, stream, grad_y, grad_res, res, weight, rstd, grad_x,
           partial, rows, cols, l.tpr);
  else
    launch(rmsnorm_bwd_kernel<T, W, K, false>, grid, l.block, stream, grad_y, grad_res, res, weight, rstd, grad_x,
           partial, rows, cols, l.tpr);
  launch_sum_partials(partial, grad_weight, num_partials, cols, stream);
}

}  // namespace

void fused_add_rmsnorm_fwd(DType dtype, const void* x, const void* residual, const float* weight,
                           void* y, void* res, float* rstd, int64_t rows, int64_t cols, float eps,
                           cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return;
  UNIGENDET_DISPATCH(dtype, T, {
    constexpr int N = VecWidth<T>::N;
    const bool vec = cols % N == 0 && aligned16(x) && aligned16(residual) && aligned16(weight) &&
                     aligned16(y) && aligned16(res);
    auto* xt = static_cast<const T*>(x);
    auto* rt = static_cast<const T*>(residual);
    if (vec)
      launch_fwd<T, N>(xt, rt, weight, static_cast<T*>(y), static_cast<T*>(res), rstd, rows, cols, eps, stream);
    else
      launch_fwd<T, 1>(xt, rt, weight, static_cast<T*>(y), static_cast<T*>(res), rstd, rows, cols, eps, stream);
  });
}

int64_t rmsnorm_bwd_num_partials(int64_t rows, int device) { return default_num_partials(rows, device); }

void fused_add_rmsnorm_bwd(DType dtype, const void* grad_y, const void* grad_res, const void* res,
                           const float* weight, const float* rstd, void* grad_x, float* partial,
                           int64_t num_partials, float* grad_weight, int64_t rows, int64_t cols,
                           cudaStream_t stream) {
  if (cols <= 0 || num_partials <= 0) return;
  UNIGENDET_DISPATCH(dtype, T, {
    constexpr int N = VecWidth<T>::N;
    const bool vec = cols % N == 0 && aligned16(grad_y) && aligned16(grad_res) && aligned16(res) &&
                     aligned16(weight) && aligned16(grad_x);
    auto* gy = static_cast<const T*>(grad_y);
    auto* gr = static_cast<const T*>(grad_res);
    auto* rt = static_cast<const T*>(res);
    auto* gx = static_cast<T*>(grad_x);
    if (vec)
      launch_bwd<T, N>(gy, gr, rt, weight, rstd, gx, partial, num_partials, grad_weight, rows, cols, stream);
    else
      launch_bwd<T, 1>(gy, gr, rt, weight, rstd, gx, partial, num_partials, grad_weight, rows, cols, stream);
  });
}

}  // namespace cuda
}  // namespace unigendet
