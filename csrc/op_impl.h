// Device-independent halves of the ops: input checks, output allocation, weight-gradient casts.
//
// csrc/cpu/ops.cpp and csrc/cuda/register.cpp call these with a callback that runs their kernels on
// prepared, contiguous inputs, so both devices accept and return exactly the same things.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

// Registers the six ops for one dispatch key; the including file (csrc/cpu/ops.cpp for CPU,
// csrc/cuda/register.cpp for CUDA) defines a function of each op's name.
#define UNIGENDET_REGISTER_OPS(m)                                         \
  m.impl("fused_add_rmsnorm", &fused_add_rmsnorm);                       \
  m.impl("fused_add_rmsnorm_backward", &fused_add_rmsnorm_backward);     \
  m.impl("swiglu", &swiglu);                                             \
  m.impl("swiglu_backward", &swiglu_backward);                           \
  m.impl("qk_rmsnorm_rope", &qk_rmsnorm_rope);                           \
  m.impl("qk_rmsnorm_rope_backward", &qk_rmsnorm_rope_backward)

namespace unigendet {

using at::Tensor;

// fp32 for fp32/fp16/bf16 activations, fp64 for fp64 (CPU only: gradcheck).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_activation(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
              op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but the input has ", like.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
              like.device());
}

// A small parameter tensor (weight, cos, sin) as a contiguous tensor of the accumulation dtype.
inline Tensor as_acc(const Tensor& t, const Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be a floating-point tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
              like.device());
  return t.to(acc_dtype(like.scalar_type())).contiguous();
}

// ---------------------------------------------------------------- fused_add_rmsnorm
struct RmsnormArgs {
  Tensor x, residual, weight;  // x, residual contiguous (residual may be undefined); weight (C,) acc dtype
  int64_t rows, cols;
};

template <typename Run>  // run(const RmsnormArgs&, Tensor& y, Tensor& res, Tensor& rstd)
std::tuple<Tensor, Tensor, Tensor> fused_add_rmsnorm_impl(const Tensor& x, const std::optional<Tensor>& residual,
                                                          const Tensor& weight, Run&& run) {
  constexpr const char* op = "unigendet::fused_add_rmsnorm";
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0, op, ": x must be non-empty, got shape ", x.sizes());
  check_activation(x, x, op, "x");
  RmsnormArgs a;
  a.cols = x.size(-1);
  a.rows = x.numel() / a.cols;
  a.x = x.contiguous();
  if (residual.has_value()) {
    check_activation(*residual, x, op, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), op, ": residual shape ", residual->sizes(), " != x shape ", x.sizes());
    a.residual = residual->contiguous();
  }
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == a.cols, op, ": weight must be (", a.cols, ",), got ", weight.sizes());
  a.weight = as_acc(weight, x, op, "weight");
  Tensor y = at::empty_like(a.x), res = at::empty_like(a.x);
  Tensor rstd = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(acc_dtype(x.scalar_type())));
  run(a, y, res, rstd);
  return {y, res, rstd};
}

template <typename Run>  // run(grad_y, grad_res (may be undefined), res, weight, rstd, rows, cols, grad_x, grad_weight)
std::tuple<Tensor, Tensor> fused_add_rmsnorm_backward_impl(const Tensor& grad_y, const std::optional<Tensor>& grad_res,
                                                           const Tensor& res, const Tensor& weight,
                                                           const Tensor& rstd, Run&& run) {
  constexpr const char* op = "unigendet::fused_add_rmsnorm_backward";
  check_activation(grad_y, res, op, "grad_y");
  TORCH_CHECK(grad_y.sizes() == res.sizes(), op, ": grad_y shape ", grad_y.sizes(), " != res shape ", res.sizes());
  const int64_t cols = res.size(-1), rows = res.numel() / cols;
  TORCH_CHECK(rstd.numel() == rows, op, ": rstd must have ", rows, " elements, got ", rstd.numel());
  Tensor gr;
  if (grad_res.has_value()) {
    check_activation(*grad_res, res, op, "grad_res");
    gr = grad_res->contiguous();
  }
  const Tensor w = as_acc(weight, res, op, "weight");
  const Tensor r = rstd.to(acc_dtype(res.scalar_type())).contiguous();
  Tensor grad_x = at::empty_like(res, at::MemoryFormat::Contiguous);
  Tensor grad_w = at::empty({cols}, w.options());
  run(grad_y.contiguous(), gr, res.contiguous(), w, r, rows, cols, grad_x, grad_w);
  return {grad_x, grad_w.to(weight.scalar_type())};
}

