// Helpers of the asynchronous global -> shared copies (cp.async, sm_80+; the instructions are in
// ptx.cuh), shared by the tensor-core kernels.
#pragma once

#include <cstdint>

#include "ptx.cuh"

namespace edpairs {
namespace cuda_detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
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
