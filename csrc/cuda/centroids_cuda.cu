// CUDA implementation of the spherical centroid update (ops.h §2):
// out[j] = sums[j] / ||sums[j]|| when counts[j] > 0 and the norm is > 0, else previous[j].
// One block per centroid; the norm is reduced in float64 in a fixed order (deterministic).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_check.cuh"
#include "edpairs/ops.h"

namespace edpairs {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// sums (k, D) float64, counts (k,) int64, previous / out (k, D) float32, all contiguous.
// out may alias previous: each element is read and written by the same thread.
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const double* __restrict__ sums, const int64_t* __restrict__ counts,
                     const float* previous, float* out, const int d) {
  __shared__ double warp_sums[kWarps];
  __shared__ double norm_s;

  const int64_t j = blockIdx.x;
  const double* __restrict__ row = sums + j * d;
  const int tid = static_cast<int>(threadIdx.x);

  double sq = 0.0;
  for (int c = tid; c < d; c += kThreads) sq = fma(row[c], row[c], sq);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sq += __shfl_down_sync(0xffffffffu, sq, offset);
  if (tid % 32 == 0) warp_sums[tid / 32] = sq;
  __syncthreads();
  if (tid == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
    norm_s = sqrt(total);
  }
  __syncthreads();

  const double norm = norm_s;
  const bool update = counts[j] > 0 && norm > 0.0;  // false for a NaN norm as well
  for (int c = tid; c < d; c += kThreads) {
    const int64_t e = j * d + c;
    out[e] = update ? static_cast<float>(row[c] / norm) : previous[e];
  }
}

}  // namespace

void normalize_centroids_cuda(const NormalizeArgs& args, Stream stream) {
  cuda_detail::DeviceGuard guard(args.sums.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t k = args.sums.size(0);
  const int64_t d = args.sums.size(1);
  if (k > INT_MAX || d > cuda_detail::kMaxExtent) {
    fail("normalize_centroids: need k <= 2^31 - 1 and D <= 2^30, got sums " + args.sums.shape_str());
  }
  if (k == 0 || d == 0) return;  // nothing to write
  normalize_kernel<<<static_cast<unsigned>(k), kThreads, 0, s>>>(
      args.sums.ptr<const double>(), args.counts.ptr<const int64_t>(),
      args.previous.ptr<const float>(), args.out.ptr<float>(), static_cast<int>(d));
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace edpairs