// ---------------------------------------------------------------- swiglu
template <typename Run>  // run(gate_up contiguous, out, rows, features)
Tensor swiglu_impl(const Tensor& gate_up, Run&& run) {
  constexpr const char* op = "unigendet::swiglu";
  check_activation(gate_up, gate_up, op, "gate_up");
  TORCH_CHECK(gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0, op,
              ": the last dimension must be even (gate and up halves), got shape ", gate_up.sizes());
  const int64_t features = gate_up.size(-1) / 2;
  auto out_shape = gate_up.sizes().vec();
  out_shape.back() = features;
  Tensor out = at::empty(out_shape, gate_up.options());
  if (out.numel() > 0) run(gate_up.contiguous(), out, out.numel() / features, features);
  return out;
}

template <typename Run>  // run(grad_out contiguous, gate_up contiguous, grad_gate_up, rows, features)
Tensor swiglu_backward_impl(const Tensor& grad_out, const Tensor& gate_up, Run&& run) {
  constexpr const char* op = "unigendet::swiglu_backward";
  check_activation(grad_out, gate_up, op, "grad_out");
  const int64_t features = gate_up.size(-1) / 2;
  TORCH_CHECK(grad_out.numel() * 2 == gate_up.numel() && grad_out.size(-1) == features, op,
              ": grad_out shape ", grad_out.sizes(), " does not match gate_up shape ", gate_up.sizes());
  Tensor grad = at::empty_like(gate_up, at::MemoryFormat::Contiguous);
  if (grad.numel() > 0) run(grad_out.contiguous(), gate_up.contiguous(), grad, grad_out.numel() / features, features);
  return grad;
}

// ---------------------------------------------------------------- qk_rmsnorm_rope
// A (B, T, H, D) input with unit stride along D (e.g. a view of a fused qkv projection) is used as it
// is; anything else is made contiguous.
inline Tensor rope_input(const Tensor& x, const Tensor& like, const char* op, const char* name) {
  check_activation(x, like, op, name);
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be (B, T, H, D), got shape ", x.sizes());
  TORCH_CHECK(x.size(3) % 2 == 0, op, ": the head dimension must be even, got ", x.size(3));
  return x.stride(3) == 1 ? x : x.contiguous();
}

struct RopeTables {
  Tensor q_weight, k_weight, cos, sin;  // acc dtype, contiguous
};

inline RopeTables rope_tables(const Tensor& q, const Tensor& k, const Tensor& q_weight, const Tensor& k_weight,
                              const Tensor& cos, const Tensor& sin, const char* op) {
  const int64_t T = q.size(1), D = q.size(3);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == T && k.size(3) == D, op,
              ": k must be (B, T, Hkv, D) with q's B, T, D; got q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q_weight.dim() == 1 && q_weight.size(0) == D && k_weight.dim() == 1 && k_weight.size(0) == D, op,
              ": q_weight and k_weight must be (", D, ",)");
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D / 2 && sin.sizes() == cos.sizes(), op,
              ": cos and sin must be (T, D/2) = (", T, ", ", D / 2, "), got ", cos.sizes(), " and ", sin.sizes());
  return {as_acc(q_weight, q, op, "q_weight"), as_acc(k_weight, q, op, "k_weight"), as_acc(cos, q, op, "cos"),
          as_acc(sin, q, op, "sin")};
}

template <typename Run>  // run(x, weight, tables, out, rstd) for each of q and k
std::tuple<Tensor, Tensor, Tensor, Tensor> qk_rmsnorm_rope_impl(const Tensor& q_in, const Tensor& k_in,
                                                                const Tensor& q_weight, const Tensor& k_weight,
                                                                const Tensor& cos, const Tensor& sin, Run&& run) {
  constexpr const char* op = "unigendet::qk_rmsnorm_rope";
  const Tensor q = rope_input(q_in, q_in, op, "q"), k = rope_input(k_in, q_in, op, "k");
  const RopeTables tab = rope_tables(q, k, q_weight, k_weight, cos, sin, op);
  const auto acc = q.options().dtype(acc_dtype(q.scalar_type()));
  Tensor q_out = at::empty(q.sizes(), q.options()), k_out = at::empty(k.sizes(), k.options());
  Tensor q_rstd = at::empty(q.sizes().slice(0, 3), acc), k_rstd = at::empty(k.sizes().slice(0, 3), acc);
  if (q.numel() > 0) run(q, tab.q_weight, tab, q_out, q_rstd);
  if (k.numel() > 0) run(k, tab.k_weight, tab, k_out, k_rstd);
  return {q_out, k_out, q_rstd, k_rstd};
}

