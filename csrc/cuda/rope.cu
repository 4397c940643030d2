// rmsnorm + rotate-half RoPE, forward and backward (see launch.h for the contract).
//
// A row is one (b, t, h) head vector of D = 2*half elements. Rotation pairs element j with j + half
// (j < half), so a lane that owns elements [j, j+W) of the first half also owns [half+j, half+j+W):
// the rotation is thread-local and needs no shuffle (the partner "lane" is the lane itself).
// W = 16 bytes worth of elements (8 for fp16 / bf16, 4 for fp32) when half % W == 0 and every
// pointer and stride is 16-byte aligned, else W = 1. A row has pairs = half / W pair-slots.
// Grouped kernels (pairs <= 32): a group of G = next_pow2(pairs) lanes per row, lane o owns slot o
// (lanes o >= pairs idle), 256/G rows per block of 256 threads:
//   D = 128 bf16: W = 8, pairs = 8,  G = 8,  4 rows per warp; lane o reads x[8o, 8o+8) and
//                 x[64+8o, 64+8o+8), cos/sin[t*64 + 8o, +8), weight[8o, +8) and [64+8o, +8).
//   D =  96 fp32: W = 4, pairs = 12, G = 16, 2 rows per warp; lanes 12..15 of each group idle.
//   D =  64 fp16: W = 8, pairs = 4,  G = 4,  8 rows per warp.
// The backward uses W = 4 (16 bytes of fp32, 8 bytes of fp16 / bf16; see kBwdVec), e.g.
//   D = 128 bf16 backward: W = 4, pairs = 16, G = 16, 2 rows per warp; lane o: [4o, 4o+4) and
//                 [64+4o, 64+4o+4) of grad_out and x, cos/sin[t*64 + 4o, +4).
// Sums of squares / dots are xor butterflies over the G lanes of a group (aligned, power of two).
// Generic kernels (pairs > 32): one block per row, two passes over the row (second from L1/L2).
// All row loops are block-uniform grid-stride loops, so shuffles and barriers are legal.
#include "common.cuh"

