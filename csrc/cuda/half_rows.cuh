// Rows as float16 for cosine labels (ops.h 3e'): the per-row power of two and 1 / ||x||, shared
// by half_rows_kernel (route_cuda.cu: float16 copies of the rows), the resident labelling
// kernel (assign_wgmma_resident_cuda.cu: float16 rows made in shared memory) and
// prepare_centroids<__half, true>, so that they write the same float16 values (but for rows
// that count as zero: half_rows writes zeros, the resident kernel keeps their scaled values
// and gives them the score factor 0, the same labels and scores).
#pragma once

#include <cmath>

namespace edpairs {
namespace cuda_detail {

// 2^e bringing big = max_d |x_d| of a row into [2^7, 2^8) (exponent clamped to float32's
// normal range): x_d * 2^e is exact and at most 256, far inside float16's 65504.
__device__ __forceinline__ float half_row_scale(const float big) {
  int e = 0;
  frexpf(big, &e);  // big = m 2^e, m in [0.5, 1)
  const int ke = 8 - e < -126 ? -126 : (8 - e > 127 ? 127 : 8 - e);
  return ldexpf(1.f, ke);
}

// half_row_scale of the largest of `big` over the 32 lanes of a warp (each lane's part of a
// row), which `big` becomes in every lane.
__device__ __forceinline__ float warp_half_row_scale(float& big) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, o));
  return half_row_scale(big);
}

// 1 / ||x|| of a row from ss, the sum of its scaled values' squares (no overflow or underflow
// after the scaling), and the scale k; 0 for a zero row and for one whose 1 / ||x|| is not a
// finite float32 (norm below about 2.9e-39), which `zero` says (half_rows writes such rows as
// zeros). A row with NaN beside other non-zero values, or with Inf, gets 0 too but is not
// `zero`: its values are written as they scale, as the CPU's half_rows does (a row of NaN
// and zeros only has big = 0, fmaxf passing NaN over, and is `zero`).
__device__ __forceinline__ float half_row_rscale(const float big, const float ss, const float k, bool& zero) {
  const double inv = ss > 0.f ? static_cast<double>(k) / sqrt(static_cast<double>(ss)) : 0.0;
  zero = !(big > 0.f) || !(inv <= 3.4028234663852886e38);
  return zero ? 0.f : static_cast<float>(inv);
}

}  // namespace cuda_detail
}  // namespace edpairs