// run(grad_out contiguous, x, weight, tables, rstd, grad_x, grad_weight) for each of q and k
template <typename Run>
std::tuple<Tensor, Tensor, Tensor, Tensor> qk_rmsnorm_rope_backward_impl(
    const Tensor& grad_q, const Tensor& grad_k, const Tensor& q_in, const Tensor& k_in, const Tensor& q_weight,
    const Tensor& k_weight, const Tensor& cos, const Tensor& sin, const Tensor& q_rstd, const Tensor& k_rstd,
    Run&& run) {
  constexpr const char* op = "unigendet::qk_rmsnorm_rope_backward";
  const Tensor q = rope_input(q_in, q_in, op, "q"), k = rope_input(k_in, q_in, op, "k");
  const RopeTables tab = rope_tables(q, k, q_weight, k_weight, cos, sin, op);
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  auto one = [&](const Tensor& grad, const Tensor& x, const Tensor& w, const Tensor& rstd, const char* name,
                 Tensor& grad_x, Tensor& grad_w) {
    check_activation(grad, x, op, name);
    TORCH_CHECK(grad.sizes() == x.sizes(), op, ": ", name, " shape ", grad.sizes(), " != ", x.sizes());
    grad_x = at::empty(x.sizes(), x.options());
    grad_w = at::zeros_like(w);
    if (x.numel() > 0) run(grad.contiguous(), x, w, tab, rstd.to(w.scalar_type()).contiguous(), grad_x, grad_w);
  };
  one(grad_q, q, tab.q_weight, q_rstd, "grad_q", std::get<0>(out), std::get<2>(out));
  one(grad_k, k, tab.k_weight, k_rstd, "grad_k", std::get<1>(out), std::get<3>(out));
  std::get<2>(out) = std::get<2>(out).to(q_weight.scalar_type());
  std::get<3>(out) = std::get<3>(out).to(k_weight.scalar_type());
  return out;
}

// ---------------------------------------------------------------- mmsa_attention
// Streams g (index 0) and d (index 1): q (B, Tq, H, D) or absent, k and v (B, Tk, Hkv, D) or absent, lens
// (B,) int. Inputs with unit stride along D are used as they are. Absent outputs are empty (0,) tensors.
struct MmsaArgs {
  Tensor q[2], k[2], v[2], lens[2];  // undefined where absent; lens int64 contiguous
  int64_t B = 0, H = 0, Hkv = 0, D = 0;
  bool reads[2][2] = {{true, true}, {true, true}}, causal[2] = {false, false};
  double scale = 1.0;
};

inline Tensor mmsa_input(const std::optional<Tensor>& t, const Tensor& like, const char* op, const char* name) {
  if (!t.has_value()) return Tensor();
  check_activation(*t, like, op, name);
  TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be (B, T, heads, D), got shape ", t->sizes());
  return t->stride(3) == 1 ? *t : t->contiguous();
}

