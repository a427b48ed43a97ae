// Hopper's warpgroup MMA (wgmma, sm_90a) as the edpairs kernels use it: 64 x N float32
// accumulator tiles per warpgroup (N = 64, 128 or 256) from K-major operand tiles in shared memory laid out in the
// 128-byte swizzle. Included by the files of the sm_90a library only (CMakeLists.txt).
//
// Shared layout: row r of an operand tile holds 128 bytes of K in 8 chunks of 16 bytes; chunk
// c is stored at (r / 8) * 1024 + (r % 8) * 128 + ((c ^ (r % 8)) * 16), tiles 1024-byte
// aligned. The descriptor of a step (32 bytes of K: k8 TF32, k16 16-bit) starts 32 s bytes into
// the tile's first row; the hardware XORs address bits 4-6 with bits 7-9; 8-row groups are
// 1024 bytes apart (stride byte offset); the leading byte offset is unused with this swizzle.
// Accumulators (PTX ISA, "wgmma register fragment layout for accumulator matrix D"): warp v of
// the warpgroup holds rows 16 v .. 16 v + 15; register i of lane l holds
//   row 16 v + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4) + i % 2.
// tests/test_tc_emulation.py models the descriptors (sw128_address) and this layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace edpairs {
namespace cuda_detail {

// Byte offset of chunk c of row r in a swizzled operand tile.
__device__ __forceinline__ uint32_t swizzled(int r, int c) {
  return static_cast<uint32_t>((r >> 3) * 1024 + (r & 7) * 128 + ((c ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// v rounded to TF32 (nearest, ties away; low 13 bits zero). wgmma reads float32 operands by
// dropping those bits, which truncates towards zero: a bias of about 2^-11 per product that does
// not average out over a Gram's rows.
__device__ __forceinline__ float round_tf32(float v) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(out) : "f"(v));
  return __uint_as_float(out);
}

__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EDPAIRS_WGMMA_AVAILABLE 1
#endif

// The accumulator operands of the inline asm: %0..%31 (m64n64), %0..%63 (m64n128) and
// %0..%127 (m64n256).
#define EDPAIRS_WGMMA_D32_REGS \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
#define EDPAIRS_WGMMA_D64_REGS \
  EDPAIRS_WGMMA_D32_REGS "," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define EDPAIRS_WGMMA_D128_REGS \
  EDPAIRS_WGMMA_D64_REGS "," \
  "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
  "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
  "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define EDPAIRS_WGMMA_OPS8(d, i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define EDPAIRS_WGMMA_D32_OPERANDS(d) \
  EDPAIRS_WGMMA_OPS8(d, 0), EDPAIRS_WGMMA_OPS8(d, 8), EDPAIRS_WGMMA_OPS8(d, 16), EDPAIRS_WGMMA_OPS8(d, 24)
#define EDPAIRS_WGMMA_D64_OPERANDS(d) \
  EDPAIRS_WGMMA_D32_OPERANDS(d), EDPAIRS_WGMMA_OPS8(d, 32), EDPAIRS_WGMMA_OPS8(d, 40), EDPAIRS_WGMMA_OPS8(d, 48), \
      EDPAIRS_WGMMA_OPS8(d, 56)
#define EDPAIRS_WGMMA_D128_OPERANDS(d) \
  EDPAIRS_WGMMA_D64_OPERANDS(d), EDPAIRS_WGMMA_OPS8(d, 64), EDPAIRS_WGMMA_OPS8(d, 72), EDPAIRS_WGMMA_OPS8(d, 80), \
      EDPAIRS_WGMMA_OPS8(d, 88), EDPAIRS_WGMMA_OPS8(d, 96), EDPAIRS_WGMMA_OPS8(d, 104), EDPAIRS_WGMMA_OPS8(d, 112), \
      EDPAIRS_WGMMA_OPS8(d, 120)

// One wgmma of shape SHAPE (e.g. "m64n64k8.f32.tf32.tf32") on NACC accumulators, the operand
// descriptors and scale_d following them as operands NACC .. NACC + 2; TAIL closes the operand
// list (the 16-bit forms also take the two transpose flags, 0: K-major).
#define EDPAIRS_WGMMA_ASM(SHAPE, NACC, A, B, S, TAIL)                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #S ", 0;\n"                                        \
               "wgmma.mma_async.sync.aligned." SHAPE " {" EDPAIRS_WGMMA_D##NACC##_REGS "}, %" #A ", %" #B \
               ", p, 1, 1" TAIL ";\n}\n"                                                                 \
               : EDPAIRS_WGMMA_D##NACC##_OPERANDS(d)                                                   \
               : "l"(a_desc), "l"(b_desc), "r"(scale_d))

// d (+)= A(desc) B(desc)^T for one 64 x N x (32 bytes of K) step: k8 TF32 for float32 T, k16
// for float16 / bfloat16; N / 2 accumulators per thread (the layout above, columns 0 .. N - 1);
// scale_d = 0 overwrites d. N is 64, 128 or 256.
template <class T, int N>
__device__ __forceinline__ void wgmma_mma(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc, int scale_d) {
  static_assert(N == 64 || N == 128 || N == 256, "wgmma tile width");
#ifdef EDPAIRS_WGMMA_AVAILABLE
  if constexpr (N == 64) {
    if constexpr (sizeof(T) == 4) {
      EDPAIRS_WGMMA_ASM("m64n64k8.f32.tf32.tf32", 32, 32, 33, 34, "");
    } else if constexpr (std::is_same<T, __half>::value) {
      EDPAIRS_WGMMA_ASM("m64n64k16.f32.f16.f16", 32, 32, 33, 34, ", 0, 0");
    } else {
      EDPAIRS_WGMMA_ASM("m64n64k16.f32.bf16.bf16", 32, 32, 33, 34, ", 0, 0");
    }
  } else if constexpr (N == 128) {
    if constexpr (sizeof(T) == 4) {
      EDPAIRS_WGMMA_ASM("m64n128k8.f32.tf32.tf32", 64, 64, 65, 66, "");
    } else if constexpr (std::is_same<T, __half>::value) {
      EDPAIRS_WGMMA_ASM("m64n128k16.f32.f16.f16", 64, 64, 65, 66, ", 0, 0");
    } else {
      EDPAIRS_WGMMA_ASM("m64n128k16.f32.bf16.bf16", 64, 64, 65, 66, ", 0, 0");
    }
  } else {
    if constexpr (sizeof(T) == 4) {
      EDPAIRS_WGMMA_ASM("m64n256k8.f32.tf32.tf32", 128, 128, 129, 130, "");
    } else if constexpr (std::is_same<T, __half>::value) {
      EDPAIRS_WGMMA_ASM("m64n256k16.f32.f16.f16", 128, 128, 129, 130, ", 0, 0");
    } else {
      EDPAIRS_WGMMA_ASM("m64n256k16.f32.bf16.bf16", 128, 128, 129, 130, ", 0, 0");
    }
  }
#else
  (void)d, (void)a_desc, (void)b_desc, (void)scale_d;
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Pins the accumulators after wgmma_wait<0>: the compiler may not read them earlier. Only there:
// touching them while a batch is in flight makes ptxas insert a wait (warning C7517).
template <int kN>
__device__ __forceinline__ void fence_accumulators(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// One iteration of the labelling kernels: the four 32-byte K steps of a 128-byte slice, the
// warpgroup's x rows at xs against the centroid slice at cs (first: the tile's first slice,
// scale_d = 0 overwrites the accumulators), committed as one batch; the batch before it is
// waited for (one stays in flight).
template <class T, int N>
__device__ __forceinline__ void mma_slice(float (&acc)[N / 2], const uint32_t xs, const uint32_t cs, const bool first) {
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    wgmma_mma<T, N>(acc, make_desc(xs + 32 * s), make_desc(cs + 32 * s), (first && s == 0) ? 0 : 1);
  }
  wgmma_commit();
  wgmma_wait<1>();
}

}  // namespace cuda_detail
}  // namespace edpairs
