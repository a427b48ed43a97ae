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
// tests/test_tc_emulation.py models the descriptors (sw128_address) and this layout; the
// instructions themselves are in ptx.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptx.cuh"

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