namespace unigendet {
namespace cuda {
namespace {

constexpr int kBlock = 256, kWarps = kBlock / 32;

// Elements per access in the backward: 4 (16 bytes of fp32, 8 bytes of fp16 / bf16). With 8 bf16
// per lane the grouped backward needs ~80 live registers (grad_out, x, cos, sin, weight and the
// weight-gradient accumulators) and spills at the 64-register cap of 4 blocks/SM; with 4 it fits.
template <typename T> constexpr int kBwdVec = VecWidth<T>::N < 4 ? VecWidth<T>::N : 4;

struct RowPtr {
  int64_t t;   // sequence position (row of cos / sin)
  int64_t xo;  // offset of the row in x (strided)
};

// Row index r = (b*T + t)*H + h of the contiguous output -> position and strided input offset.
__device__ __forceinline__ RowPtr locate(const RopeShape& s, int64_t r) {
  const int64_t h = r % s.heads, bt = r / s.heads, t = bt % s.seq, b = bt / s.seq;
  return {t, b * s.stride_b + t * s.stride_t + h * s.stride_h};
}

// x rows -> out for W pairs (j+i, half+j+i), r = rstd of the row; w, c, sn point at element j.
template <int W>
__device__ __forceinline__ void rotate_fwd(const float (&x1)[W], const float (&x2)[W], float r,
                                           const float* w, const float* c_j, const float* s_j,
                                           int64_t half, float (&o1)[W], float (&o2)[W]) {
  float w1[W], w2[W], c[W], sn[W];
  load_param<W>(w, w1);
  load_param<W>(w + half, w2);
  load_param<W>(c_j, c);
  load_param<W>(s_j, sn);
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float n1 = x1[i] * r * w1[i], n2 = x2[i] * r * w2[i];
    o1[i] = n1 * c[i] - n2 * sn[i];
    o2[i] = n2 * c[i] + n1 * sn[i];
  }
}

// Backward terms of W pairs: du = rotate^T(grad_out) (du1 = do1*c + do2*s, du2 = do2*c - do1*s),
// n = x*rstd, dn = du*weight. in = {do1, do2, x1, x2} as loaded; w, c_j, s_j point at element j.
template <typename T, int W> struct BwdTerms {
  float n1[W], n2[W], du1[W], du2[W], dn1[W], dn2[W];
  __device__ __forceinline__ BwdTerms(const Pack<T, W> (&in)[4], float rs, const float* w,
                                      const float* c_j, const float* s_j, int64_t half) {
    float w1[W], w2[W], c[W], sn[W];
    load_param<W>(w, w1);
    load_param<W>(w + half, w2);
    load_param<W>(c_j, c);
    load_param<W>(s_j, sn);
#pragma unroll
    for (int i = 0; i < W; ++i) {
      const float d1 = to_float(in[0].v[i]), d2 = to_float(in[1].v[i]);
      du1[i] = d1 * c[i] + d2 * sn[i];
      du2[i] = d2 * c[i] - d1 * sn[i];
      n1[i] = to_float(in[2].v[i]) * rs;
      n2[i] = to_float(in[3].v[i]) * rs;
      dn1[i] = du1[i] * w1[i];
      dn2[i] = du2[i] * w2[i];
    }
  }
};

// grad_x of one pack of pairs: rs * (dn - n * cc) for both halves; gx points at the row's column j.
template <typename T, int W>
__device__ __forceinline__ void store_grad_x(T* gx, const BwdTerms<T, W>& b, float rs, float cc, int64_t half) {
  float g1[W], g2[W];
#pragma unroll
  for (int i = 0; i < W; ++i) {
    g1[i] = rs * (b.dn1[i] - b.n1[i] * cc);
    g2[i] = rs * (b.dn2[i] - b.n2[i] * cc);
  }
  store_f<T, W>(gx, g1);
  store_f<T, W>(gx + half, g2);
}

template <typename T, int W>
__device__ __forceinline__ void load_bwd_inputs(Pack<T, W> (&in)[4], const T* dr, const T* xr,
                                                int64_t half) {
  in[0] = load_pack<Pack<T, W>>(dr);
  in[1] = load_pack<Pack<T, W>>(dr + half);
  in[2] = load_pack<Pack<T, W>>(xr);
  in[3] = load_pack<Pack<T, W>>(xr + half);
}

// ---------------------------------------------------------------- forward
// Grouped kernel (pairs <= 32): lane o of the G-lane group owns pair-slot o (j = o*W).
template <typename T, int W>
__global__ void __launch_bounds__(kBlock)
    rope_fwd_kernel(const T* x, RopeShape s, const float* weight, const float* cos,
                    const float* sin, T* out, float* rstd, float eps, int G) {
  const int64_t D = s.head_dim, half = D / 2, rows = s.batch * s.seq * s.heads;
  const int rpb = kBlock / G, g = threadIdx.x / G, o = threadIdx.x % G;
  const int64_t j = static_cast<int64_t>(o) * W;
  const bool lane_ok = j < half;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rpb; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rpb) {
    const int64_t row = base + g;
    const bool active = row < rows;
    const RowPtr rp = active ? locate(s, row) : RowPtr{0, 0};
    float x1[W], x2[W], ss = 0.f;
    if (active && lane_ok) {
      load_f<T, W>(x + rp.xo + j, x1);
      load_f<T, W>(x + rp.xo + half + j, x2);
#pragma unroll
      for (int i = 0; i < W; ++i) ss += x1[i] * x1[i] + x2[i] * x2[i];
    }
    ss = group_sum(ss, G);
    const float r = rsqrtf(ss / static_cast<float>(D) + eps);
    if (!active || !lane_ok) continue;  // no reduction below
    if (o == 0) rstd[row] = r;
    float o1[W], o2[W];
    rotate_fwd<W>(x1, x2, r, weight + j, cos + rp.t * half + j, sin + rp.t * half + j, half, o1, o2);
    store_f<T, W>(out + row * D + j, o1);
    store_f<T, W>(out + row * D + half + j, o2);
  }
}

// Generic kernel (any even D): one block per row, thread tid owns j = tid*W, tid*W + blockDim*W,
// ...; pass 1 sums squares, pass 2 re-reads the row (L1 / L2 hits).
template <typename T, int W>
__global__ void __launch_bounds__(kBlock)
    rope_fwd_generic(const T* x, RopeShape s, const float* weight, const float* cos,
                     const float* sin, T* out, float* rstd, float eps) {
  __shared__ float red[32];
  const int64_t D = s.head_dim, half = D / 2, rows = s.batch * s.seq * s.heads;
  const int64_t step = static_cast<int64_t>(blockDim.x) * W;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowPtr rp = locate(s, row);
    const T* xr = x + rp.xo;
    float ss = 0.f;
    for (int64_t j = threadIdx.x * W; j < half; j += step) {
      float x1[W], x2[W];
      load_f<T, W>(xr + j, x1);
      load_f<T, W>(xr + half + j, x2);
#pragma unroll
      for (int i = 0; i < W; ++i) ss += x1[i] * x1[i] + x2[i] * x2[i];
    }
    const float r = rsqrtf(block_sum(ss, red) / static_cast<float>(D) + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int64_t j = threadIdx.x * W; j < half; j += step) {
      float x1[W], x2[W], o1[W], o2[W];
      load_f<T, W>(xr + j, x1);
      load_f<T, W>(xr + half + j, x2);
      rotate_fwd<W>(x1, x2, r, weight + j, cos + rp.t * half + j, sin + rp.t * half + j, half, o1, o2);
      store_f<T, W>(out + row * D + j, o1);
      store_f<T, W>(out + row * D + half + j, o2);
    }
  }
}

