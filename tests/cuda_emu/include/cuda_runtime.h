// A CPU stand-in for the parts of the CUDA runtime that csrc/centroid_align_kernel.cu uses, so its kernels run
// on a machine without a GPU (tests/test_centroid_cuda_emu.py). Each CUDA thread is a fiber (ucontext) and a
// block's fibers take turns only at __syncthreads and warp shuffles, in a random order; blocks run one at a
// time, in a random order. So a missing barrier, a ticket that assumes an order of blocks, or a read past a
// buffer (under AddressSanitizer) shows up here; timing, occupancy and memory ordering between blocks do not.
// The <<<grid, block, smem, stream>>> launches are rewritten to emu::launch(...) before compiling.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time: one copy serves every block (poisoned per block)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 { float x, y, z, w; };  // aligned as CUDA's: a misaligned vector access fails
struct alignas(16) double2 { double x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
namespace emu {
[[noreturn]] inline void fail(const char* what);
}
template <typename T> inline T __ldg(const T* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T)) emu::fail("misaligned load: a GPU faults here");
  return *p;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename A, typename B> inline auto min(A a, B b) -> decltype(a < b ? a : b) { return a < b ? a : b; }
template <typename A, typename B> inline auto max(A a, B b) -> decltype(a < b ? b : a) { return a < b ? b : a; }
inline void __threadfence() {}  // one block at a time: every write is visible to the next
template <typename T> inline T atomicAdd(T* p, T v) { const T old = *p; *p = old + v; return old; }

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "invalid configuration";
}

namespace emu {

inline cudaError_t last_error = cudaSuccess;
inline int occupancy = 2;  // what cudaOccupancyMaxActiveBlocksPerMultiprocessor answers (the test sets it)
inline std::mt19937 rng(1);
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u thread %u,%u)\n", what, blockIdx.x, blockIdx.y, threadIdx.x,
               threadIdx.y);
  std::abort();
}

constexpr size_t kStack = 128 * 1024;

struct Barrier {
  int expected = 0, arrived = 0;
  unsigned long gen = 0;
};

struct Fiber {
  ucontext_t ctx;
  dim3 tid;
  Barrier* waiting = nullptr;  // the barrier it waits at, and that barrier's generation then
  unsigned long wait_gen = 0;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;  // not zeroed: a 1024-thread block would touch them all
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<int> warp_live;
  std::vector<unsigned long long> slots;  // [warp][2][32]: shuffle values, two buffers used in turn
  std::vector<unsigned char> parity;      // per thread: which buffer its next shuffle uses
  ucontext_t sched;
  int cur = -1;
  std::function<void()> body;
};
inline Block* block = nullptr;
inline unsigned long block_serial = 0;  // one per block run
inline std::string grids;  // " x,y" per launch, in launch order (the driver reports it)
inline std::unordered_map<const void*, unsigned long> poisoned;

// Called after each __shared__ declaration (the test rewrites them): the first thread of a block to pass it
// fills the object with 0xFF bytes (NaN for floats), as a GPU gives a block garbage, not the last block's data.
inline void poison_once(void* p, size_t n) {
  unsigned long& seen = poisoned[p];
  if (seen != block_serial) {
    seen = block_serial;
    std::memset(p, 0xFF, n);
  }
}

