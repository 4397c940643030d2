// Memory accesses of the emulated kernels: global-memory traffic, and reads of unwritten __shared__ memory. The kernel sources (csrc/cuda/*.cu) are compiled with
// GCC's ThreadSanitizer instrumentation but linked without its runtime: the compiler then reports
// every load and store of kernel code to the __tsan_* callbacks below, which count the bytes and
// the accesses that fall inside the buffers a test registered. So a test can check that a
// kernel reads each input row once and moves 16-byte packs, without changing a line of the kernel;
// and a read of shared memory that no thread of the block has written stops the launch.
// (Widths are those of the host compiler's code for the same source: a 16-byte Pack is one 16-byte
// access here. nvcc's code is checked separately, from its SASS: tests/sass.py, tests/test_ext.py.)
#include <link.h>

#include <cstddef>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <unordered_set>
#include <vector>

namespace cuda_emu {
uint64_t running_block();  // cuda_emu.cpp
}

namespace {

struct Buffer {
  uintptr_t begin, end;
  int64_t loaded = 0, stored = 0, accesses = 0;
};

std::vector<Buffer> g_buffers;
bool g_tracing = false;

// ---------------------------------------------------------------- __shared__ initialisation check
// __shared__ variables are statics of this library, so a kernel access that lands in one of its
// writable segments is a shared-memory access. Per block, the bytes written so far are kept; a read
// of any other byte is an error (shared memory starts undefined in every block).
struct Span {
  uintptr_t lo, hi;
};

std::vector<Span> writable_segments_of_this_library() {
  struct Search {
    uintptr_t anchor;
    std::vector<Span> spans;
  } search{reinterpret_cast<uintptr_t>(&g_tracing), {}};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* s = static_cast<Search*>(data);
        std::vector<Span> writable;
        bool mine = false;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const ElfW(Phdr)& ph = info->dlpi_phdr[i];
          if (ph.p_type != PT_LOAD) continue;
          const Span span{info->dlpi_addr + ph.p_vaddr, info->dlpi_addr + ph.p_vaddr + ph.p_memsz};
          mine |= s->anchor >= span.lo && s->anchor < span.hi;
          if (ph.p_flags & PF_W) writable.push_back(span);
        }
        if (mine) s->spans = writable;
        return mine ? 1 : 0;
      },
      &search);
  return search.spans;
}

std::unordered_set<uintptr_t> g_shared_written;  // bytes written in the running block
uint64_t g_shared_block = 0;

void check_shared(uintptr_t a, uint64_t bytes, bool store) {
  static const std::vector<Span> statics = writable_segments_of_this_library();
  const uint64_t block = cuda_emu::running_block();
  if (block == 0) return;  // host code of the .cu files (cached device attributes)
  bool shared = false;
  for (const Span& s : statics) shared |= a >= s.lo && a < s.hi;
  if (!shared) return;
  if (block != g_shared_block) {
    g_shared_written.clear();
    g_shared_block = block;
  }
  for (uint64_t i = 0; i < bytes; ++i) {
    if (store) {
      g_shared_written.insert(a + i);
    } else if (g_shared_written.count(a + i) == 0) {
      std::ostringstream msg;
      msg << "read of " << bytes << " bytes of __shared__ memory (library offset 0x" << std::hex
          << a - statics.front().lo << ") that no thread of this block has written";
      throw std::runtime_error(msg.str());
    }
  }
}

void record(const volatile void* p, uint64_t bytes, bool store) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  check_shared(a, bytes, store);
  if (!g_tracing) return;
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
