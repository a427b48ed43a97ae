// CPU emulation of the part of the CUDA programming model that edpairs' kernels use, for
// tools/cuda_emu (the CUDA sources compiled as C++ and run on the CPU, so that kernels can be
// tested on a machine without a GPU).
//
// Model: a launch runs its blocks one after another, or EMU_BLOCKS_AT_ONCE of them at a time
// (launches themselves one at a time, under one lock); a block runs each of its threads as a
// std::thread. Shared memory: each block's
// `__shared__` arrays are fresh allocations (translate.py), dynamic shared memory is a fresh
// buffer per block placed `EMU_SMEM_PAD` bytes (default 528) into a window whose start is
// shared address 0, so that kernels that align their tiles themselves do it for real. Memory
// returned by cudaMallocAsync and shared memory start filled with 0xFF bytes (NaN as
// float), so that reads of unwritten memory show. Streams and events are ordering no-ops:
// every launch is complete when it returns.
//
// What fails loudly (a message on stderr and abort()): a barrier, shuffle or warp MMA that not
// every thread it names reaches within EMU_DEADLOCK_S seconds (default 60), shared addresses
// outside the block's window, misaligned cp.async, wgmma descriptors other than the 128-byte
// swizzle, __trap(). What fails as CUDA would (an error from cudaGetLastError): a launch with
// a bad configuration or more dynamic shared memory than its kernel's attribute allows.
#pragma once

#include <math.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr cudaError_t cudaErrorNoDevice = 100;
typedef struct emu_stream* cudaStream_t;
typedef struct emu_event* cudaEvent_t;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrComputeCapabilityMajor,
  cudaDevAttrComputeCapabilityMinor,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize, cudaFuncAttributePreferredSharedMemoryCarveout };
constexpr int cudaSharedmemCarveoutMaxShared = 100;
constexpr unsigned cudaStreamNonBlocking = 1;
constexpr unsigned cudaEventDisableTiming = 2;

namespace emu {

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "EMU: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}
inline int sms() { return env_int("EMU_SMS", 3); }
inline int smem_pad() { return env_int("EMU_SMEM_PAD", 528); }
// Blocks of a launch that run at the same time (default 1: one after another); more let
// ThreadSanitizer see accesses of different blocks to the same global memory.
inline int blocks_at_once() { return env_int("EMU_BLOCKS_AT_ONCE", 1); }
constexpr int kSmemOptin = 232448;   // sm_90: 227 KB per block
constexpr int kSmemPerSm = 233472;   // 228 KB per SM
constexpr int kSmemDefault = 49152;  // without the attribute

// A barrier for `expected` threads that can be arrived at without waiting (bar.arrive) and
// reports a deadlock instead of hanging.
class Barrier {
 public:
  void sync(int expected, const char* what) { step(expected, true, what); }
  void arrive(int expected, const char* what) { step(expected, false, what); }

 private:
  void step(int expected, bool wait, const char* what) {
    std::unique_lock<std::mutex> lock(m_);
    if (arrived_ == 0) expected_ = expected;
    if (expected != expected_) die(what);  // two counts for one barrier phase
    const uint64_t gen = gen_;
    if (++arrived_ == expected_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    if (!wait) return;
    const auto limit = std::chrono::seconds(env_int("EMU_DEADLOCK_S", 60));
    if (!cv_.wait_for(lock, limit, [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "EMU: deadlock at %s: %d of %d threads arrived\n", what, arrived_, expected_);
      die("deadlock");
    }
  }
  std::mutex m_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int expected_ = 0;
  uint64_t gen_ = 0;
};

// A warp's exchange slots, two sets used in turn: a lane that has passed collective p's barrier
// writes collective p + 1's set, and can write p's set again only after every lane has reached
// p + 1's barrier, that is, has read p's. One barrier per collective.
struct WarpSlots {
  Barrier bar;
  uint64_t value[2][32];
  uint32_t a[2][32][4];
  uint32_t b[2][32][2];
};

struct AlignedDelete {
  size_t align;
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(align)); }
};

struct Block {
  std::mutex statics_mutex;  // the block's static __shared__ arrays, by declaration
  std::map<const void*, std::unique_ptr<unsigned char[], AlignedDelete>> statics;
  int threads = 0;
  unsigned char* window = nullptr;  // shared address 0
  size_t window_bytes = 0;
  unsigned char* dynamic = nullptr;
  Barrier named[16];
  std::vector<std::unique_ptr<WarpSlots>> warps;
};

// Deferred asynchronous work of one thread: cp.async copies and wgmma batches, done when the
// thread waits for them (as the hardware may do them as late as that).
struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
};
struct Thread {
  Block* block = nullptr;
  int tid = 0;
  unsigned collectives = 0;  // warp-wide exchanges so far (the same count in every lane)
  std::vector<Copy> copies_open;
  std::deque<std::vector<Copy>> copies;
  std::vector<std::function<void()>> mma_open;
  std::deque<std::vector<std::function<void()>>> mmas;
};
inline thread_local Thread self;

