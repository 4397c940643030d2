// CPU implementations of the unigendet ops (schemas in csrc/library.cpp).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../op_impl.h"
#include "attention.h"
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

// mmsa_attention (CPU only: the Triton kernels serve GPUs).
template <typename T>
cpu::AttnProblem<T> attn_problem(const MmsaArgs& a) {
  cpu::AttnProblem<T> p;
  p.B = a.B;
  p.H = a.H;
  p.Hkv = a.Hkv;
  p.D = a.D;
  p.scale = a.scale;
  for (int s = 0; s < 2; ++s) {
    for (int o = 0; o < 2; ++o) p.reads[s][o] = a.reads[s][o];
    auto& st = p.s[s];
    st.causal = a.causal[s];
    if (a.q[s].defined()) {
      st.q = a.q[s].const_data_ptr<T>();
      st.tq = a.q[s].size(1);
      for (int d = 0; d < 3; ++d) st.q_s[d] = a.q[s].stride(d);
    }
    if (a.k[s].defined()) {
      st.k = a.k[s].const_data_ptr<T>();
      st.v = a.v[s].const_data_ptr<T>();
      st.tk = a.k[s].size(1);
      for (int d = 0; d < 3; ++d) {
        st.k_s[d] = a.k[s].stride(d);
        st.v_s[d] = a.v[s].stride(d);
      }
    }
    st.lens = ptr_or_null<int64_t>(a.lens[s]);
  }
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> mmsa_attention(
    const std::optional<Tensor>& q_g, const std::optional<Tensor>& k_g, const std::optional<Tensor>& v_g,
    const std::optional<Tensor>& q_d, const std::optional<Tensor>& k_d, const std::optional<Tensor>& v_d,
    const std::optional<Tensor>& len_g, const std::optional<Tensor>& len_d, bool g2d, bool d2g, bool g_causal,
    bool d_causal, double scale) {
  return mmsa_attention_impl(q_g, k_g, v_g, q_d, k_d, v_d, len_g, len_d, g2d, d2g, g_causal, d_causal, scale,
                             [&](const MmsaArgs& a, Tensor(&o)[2], Tensor(&lse)[2]) {
    const Tensor& like = a.q[0].defined() ? a.q[0] : a.q[1];
    UNIGENDET_DISPATCH(like.scalar_type(), "mmsa_attention", [&] {
      using A = cpu::acc_t<scalar_t>;
      cpu::AttnProblem<scalar_t> p = attn_problem<scalar_t>(a);
      for (int s = 0; s < 2; ++s) {
        if (!a.q[s].defined()) continue;
        p.s[s].o = o[s].mutable_data_ptr<scalar_t>();
        p.s[s].lse = lse[s].mutable_data_ptr<A>();
      }
      cpu::mmsa_attention_fwd<scalar_t>(p);
    });
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mmsa_attention_backward(
    const std::optional<Tensor>& grad_o_g, const std::optional<Tensor>& grad_o_d,
    const std::optional<Tensor>& grad_lse_g, const std::optional<Tensor>& grad_lse_d,
    const std::optional<Tensor>& q_g, const std::optional<Tensor>& k_g, const std::optional<Tensor>& v_g,
    const std::optional<Tensor>& q_d, const std::optional<Tensor>& k_d, const std::optional<Tensor>& v_d,
    const Tensor& o_g, const Tensor& o_d, const Tensor& lse_g, const Tensor& lse_d,
    const std::optional<Tensor>& len_g, const std::optional<Tensor>& len_d, bool g2d, bool d2g, bool g_causal,
    bool d_causal, double scale) {
  return mmsa_attention_backward_impl(
      grad_o_g, grad_o_d, grad_lse_g, grad_lse_d, q_g, k_g, v_g, q_d, k_d, v_d, o_g, o_d, lse_g, lse_d, len_g, len_d,
      g2d, d2g, g_causal, d_causal, scale,
      [&](const MmsaArgs& a, Tensor(&go)[2], Tensor(&gl)[2], Tensor(&o)[2], Tensor(&lse)[2], Tensor(&dq)[2],
          Tensor(&dk)[2], Tensor(&dv)[2]) {
        const Tensor& like = a.q[0].defined() ? a.q[0] : a.q[1];
        UNIGENDET_DISPATCH(like.scalar_type(), "mmsa_attention_backward", [&] {
          using A = cpu::acc_t<scalar_t>;
          cpu::AttnProblem<scalar_t> p = attn_problem<scalar_t>(a);
          for (int s = 0; s < 2; ++s) {
            auto& st = p.s[s];
            if (a.q[s].defined()) {
              st.o = o[s].mutable_data_ptr<scalar_t>();
              st.lse = lse[s].mutable_data_ptr<A>();
              st.dout = go[s].const_data_ptr<scalar_t>();
              st.dlse = ptr_or_null<A>(gl[s]);
              st.dq = dq[s].mutable_data_ptr<scalar_t>();
            }
            if (a.k[s].defined()) {
              st.dk = dk[s].mutable_data_ptr<scalar_t>();
              st.dv = dv[s].mutable_data_ptr<scalar_t>();
            }
          }
          cpu::mmsa_attention_bwd<scalar_t>(p);
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(unigendet, CPU, m) {
  UNIGENDET_REGISTER_OPS(m);
  m.impl("mmsa_attention", &mmsa_attention);  // CPU only, so not in the macro both devices share
  m.impl("mmsa_attention_backward", &mmsa_attention_backward);
}

}  // namespace unigendet
