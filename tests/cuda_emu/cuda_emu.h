// A CPU stand-in for the parts of the CUDA execution model that csrc/cuda/*.cu use, so the CUDA
// kernels themselves (not a re-implementation) run and are checked on machines without a GPU.
//
// The .cu files compile as plain C++ with include/ (cuda_runtime.h, cuda_fp16.h, ... -> this file)
// ahead on the include path and UNIGENDET_CUDA_EMU defined; their one launch helper
// (unigendet::cuda::launch in common.cuh) then calls cuda_emu::launch instead of <<<...>>>.
//
// What is emulated, and how strictly:
//   - Every thread of a block is a fiber (its own stack); blocks run one after another. A thread runs
//     until its next synchronisation point (__syncthreads, a warp shuffle); then the scheduler resumes
//     a ready thread drawn at random from a seed: in half of the blocks from all ready threads, in
//     the other half from the same warp while it has any (warps drift apart by whole phases between
//     barriers, as on a GPU). Code that reads shared memory without the barrier that orders it so
//     gives different results from run to run.
//   - __syncthreads waits for every thread of the block and __shfl_xor_sync for all 32 lanes of the
//     warp with the full mask. A thread that exits while others wait, lanes that wait at different
//     barriers, a partial mask or a shuffle in a partial warp stop the launch with an error that
//     names the block and what each thread waits for (undefined behaviour on a GPU).
//   - The device has kSmCount multiprocessors with one resident block each, so grids sized to "one
//     wave" are small and the grid-stride loops of the kernels take several turns.
//   - Launch configurations are checked as the driver does (threads per block, grid limits); a bad
//     one is reported by cudaGetLastError and the kernel does not run. A kernel's own
//     __launch_bounds__ is not known here (the macro expands to nothing), so a block larger than it
//     is not caught.
//   - __shared__ variables are function-local statics: one copy per kernel instantiation, shared by
//     the threads of the (single) running block. In the traced build (trace.cpp) a read of shared
//     memory that no thread of the running block has written is an error, as compute-sanitizer's
//     initcheck reports it on a GPU.
//   - __half / __nv_bfloat16 round to nearest even like the device conversions; rsqrtf is exact
//     here (the device's is within 2 ulp).
// Memory accesses are plain host loads and stores; build with -fsanitize=address to catch
// out-of-bounds accesses of the kernels (tests/test_cuda_emulated.py does both).
#pragma once

#define UNIGENDET_CUDA_EMU 1

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

// ---------------------------------------------------------------- CUDA C++ keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

// ---------------------------------------------------------------- vector types
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

// ---------------------------------------------------------------- runtime API (the part used)
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };
using cudaStream_t = struct CUstream_st*;

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int block_size,
                                                          size_t dynamic_smem);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace cuda_emu {

constexpr int kSmCount = 3;  // multiprocessors of the emulated device, one resident block each

// Index registers of the running thread.
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

void sync_threads();
float shfl_xor(unsigned mask, float value, int lane_mask, int width);

// Runs body once per thread of every block (validating the configuration first).
void run_grid(dim3 grid, dim3 block, const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t /*stream*/, Args... args) {
  run_grid(grid, block, [&] { kernel(args...); });
}

// Seed of the thread-order draws; each launch advances it, so two identical launches interleave
// their threads differently.
void set_seed(uint64_t seed);

// Message of the last failed launch (deadlock, bad configuration, exception in a kernel).
const char* last_error_message();

// For the memory tracer (trace.cpp): 0 outside kernels, else a number that changes with every
// block run (shared memory starts undefined in each block).
uint64_t running_block();

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

inline void __syncthreads() { ::cuda_emu::sync_threads(); }

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, int width = 32) {
  return ::cuda_emu::shfl_xor(mask, value, lane_mask, width);
}

// One access of sizeof(T) bytes, as the device's LDG (a float4 stays one 16-byte load).
template <typename T> inline T __ldg(const T* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

// ---------------------------------------------------------------- fp16 / bf16
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, sizeof v);
  return static_cast<float>(v);
}

inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even, overflow to inf
  __half h;
  std::memcpy(&h.bits, &v, sizeof v);
  return h;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays a (quiet) NaN
    b.bits = static_cast<uint16_t>((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    b.bits = static_cast<uint16_t>(u >> 16);
  }
  return b;
}