// ---------------------------------------------------------------- backward
// grad_x = rstd*(dn - n*sum(dn*n)/D); grad_weight = sum over rows of du*n.
// grid = num_partials; block b owns partial[b, :] (its groups combined in a fixed order).
// The raw inputs stay in registers across the group sum and the terms are recomputed afterwards
// (cos / sin / weight re-read from L1): this keeps the kernel at <= 64 registers without spills.
template <typename T, int W>
__global__ void __launch_bounds__(kBlock, 4)
    rope_bwd_kernel(const T* grad_out, const T* x, RopeShape s, const float* weight,
                    const float* cos, const float* sin, const float* rstd, T* grad_x,
                    float* partial, int G) {
  __shared__ float buf[kWarps * 2 * W * 32];
  const int64_t D = s.head_dim, half = D / 2, rows = s.batch * s.seq * s.heads;
  const int rpb = kBlock / G, g = threadIdx.x / G, o = threadIdx.x % G;
  const int64_t j = static_cast<int64_t>(o) * W;
  const bool lane_ok = j < half;
  float acc1[W] = {}, acc2[W] = {};
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * rpb; base < rows;
       base += static_cast<int64_t>(gridDim.x) * rpb) {
    const int64_t row = base + g;
    const bool active = row < rows;
    const RowPtr rp = active ? locate(s, row) : RowPtr{0, 0};
    const float rs = active ? rstd[row] : 0.f;
    Pack<T, W> in[4];
    float dot = 0.f;
    if (active && lane_ok) {
      load_bwd_inputs<T, W>(in, grad_out + row * D + j, x + rp.xo + j, half);
      const BwdTerms<T, W> b(in, rs, weight + j, cos + rp.t * half + j, sin + rp.t * half + j, half);
#pragma unroll
      for (int i = 0; i < W; ++i) {
        dot += b.dn1[i] * b.n1[i] + b.dn2[i] * b.n2[i];
        acc1[i] += b.du1[i] * b.n1[i];
        acc2[i] += b.du2[i] * b.n2[i];
      }
    }
    const float cc = group_sum(dot, G) / static_cast<float>(D);
    if (!active || !lane_ok) continue;
    const BwdTerms<T, W> b(in, rs, weight + j, cos + rp.t * half + j, sin + rp.t * half + j, half);
    store_grad_x<T, W>(grad_x + row * D + j, b, rs, cc, half);
  }

  // Combine the block's groups: lanes o, o+G, ... of each warp by an xor butterfly (all of them
  // end with the same bits), then the kWarps warps through shared memory in warp order.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < W; ++i)
    for (int m = G; m < 32; m <<= 1) {
      acc1[i] += __shfl_xor_sync(0xffffffffu, acc1[i], m);
      acc2[i] += __shfl_xor_sync(0xffffffffu, acc2[i], m);
    }
  if (lane < G)
