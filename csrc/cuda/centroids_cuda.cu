// CUDA implementation of the spherical centroid update (ops.h §2):
// out[j] = sums[j] / ||sums[j]|| when counts[j] > 0 and the norm is > 0, else previous[j].
// One block per centroid; the norm is reduced in float64 in a fixed order (deterministic), of
// the row scaled by a power of two (no overflow for sums of 1e200, no underflow for 1e-200).
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "cuda_check.cuh"
#include "edpairs/ops.h"

namespace edpairs {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Block-wide reduction of one double per thread (op: fmax or +), in a fixed order.
template <typename Op>
__device__ double block_reduce(double v, double* warp_parts, Op op) {
  const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  if (tid % 32 == 0) warp_parts[tid / 32] = v;
  __syncthreads();
  double total = warp_parts[0];
  for (int w = 1; w < kWarps; ++w) total = op(total, warp_parts[w]);
  __syncthreads();  // warp_parts is free for the next reduction
  return total;
}

// sums (k, D) float64, counts (k,) int64, previous / out (k, D) float32, all contiguous.
// out may alias previous: each element is read and written by the same thread.
// The norm is taken of the row scaled by a power of two that brings its largest element into
// [1, 2): exact, the same result as unscaled where s.s neither overflows nor underflows, and
// right beyond that (sums of 1e200 or 1e-200). Non-finite sums keep previous.
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const double* __restrict__ sums, const int64_t* __restrict__ counts,
                     const float* previous, float* out, const int d) {
  __shared__ double warp_parts[kWarps];

  const int64_t j = blockIdx.x;
  const double* __restrict__ row = sums + j * d;
  const int tid = static_cast<int>(threadIdx.x);

  double big = 0.0;
  for (int c = tid; c < d; c += kThreads) big = fmax(big, fabs(row[c]));
  big = block_reduce(big, warp_parts, [](double a, double b) { return fmax(a, b); });
  const bool scalable = big > 0.0 && isfinite(big);
  const int e = scalable ? ilogb(big) : 0;

  double sq = 0.0;
  for (int c = tid; c < d; c += kThreads) {
    const double t = scalbn(row[c], -e);
    sq = fma(t, t, sq);
  }
  sq = block_reduce(sq, warp_parts, [](double a, double b) { return a + b; });
  const double norm = sqrt(sq);

  const bool update = counts[j] > 0 && scalable && norm > 0.0 && isfinite(norm);  // false for NaN too
  for (int c = tid; c < d; c += kThreads) {
    const int64_t e_at = j * d + c;
    out[e_at] = update ? static_cast<float>(scalbn(row[c], -e) / norm) : previous[e_at];
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
