// Cooperative host emulation of a CUDA thread block, for the host-emulation tests of csrc/cuda/*.cu.
//
// Every thread of a block is a user-level context on one OS thread (a 14-instruction stack switch on
// x86-64, ucontext elsewhere). A thread runs until it
// reaches __syncthreads(), __syncwarp() or a warp shuffle, then the next one runs; a warp barrier is
// released when all 32 lanes of the warp reached it, a block barrier when every live thread reached it.
// So shared-memory tiling, warp shuffles and barriers behave as on the device, deterministically.
// Races show up as order dependence: DDFAST_EMU_ORDER=reverse runs the threads of each phase in reverse
// order (tests run both orders). Exited threads count as arrived at __syncthreads() (as on sm_70+); a
// barrier that can never be released (lanes of a warp waiting at different barriers, a shuffle with
// exited lanes) exits with status 3 and a message instead of hanging (tests/cuda_host_emulation_selftest.cpp).
//
// Dynamic shared memory is filled with 0xFF bytes (NaN) before each block, and the bytes beyond the size
// the launch declares are checked afterwards: a kernel that writes past its declared dynamic shared memory
// aborts.
#pragma once
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // #pragma unroll

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define DDFAST_HOST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

using std::exp;
using std::log;
using std::sqrt;

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSharedBytes = size_t(1) << 20;

enum State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Thread {
  ucontext_t ctx;
  void* sp = nullptr;  // saved stack pointer (x86-64 switch)
  State state = kRunnable;
  std::vector<char> stack;
};

inline std::vector<Thread>& threads() {
  static std::vector<Thread> t;
  return t;
}
inline ucontext_t& scheduler() {
  static ucontext_t s;
  return s;
}
inline int& current() {
  static int c = 0;
  return c;
}
inline const std::function<void()>*& body() {
  static const std::function<void()>* b = nullptr;
  return b;
}
// 8 bytes per lane per warp: the values a shuffle exchanges.
inline std::vector<unsigned char>& exchange() {
  static std::vector<unsigned char> e;
  return e;
}
inline bool reverse_order() {
  static const bool r = [] {
    const char* v = std::getenv("DDFAST_EMU_ORDER");
    return v != nullptr && std::strcmp(v, "reverse") == 0;
  }();
  return r;
}
alignas(16) inline unsigned char shared_memory[kSharedBytes];

}  // namespace emu

inline Dim3 threadIdx, blockIdx, blockDim, gridDim;

#define DDFAST_DYNAMIC_SHARED(name) unsigned char* name = emu::shared_memory

namespace emu {

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *save, switches to `to`
// (a stack saved the same way, or a fresh one built by start_stack) and restores from there.
extern "C" void ddfast_emu_switch(void** save, void* to);
asm(R"(
.text
.globl ddfast_emu_switch
.type ddfast_emu_switch,@function
ddfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size ddfast_emu_switch, .-ddfast_emu_switch
)");
inline void*& scheduler_sp() {
  static void* sp = nullptr;
  return sp;
}
#endif

inline void yield(State s) {
  Thread& t = threads()[current()];
  t.state = s;
#if defined(__x86_64__)
  ddfast_emu_switch(&t.sp, scheduler_sp());
#else
  swapcontext(&t.ctx, &scheduler());
#endif
}

inline void trampoline() {
  (*body())();
  threads()[current()].state = kDone;
#if defined(__x86_64__)
  ddfast_emu_switch(&threads()[current()].sp, scheduler_sp());
  std::abort();  // a finished thread is never resumed
#endif
  // ucontext: uc_link returns to the scheduler
}

#if defined(__x86_64__)
// A fresh stack whose first switch "returns" into trampoline with the alignment of a call.
inline void* start_stack(std::vector<char>& stack) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                          // fake return address of trampoline
  *--sp = reinterpret_cast<void*>(&trampoline);             // popped by ret
  for (int i = 0; i < 6; ++i) *--sp = nullptr;              // rbp rbx r12 r13 r14 r15
  return sp;
}
#endif

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "host emulation: %s (block %u)\n", what, blockIdx.x);
  std::exit(3);
}