inline MmsaArgs mmsa_args(const std::optional<Tensor>& q_g, const std::optional<Tensor>& k_g,
                          const std::optional<Tensor>& v_g, const std::optional<Tensor>& q_d,
                          const std::optional<Tensor>& k_d, const std::optional<Tensor>& v_d,
                          const std::optional<Tensor>& len_g, const std::optional<Tensor>& len_d, bool g2d, bool d2g,
                          bool g_causal, bool d_causal, double scale, const char* op) {
  const std::optional<Tensor>* qs[2] = {&q_g, &q_d};
  const std::optional<Tensor>* ks[2] = {&k_g, &k_d};
  const std::optional<Tensor>* vs[2] = {&v_g, &v_d};
  const std::optional<Tensor>* ls[2] = {&len_g, &len_d};
  const char* names[2][3] = {{"q_g", "k_g", "v_g"}, {"q_d", "k_d", "v_d"}};
  TORCH_CHECK(q_g.has_value() || q_d.has_value(), op, ": both streams are absent (q_g and q_d are None)");
  const Tensor& like = q_g.has_value() ? *q_g : *q_d;
  MmsaArgs a;
  a.B = like.size(0);
  a.H = like.size(2);
  a.D = like.size(3);
  for (int s = 0; s < 2; ++s) {
    a.q[s] = mmsa_input(*qs[s], like, op, names[s][0]);
    a.k[s] = mmsa_input(*ks[s], like, op, names[s][1]);
    a.v[s] = mmsa_input(*vs[s], like, op, names[s][2]);
    TORCH_CHECK(a.k[s].defined() == a.v[s].defined() && (!a.q[s].defined() || a.k[s].defined()), op, ": stream ",
                names[s][0] + 2, " needs both k and v, and them whenever q is given");
    if (!a.k[s].defined()) continue;
    if (a.Hkv == 0) a.Hkv = a.k[s].size(2);
    TORCH_CHECK(a.k[s].sizes() == a.v[s].sizes() && a.k[s].size(0) == a.B && a.k[s].size(2) == a.Hkv &&
                    a.k[s].size(3) == a.D,
                op, ": ", names[s][1], " and ", names[s][2], " must be (B, T, Hkv, D) = (", a.B, ", T, ", a.Hkv, ", ",
                a.D, "), got ", a.k[s].sizes(), " and ", a.v[s].sizes());
    if (a.q[s].defined())
      TORCH_CHECK(a.q[s].size(0) == a.B && a.q[s].size(1) == a.k[s].size(1) && a.q[s].size(2) == a.H &&
                      a.q[s].size(3) == a.D,
                  op, ": ", names[s][0], " must be (B, T, H, D) = (", a.B, ", ", a.k[s].size(1), ", ", a.H, ", ", a.D,
                  "), got ", a.q[s].sizes());
    if (ls[s]->has_value()) {
      const Tensor& l = **ls[s];
      TORCH_CHECK(!l.is_floating_point() && l.dim() == 1 && l.size(0) == a.B, op, ": the lengths of stream ",
                  names[s][0] + 2, " must be an int tensor of shape (", a.B, ",), got ", l.sizes());
      a.lens[s] = l.to(at::kCPU, at::kLong).contiguous();
      const int64_t* p = a.lens[s].const_data_ptr<int64_t>();
      for (int64_t b = 0; b < a.B; ++b)
        TORCH_CHECK(p[b] >= 1 && p[b] <= a.k[s].size(1), op, ": the lengths of stream ", names[s][0] + 2,
                    " must be in [1, ", a.k[s].size(1), "], got ", p[b]);
    }
  }
  TORCH_CHECK(a.Hkv > 0 && a.H % a.Hkv == 0, op, ": H=", a.H, " must be a multiple of Hkv=", a.Hkv);
  a.reads[0][1] = g2d;
  a.reads[1][0] = d2g;
  a.causal[0] = g_causal;
  a.causal[1] = d_causal;
  a.scale = scale;
  return a;
}

template <typename Run>  // run(const MmsaArgs&, Tensor (&o)[2], Tensor (&lse)[2]) fills the outputs
std::tuple<Tensor, Tensor, Tensor, Tensor> mmsa_attention_impl(
    const std::optional<Tensor>& q_g, const std::optional<Tensor>& k_g, const std::optional<Tensor>& v_g,
    const std::optional<Tensor>& q_d, const std::optional<Tensor>& k_d, const std::optional<Tensor>& v_d,
    const std::optional<Tensor>& len_g, const std::optional<Tensor>& len_d, bool g2d, bool d2g, bool g_causal,
    bool d_causal, double scale, Run&& run) {
  constexpr const char* op = "unigendet::mmsa_attention";
  const MmsaArgs a = mmsa_args(q_g, k_g, v_g, q_d, k_d, v_d, len_g, len_d, g2d, d2g, g_causal, d_causal, scale, op);
  const Tensor& like = a.q[0].defined() ? a.q[0] : a.q[1];
  const auto acc = like.options().dtype(acc_dtype(like.scalar_type()));
  Tensor o[2], lse[2];
  for (int s = 0; s < 2; ++s) {
    const bool present = a.q[s].defined();
    o[s] = present ? at::empty(a.q[s].sizes(), like.options()) : at::empty({0}, like.options());
    lse[s] = present ? at::empty({a.B, a.H, a.q[s].size(1)}, acc) : at::empty({0}, acc);
  }
  if (a.B > 0 && a.H > 0 && a.D > 0) run(a, o, lse);
  return {o[0], o[1], lse[0], lse[1]};
}

