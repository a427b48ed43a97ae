// The emulator's definitions of csrc/cuda/ptx.cuh's wrappers (included there when
// EDPAIRS_CUDA_EMU is defined): the same names and signatures, computed on the CPU.
//
// * mma_16x8: the warp's fragments are exchanged and each lane forms its four outputs from the
//   PTX ISA's fragment layouts (m16n8k8 .tf32; m16n8k16 .f16 / .bf16). TF32 operands lose their
//   low 13 bits (the hardware ignores them), products are exact, sums float32.
// * wgmma_mma: each thread's accumulators (wgmma.cuh's layout) from the operand tiles in shared
//   memory as the descriptors name them, in the 128-byte swizzle (the only one the kernels use;
//   any other aborts). Built for ThreadSanitizer, every thread also reads its warpgroup's whole
//   A tile, as the hardware may. Batches are done when a thread waits for them (wgmma_wait), so a kernel
//   that writes a tile still being read by a batch in flight reads the new data, as it might
//   on the GPU.
// * cp_async_16: done at cp_async_wait, for the same reason.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace edpairs {
namespace cuda_detail {

// cvt.rna.tf32.f32: nearest, ties away from zero, low 13 bits zero.
inline uint32_t tf32_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // Inf, NaN
  return (u + 0x1000u) & 0xffffe000u;
}
inline float round_tf32(float v) { return __uint_as_float(tf32_bits(v)); }

namespace emu_ptx {

inline float tf32_operand(uint32_t bits) { return __uint_as_float(bits & 0xffffe000u); }

template <class T>
inline float half_operand(uint32_t word, int which) {
  const uint16_t h = static_cast<uint16_t>(word >> (16 * which));
  if constexpr (std::is_same<T, __half>::value) {
    __half v;
    std::memcpy(&v, &h, 2);
    return __half2float(v);
  } else {
    return __bfloat162float(__nv_bfloat16{h});
  }
}

// Element (row, k) of an operand tile named by a wgmma descriptor (K-major, 128-byte swizzle).
template <class T>
inline float wgmma_operand(uint64_t desc, int row, int k) {
  if ((desc >> 62) != 1) ::emu::die("wgmma descriptor without the 128-byte swizzle");
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const uint32_t logical = start + static_cast<uint32_t>(row / 8) * sbo + static_cast<uint32_t>(row % 8) * 128 +
                           static_cast<uint32_t>(k) * static_cast<uint32_t>(sizeof(T));
  const uint32_t physical = logical ^ (((logical >> 7) & 7u) << 4);
  const unsigned char* p = ::emu::shared_at(physical, sizeof(T));
  if constexpr (sizeof(T) == 4) {
    uint32_t bits;
    std::memcpy(&bits, p, 4);
    return tf32_operand(bits);
  } else {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return half_operand<T>(h, 0);
  }
}

}  // namespace emu_ptx

template <class T>
inline void mma_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::WarpSlots& w = ::emu::warp();
  const int l = ::emu::lane();
  ::emu::count(::emu::stats().mma_sync);
  const unsigned set = ::emu::self.collectives++ % 2;
  std::memcpy(w.a[set][l], a, sizeof(a));
  std::memcpy(w.b[set][l], b, sizeof(b));
  w.bar.sync(32, "mma.sync");
  const int g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i / 2), c = 2 * t + i % 2;
    float s = 0.0f;
    if constexpr (std::is_same<T, float>::value) {
      for (int k = 0; k < 8; ++k) {
        const float av = emu_ptx::tf32_operand(w.a[set][(r % 8) * 4 + k % 4][r / 8 + 2 * (k / 4)]);
        const float bv = emu_ptx::tf32_operand(w.b[set][c * 4 + k % 4][k / 4]);
        s += av * bv;
      }
    } else {
      for (int k = 0; k < 16; ++k) {
        const float av = emu_ptx::half_operand<T>(w.a[set][(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)], k % 2);
        const float bv = emu_ptx::half_operand<T>(w.b[set][c * 4 + (k % 8) / 2][k / 8], k % 2);
        s += av * bv;
      }
    }
    d[i] += s;
  }
}

