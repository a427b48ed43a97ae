// The labelling rule every CUDA assignment kernel shares (ops.h §1): which of two (score, index)
// candidates wins, and a row's scale r_n. The kernels' butterflies over lanes stay written out in
// each kernel: as a helper taking its pair by reference or by value, nvcc compiled the folds
// around it differently (branches for selects), where these two leave every kernel's machine
// code as it was measured.
#pragma once

#include <cmath>
#include <cstdint>

namespace edpairs {
namespace cuda_detail {

// Is (v1, i1) better than (v0, i0)? Larger value, then smaller index: the tie rule of ops.h.
__device__ __forceinline__ bool better(float v1, int i1, float v0, int i0) {
  return v1 > v0 || (v1 == v0 && i1 < i0);
}

// Row `row`'s scale r_n: the caller's row_scale where given, else 1 / ||x~_n|| from its summed
// squares `sq` (0 for a row of zeros).
__device__ __forceinline__ float row_scale_of(const float* row_scale, int64_t row, float sq) {
  if (row_scale != nullptr) return row_scale[row];
  return sq > 0.f ? 1.f / sqrtf(sq) : 0.f;
}

}  // namespace cuda_detail
}  // namespace edpairs
