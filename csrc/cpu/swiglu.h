// CPU kernels of swiglu: out = silu(gate) * up with gate, up the two halves of each row of gate_up.
// One read of gate_up and one write of out (eager: silu writes a temporary that the product re-reads,
// and autograd's slice backward writes zero-filled copies of both halves).
#pragma once

#include <ATen/Parallel.h>

#include "vec_io.h"

namespace unigendet {
namespace cpu {

// sigmoid(g) = 1 / (1 + exp(-g)): exp overflows to inf for g << 0 and the result is 0, never NaN.
// fp32 uses the faster exp of 20 ULP (errors ~1e-6, far below the fp16/bf16 rounding of the output).
template <typename A>
inline at::vec::Vectorized<A> sigmoid(const at::vec::Vectorized<A>& g) {
  const at::vec::Vectorized<A> one(A(1));
  if constexpr (std::is_same_v<A, float>) {
    return one / (one + g.neg().exp_u20());
  } else {
    return one / (one + g.neg().exp());
  }
}

// gate_up: (rows, 2F) contiguous; out: (rows, F).
template <typename T, typename A = acc_t<T>>
void swiglu_fwd(const T* gate_up, T* out, int64_t rows, int64_t features) {
  using V = AccVec<T>;
  constexpr int64_t kV = lanes<T>();
  const bool nt = use_stream_stores(rows * features * int64_t(sizeof(T)));
  at::parallel_for(0, rows, row_grain(2 * features), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * features;
      const T* up = gate + features;
      T* o = out + r * features;
      for (int64_t j = 0; j < features; j += kV) {
        const int64_t n = std::min<int64_t>(kV, features - j);
        const V g = load_acc(gate + j, n);
        store_out(o + j, g * sigmoid(g) * load_acc(up + j, n), n, nt);
      }
    }
    stream_fence();
  });
}

// grad_out: (rows, F); grad_gate_up: (rows, 2F). With s = sigmoid(g):
//   d gate = grad_out * up * s * (1 + g * (1 - s)),   d up = grad_out * g * s.
template <typename T, typename A = acc_t<T>>
void swiglu_bwd(const T* grad_out, const T* gate_up, T* grad_gate_up, int64_t rows, int64_t features) {
  using V = AccVec<T>;
  constexpr int64_t kV = lanes<T>();
  constexpr int64_t kChunk = 512;  // elements, a multiple of kV
  const bool nt = use_stream_stores(2 * rows * features * int64_t(sizeof(T)));
  at::parallel_for(0, rows, row_grain(3 * features), [&](int64_t begin, int64_t end) {
    const V one(A(1));
    alignas(64) A dup_chunk[kChunk];
    for (int64_t r = begin; r < end; ++r) {
      const T* gate = gate_up + r * 2 * features;
      const T* up = gate + features;
      const T* go = grad_out + r * features;
      T* dgate = grad_gate_up + r * 2 * features;
      T* dup = dgate + features;
      // Chunk by chunk: d gate goes out while d up waits in an L1 buffer, then d up goes out, so the
      // stores fill one output's lines at a time. Interleaving the two outputs (F elements apart)
      // vector by vector made the non-temporal stores 1.9x slower than plain ones on an AVX2 EPYC
      // (N=8192, F=4096); chunked, they are as fast.
      for (int64_t c = 0; c < features; c += kChunk) {
        const int64_t chunk_end = std::min(features, c + kChunk);
        for (int64_t j = c; j < chunk_end; j += kV) {
          const int64_t n = std::min<int64_t>(kV, features - j);
          const V g = load_acc(gate + j, n);
          const V d = load_acc(go + j, n);
          const V s = sigmoid(g);
          store_out(dgate + j, d * load_acc(up + j, n) * s * (one + g * (one - s)), n, nt);
          (d * g * s).store(dup_chunk + (j - c));
        }
        for (int64_t j = c; j < chunk_end; j += kV) {
          store_out(dup + j, V::loadu(dup_chunk + (j - c)), std::min<int64_t>(kV, features - j), nt);
        }
      }
    }
    stream_fence();
  });
}

}  // namespace cpu
}  // namespace unigendet