#pragma unroll
    for (int i = 0; i < W; ++i) {
      buf[(warp * 2 * W + i) * G + lane] = acc1[i];
      buf[(warp * 2 * W + W + i) * G + lane] = acc2[i];
    }
  __syncthreads();
  float* prow = partial + static_cast<int64_t>(blockIdx.x) * D;
  for (int idx = threadIdx.x; idx < 2 * W * G; idx += kBlock) {
    const int e = idx / G, l = idx % G;  // slot e of lane l: e < W first half, else second half
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += buf[(w * 2 * W + e) * G + l];
    const int64_t jl = static_cast<int64_t>(l) * W;
    if (jl < half) prow[(e < W ? 0 : half) + jl + e % W] = sum;
  }
}

// Generic kernel (any even D): one block per row, thread-owned columns of partial[b, :]
// accumulated in place (zeroed first; only this thread touches them: deterministic).
template <typename T, int W>
__global__ void __launch_bounds__(kBlock)
    rope_bwd_generic(const T* grad_out, const T* x, RopeShape s, const float* weight,
                     const float* cos, const float* sin, const float* rstd, T* grad_x,
                     float* partial) {
  __shared__ float red[32];
  const int64_t D = s.head_dim, half = D / 2, rows = s.batch * s.seq * s.heads;
  const int64_t step = static_cast<int64_t>(blockDim.x) * W;
  float* prow = partial + static_cast<int64_t>(blockIdx.x) * D;
  const float zero[W] = {};
  for (int64_t j = threadIdx.x * W; j < half; j += step) {
    store_f<float, W>(prow + j, zero);
    store_f<float, W>(prow + half + j, zero);
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowPtr rp = locate(s, row);
    const float rs = rstd[row];
    float dot = 0.f;
    for (int pass = 0; pass < 2; ++pass) {  // pass 0: dot and grad_weight; pass 1: grad_x
      const float cc = pass ? block_sum(dot, red) / static_cast<float>(D) : 0.f;
      for (int64_t j = threadIdx.x * W; j < half; j += step) {
        Pack<T, W> in[4];
        load_bwd_inputs<T, W>(in, grad_out + row * D + j, x + rp.xo + j, half);
        const BwdTerms<T, W> b(in, rs, weight + j, cos + rp.t * half + j, sin + rp.t * half + j, half);
        if (pass == 0) {
          float p1[W], p2[W];
          load_f<float, W>(prow + j, p1);
          load_f<float, W>(prow + half + j, p2);
#pragma unroll
          for (int i = 0; i < W; ++i) {
            dot += b.dn1[i] * b.n1[i] + b.dn2[i] * b.n2[i];
            p1[i] += b.du1[i] * b.n1[i];
            p2[i] += b.du2[i] * b.n2[i];
          }
          store_f<float, W>(prow + j, p1);
          store_f<float, W>(prow + half + j, p2);
        } else {
          store_grad_x<T, W>(grad_x + row * D + j, b, rs, cc, half);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- host side
// pairs = half / W pair-slots per row. Grouped kernels when pairs <= 32 (D <= 512 for fp16 / bf16
// and D <= 256 for fp32 on the vector path, D <= 64 on the scalar path); generic ones otherwise.
int group_lanes(int64_t pairs) { return pairs <= 32 ? next_pow2(pairs) : 0; }

int generic_block(int64_t pairs) {
  const int64_t b = ceil_div<int64_t>(pairs, 32) * 32;
  return static_cast<int>(b < kBlock ? b : kBlock);
}

// The W-wide path needs half % W == 0 (a lane's W elements never straddle the halves and cos / sin
// rows stay 16-byte aligned for W >= 4); pointers and strides are required 16-byte aligned.
template <typename T, int W>
bool vec_ok(const RopeShape& s, const void* x, const void* y, const float* weight, const float* cos,
            const float* sin) {
  const int64_t e = sizeof(T);
  auto stride_ok = [&](int64_t size, int64_t stride) { return size == 1 || (stride * e) % 16 == 0; };
  return (s.head_dim / 2) % W == 0 && aligned16(x) && aligned16(y) && aligned16(weight) &&
         aligned16(cos) && aligned16(sin) && stride_ok(s.batch, s.stride_b) &&
         stride_ok(s.seq, s.stride_t) && stride_ok(s.heads, s.stride_h);
}

template <typename T, int W>
void launch_fwd(const T* x, const RopeShape& s, const float* weight, const float* cos,
                const float* sin, T* out, float* rstd, float eps, cudaStream_t stream) {
  const int64_t rows = s.batch * s.seq * s.heads, pairs = s.head_dim / 2 / W;
  const int G = group_lanes(pairs);
  if (G == 0) {
    const int block = generic_block(pairs);
    auto kern = rope_fwd_generic<T, W>;
    launch(kern, grid_for(kern, block, rows), block, stream, x, s, weight, cos, sin, out, rstd, eps);
  } else {
    auto kern = rope_fwd_kernel<T, W>;
    const int64_t blocks = ceil_div<int64_t>(rows, kBlock / G);
    launch(kern, grid_for(kern, kBlock, blocks), kBlock, stream, x, s, weight, cos, sin, out, rstd, eps, G);
  }
}

template <typename T, int W>
void launch_bwd(const T* grad_out, const T* x, const RopeShape& s, const float* weight,
                const float* cos, const float* sin, const float* rstd, T* grad_x, float* partial,
                int64_t num_partials, cudaStream_t stream) {
  const int64_t pairs = s.head_dim / 2 / W;
  const int G = group_lanes(pairs);
  const unsigned grid = static_cast<unsigned>(num_partials);
  if (G == 0)
    launch(rope_bwd_generic<T, W>, grid, generic_block(pairs), stream, grad_out, x, s, weight, cos, sin, rstd,
           grad_x, partial);
  else
    launch(rope_bwd_kernel<T, W>, grid, kBlock, stream, grad_out, x, s, weight, cos, sin, rstd, grad_x, partial,
           G);
}

}  // namespace

void rmsnorm_rope_fwd(DType dtype, const void* x, const RopeShape& shape, const float* weight,
                      const float* cos, const float* sin, void* out, float* rstd, float eps,
                      cudaStream_t stream) {
  if (shape.batch * shape.seq * shape.heads <= 0 || shape.head_dim < 2) return;
  UNIGENDET_DISPATCH(dtype, T, {
    auto* xt = static_cast<const T*>(x);
    auto* ot = static_cast<T*>(out);
    if (vec_ok<T, VecWidth<T>::N>(shape, x, out, weight, cos, sin))
      launch_fwd<T, VecWidth<T>::N>(xt, shape, weight, cos, sin, ot, rstd, eps, stream);
    else
      launch_fwd<T, 1>(xt, shape, weight, cos, sin, ot, rstd, eps, stream);
  });
}

int64_t rmsnorm_rope_bwd_num_partials(const RopeShape& shape, int device) {
  return default_num_partials(shape.batch * shape.seq * shape.heads, device);
}

void rmsnorm_rope_bwd(DType dtype, const void* grad_out, const void* x, const RopeShape& shape,
                      const float* weight, const float* cos, const float* sin, const float* rstd,
                      void* grad_x, float* partial, int64_t num_partials, float* grad_weight,
                      cudaStream_t stream) {
  if (shape.head_dim < 2 || num_partials <= 0) return;
  UNIGENDET_DISPATCH(dtype, T, {
    auto* go = static_cast<const T*>(grad_out);
    auto* xt = static_cast<const T*>(x);
    auto* gx = static_cast<T*>(grad_x);
    // grad_out and grad_x are contiguous like out: one alignment check covers both with x's.
    if (vec_ok<T, kBwdVec<T>>(shape, x, grad_out, weight, cos, sin) && aligned16(grad_x))
      launch_bwd<T, kBwdVec<T>>(go, xt, shape, weight, cos, sin, rstd, gx, partial, num_partials, stream);
    else
      launch_bwd<T, 1>(go, xt, shape, weight, cos, sin, rstd, gx, partial, num_partials, stream);
  });
  launch_sum_partials(partial, grad_weight, num_partials, shape.head_dim, stream);
}

}  // namespace cuda
}  // namespace unigendet
