// Global-memory traffic of the emulated kernels. The kernel sources (csrc/cuda/*.cu) are compiled with
// GCC's ThreadSanitizer instrumentation but linked without its runtime: the compiler then reports
// every load and store of kernel code to the __tsan_* callbacks below, which count the bytes and
// the accesses that fall inside the buffers a test registered. So a test can check that a
// kernel reads each input row once and moves 16-byte packs, without changing a line of the kernel.
// (Widths are those of the host compiler's code for the same source: a 16-byte Pack copy is one
// 16-byte access, as nvcc's LDG.128 / STG.128.)
#include <cstddef>
#include <cstdint>
#include <vector>

namespace {

struct Buffer {
  uintptr_t begin, end;
  int64_t loaded = 0, stored = 0, accesses = 0;
};

std::vector<Buffer> g_buffers;
bool g_tracing = false;

void record(const volatile void* p, uint64_t bytes, bool store) {
  if (!g_tracing) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (Buffer& b : g_buffers)
    if (a >= b.begin && a < b.end) {
      (store ? b.stored : b.loaded) += static_cast<int64_t>(bytes);
      ++b.accesses;
      return;
    }
}

}  // namespace

extern "C" {

// ---------------------------------------------------------------- the test's side
// Starts counting accesses to n buffers [ptrs[i], ptrs[i] + sizes[i]) (bytes), from zero.
void cuda_emu_trace_start(int n, const void* const* ptrs, const int64_t* sizes) {
  g_buffers.clear();
  for (int i = 0; i < n; ++i) {
    const auto a = reinterpret_cast<uintptr_t>(ptrs[i]);
    g_buffers.push_back({a, a + static_cast<uintptr_t>(sizes[i])});
  }
  g_tracing = true;
}

void cuda_emu_trace_stop() { g_tracing = false; }

// what: 0 bytes loaded, 1 bytes stored, 2 accesses; of buffer i.
int64_t cuda_emu_trace_stat(int i, int what) {
  const Buffer& b = g_buffers.at(static_cast<size_t>(i));
  const int64_t v[] = {b.loaded, b.stored, b.accesses};
  return v[what];
}

// ---------------------------------------------------------------- the instrumentation's side
void __tsan_init() {}
void __tsan_read1(void* p) { record(p, 1, false); }
void __tsan_read2(void* p) { record(p, 2, false); }
void __tsan_read4(void* p) { record(p, 4, false); }
void __tsan_read8(void* p) { record(p, 8, false); }
void __tsan_read16(void* p) { record(p, 16, false); }
void __tsan_write1(void* p) { record(p, 1, true); }
void __tsan_write2(void* p) { record(p, 2, true); }
void __tsan_write4(void* p) { record(p, 4, true); }
void __tsan_write8(void* p) { record(p, 8, true); }
void __tsan_write16(void* p) { record(p, 16, true); }
void __tsan_read_range(void* p, unsigned long size) { record(p, size, false); }
void __tsan_write_range(void* p, unsigned long size) { record(p, size, true); }
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
// Atomics of the host helpers (cached device attributes, static-local guards): plain atomics.
char __tsan_atomic8_load(const volatile char* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }
int __tsan_atomic32_load(const volatile int* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }
void __tsan_atomic32_store(volatile int* a, int v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }

}  // extern "C"