inline int linear_tid() { return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

inline void wait_at(Barrier& b) {
  Fiber& f = block->fibers[block->cur];
  const unsigned long gen = b.gen;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  f.waiting = &b;
  f.wait_gen = gen;
  swapcontext(&f.ctx, &block->sched);
}

inline void fiber_main() {
  block->body();
  Fiber& f = block->fibers[block->cur];
  f.done = true;
  // An exited thread no longer holds up __syncthreads; a warp with an exited lane may not shuffle.
  Barrier& b = block->block_bar;
  if (--b.expected == b.arrived && b.arrived > 0) { b.arrived = 0; ++b.gen; }
  --block->warp_live[block->cur / 32];
  Barrier& w = block->warp_bar[block->cur / 32];
  if (w.arrived > 0) fail("a thread exited while lanes of its warp wait at a shuffle");
  --w.expected;
  // returning resumes uc_link, the scheduler
}

inline void run_block(const dim3& bid, const std::function<void()>& body) {
  Block& B = *block;
  const int n = static_cast<int>(blockDim.x * blockDim.y * blockDim.z), warps = (n + 31) / 32;
  blockIdx = bid;
  ++block_serial;
  B.body = body;
  B.block_bar = Barrier{n, 0, 0};
  B.warp_bar.assign(warps, Barrier{});
  B.warp_live.assign(warps, 0);
  for (int t = 0; t < n; ++t) { ++B.warp_bar[t / 32].expected; ++B.warp_live[t / 32]; }
  B.slots.assign(static_cast<size_t>(warps) * 64, 0);
  B.parity.assign(n, 0);
  B.fibers.assign(n, Fiber{});
  for (int t = 0; t < n; ++t) {
    Fiber& f = B.fibers[t];
    f.tid = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = B.stacks[t].get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &B.sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> ready;
  for (;;) {
    ready.clear();
    bool any = false;
    for (int t = 0; t < n; ++t) {
      Fiber& f = B.fibers[t];
      if (f.done) continue;
      any = true;
      if (!f.waiting || f.waiting->gen != f.wait_gen) ready.push_back(t);
    }
    if (!any) break;
    if (ready.empty()) fail("deadlock: every live thread waits at a barrier that others never reach");
    const int t = ready[std::uniform_int_distribution<int>(0, static_cast<int>(ready.size()) - 1)(rng)];
    B.fibers[t].waiting = nullptr;
    B.cur = t;
    threadIdx = B.fibers[t].tid;
    swapcontext(&B.sched, &B.fibers[t].ctx);
  }
}

struct Config {
  dim3 grid, block;
  size_t shared;
};
inline Config config(dim3 g, dim3 b, size_t shared = 0, cudaStream_t = nullptr) { return {g, b, shared}; }

template <typename... P, typename... A>
void launch(void (*kernel)(P...), Config c, A&&... args) {
  const unsigned long long n = 1ull * c.block.x * c.block.y * c.block.z;
  if (n == 0 || n > 1024 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 || c.grid.y > 65535 ||
      c.grid.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (c.shared) fail("a launch with dynamic shared memory: not emulated");
  std::tuple<P...> params(std::forward<A>(args)...);  // by value, as CUDA passes kernel parameters
  grids += " " + std::to_string(c.grid.x) + "," + std::to_string(c.grid.y);
  Block B;
  for (unsigned long long t = 0; t < n; ++t) B.stacks.emplace_back(new char[kStack]);
  Block* outer = block;
  block = &B;
  blockDim = c.block;
  gridDim = c.grid;
  std::vector<dim3> order;
  for (unsigned z = 0; z < c.grid.z; ++z)
    for (unsigned y = 0; y < c.grid.y; ++y)
      for (unsigned x = 0; x < c.grid.x; ++x) order.emplace_back(x, y, z);
  std::shuffle(order.begin(), order.end(), rng);
  for (const dim3& bid : order) run_block(bid, [&] { std::apply(kernel, params); });
  block = outer;
}

}  // namespace emu

inline void __syncthreads() { emu::wait_at(emu::block->block_bar); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  emu::Block& B = *emu::block;
  const int t = emu::linear_tid(), warp = t / 32, lane = t % 32;
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask: not emulated");
  if (B.warp_live[warp] != 32) emu::fail("__shfl_xor_sync in a warp with exited lanes");
  const int buf = B.parity[t];
  B.parity[t] ^= 1;
  unsigned long long* slot = &B.slots[(static_cast<size_t>(warp) * 2 + buf) * 32];
  std::memcpy(&slot[lane], &v, sizeof(T));
  emu::wait_at(B.warp_bar[warp]);
  T out;
  std::memcpy(&out, &slot[lane ^ lane_mask], sizeof(T));
  return out;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
template <typename K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = emu::occupancy;
  return cudaSuccess;
}