inline int lane() { return self.tid % 32; }
inline WarpSlots& warp() { return *self.block->warps[self.tid / 32]; }

inline void finish_copies(size_t keep) {
  while (self.copies.size() > keep) {
    for (const Copy& c : self.copies.front()) {
      if (c.bytes > 0) std::memcpy(c.dst, c.src, static_cast<size_t>(c.bytes));
      std::memset(c.dst + c.bytes, 0, static_cast<size_t>(16 - c.bytes));
    }
    self.copies.pop_front();
  }
}
inline void finish_mmas(size_t keep) {
  while (self.mmas.size() > keep) {
    for (auto& f : self.mmas.front()) f();
    self.mmas.pop_front();
  }
}

inline unsigned char* shared_at(uint32_t addr, size_t bytes) {
  Block* b = self.block;
  if (b == nullptr || static_cast<size_t>(addr) + bytes > b->window_bytes) {
    std::fprintf(stderr, "EMU: shared address %u (+%zu) outside the block's %zu bytes\n", addr, bytes,
                 b ? b->window_bytes : size_t{0});
    die("shared address out of range");
  }
  return b->window + addr;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline std::map<const void*, int>& smem_attribute() {
  static std::map<const void*, int> m;
  return m;
}
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
// What ran, for tests that must know which path a call took (reset by the tests).
struct Stats {
  std::atomic<long> launches{0}, mma_sync{0}, wgmma{0}, cp_async{0}, named_barriers{0};
};
inline Stats& stats() {
  static Stats s;
  return s;
}
// Relaxed: a counter must not order the threads' memory accesses (ThreadSanitizer would take an
// acquire-release increment as synchronisation and miss the races it is there to find).
inline void count(std::atomic<long>& c) { c.fetch_add(1, std::memory_order_relaxed); }

template <class F>
const void* key(F f) {
  return reinterpret_cast<const void*>(f);
}

// kernel<<<grid, block, smem, stream>>>(args) becomes launch(key(kernel), grid, block, smem, body).
inline void launch(const void* kernel, dim3 g, dim3 b, size_t smem, const std::function<void()>& body) {
  const std::lock_guard<std::mutex> lock(launch_mutex());
  count(stats().launches);
  const long threads = long(b.x) * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 || g.z > 65535 || threads == 0 || threads > 1024 ||
      threads % 32 != 0) {
    std::fprintf(stderr, "EMU: bad launch: grid (%u,%u,%u) block (%u,%u,%u)\n", g.x, g.y, g.z, b.x, b.y, b.z);
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const auto it = smem_attribute().find(kernel);
  const long allowed = it == smem_attribute().end() ? kSmemDefault : it->second;
  if (static_cast<long>(smem) > allowed) {
    std::fprintf(stderr, "EMU: launch with %zu bytes of dynamic shared memory, the kernel allows %ld\n", smem,
                 allowed);
    last_error() = cudaErrorInvalidValue;
    return;
  }
  const size_t pad = static_cast<size_t>(smem_pad());
  const long total = long(g.x) * g.y * g.z;
  const long at_once = std::max(1, blocks_at_once());
  for (long first = 0; first < total; first += at_once) {
    const long count_here = std::min(at_once, total - first);
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<std::unique_ptr<unsigned char[], AlignedDelete>> windows;
    std::vector<std::thread> ts;
    ts.reserve(static_cast<size_t>(threads * count_here));
    for (long i = 0; i < count_here; ++i) {
      const long linear = first + i;
      const dim3 bid(static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
                     static_cast<unsigned>(linear / (long(g.x) * g.y)));
      blocks.emplace_back(new Block());
      Block& blk = *blocks.back();
      blk.threads = static_cast<int>(threads);
      blk.window_bytes = pad + smem;
      const size_t alloc = std::max<size_t>(blk.window_bytes, 1);  // exact: AddressSanitizer sees overruns
      windows.emplace_back(new (std::align_val_t(1024)) unsigned char[alloc], AlignedDelete{1024});
      std::memset(windows.back().get(), 0xFF, alloc);
      blk.window = windows.back().get();
      blk.dynamic = blk.window + pad;
      for (int w = 0; w < threads / 32; ++w) blk.warps.emplace_back(new WarpSlots());
      for (int t = 0; t < threads; ++t) {
        ts.emplace_back([&, t, bid, blkp = &blk] {
          threadIdx = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
          blockIdx = bid;
          blockDim = b;
          gridDim = g;
          self = Thread();
          self.block = blkp;
          self.tid = t;
          body();
          // Whatever is still in flight lands before the block's memory goes.
          if (!self.copies_open.empty()) self.copies.push_back(std::move(self.copies_open));
          finish_copies(0);
          if (!self.mma_open.empty()) die("a wgmma batch was never committed");
          finish_mmas(0);
          self = Thread();
        });
      }
    }
    for (auto& th : ts) th.join();
  }
}

inline unsigned char* dyn_smem() { return self.block->dynamic; }

// A static __shared__ array of type A (translate.py): one per block and declaration, allocated
// on its first use in the block and filled with 0xFF bytes.
template <class A, size_t kAlign>
A& block_static(const void* key) {
  Block* b = self.block;
  const std::lock_guard<std::mutex> lock(b->statics_mutex);
  auto& slot = b->statics[key];
  if (!slot) {
    constexpr size_t align = std::max<size_t>({kAlign, alignof(A), 16});
    slot = std::unique_ptr<unsigned char[], AlignedDelete>(new (std::align_val_t(align)) unsigned char[sizeof(A)],
                                                           AlignedDelete{align});
    std::memset(slot.get(), 0xFF, sizeof(A));
  }
  return *reinterpret_cast<A*>(slot.get());
}

}  // namespace emu

