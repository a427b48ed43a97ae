// Asynchronous global -> shared copies (cp.async, sm_80+), shared by the tensor-core kernels.
#pragma once

#include <cstdint>

namespace edpairs {
namespace cuda_detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; bytes past src_bytes (0..16) are zero-filled.
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

// The sum of v over the 8 lanes l with equal l / 8 (lanes 8 m .. 8 m + 7 of a warp): the loaders
// give one row's eight 16-byte chunks of a 128-byte slice to 8 consecutive lanes, which add a
// row's partial sums with this.
__device__ __forceinline__ float sum_over_chunk_lanes(float v) {
#pragma unroll
  for (int off = 1; off < 8; off <<= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace cuda_detail
}  // namespace edpairs
