// Shared device helpers of the CUDA kernels (csrc/cuda/*.cu): dtype conversion, 16-byte packed
// loads/stores, warp/row-group/block sums, the deterministic sum of weight-gradient partials, the
// DType dispatch and small host helpers. No torch header: these files compile with plain nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

#include "launch.h"

namespace unigendet {
namespace cuda {

// ---------------------------------------------------------------- dtype traits
// Activations are float / __half / __nv_bfloat16 in memory; all arithmetic is in fp32.
template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------- packed loads / stores
// Elements per 16-byte access: 4 for fp32, 8 for fp16 / bf16.
template <typename T> struct VecWidth { static constexpr int N = 16 / static_cast<int>(sizeof(T)); };

// W consecutive elements moved as one access. W == VecWidth<T>::N gives a 16-byte aligned struct;
// W == 1 is the scalar fallback path.
template <typename T, int W> struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

// Packs move as native words: uint4 (16 bytes), uint2, unsigned int, unsigned short. Loads are
// plain word loads. A plain store of a uint4 (or a struct copy of the Pack) is not always one
// instruction: nvcc 13 splits the second of two such stores in a loop body into four 4-byte stores
// (swiglu's backward, RoPE's forward), so vector words are stored with one PTX st.global (weak, the
// default cache policy; CUDA's __stwb would make it a strong store). The SASS check in
// tests/test_ext.py fails on split accesses.
template <int B> struct NativeWord;
template <> struct NativeWord<2> { using type = unsigned short; };
template <> struct NativeWord<4> { using type = unsigned int; };
template <> struct NativeWord<8> { using type = uint2; };
template <> struct NativeWord<16> { using type = uint4; };

template <typename Word> __device__ __forceinline__ void store_word(Word* p, const Word& w) {
#ifdef UNIGENDET_CUDA_EMU
  memcpy(p, &w, sizeof w);  // one access of sizeof(Word) bytes, as traced by tests/cuda_emu
#else
  if constexpr (sizeof(Word) == 16)
    asm("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w) : "memory");
  else if constexpr (sizeof(Word) == 8)
    asm("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y) : "memory");
  else
    *p = w;
#endif
}

// A Pack (sizeof(P) bytes; 16-byte words above 16) from p, which is aligned to min(sizeof(P), 16).
template <typename P> __device__ __forceinline__ P load_pack(const void* p) {
  constexpr int B = static_cast<int>(sizeof(P)), WordBytes = B < 16 ? B : 16;
  using Word = typename NativeWord<WordBytes>::type;
  static_assert(B % WordBytes == 0, "a Pack is a whole number of native words");
  P pk;
#pragma unroll
  for (int k = 0; k < B / WordBytes; ++k) {
    const Word w = static_cast<const Word*>(p)[k];
    memcpy(reinterpret_cast<char*>(&pk) + k * WordBytes, &w, WordBytes);
  }
  return pk;
}

template <typename P> __device__ __forceinline__ void store_pack(void* p, const P& pk) {
  constexpr int B = static_cast<int>(sizeof(P)), WordBytes = B < 16 ? B : 16;
  using Word = typename NativeWord<WordBytes>::type;
  static_assert(B % WordBytes == 0, "a Pack is a whole number of native words");
#pragma unroll
  for (int k = 0; k < B / WordBytes; ++k) {
    Word w;
    memcpy(&w, reinterpret_cast<const char*>(&pk) + k * WordBytes, WordBytes);
    store_word(static_cast<Word*>(p) + k, w);
  }
}

// Loads W elements at p (aligned to sizeof(T) * W, or 16 bytes) and widens them to fp32.
template <typename T, int W> __device__ __forceinline__ void load_f(const T* p, float (&f)[W]) {
  const Pack<T, W> pk = load_pack<Pack<T, W>>(p);
#pragma unroll
  for (int i = 0; i < W; ++i) f[i] = to_float(pk.v[i]);
}

// Rounds W fp32 values to T and stores them at p (aligned to sizeof(T) * W, or 16 bytes).
template <typename T, int W> __device__ __forceinline__ void store_f(T* p, const float (&f)[W]) {
  Pack<T, W> pk;
#pragma unroll
  for (int i = 0; i < W; ++i) pk.v[i] = from_float<T>(f[i]);
  store_pack(p, pk);
}

// W fp32 parameters (weight, cos, sin: never written by a kernel, so read through the read-only
// path). With W % 4 == 0, p must be 16-byte aligned (checked at launch) and float4 loads are used.
template <int W> __device__ __forceinline__ void load_param(const float* p, float (&f)[W]) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p + i));
      f[i] = q.x; f[i + 1] = q.y; f[i + 2] = q.z; f[i + 3] = q.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) f[i] = __ldg(p + i);
  }
}

// ---------------------------------------------------------------- reductions
// All reductions are fixed-order butterflies / sequential sums, hence bitwise deterministic, and
// every participating thread ends with the same bits (a + b == b + a in IEEE arithmetic).
// They use full-warp masks: every thread of the block must call them (callers keep their loops
// block-uniform and let out-of-range threads contribute 0).

// Sum over aligned groups of `width` lanes (width a power of two <= 32).
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int o = width >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) { return group_sum(v, 32); }

// Sum over the whole block (blockDim.x a multiple of 32). red: __shared__ float[32].
__device__ __forceinline__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < nwarps; ++i) s += red[i];
  __syncthreads();  // red may be reused right after
  return s;
}