// run(const MmsaArgs&, grad_o[2], grad_lse[2] (may be undefined), o[2], lse[2], dq[2], dk[2], dv[2])
template <typename Run>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mmsa_attention_backward_impl(
    const std::optional<Tensor>& grad_o_g, const std::optional<Tensor>& grad_o_d,
    const std::optional<Tensor>& grad_lse_g, const std::optional<Tensor>& grad_lse_d,
    const std::optional<Tensor>& q_g, const std::optional<Tensor>& k_g, const std::optional<Tensor>& v_g,
    const std::optional<Tensor>& q_d, const std::optional<Tensor>& k_d, const std::optional<Tensor>& v_d,
    const Tensor& o_g, const Tensor& o_d, const Tensor& lse_g, const Tensor& lse_d,
    const std::optional<Tensor>& len_g, const std::optional<Tensor>& len_d, bool g2d, bool d2g, bool g_causal,
    bool d_causal, double scale, Run&& run) {
  constexpr const char* op = "unigendet::mmsa_attention_backward";
  const MmsaArgs a = mmsa_args(q_g, k_g, v_g, q_d, k_d, v_d, len_g, len_d, g2d, d2g, g_causal, d_causal, scale, op);
  const Tensor& like = a.q[0].defined() ? a.q[0] : a.q[1];
  const std::optional<Tensor>* gos[2] = {&grad_o_g, &grad_o_d};
  const std::optional<Tensor>* gls[2] = {&grad_lse_g, &grad_lse_d};
  const Tensor* os[2] = {&o_g, &o_d};
  const Tensor* lses[2] = {&lse_g, &lse_d};
  Tensor go[2], gl[2], o[2], lse[2], dq[2], dk[2], dv[2];
  for (int s = 0; s < 2; ++s) {
    if (a.q[s].defined()) {
      TORCH_CHECK(os[s]->sizes() == a.q[s].sizes() && lses[s]->sizes() == at::IntArrayRef({a.B, a.H, a.q[s].size(1)}),
                  op, ": the saved output and lse of stream ", s == 0 ? "g" : "d", " do not match its queries");
      check_activation(*os[s], like, op, "o");
      o[s] = os[s]->contiguous();
      lse[s] = lses[s]->to(acc_dtype(like.scalar_type())).contiguous();
      if (gos[s]->has_value()) {
        check_activation(**gos[s], like, op, "grad_o");
        TORCH_CHECK((*gos[s])->sizes() == a.q[s].sizes(), op, ": grad_o shape ", (*gos[s])->sizes(), " != ",
                    a.q[s].sizes());
        go[s] = (*gos[s])->contiguous();
      } else {
        go[s] = at::zeros(a.q[s].sizes(), like.options());
      }
      if (gls[s]->has_value()) {
        TORCH_CHECK((*gls[s])->sizes() == lse[s].sizes(), op, ": grad_lse shape ", (*gls[s])->sizes(), " != ",
                    lse[s].sizes());
        gl[s] = (*gls[s])->to(acc_dtype(like.scalar_type())).contiguous();
      }
      dq[s] = at::empty(a.q[s].sizes(), like.options());
    } else {
      dq[s] = at::empty({0}, like.options());
    }
    // every element of dk and dv is written (zero for keys no row reads)
    dk[s] = at::empty(a.k[s].defined() ? a.k[s].sizes() : at::IntArrayRef({0}), like.options());
    dv[s] = at::empty(a.k[s].defined() ? a.k[s].sizes() : at::IntArrayRef({0}), like.options());
  }
  if (a.B > 0 && a.H > 0 && a.D > 0) run(a, go, gl, o, lse, dq, dk, dv);
  return {dq[0], dk[0], dv[0], dq[1], dk[1], dv[1]};
}

}  // namespace unigendet
