// argmax_rows on CUDA (ops.h 3d): the per-row half of the assignment on the library-product
// route, run on each block of scores right after cuBLAS formed it (still in L2 when the block
// is a few tens of MB). One warp per row: the row norm from x (unless row_scale is given),
// then the first maximum of the row's k scores, lanes striding the row (coalesced).
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "cuda_check.cuh"
#include "dtype_load.cuh"
#include "edpairs/ops.h"

namespace edpairs {
namespace {

using cuda_detail::ceil_div;
using cuda_detail::minus_center;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

template <class T>
__global__ void __launch_bounds__(kThreads)
argmax_rows_kernel(const float* __restrict__ scores, const float* __restrict__ col_scale,
                   const int k, const T* __restrict__ x,
                   const int64_t x_stride, const int d, const float* __restrict__ center,
                   const float* __restrict__ row_scale, const int64_t rows,
                   int64_t* __restrict__ labels, float* __restrict__ best,
                   float* __restrict__ rscale) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    float rs;
    if (row_scale != nullptr) {
      rs = row_scale[r];
    } else {
      const T* xr = x + r * x_stride;
      float ss = 0.f;
      for (int c = lane; c < d; c += 32) {
        const float v = minus_center(xr[c], center != nullptr ? center[c] : 0.f);
        ss = fmaf(v, v, ss);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(kFull, ss, off);
      rs = ss > 0.f ? 1.0f / sqrtf(ss) : 0.f;
    }
    const float* sr = scores + r * k;
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int j = lane; j < k; j += 32) {  // a lane's indices increase: '>' keeps its first max
      const float v = sr[j] * col_scale[j];
      if (v > bv) {
        bv = v;
        bi = j;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(kFull, bv, off);
      const int oi = __shfl_xor_sync(kFull, bi, off);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == 0) {
      const bool scored = rs > 0.f && bi != INT_MAX;
      labels[r] = scored ? bi : 0;
      best[r] = scored ? rs * bv : 0.f;
      rscale[r] = rs;
    }
  }
}

}  // namespace

void argmax_rows_cuda(const ArgmaxRowsArgs& a, Stream stream) {
  const int64_t rows = a.scores.size(0), k = a.scores.size(1), d = a.x.size(1);
  if (rows < 1) return;
  if (k < 1 || k > INT_MAX || d < 1 || d > INT_MAX) {
    fail("argmax_rows: need 1 <= k, D < 2^31, got scores " + a.scores.shape_str() + " and x " +
         a.x.shape_str());
  }
  cuda_detail::DeviceGuard guard(a.x.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kWarps), 1 << 20));
  cuda_detail::dispatch_input_dtype(a.x, [&](auto tag) {
    using T = typename decltype(tag)::type;
    argmax_rows_kernel<T><<<grid, kThreads, 0, s>>>(
        a.scores.ptr<const float>(), a.col_scale.ptr<const float>(), static_cast<int>(k),
        static_cast<const T*>(a.x.data),
        a.x.stride(0), static_cast<int>(d), a.center.present ? a.center.ptr<const float>() : nullptr,
        a.row_scale.present ? a.row_scale.ptr<const float>() : nullptr, rows,
        a.labels.ptr<int64_t>(), a.best.ptr<float>(), a.rscale.ptr<float>());
    EDPAIRS_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace edpairs