// Sum over row groups of `tpr` consecutive threads: tpr a power of two; groups of <= 32 threads
// live inside one warp (shuffles only); wider groups span tpr/32 whole warps (one smem round).
// tpr must be the same for the whole block. red: __shared__ float[32].
__device__ __forceinline__ float row_group_sum(float v, int tpr, float* red) {
  v = group_sum(v, tpr < 32 ? tpr : 32);
  if (tpr <= 32) return v;
  const int warp = threadIdx.x >> 5, wpr = tpr >> 5, first = (warp / wpr) * wpr;
  if ((threadIdx.x & 31) == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < wpr; ++i) s += red[first + i];
  __syncthreads();
  return s;
}

// ---------------------------------------------------------------- weight-gradient finalize
// out[j] = sum over p < P of partial[p, j] (partial: (P, cols) fp32, row-major). Block (32, 8):
// 32 columns per block; thread y sums rows p = y, y + 8, ... in ascending order, then the 8 strands
// are added in order y = 0..7. The order depends only on P, so the result is deterministic.
static __global__ void __launch_bounds__(256)
    sum_partials_kernel(const float* partial, float* out, int64_t P, int64_t cols) {
  __shared__ float strand[8][33];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float a = 0.f;
  if (j < cols)
    for (int64_t p = threadIdx.y; p < P; p += 8) a += partial[p * cols + j];
  strand[threadIdx.y][threadIdx.x] = a;
  __syncthreads();
  if (threadIdx.y == 0 && j < cols) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s += strand[i][threadIdx.x];
    out[j] = s;
  }
}

// ---------------------------------------------------------------- host helpers
template <typename A> __host__ __device__ constexpr A ceil_div(A a, A b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Smallest power of two >= v (v >= 1, result <= 2^30).
inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Multiprocessor count of `device` (the current device when device < 0), cached per device.
inline int sm_count(int device = -1) {
  if (device < 0 && cudaGetDevice(&device) != cudaSuccess) device = 0;
  static std::atomic<int> cache[64];
  int v = device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (v > 0) return v;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || v <= 0)
    v = 132;  // H100 SXM; only reached when the query fails, the launch itself then reports it
  if (device < 64) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Resident blocks per SM of `kernel` at `block` threads (no dynamic smem) on the current device,
// from the occupancy calculator, cached per (kernel, block, device) so launches stay cheap.
inline int resident_per_sm(const void* kernel, int block) {
  struct Entry {
    const void* kernel;
    int block, device, value;
  };
  static std::mutex mu;
  static std::vector<Entry> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) device = 0;
  {
    const std::lock_guard<std::mutex> lock(mu);
    for (const Entry& e : cache)
      if (e.kernel == kernel && e.block == block && e.device == device) return e.value;
  }
  int v = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, block, 0) != cudaSuccess || v < 1) v = 1;
  const std::lock_guard<std::mutex> lock(mu);
  cache.push_back({kernel, block, device, v});
  return v;
}

// Blocks for a grid-stride kernel: enough to cover `work_blocks`, at most one full wave
// (SMs x resident blocks per SM for this kernel and block size), at least 1.
template <typename Kernel>
inline unsigned grid_for(Kernel kernel, int block, int64_t work_blocks) {
  const int64_t wave = static_cast<int64_t>(sm_count()) *
                       resident_per_sm(reinterpret_cast<const void*>(kernel), block);
  const int64_t g = work_blocks < wave ? work_blocks : wave;
  return static_cast<unsigned>(g < 1 ? 1 : g);
}

// Launches kernel<<<grid, block, 0, stream>>>(args...). Every launch of csrc/cuda goes through here,
// so tests/cuda_emu (a CPU stand-in for the CUDA execution model) can run the same kernels without a GPU.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args... args) {
#ifdef UNIGENDET_CUDA_EMU
  ::cuda_emu::launch(kernel, grid, block, stream, args...);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
#endif
}

// grad_weight = column sums of partial (P, cols), launched on `stream`.
inline void launch_sum_partials(const float* partial, float* out, int64_t P, int64_t cols,
                                cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div<int64_t>(cols, 32));
  launch(sum_partials_kernel, grid, dim3(32, 8), stream, partial, out, P, cols);
}

// Default number of partial rows for the deterministic weight gradients: about 4 blocks per SM
// (blocks of 256 threads at <= 64 registers -> one full wave), never more than rows, at least 1.
inline int64_t default_num_partials(int64_t rows, int device) {
  const int64_t p = 4 * static_cast<int64_t>(sm_count(device));
  return rows < 1 ? 1 : (rows < p ? rows : p);
}

}  // namespace cuda
}  // namespace unigendet

// Runs the statements in __VA_ARGS__ with `T` bound to the element type of `dtype`
// (float, __half or __nv_bfloat16). An unknown dtype runs nothing (register.cpp validates it).
#define UNIGENDET_DISPATCH(dtype, T, ...)                                  \
  do {                                                                     \
    switch (dtype) {                                                       \
      case ::unigendet::cuda::DType::kFloat32: {                           \
        using T = float;                                                   \
        __VA_ARGS__;                                                       \
        break;                                                             \
      }                                                                    \
      case ::unigendet::cuda::DType::kFloat16: {                           \
        using T = __half;                                                  \
        __VA_ARGS__;                                                       \
        break;                                                             \
      }                                                                    \
      case ::unigendet::cuda::DType::kBFloat16: {                          \
        using T = __nv_bfloat16;                                           \
        __VA_ARGS__;                                                       \
        break;                                                             \
      }                                                                    \
    }                                                                      \
  } while (0)
