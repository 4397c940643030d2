// Accumulation-type views of fp64/fp32/fp16/bf16 memory for the CPU kernels (at::vec, compiled for
// the build machine's best instruction set: see setup.py).
//
// A kernel over elements of type T computes in acc_t<T> (fp32, or fp64 for fp64 inputs so that
// gradcheck can run on the extension) one vector of lanes<T>() lanes at a time: `load_acc` widens that
// many elements (fewer at a row's tail; missing lanes read as 0), `store_acc` narrows and writes them.
// Rows need no scratch buffers and tails need no scalar loops.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace unigendet {
namespace cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename T>
using AccVec = at::vec::Vectorized<acc_t<T>>;
template <typename T>
constexpr int64_t lanes() { return AccVec<T>::size(); }

template <typename T>
inline AccVec<T> load_acc(const T* p, int64_t n = lanes<T>()) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return AccVec<T>::loadu(p, n);
  } else {  // fp16/bf16: a Vectorized<T> holds 2 * lanes; widen and keep the first half
    using TVec = at::vec::Vectorized<T>;
    const TVec v = n == lanes<T>() ? TVec::loadu(p, lanes<T>()) : TVec::loadu(p, n);
    return std::get<0>(at::vec::convert_to_float<T>(v));
  }
}

template <typename T>
inline void store_acc(T* p, const AccVec<T>& v, int64_t n = lanes<T>()) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, n);
  }
}

// Outputs of a kernel are written once and not read back by it. When they are too large to stay
// in the caches anyway, full aligned fp32 vectors go out with non-temporal stores: no
// read-for-ownership of the destination lines, which otherwise doubles the traffic of the writes.
// UNIGENDET_CPU_NT_STORES=0|1 forces the choice (A/B measurements); kernels that stream end their
// parallel region with stream_fence().
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

inline bool use_stream_stores(int64_t output_bytes) {
  static const int forced = [] {
    const char* v = std::getenv("UNIGENDET_CPU_NT_STORES");
    return v && *v ? std::atoi(v) : -1;
  }();
  return forced >= 0 ? forced != 0 : output_bytes >= kStreamMinBytes;
}

template <typename T>
inline void store_out(T* p, const AccVec<T>& v, int64_t n, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    if (stream && n == lanes<T>() && reinterpret_cast<uintptr_t>(p) % 64 == 0) return _mm512_stream_ps(p, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (stream && n == lanes<T>() && reinterpret_cast<uintptr_t>(p) % 32 == 0) return _mm256_stream_ps(p, v);
  }
#endif
  store_acc(p, v, n);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename A>
inline A hsum(const at::vec::Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](auto& a, auto& b) { return a + b; }, v);
}

// Rows per task for at::parallel_for: about 16K elements per task, at least one row.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Weight gradients are summed in fixed blocks of rows whose count depends only on the shape (never
// on the thread count), then over blocks in block order: results are bitwise reproducible.
constexpr int64_t kMaxPartials = 64;
inline int64_t rows_per_partial(int64_t rows) { return std::max<int64_t>(1, (rows + kMaxPartials - 1) / kMaxPartials); }

// out[j] = sum over p, in order, of partial[p, j]; partial: (num_partials, cols).
template <typename A>
void sum_partials(const A* partial, int64_t num_partials, int64_t cols, A* out) {
  using V = at::vec::Vectorized<A>;
  for (int64_t j = 0; j < cols; j += V::size()) {
    const int64_t n = std::min<int64_t>(V::size(), cols - j);
    V acc(A(0));
    for (int64_t p = 0; p < num_partials; ++p) acc = acc + V::loadu(partial + p * cols + j, n);
    acc.store(out + j, n);
  }
}

}  // namespace cpu
}  // namespace unigendet
