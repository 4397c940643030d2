// C entry points of the emulated CUDA library (loaded with ctypes by tests/cuda_emu/__init__.py):
// the host functions of csrc/cuda/launch.h with plain arguments, each returning 0 on success or 1
// with the reason in cuda_emu_error().
#include <exception>
#include <string>

#include "launch.h"

namespace selftest_kernels {
void launch(const std::string& name, const float* in, float* out, int threads, int param);  // selftest.cu
}

namespace {

std::string g_error;

template <typename F>
int guarded(F&& call) {
  g_error.clear();
  try {
    call();
  } catch (const std::exception& e) {
    g_error = e.what();
    return 1;
  }
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return 0;
  g_error = std::string(cudaGetErrorString(err)) + ": " + cuda_emu::last_error_message();
  return 1;
}

unigendet::cuda::DType dtype_of(int code) { return static_cast<unigendet::cuda::DType>(code); }

unigendet::cuda::RopeShape rope_shape(const int64_t* s) { return {s[0], s[1], s[2], s[3], s[4], s[5], s[6]}; }

}  // namespace

namespace uc = unigendet::cuda;

extern "C" {

const char* cuda_emu_error() { return g_error.c_str(); }

void cuda_emu_set_seed(uint64_t seed) { cuda_emu::set_seed(seed); }

int cuda_emu_fused_add_rmsnorm_fwd(int dtype, const void* x, const void* residual, const float* weight, void* y,
                                   void* res, float* rstd, int64_t rows, int64_t cols, float eps) {
  return guarded([&] {
    uc::fused_add_rmsnorm_fwd(dtype_of(dtype), x, residual, weight, y, res, rstd, rows, cols, eps, nullptr);
  });
}

int64_t cuda_emu_rmsnorm_bwd_num_partials(int64_t rows) { return uc::rmsnorm_bwd_num_partials(rows, 0); }

int cuda_emu_fused_add_rmsnorm_bwd(int dtype, const void* grad_y, const void* grad_res, const void* res,
                                   const float* weight, const float* rstd, void* grad_x, float* partial,
                                   int64_t num_partials, float* grad_weight, int64_t rows, int64_t cols) {
  return guarded([&] {
    uc::fused_add_rmsnorm_bwd(dtype_of(dtype), grad_y, grad_res, res, weight, rstd, grad_x, partial, num_partials,
                              grad_weight, rows, cols, nullptr);
  });
}

int cuda_emu_swiglu_fwd(int dtype, const void* gate_up, void* out, int64_t rows, int64_t features) {
  return guarded([&] { uc::swiglu_fwd(dtype_of(dtype), gate_up, out, rows, features, nullptr); });
}

int cuda_emu_swiglu_bwd(int dtype, const void* grad_out, const void* gate_up, void* grad_gate_up, int64_t rows,
                        int64_t features) {
  return guarded([&] { uc::swiglu_bwd(dtype_of(dtype), grad_out, gate_up, grad_gate_up, rows, features, nullptr); });
}

// shape: {batch, seq, heads, head_dim, stride_b, stride_t, stride_h} of x.
int cuda_emu_rmsnorm_rope_fwd(int dtype, const void* x, const int64_t* shape, const float* weight, const float* cos,
                              const float* sin, void* out, float* rstd, float eps) {
  return guarded([&] {
    uc::rmsnorm_rope_fwd(dtype_of(dtype), x, rope_shape(shape), weight, cos, sin, out, rstd, eps, nullptr);
  });
}

int64_t cuda_emu_rmsnorm_rope_bwd_num_partials(const int64_t* shape) {
  return uc::rmsnorm_rope_bwd_num_partials(rope_shape(shape), 0);
}

int cuda_emu_rmsnorm_rope_bwd(int dtype, const void* grad_out, const void* x, const int64_t* shape,
                              const float* weight, const float* cos, const float* sin, const float* rstd,
                              void* grad_x, float* partial, int64_t num_partials, float* grad_weight) {
  return guarded([&] {
    uc::rmsnorm_rope_bwd(dtype_of(dtype), grad_out, x, rope_shape(shape), weight, cos, sin, rstd, grad_x, partial,
                         num_partials, grad_weight, nullptr);
  });
}

// One block of `threads` threads of the self-test kernel `name` (tests/cuda_emu/selftest.cu).
int cuda_emu_selftest(const char* name, const float* in, float* out, int threads, int param) {
  return guarded([&] { selftest_kernels::launch(name, in, out, threads, param); });
}

}  // extern "C"
