// CPU implementations of the unigendet ops (schemas in csrc/library.cpp).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../op_impl.h"
#include "rmsnorm.h"
#include "rope.h"
#include "swiglu.h"

namespace unigendet {
namespace {

// fp32, fp16, bf16, and fp64 for gradcheck; the kernels compute in acc_t<scalar_t>.
#define UNIGENDET_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, name, __VA_ARGS__)

template <typename T>
const T* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr<T>() : nullptr; }

std::tuple<Tensor, Tensor, Tensor> fused_add_rmsnorm(const Tensor& x, const std::optional<Tensor>& residual,
                                                     const Tensor& weight, double eps) {
  return fused_add_rmsnorm_impl(x, residual, weight, [&](const RmsnormArgs& a, Tensor& y, Tensor& res, Tensor& rstd) {
    UNIGENDET_DISPATCH(x.scalar_type(), "fused_add_rmsnorm", [&] {
      using A = cpu::acc_t<scalar_t>;
      cpu::fused_add_rmsnorm_fwd<scalar_t>(a.x.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.residual),
                                           a.weight.const_data_ptr<A>(), y.mutable_data_ptr<scalar_t>(),
                                           res.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<A>(), a.rows,
                                           a.cols, static_cast<float>(eps));
    });
  });
}

std::tuple<Tensor, Tensor> fused_add_rmsnorm_backward(const Tensor& grad_y, const std::optional<Tensor>& grad_res,
                                                      const Tensor& res, const Tensor& weight, const Tensor& rstd) {
  return fused_add_rmsnorm_backward_impl(
      grad_y, grad_res, res, weight, rstd,
      [&](const Tensor& gy, const Tensor& gr, const Tensor& rs, const Tensor& w, const Tensor& r, int64_t rows,
          int64_t cols, Tensor& grad_x, Tensor& grad_w) {
        UNIGENDET_DISPATCH(res.scalar_type(), "fused_add_rmsnorm_backward", [&] {
          using A = cpu::acc_t<scalar_t>;
          cpu::fused_add_rmsnorm_bwd<scalar_t>(gy.const_data_ptr<scalar_t>(), ptr_or_null<scalar_t>(gr),
                                               rs.const_data_ptr<scalar_t>(), w.const_data_ptr<A>(),
                                               r.const_data_ptr<A>(), grad_x.mutable_data_ptr<scalar_t>(),
                                               grad_w.mutable_data_ptr<A>(), rows, cols);
        });
      });
}

Tensor swiglu(const Tensor& gate_up) {
  return swiglu_impl(gate_up, [&](const Tensor& gu, Tensor& out, int64_t rows, int64_t features) {
    UNIGENDET_DISPATCH(gu.scalar_type(), "swiglu", [&] {
      cpu::swiglu_fwd<scalar_t>(gu.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, features);
    });
  });
}

Tensor swiglu_backward(const Tensor& grad_out, const Tensor& gate_up) {
  return swiglu_backward_impl(grad_out, gate_up,
                              [&](const Tensor& go, const Tensor& gu, Tensor& grad, int64_t rows, int64_t features) {
    UNIGENDET_DISPATCH(gu.scalar_type(), "swiglu_backward", [&] {
      cpu::swiglu_bwd<scalar_t>(go.const_data_ptr<scalar_t>(), gu.const_data_ptr<scalar_t>(),
                                grad.mutable_data_ptr<scalar_t>(), rows, features);
    });
  });
}

cpu::RopeShape rope_shape(const Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), x.stride(0), x.stride(1), x.stride(2)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_rmsnorm_rope(const Tensor& q, const Tensor& k, const Tensor& q_weight,
                                                           const Tensor& k_weight, const Tensor& cos,
                                                           const Tensor& sin, double eps) {
  return qk_rmsnorm_rope_impl(q, k, q_weight, k_weight, cos, sin,
                              [&](const Tensor& x, const Tensor& w, const RopeTables& tab, Tensor& out, Tensor& rstd) {
    UNIGENDET_DISPATCH(x.scalar_type(), "qk_rmsnorm_rope", [&] {
      using A = cpu::acc_t<scalar_t>;
      cpu::rmsnorm_rope_fwd<scalar_t>(x.const_data_ptr<scalar_t>(), rope_shape(x), w.const_data_ptr<A>(),
                                      tab.cos.const_data_ptr<A>(), tab.sin.const_data_ptr<A>(),
                                      out.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<A>(),
                                      static_cast<float>(eps));
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_rmsnorm_rope_backward(
    const Tensor& grad_q, const Tensor& grad_k, const Tensor& q, const Tensor& k, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& cos, const Tensor& sin, const Tensor& q_rstd, const Tensor& k_rstd) {
  return qk_rmsnorm_rope_backward_impl(
      grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, q_rstd, k_rstd,
      [&](const Tensor& go, const Tensor& x, const Tensor& w, const RopeTables& tab, const Tensor& rstd,
          Tensor& grad_x, Tensor& grad_w) {
        UNIGENDET_DISPATCH(x.scalar_type(), "qk_rmsnorm_rope_backward", [&] {
          using A = cpu::acc_t<scalar_t>;
          cpu::rmsnorm_rope_bwd<scalar_t>(go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), rope_shape(x),
                                          w.const_data_ptr<A>(), tab.cos.const_data_ptr<A>(),
                                          tab.sin.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
                                          grad_x.mutable_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<A>());
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(unigendet, CPU, m) { UNIGENDET_REGISTER_OPS(m); }

}  // namespace unigendet