// Runs one block (blockIdx set by the caller) of blockDim.x threads to completion.
inline void run_block(const std::function<void()>& f) {
  const int n = static_cast<int>(blockDim.x);
  if (n <= 0 || n % kWarpSize != 0) fail("blockDim.x must be a positive multiple of 32");
  auto& ts = threads();
  if (static_cast<int>(ts.size()) < n) ts.resize(n);
  exchange().assign(size_t(n) * 8, 0);
  body() = &f;
  for (int i = 0; i < n; ++i) {
    Thread& t = ts[i];
    if (t.stack.empty()) t.stack.resize(kStackBytes);
#if defined(__x86_64__)
    t.sp = start_stack(t.stack);
#else
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.data();
    t.ctx.uc_stack.ss_size = t.stack.size();
    t.ctx.uc_link = &scheduler();
    makecontext(&t.ctx, trampoline, 0);
#endif
    t.state = kRunnable;
  }
  for (;;) {
    for (int s = 0; s < n; ++s) {
      const int i = reverse_order() ? n - 1 - s : s;
      if (ts[i].state != kRunnable) continue;
      current() = i;
      threadIdx.x = static_cast<unsigned>(i);
#if defined(__x86_64__)
      ddfast_emu_switch(&scheduler_sp(), ts[i].sp);
#else
      swapcontext(&scheduler(), &ts[i].ctx);
#endif
    }
    bool all_done = true, released = false;
    for (int w = 0; w < n / kWarpSize; ++w) {
      int at_warp = 0, done = 0;
      for (int l = 0; l < kWarpSize; ++l) {
        const State s = ts[w * kWarpSize + l].state;
        at_warp += s == kAtWarpBarrier;
        done += s == kDone;
      }
      if (done != kWarpSize) all_done = false;
      if (at_warp == kWarpSize) {
        for (int l = 0; l < kWarpSize; ++l) ts[w * kWarpSize + l].state = kRunnable;
        released = true;
      } else if (at_warp > 0 && at_warp + done == kWarpSize) {
        fail("warp barrier or shuffle with exited lanes");
      }
    }
    if (all_done) return;
    if (released) continue;
    bool all_at_block = true;
    for (int i = 0; i < n; ++i)
      if (ts[i].state != kDone && ts[i].state != kAtBlockBarrier) all_at_block = false;
    if (!all_at_block) fail("deadlock: threads wait at different barriers");
    for (int i = 0; i < n; ++i)
      if (ts[i].state == kAtBlockBarrier) ts[i].state = kRunnable;
  }
}

// Runs grid.x blocks of `threads` threads, in turn. `dynamic_shared` bytes are the launch's declared
// dynamic shared memory: poisoned with 0xFF before each block, the rest checked for writes after it.
inline void launch(unsigned grid, unsigned threads_per_block, size_t dynamic_shared, const std::function<void()>& f) {
  if (dynamic_shared > kSharedBytes / 2) fail("dynamic shared memory too large for the emulator");
  gridDim.x = grid;
  gridDim.y = gridDim.z = 1;
  blockDim.x = threads_per_block;
  blockDim.y = blockDim.z = 1;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    std::memset(shared_memory, 0xFF, kSharedBytes);
    run_block(f);
    for (size_t i = dynamic_shared; i < kSharedBytes; ++i)
      if (shared_memory[i] != 0xFF) fail("write beyond the declared dynamic shared memory");
  }
}

}  // namespace emu

inline void __syncthreads() { emu::yield(emu::kAtBlockBarrier); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::yield(emu::kAtWarpBarrier); }

namespace emu {
template <typename T>
T shuffle(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int tid = current();
  const int warp = tid / kWarpSize;
  std::memcpy(&exchange()[size_t(tid) * 8], &v, sizeof(T));
  __syncwarp();
  T out = v;
  if (src_lane >= 0 && src_lane < kWarpSize)
    std::memcpy(&out, &exchange()[size_t(warp * kWarpSize + src_lane) * 8], sizeof(T));
  __syncwarp();
  return out;
}
}  // namespace emu

template <typename T>
T __shfl_sync(unsigned, T v, int src_lane, int = emu::kWarpSize) {
  return emu::shuffle(v, src_lane & (emu::kWarpSize - 1));
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int mask, int = emu::kWarpSize) {
  return emu::shuffle(v, (static_cast<int>(threadIdx.x) % emu::kWarpSize) ^ mask);
}
template <typename T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int = emu::kWarpSize) {
  const int lane = static_cast<int>(threadIdx.x) % emu::kWarpSize;
  const int src = lane + static_cast<int>(delta);
  return emu::shuffle(v, src < emu::kWarpSize ? src : lane);
}
