// Hopper's warpgroup MMA (wgmma, sm_90a) as the edpairs kernels use it: 64 x 256 float32
// accumulator tiles per warpgroup from K-major operand tiles in shared memory laid out in the
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

constexpr int kWgmmaAcc = 128;  // accumulators per thread of an m64n256 tile

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

// The accumulator operands of the inline asm: %0..%63 (m64n128) and %0..%127 (m64n256).
#define EDPAIRS_WGMMA_D64_REGS \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63"
#define EDPAIRS_WGMMA_D_REGS \
  EDPAIRS_WGMMA_D64_REGS "," \
  "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
  "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
  "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define EDPAIRS_WGMMA_OPS8(d, i) \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define EDPAIRS_WGMMA_D64_OPERANDS(d) \
  EDPAIRS_WGMMA_OPS8(d, 0), EDPAIRS_WGMMA_OPS8(d, 8), EDPAIRS_WGMMA_OPS8(d, 16), EDPAIRS_WGMMA_OPS8(d, 24), \
      EDPAIRS_WGMMA_OPS8(d, 32), EDPAIRS_WGMMA_OPS8(d, 40), EDPAIRS_WGMMA_OPS8(d, 48), EDPAIRS_WGMMA_OPS8(d, 56)
#define EDPAIRS_WGMMA_D_OPERANDS(d) \
  EDPAIRS_WGMMA_D64_OPERANDS(d), EDPAIRS_WGMMA_OPS8(d, 64), EDPAIRS_WGMMA_OPS8(d, 72), EDPAIRS_WGMMA_OPS8(d, 80), \
      EDPAIRS_WGMMA_OPS8(d, 88), EDPAIRS_WGMMA_OPS8(d, 96), EDPAIRS_WGMMA_OPS8(d, 104), EDPAIRS_WGMMA_OPS8(d, 112), \
      EDPAIRS_WGMMA_OPS8(d, 120)

// d (+)= A(desc) B(desc)^T for one 64 x 256 x (32 bytes of K) step; scale_d = 0 overwrites d.
template <class T>
__device__ __forceinline__ void wgmma_step(float (&d)[kWgmmaAcc], uint64_t a_desc, uint64_t b_desc, int scale_d) {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  if constexpr (sizeof(T) == 4) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 {" EDPAIRS_WGMMA_D_REGS
                 "}, %128, %129, p, 1, 1;\n}\n"
                 : EDPAIRS_WGMMA_D_OPERANDS(d)
                 : "l"(a_desc), "l"(b_desc), "r"(scale_d));
  } else if constexpr (std::is_same<T, __half>::value) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {" EDPAIRS_WGMMA_D_REGS
                 "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : EDPAIRS_WGMMA_D_OPERANDS(d)
                 : "l"(a_desc), "l"(b_desc), "r"(scale_d));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" EDPAIRS_WGMMA_D_REGS
                 "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : EDPAIRS_WGMMA_D_OPERANDS(d)
                 : "l"(a_desc), "l"(b_desc), "r"(scale_d));
  }
#else
  (void)d, (void)a_desc, (void)b_desc, (void)scale_d;
  __trap();
#endif
}

// d (+)= A(desc) B(desc)^T for one 64 x 128 x 8 TF32 step (64 accumulators per thread, the
// same layout with columns 0..127); scale_d = 0 overwrites d.
__device__ __forceinline__ void wgmma_tf32_n128(float (&d)[64], uint64_t a_desc, uint64_t b_desc, int scale_d) {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 {" EDPAIRS_WGMMA_D64_REGS
               "}, %64, %65, p, 1, 1;\n}\n"
               : EDPAIRS_WGMMA_D64_OPERANDS(d)
               : "l"(a_desc), "l"(b_desc), "r"(scale_d));
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

}  // namespace cuda_detail
}  // namespace edpairs
