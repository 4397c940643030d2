// The fiber scheduler behind cuda_emu.h: one ucontext fiber per CUDA thread, one block at a time.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <exception>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUDA_EMU_ASAN 1
#endif

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = size_t{256} << 10;  // per thread; kernels keep small frames
constexpr unsigned kMaxThreadsPerBlock = 1024;

struct Barrier {
  unsigned expected = 0;
  std::vector<unsigned> waiters;  // threads that arrived since it last opened
};

struct Fiber {
  ucontext_t context{};
  char* stack = nullptr;
  uint3 tid{};
  unsigned linear = 0;
  bool done = false;
  const Barrier* waiting = nullptr;  // while parked at a barrier (for the deadlock message)
  const char* wait_what = nullptr;
#ifdef CUDA_EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// State of the block being run (blocks run one at a time, on the calling OS thread).
struct Block {
  dim3 grid, dim;
  uint3 index{};
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  std::vector<std::vector<unsigned>> ready;  // per warp: its threads free to run, in no order
  size_t ready_count = 0;
  Fiber* current = nullptr;
  ucontext_t scheduler{};
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<float> lanes;  // shuffle exchange: one slot per thread
  std::string error;
#ifdef CUDA_EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
#endif
};

// Thread stacks, mapped once and reused by every launch (pages are only touched as they are used).
class StackPool {
 public:
  char* get(size_t i) {
    while (stacks_.size() <= i) {
      void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map a thread stack");
      stacks_.push_back(static_cast<char*>(p));
    }
#ifdef CUDA_EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(stacks_[i], kStackBytes);  // frames of an abandoned (failed) launch
#endif
    return stacks_[i];
  }

 private:
  std::vector<char*> stacks_;
};

Block* g_block = nullptr;
StackPool g_stacks;
uint64_t g_seed = 0, g_launches = 0, g_blocks_run = 0;
cudaError_t g_last_error = cudaSuccess;
std::string g_message;

// Error inside a kernel call (bad shuffle, index register read outside a kernel): stops the launch.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

Block& running() {
  if (g_block == nullptr || g_block->current == nullptr)
    throw KernelError("cuda_emu: a device builtin was used outside a running kernel");
  return *g_block;
}

std::string str(const dim3& d) {
  std::ostringstream s;
  s << "(" << d.x << ", " << d.y << ", " << d.z << ")";
  return s.str();
}
std::string str(const uint3& d) { return str(dim3(d.x, d.y, d.z)); }

// ---------------------------------------------------------------- context switches
void switch_to_fiber(Block& b, Fiber& f) {
  b.current = &f;
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, f.stack, kStackBytes);
#endif
  swapcontext(&b.scheduler, &f.context);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
  b.current = nullptr;
}

void switch_to_scheduler(Block& b, Fiber& f) {
#ifdef CUDA_EMU_ASAN
  __sanitizer_start_switch_fiber(f.done ? nullptr : &f.fake_stack, b.scheduler_bottom, b.scheduler_size);
#endif
  swapcontext(&f.context, &b.scheduler);
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &b.scheduler_bottom, &b.scheduler_size);
#endif
}

void fiber_main() {
  Block& b = *g_block;
  Fiber& f = *b.current;
#ifdef CUDA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_bottom, &b.scheduler_size);
#endif
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = "thread " + str(f.tid) + ": " + e.what();
  }
  f.done = true;
  switch_to_scheduler(b, f);  // never resumed
}

// Arrives at `barrier` and yields; the scheduler resumes this fiber once the barrier has opened
// (the last arrival makes every waiter runnable again).
void arrive_and_wait(Barrier& barrier, const char* what) {
  Block& b = running();
  Fiber& f = *b.current;
  f.waiting = &barrier;
  f.wait_what = what;
  barrier.waiters.push_back(f.linear);
  if (barrier.waiters.size() == barrier.expected) {
    for (unsigned i : barrier.waiters) b.ready[i / 32].push_back(i);
    b.ready_count += barrier.waiters.size();
    barrier.waiters.clear();
  }
  switch_to_scheduler(b, f);
  f.waiting = nullptr;
}

// What every unfinished thread waits for, for the deadlock message.
std::string describe_deadlock(const Block& b) {
  std::map<std::string, std::pair<unsigned, uint3>> groups;  // state -> (count, first thread)
  for (const Fiber& f : b.fibers) {
    std::string state = f.done ? "have exited" : std::string("wait at ") + f.wait_what;
    if (!f.done && f.waiting != &b.block_barrier) state += " (warp " + std::to_string(f.linear / 32) + ")";
    auto it = groups.find(state);
    if (it == groups.end()) groups.emplace(state, std::make_pair(1u, f.tid));
    else ++it->second.first;
  }
  std::ostringstream s;
  s << "deadlock in block " << str(b.index) << " of grid " << str(b.grid) << ", block " << str(b.dim) << ":";
  for (const auto& [state, info] : groups)
    s << " " << info.first << " threads " << state << " (first " << str(info.second) << ");";
  return s.str();
}

