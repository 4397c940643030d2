// Kernels that check the emulator itself (it must expose races, divergent barriers, bad launches and,
// under AddressSanitizer, out-of-bounds reads) and the reductions of csrc/cuda/common.cuh.
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace uc = unigendet::cuda;

namespace {

// out[t] = sum of in over the aligned group of `tpr` threads holding t (one block).
__global__ void row_group_sum_kernel(const float* in, float* out, int tpr) {
  __shared__ float red[32];
  out[threadIdx.x] = uc::row_group_sum(in[threadIdx.x], tpr, red);
}

// out[t] = sum of in over the block, twice in a row (the second sum reuses `red`).
__global__ void block_sum_kernel(const float* in, float* out) {
  __shared__ float red[32];
  const float a = uc::block_sum(in[threadIdx.x], red);
  out[threadIdx.x] = uc::block_sum(a * in[threadIdx.x], red);
}

// Thread t publishes base + t and reads its predecessor's slot, ordered by __syncthreads or not.
__global__ void neighbour_kernel(float* out, float base, int with_barrier) {
  __shared__ float slot[1024];
  const unsigned t = threadIdx.x, n = blockDim.x;
  slot[t] = base + static_cast<float>(t);
  if (with_barrier) __syncthreads();
  out[t] = slot[(t + n - 1) % n];
}

// Thread 0 leaves before the barrier the others wait at.
__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Every thread reads in[t + 1]: the last one reads one element past the end.
__global__ void overrun_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

}  // namespace

namespace selftest_kernels {

// Runs the self-test kernel `name` on one block of `threads` threads (errors: cudaGetLastError).
void launch(const std::string& name, const float* in, float* out, int threads, int param) {
  const dim3 block(static_cast<unsigned>(threads));
  if (name == "row_group_sum") uc::launch(row_group_sum_kernel, 1, block, nullptr, in, out, param);
  else if (name == "block_sum") uc::launch(block_sum_kernel, 1, block, nullptr, in, out);
  else if (name == "neighbour") uc::launch(neighbour_kernel, 1, block, nullptr, out, in[0], param);
  else if (name == "early_exit") uc::launch(early_exit_kernel, 1, block, nullptr, out);
  else if (name == "overrun") uc::launch(overrun_kernel, 1, block, nullptr, in, out);
  else throw std::invalid_argument("no self-test kernel named '" + name + "'");
}

}  // namespace selftest_kernels