inline void named_sync(const int id, const int count) {
  if (id < 0 || id >= 16 || count % 32 != 0) ::emu::die("bar.sync: id 0..15 and a multiple of 32 threads");
  ::emu::count(::emu::stats().named_barriers);
  ::emu::self.block->named[id].sync(count, "bar.sync");
}
inline void named_arrive(const int id, const int count) {
  if (id < 0 || id >= 16 || count % 32 != 0) ::emu::die("bar.arrive: id 0..15 and a multiple of 32 threads");
  ::emu::count(::emu::stats().named_barriers);
  ::emu::self.block->named[id].arrive(count, "bar.arrive");
}
inline void prefetch_l2(const void*) {}
inline int load_relaxed(const int* p) {
  return std::atomic_ref<int>(*const_cast<int*>(p)).load(std::memory_order_relaxed);
}

inline void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  if (dst % 16 != 0) ::emu::die("cp.async to a shared address that is not 16-byte aligned");
  if (src_bytes < 0 || src_bytes > 16) ::emu::die("cp.async of other than 0..16 bytes");
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    ::emu::die("cp.async from a global address that is not 16-byte aligned");
  ::emu::count(::emu::stats().cp_async);
  ::emu::self.copies_open.push_back(
      ::emu::Copy{::emu::shared_at(dst, 16), static_cast<const unsigned char*>(src), src_bytes});
}
inline void cp_async_commit() {
  ::emu::self.copies.push_back(std::move(::emu::self.copies_open));
  ::emu::self.copies_open.clear();
}
template <int kPending>
inline void cp_async_wait() {
  ::emu::finish_copies(static_cast<size_t>(kPending));
}

inline void fence_proxy_async() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <class T, int N>
inline void wgmma_mma(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc, int scale_d) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma tile width");
  const int warp = (::emu::self.tid % 128) / 32, l = ::emu::lane();
  float* acc = d;
  ::emu::count(::emu::stats().wgmma);
  ::emu::self.mma_open.push_back([=] {
    constexpr int kK = 32 / static_cast<int>(sizeof(T));
#if defined(__SANITIZE_THREAD__)
    // The hardware reads the warpgroup's whole 64-row A tile for every warp's part, at any time
    // before the wait: so does each thread here, for ThreadSanitizer to see (its own outputs
    // need only its warp's 16 rows).
    volatile float sink = 0.0f;
    for (int row = 0; row < 64; ++row)
      for (int k = 0; k < kK; ++k) sink = sink + emu_ptx::wgmma_operand<T>(a_desc, row, k);
#endif
    float a_rows[2][kK];  // the thread's two rows of A, read once for all its columns
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < kK; ++k) a_rows[h][k] = emu_ptx::wgmma_operand<T>(a_desc, 16 * warp + l / 4 + 8 * h, k);
    for (int i = 0; i < N / 2; ++i) {
      const float* a_row = a_rows[(i / 2) % 2];
      const int col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
      float s = 0.0f;
      for (int k = 0; k < kK; ++k) s += a_row[k] * emu_ptx::wgmma_operand<T>(b_desc, col, k);
      acc[i] = scale_d ? acc[i] + s : s;
    }
  });
}
inline void wgmma_fence() {}
inline void wgmma_commit() {
  ::emu::self.mmas.push_back(std::move(::emu::self.mma_open));
  ::emu::self.mma_open.clear();
}
template <int kPending>
inline void wgmma_wait() {
  ::emu::finish_mmas(static_cast<size_t>(kPending));
}
template <int kN>
inline void fence_accumulators(float (&)[kN]) {}

}  // namespace cuda_detail
}  // namespace edpairs