void run_block(Block& b, std::mt19937_64& rng) {
  const unsigned n = b.dim.x * b.dim.y * b.dim.z;
  b.fibers.assign(n, Fiber{});
  b.block_barrier = Barrier{n, {}};
  b.warp_barriers.assign((n + 31) / 32, Barrier{});
  for (unsigned w = 0; w < b.warp_barriers.size(); ++w) b.warp_barriers[w].expected = std::min(32u, n - 32 * w);
  b.lanes.assign(n, 0.f);
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.linear = i;
    f.tid = {i % b.dim.x, (i / b.dim.x) % b.dim.y, i / (b.dim.x * b.dim.y)};
    f.stack = g_stacks.get(i);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
  }
  b.ready.assign(b.warp_barriers.size(), {});
  for (unsigned i = 0; i < n; ++i) b.ready[i / 32].push_back(i);
  b.ready_count = n;
  // Each step runs one ready thread, drawn at random, until its next barrier. Half of the blocks
  // (drawn per block) run in bursts: the drawn warp keeps running until none of its threads is
  // ready, so warps drift apart by whole phases between __syncthreads, as on a GPU; the others
  // draw every step from all ready threads (fine-grained interleaving).
  const bool bursts = (rng() & 1) != 0;
  size_t warp = b.ready.size();
  while (b.ready_count > 0) {
    if (!bursts || warp == b.ready.size() || b.ready[warp].empty()) {
      if (bursts) {  // a random warp with ready threads
        std::vector<size_t> candidates;
        for (size_t w = 0; w < b.ready.size(); ++w)
          if (!b.ready[w].empty()) candidates.push_back(w);
        warp = candidates[std::uniform_int_distribution<size_t>(0, candidates.size() - 1)(rng)];
      } else {  // the warp of a random ready thread
        size_t r = std::uniform_int_distribution<size_t>(0, b.ready_count - 1)(rng);
        for (warp = 0; r >= b.ready[warp].size(); ++warp) r -= b.ready[warp].size();
      }
    }
    std::vector<unsigned>& lanes = b.ready[warp];
    const size_t pick = std::uniform_int_distribution<size_t>(0, lanes.size() - 1)(rng);
    const unsigned i = lanes[pick];
    lanes[pick] = lanes.back();
    lanes.pop_back();
    --b.ready_count;
    switch_to_fiber(b, b.fibers[i]);
    if (!b.error.empty()) return;
  }
  for (const Fiber& f : b.fibers)
    if (!f.done) {
      b.error = describe_deadlock(b);
      return;
    }
}

void fail(cudaError_t err, const std::string& message) {
  if (g_last_error == cudaSuccess) {  // the first error sticks until cudaGetLastError
    g_last_error = err;
    g_message = message;
  }
}

// The driver's limits (compute capability 9.0); "" when the configuration is valid.
std::string check_config(const dim3& grid, const dim3& block) {
  std::ostringstream s;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64)
    s << "invalid block " << str(block) << " (" << threads << " threads; at most 1024, z <= 64)";
  else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
    s << "invalid grid " << str(grid);
  return s.str();
}

}  // namespace

const uint3& thread_idx() { return running().current->tid; }
const uint3& block_idx() { return running().index; }
const dim3& block_dim() { return running().dim; }
const dim3& grid_dim() { return running().grid; }

void sync_threads() { arrive_and_wait(running().block_barrier, "__syncthreads"); }

float shfl_xor(unsigned mask, float value, int lane_mask, int width) {
  Block& b = running();
  const unsigned linear = b.current->linear, warp = linear / 32, lane = linear % 32;
  Barrier& barrier = b.warp_barriers[warp];
  if (mask != 0xffffffffu) throw KernelError("__shfl_xor_sync: only the full mask 0xffffffff is emulated");
  if (barrier.expected != 32)
    throw KernelError("__shfl_xor_sync in warp " + std::to_string(warp) + " of a block of " +
                      std::to_string(b.fibers.size()) + " threads: the full mask names lanes that do not exist");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    throw KernelError("__shfl_xor_sync: width " + std::to_string(width) + " is not a power of two <= 32");
  b.lanes[linear] = value;
  arrive_and_wait(barrier, "__shfl_xor_sync");
  unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  const unsigned group = ~static_cast<unsigned>(width - 1);
  if ((src & group) != (lane & group)) src = lane;  // outside the lane's width-group: own value
  const float result = b.lanes[warp * 32 + src];
  arrive_and_wait(barrier, "__shfl_xor_sync");  // no lane overwrites its slot before all have read
  return result;
}

void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  if (g_block != nullptr) {
    fail(cudaErrorLaunchFailure, "cuda_emu: a kernel launched another kernel (dynamic parallelism is not emulated)");
    return;
  }
  const std::string bad = check_config(grid, block);
  if (!bad.empty()) {
    fail(cudaErrorInvalidConfiguration, bad);
    return;
  }
  std::mt19937_64 rng(g_seed * 0x9e3779b97f4a7c15ull + ++g_launches);
  Block b;
  b.grid = grid;
  b.dim = block;
  b.body = &body;
  g_block = &b;
  for (unsigned z = 0; z < grid.z && b.error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && b.error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && b.error.empty(); ++x) {
        b.index = {x, y, z};
        ++g_blocks_run;
        run_block(b, rng);
      }
  g_block = nullptr;
  if (!b.error.empty()) fail(cudaErrorLaunchFailure, b.error);
}

void set_seed(uint64_t seed) { g_seed = seed; }

const char* last_error_message() { return g_message.c_str(); }

uint64_t running_block() { return g_block != nullptr && g_block->current != nullptr ? g_blocks_run : 0; }

}  // namespace cuda_emu

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = cuda_emu::kSmCount;
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* /*kernel*/, int /*block_size*/,
                                                          size_t /*dynamic_smem*/) {
  *blocks = 1;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}