// ---------------------------------------------------------------- device intrinsics
inline void __syncthreads() { emu::self.block->named[0].sync(emu::self.block->threads, "__syncthreads"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::die("__syncwarp with a partial mask");
  emu::warp().bar.sync(32, "__syncwarp");
}
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { emu::die("__trap()"); }

template <class V>
inline V emu_exchange(V v, int src_lane) {
  static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
  emu::WarpSlots& w = emu::warp();
  const unsigned set = emu::self.collectives++ % 2;
  std::memcpy(&w.value[set][emu::lane()], &v, sizeof(V));
  w.bar.sync(32, "a shuffle");
  V out;
  std::memcpy(&out, &w.value[set][src_lane], sizeof(V));
  return out;
}
template <class V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  if (mask != 0xffffffffu) emu::die("shuffle with a partial mask");
  return emu_exchange(v, emu::lane() ^ (lane_mask & 31));
}
template <class V>
inline V __shfl_down_sync(unsigned mask, V v, unsigned delta) {
  if (mask != 0xffffffffu) emu::die("shuffle with a partial mask");
  const int src = emu::lane() + static_cast<int>(delta);
  return emu_exchange(v, src < 32 ? src : emu::lane());
}

template <class T>
inline T atomicAdd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_add(v);
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  std::atomic_ref<unsigned> a(*p);
  unsigned old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
inline int atomicCAS(int* p, int compare, int v) {
  std::atomic_ref<int> a(*p);
  a.compare_exchange_strong(compare, v);
  return compare;
}

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __double2float_rn(double v) { return static_cast<float>(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
using std::max;
using std::min;

inline size_t __cvta_generic_to_shared(const void* p) {
  emu::Block* b = emu::self.block;
  const auto* c = static_cast<const unsigned char*>(p);
  if (b == nullptr || c < b->window || c >= b->window + b->window_bytes)
    emu::die("__cvta_generic_to_shared of a pointer outside dynamic shared memory");
  return static_cast<size_t>(c - b->window);
}

// ---------------------------------------------------------------- host API
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated CUDA error"; }
inline const char* cudaGetErrorName(cudaError_t e) { return e == cudaSuccess ? "cudaSuccess" : "cudaErrorEmulated"; }
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = emu::sms(); break;
    case cudaDevAttrComputeCapabilityMajor: *v = emu::env_int("EMU_CC_MAJOR", 9); break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = emu::kSmemOptin; break;
  }
  return cudaSuccess;
}
template <class K>
inline cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > emu::kSmemOptin) return cudaErrorInvalidValue;
    emu::smem_attribute()[emu::key(kernel)] = value;
  }
  return cudaSuccess;
}
template <class K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K kernel, int threads, size_t smem) {
  const auto it = emu::smem_attribute().find(emu::key(kernel));
  const long allowed = it == emu::smem_attribute().end() ? emu::kSmemDefault : it->second;
  if (static_cast<long>(smem) > allowed) {
    *n = 0;
    return cudaSuccess;
  }
  const int by_threads = threads > 0 ? 2048 / threads : 0;
  const int by_smem = static_cast<int>(emu::kSmemPerSm / (static_cast<long>(smem) + 1024));
  *n = std::min(by_threads, by_smem);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t = nullptr) {
  *p = ::operator new(n == 0 ? 1 : n, std::align_val_t(256));
  std::memset(*p, 0xFF, n);
  return cudaSuccess;
}
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t = nullptr) {
  ::operator delete(p, std::align_val_t(256));
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetStreamPriorityRange(int* least, int* greatest) {
  *least = 0;
  *greatest = -5;
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned, int) {
  static int token;
  *s = reinterpret_cast<cudaStream_t>(&token);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) {
  static int token;
  *e = reinterpret_cast<cudaEvent_t>(&token);
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned = 0) { return cudaSuccess; }
