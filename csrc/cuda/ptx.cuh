// The inline PTX of the kernels, in one place: every instruction the kernels issue by hand
// (other than the opt-in TMA kernel's, assign_wgmma_tma_cuda.cu) is one of these wrappers.
// Built with EDPAIRS_CUDA_EMU (tools/cuda_emu: the kernels compiled as C++ and run on the CPU),
// the emulator's own definitions of the same functions take their place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#ifdef EDPAIRS_CUDA_EMU
#include <edpairs_emu_ptx.h>
#else

namespace edpairs {
namespace cuda_detail {

// The TF32 bits of v (nearest, ties away; low 13 bits zero).
__device__ __forceinline__ uint32_t tf32_bits(float v) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(out) : "f"(v));
  return out;
}

// v rounded to TF32 as tf32_bits does. wgmma reads float32 operands by dropping those bits,
// which truncates towards zero: a bias of about 2^-11 per product that does not average out
// over a Gram's rows.
__device__ __forceinline__ float round_tf32(float v) { return __uint_as_float(tf32_bits(v)); }

// d += a b on one 16 x 8 tile of a warp (mma.sync, sm_80+): m16n8k8 TF32 for T = float,
// m16n8k16 for float16 / bfloat16; fragments in the PTX ISA's layouts for these shapes.
template <class T>
__device__ __forceinline__ void mma_16x8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same<T, float>::value) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(std::is_same<T, __nv_bfloat16>::value, "mma_16x8: float, __half or __nv_bfloat16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Named barrier `id` of `count` threads: wait for all (named_sync) or only arrive (named_arrive).
__device__ __forceinline__ void named_sync(const int id, const int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(const int id, const int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// *p read while other threads may update it atomically (a volatile load: one read, no caching
// in registers; a relaxed load in the memory model).
__device__ __forceinline__ int load_relaxed(const int* p) { return *reinterpret_cast<const volatile int*>(p); }

// A hint to bring the 128-byte line holding p into L2.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p)); }

// 16 bytes global -> shared (cp.async, sm_80+); bytes past src_bytes (0..16) are zero-filled.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's commit groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
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

}  // namespace cuda_detail
}  // namespace edpairs

#endif  // EDPAIRS_CUDA_EMU
