// CUDA implementations of the unigendet ops (schemas in csrc/library.cpp): checks and allocation are
// shared with the CPU side (csrc/op_impl.h); the kernels (csrc/cuda/*.cu, raw pointers) run on the
// current stream with workspaces from torch's caching allocator, so the ops are CUDA-graph safe.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_impl.h"
#include "launch.h"

namespace unigendet {
namespace {

cuda::DType kernel_dtype(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": dtype ", t.scalar_type(), " is not supported on CUDA (float32, float16, bfloat16)");
  }
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<Tensor, Tensor, Tensor> fused_add_rmsnorm(const Tensor& x, const std::optional<Tensor>& residual,
                                                     const Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return fused_add_rmsnorm_impl(x, residual, weight, [&](const RmsnormArgs& a, Tensor& y, Tensor& res, Tensor& rstd) {
    cuda::fused_add_rmsnorm_fwd(kernel_dtype(x, "fused_add_rmsnorm"), a.x.const_data_ptr(), ptr_or_null(a.residual),
                                a.weight.const_data_ptr<float>(), y.mutable_data_ptr(), res.mutable_data_ptr(),
                                rstd.mutable_data_ptr<float>(), a.rows, a.cols, static_cast<float>(eps), stream_of(x));
    check_launch("fused_add_rmsnorm");
  });
}

std::tuple<Tensor, Tensor> fused_add_rmsnorm_backward(const Tensor& grad_y, const std::optional<Tensor>& grad_res,
                                                      const Tensor& res, const Tensor& weight, const Tensor& rstd) {
  const c10::cuda::CUDAGuard guard(res.device());
  return fused_add_rmsnorm_backward_impl(
      grad_y, grad_res, res, weight, rstd,
      [&](const Tensor& gy, const Tensor& gr, const Tensor& rs, const Tensor& w, const Tensor& r, int64_t rows,
          int64_t cols, Tensor& grad_x, Tensor& grad_w) {
        const int64_t parts = cuda::rmsnorm_bwd_num_partials(rows, res.device().index());
        Tensor partial = at::empty({parts, cols}, w.options());
        cuda::fused_add_rmsnorm_bwd(kernel_dtype(res, "fused_add_rmsnorm_backward"), gy.const_data_ptr(),
                                    ptr_or_null(gr), rs.const_data_ptr(), w.const_data_ptr<float>(),
                                    r.const_data_ptr<float>(), grad_x.mutable_data_ptr(),
                                    partial.mutable_data_ptr<float>(), parts, grad_w.mutable_data_ptr<float>(),
                                    rows, cols, stream_of(res));
        check_launch("fused_add_rmsnorm_backward");
      });
}

Tensor swiglu(const Tensor& gate_up) {
  const c10::cuda::CUDAGuard guard(gate_up.device());
  return swiglu_impl(gate_up, [&](const Tensor& gu, Tensor& out, int64_t rows, int64_t features) {
    cuda::swiglu_fwd(kernel_dtype(gu, "swiglu"), gu.const_data_ptr(), out.mutable_data_ptr(), rows, features,
                     stream_of(gu));
    check_launch("swiglu");
  });
}

Tensor swiglu_backward(const Tensor& grad_out, const Tensor& gate_up) {
  const c10::cuda::CUDAGuard guard(gate_up.device());
  return swiglu_backward_impl(grad_out, gate_up,
                              [&](const Tensor& go, const Tensor& gu, Tensor& grad, int64_t rows, int64_t features) {
    cuda::swiglu_bwd(kernel_dtype(gu, "swiglu_backward"), go.const_data_ptr(), gu.const_data_ptr(),
                     grad.mutable_data_ptr(), rows, features, stream_of(gu));
    check_launch("swiglu_backward");
  });
}

cuda::RopeShape rope_shape(const Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_rmsnorm_rope(const Tensor& q, const Tensor& k, const Tensor& q_weight,
                                                           const Tensor& k_weight, const Tensor& cos,
                                                           const Tensor& sin, double eps) {
  const c10::cuda::CUDAGuard guard(q.device());
  return qk_rmsnorm_rope_impl(q, k, q_weight, k_weight, cos, sin,
                              [&](const Tensor& x, const Tensor& w, const RopeTables& tab, Tensor& out, Tensor& rstd) {
    cuda::rmsnorm_rope_fwd(kernel_dtype(x, "qk_rmsnorm_rope"), x.const_data_ptr(), rope_shape(x),
                           w.const_data_ptr<float>(), tab.cos.const_data_ptr<float>(), tab.sin.const_data_ptr<float>(),
                           out.mutable_data_ptr(), rstd.mutable_data_ptr<float>(), static_cast<float>(eps),
                           stream_of(x));
    check_launch("qk_rmsnorm_rope");
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_rmsnorm_rope_backward(
    const Tensor& grad_q, const Tensor& grad_k, const Tensor& q, const Tensor& k, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& cos, const Tensor& sin, const Tensor& q_rstd, const Tensor& k_rstd) {
  const c10::cuda::CUDAGuard guard(q.device());
  return qk_rmsnorm_rope_backward_impl(
      grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd,
      [&](const Tensor& go, const Tensor& x, const Tensor& w, const RopeTables& tab, const Tensor& rstd,
          Tensor& grad_x, Tensor& grad_w) {
        const cuda::RopeShape shape = rope_shape(x);
        const int64_t parts = cuda::rmsnorm_rope_bwd_num_partials(shape, x.device().index());
        Tensor partial = at::empty({parts, shape.head_dim}, w.options());
        cuda::rmsnorm_rope_bwd(kernel_dtype(x, "qk_rmsnorm_rope_backward"), go.const_data_ptr(), x.const_data_ptr(),
                               shape, w.const_data_ptr<float>(), tab.cos.const_data_ptr<float>(),
                               tab.sin.const_data_ptr<float>(), rstd.const_data_ptr<float>(),
                               grad_x.mutable_data_ptr(), partial.mutable_data_ptr<float>(), parts,
                               grad_w.mutable_data_ptr<float>(), stream_of(x));
        check_launch("qk_rmsnorm_rope_backward");
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(unigendet, CUDA, m) { UNIGENDET_REGISTER_OPS(m); }

}  // namespace unigendet
