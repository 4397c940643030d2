// swiglu forward and backward (see launch.h for the contract).
//
// Elementwise over (rows, F): item i covers W consecutive features of one row, row = i / (F/W),
// column c = (i % (F/W)) * W; gate at gate_up[row*2F + c], up at gate_up[row*2F + F + c].
// W = 16 bytes worth of elements (4 fp32 / 8 fp16 or bf16) when F % W == 0 and every pointer is
// 16-byte aligned (then every gate, up and out access is 16-byte aligned), else W = 1.
// Launch: 256 threads per block, grid-stride loop with 64-bit indices, grid = min(items / 256,
// one wave of resident blocks).
#include "common.cuh"

namespace unigendet {
namespace cuda {
namespace {

constexpr int kBlock = 256;

// sigmoid(g) without overflow: e = exp(-|g|) is in (0, 1], so 1 + e is in [1, 2]; for g = +-100
// e underflows to 0 (s = 1 or 0 exactly), never inf / inf.
__device__ __forceinline__ float stable_sigmoid(float g) {
  const float e = expf(-fabsf(g));
  const float p = 1.f / (1.f + e);  // sigmoid(|g|)
  return g >= 0.f ? p : e * p;      // sigmoid(-|g|) = e / (1 + e)
}

template <typename T, int W>
__global__ void __launch_bounds__(kBlock)
    swiglu_fwd_kernel(const T* gate_up, T* out, int64_t rows, int64_t features) {
  const int64_t per_row = features / W, items = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t row = i / per_row, c = (i - row * per_row) * W;
    const T* g_ptr = gate_up + row * 2 * features + c;
    float g[W], u[W], o[W];
    load_f<T, W>(g_ptr, g);
    load_f<T, W>(g_ptr + features, u);
#pragma unroll
    for (int k = 0; k < W; ++k) o[k] = g[k] * stable_sigmoid(g[k]) * u[k];
    store_f<T, W>(out + row * features + c, o);
  }
}

// d_gate = go * up * s * (1 + g * (1 - s)), d_up = go * g * s with s = sigmoid(g).
template <typename T, int W>
__global__ void __launch_bounds__(kBlock)
    swiglu_bwd_kernel(const T* grad_out, const T* gate_up, T* grad_gate_up, int64_t rows,
                      int64_t features) {
  const int64_t per_row = features / W, items = rows * per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlock + threadIdx.x; i < items;
       i += static_cast<int64_t>(gridDim.x) * kBlock) {
    const int64_t row = i / per_row, c = (i - row * per_row) * W;
    const int64_t gu_off = row * 2 * features + c;
    float go[W], g[W], u[W], dg[W], du[W];
    load_f<T, W>(grad_out + row * features + c, go);
    load_f<T, W>(gate_up + gu_off, g);
    load_f<T, W>(gate_up + gu_off + features, u);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float s = stable_sigmoid(g[k]);
      dg[k] = go[k] * u[k] * s * (1.f + g[k] * (1.f - s));
      du[k] = go[k] * g[k] * s;
    }
    store_f<T, W>(grad_gate_up + gu_off, dg);
    store_f<T, W>(grad_gate_up + gu_off + features, du);
  }
}

template <typename Kernel, typename... Args>
void launch_elementwise(Kernel kernel, int64_t items, cudaStream_t stream, Args... args) {
  const unsigned grid = grid_for(kernel, kBlock, ceil_div<int64_t>(items, kBlock));
  launch(kernel, grid, kBlock, stream, args...);
}

}  // namespace

void swiglu_fwd(DType dtype, const void* gate_up, void* out, int64_t rows, int64_t features,
                cudaStream_t stream) {
  if (rows <= 0 || features <= 0) return;
  UNIGENDET_DISPATCH(dtype, T, {
    constexpr int N = VecWidth<T>::N;
    auto* gu = static_cast<const T*>(gate_up);
    auto* o = static_cast<T*>(out);
    if (features % N == 0 && aligned16(gate_up) && aligned16(out))
      launch_elementwise(swiglu_fwd_kernel<T, N>, rows * (features / N), stream, gu, o, rows, features);
    else
      launch_elementwise(swiglu_fwd_kernel<T, 1>, rows * features, stream, gu, o, rows, features);
  });
}

void swiglu_bwd(DType dtype, const void* grad_out, const void* gate_up, void* grad_gate_up,
                int64_t rows, int64_t features, cudaStream_t stream) {
  if (rows <= 0 || features <= 0) return;
  UNIGENDET_DISPATCH(dtype, T, {
    constexpr int N = VecWidth<T>::N;
    auto* go = static_cast<const T*>(grad_out);
    auto* gu = static_cast<const T*>(gate_up);
    auto* dgu = static_cast<T*>(grad_gate_up);
    if (features % N == 0 && aligned16(grad_out) && aligned16(gate_up) && aligned16(grad_gate_up))
      launch_elementwise(swiglu_bwd_kernel<T, N>, rows * (features / N), stream, go, gu, dgu, rows, features);
    else
      launch_elementwise(swiglu_bwd_kernel<T, 1>, rows * features, stream, go, gu, dgu, rows, features);
  });
}

}  // namespace cuda
}  // namespace unigendet
