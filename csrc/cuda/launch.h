// Host-side entry points of the CUDA kernels (csrc/cuda/*.cu).
//
// The .cu files take raw pointers, sizes and a cudaStream_t and include no torch header, so they
// compile in seconds with plain nvcc (CI compiles them for sm_90 without a GPU). csrc/cuda/register.cpp
// checks and allocates tensors with ATen, takes the current stream and calls these functions.
//
// Conventions for every function below:
//   - `dtype` is the element type of the activation tensors (inputs, outputs and gradients named
//     x/res/y/out/grad_*); weights, cos/sin tables, rstd and weight-gradient buffers are fp32.
//   - rows of activations are contiguous in their last dimension; where strides are given they are
//     in elements, for the leading dimensions only.
//   - all arithmetic is in fp32; reductions are deterministic (fixed order, no float atomics).
//   - launches go to `stream`; nothing synchronises with the host; errors are reported by the
//     caller with cudaGetLastError().
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace unigendet {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---------------------------------------------------------------- fused_add_rmsnorm
// x, residual, y, res: (rows, cols); residual may be nullptr (then res = x).
// res = x + residual; rstd[r] = rsqrt(mean(res[r]^2) + eps); y = res * rstd * weight.
// y and res are computed from the fp32 sum (res is rounded to dtype only when stored).
void fused_add_rmsnorm_fwd(DType dtype, const void* x, const void* residual, const float* weight,
                           void* y, void* res, float* rstd, int64_t rows, int64_t cols, float eps,
                           cudaStream_t stream);

// Number of rows of the fp32 workspace `partial` (num_partials, cols) the backward needs. The
// workspace must be 16-byte aligned (a fresh allocation is): the vector path moves its rows in packs.
int64_t rmsnorm_bwd_num_partials(int64_t rows, int device);

// grad_y: (rows, cols); grad_res: (rows, cols) or nullptr (the gradient reaching the `res` output);
// res, rstd: saved by the forward. Writes grad_x (rows, cols) = d loss / d res (which is also the
// gradient of x and of residual) and grad_weight (cols,) = sum over rows of grad_y * res * rstd,
// summed over `partial` (num_partials, cols) in a fixed order.
void fused_add_rmsnorm_bwd(DType dtype, const void* grad_y, const void* grad_res, const void* res,
                           const float* weight, const float* rstd, void* grad_x, float* partial,
                           int64_t num_partials, float* grad_weight, int64_t rows, int64_t cols,
                           cudaStream_t stream);

// ---------------------------------------------------------------- swiglu
// gate_up: (rows, 2F) contiguous; out: (rows, F). out = silu(gate) * up.
void swiglu_fwd(DType dtype, const void* gate_up, void* out, int64_t rows, int64_t features,
                cudaStream_t stream);

// grad_out: (rows, F); grad_gate_up: (rows, 2F) = [grad_out * up * dsilu(gate), grad_out * silu(gate)].
void swiglu_bwd(DType dtype, const void* grad_out, const void* gate_up, void* grad_gate_up,
                int64_t rows, int64_t features, cudaStream_t stream);

// ---------------------------------------------------------------- rmsnorm + rotate-half RoPE
// One of q or k: x is (B, T, H, D) with element strides (stride_b, stride_t, stride_h, 1);
// out is contiguous (B, T, H, D); rstd is (B * T * H,) in row order (b, t, h); cos, sin: (T, D/2).
// n = x * rstd * weight; out = cat(n1 * cos - n2 * sin, n2 * cos + n1 * sin) with n1, n2 the halves.
struct RopeShape {
  int64_t batch, seq, heads, head_dim;
  int64_t stride_b, stride_t, stride_h;  // of x (input) only
};

void rmsnorm_rope_fwd(DType dtype, const void* x, const RopeShape& shape, const float* weight,
                      const float* cos, const float* sin, void* out, float* rstd, float eps,
                      cudaStream_t stream);

// Rows of the fp32 workspace `partial` (num_partials, D); 16-byte aligned, as for rmsnorm.
int64_t rmsnorm_rope_bwd_num_partials(const RopeShape& shape, int device);

// grad_out: contiguous (B, T, H, D); x strided as in `shape`; grad_x contiguous (B, T, H, D);
// grad_weight (D,) summed over `partial` (num_partials, D) in a fixed order.
void rmsnorm_rope_bwd(DType dtype, const void* grad_out, const void* x, const RopeShape& shape,
                      const float* weight, const float* cos, const float* sin, const float* rstd,
                      void* grad_x, float* partial, int64_t num_partials, float* grad_weight,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace unigendet
