// CUDA implementation of the fused cosine assignment (ops.h §1): per row the label of the
// centroid of highest s_j * (x~_n . c_j), its score and, optionally, per-cluster sums of
// r_n x~_n and counts, without ever materialising the N x k score matrix.
//
// One block owns kRows rows of x and loops over all centroids in tiles of kCents; each tile is
// a small GEMM over D in slices of kStep staged in shared memory, 4 x 4 outputs per thread.
// The row norms (first centroid tile) and the tile's centroid norms are summed from the same
// shared slices, so no extra pass and no scratch buffer is needed.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "cuda_check.cuh"
#include "dtype_load.cuh"
#include "assign_sums.cuh"
#include "assign_tc.cuh"
#include "edpairs/ops.h"
#include "gram.cuh"
#include "label_rule.cuh"

namespace edpairs {
namespace {

using cuda_detail::accumulate_4x4;
using cuda_detail::minus_center;

constexpr int kThreads = 256;  // 16 x 16: ty picks 4 rows, tx picks 4 centroids
constexpr int kRows = 64;      // rows of x per block (BM)
constexpr int kCents = 64;     // centroids per tile (BN)
constexpr int kStep = 16;      // slice of D staged in shared memory (BK)
constexpr int kPad = 4;        // keeps float4 alignment, halves bank conflicts of the stores

struct AssignParams {
  const void* x;             // (N, D), row stride x_stride, unit column stride
  int64_t x_stride;
  int64_t n;
  int d;
  int k;
  const float* centroids;    // (k, D) contiguous
  const float* center;       // (D,) or null
  const float* row_scale;    // (N,) or null
  const float* col_scale;    // (k,) or null
  int64_t* labels;           // (N,)
  float* scores;             // (N,)
  double* sums;              // (k, D) or null (zeroed before the launch)
  unsigned long long* counts;  // (k,) or null (zeroed before the launch)
};

template <class T>
__global__ void __launch_bounds__(kThreads) assign_kernel(const AssignParams p) {
  __shared__ __align__(16) float xs[kStep][kRows + kPad];   // xs[kk][m] = x~[row0 + m][k0 + kk]
  __shared__ __align__(16) float cs[kStep][kCents + kPad];  // cs[kk][c] = C[j0 + c][k0 + kk]
  __shared__ float row_scale_s[kRows];                      // r_n of the block's rows
  __shared__ float col_scale_s[kCents];                     // s_j of the current tile
  __shared__ float best_s[kRows];                           // best s_j * dot of each row
  __shared__ int label_s[kRows];
  __shared__ int order_s[kRows];                            // rows sorted by (label, row)

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(p.n - row0 < kRows ? p.n - row0 : kRows);  // 1..kRows

  // Loading: thread (ld_m, ld_k) reads element k0 + ld_k of rows ld_m + 16 s, s = 0..3, so a
  // half-warp reads kStep consecutive elements of one row.
  const int ld_k = tid % kStep;
  const int ld_m = tid / kStep;  // 0..15

  // Threads 0..63 sum the squares of row `tid` (first tile only); threads 64..127 those of
  // centroid `tid - 64` of each tile. One thread per row/centroid, increasing kk: the sums are
  // deterministic and identical for identical centroids.
  const bool sums_row_norm = p.row_scale == nullptr && tid < kRows;
  const bool sums_col_norm = p.col_scale == nullptr && tid >= kRows && tid < kRows + kCents;

  // Running best of this thread's 4 rows over the tiles seen so far. Every thread of the 16
  // sharing a row holds the same copy (the butterfly below ends equal in all lanes).
  float run_val[4];
  int run_idx[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    run_val[i] = -INFINITY;
    run_idx[i] = 0;
  }
  float row_sq = 0.f;

  for (int j0 = 0; j0 < p.k; j0 += kCents) {
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
    double col_sq = 0.0;  // float64, as the CPU and the tensor-core path: float32 squares underflow

    for (int k0 = 0; k0 < p.d; k0 += kStep) {
      const int kcol = k0 + ld_k;
      const bool k_in = kcol < p.d;
      const float ctr = (k_in && p.center != nullptr) ? p.center[kcol] : 0.f;
#pragma unroll
      for (int s = 0; s < kRows / 16; ++s) {
        const int m = ld_m + 16 * s;
        float v = 0.f;
        if (k_in && m < rows) v = minus_center(x[(row0 + m) * p.x_stride + kcol], ctr);
        xs[ld_k][m] = v;
        const int j = j0 + m;
        float c = 0.f;
        if (k_in && j < p.k) c = p.centroids[static_cast<int64_t>(j) * p.d + kcol];
        cs[ld_k][m] = c;
      }
      __syncthreads();

      accumulate_4x4(acc, xs, cs, 4 * ty, 4 * tx);
      if (sums_row_norm && j0 == 0) {
#pragma unroll
        for (int kk = 0; kk < kStep; ++kk) row_sq = fmaf(xs[kk][tid], xs[kk][tid], row_sq);
      }
      if (sums_col_norm) {
        const int c = tid - kRows;
#pragma unroll
        for (int kk = 0; kk < kStep; ++kk) col_sq = fma(static_cast<double>(cs[kk][c]), static_cast<double>(cs[kk][c]), col_sq);
      }
      __syncthreads();  // xs / cs are overwritten by the next slice
    }

    // Scales of this tile's centroids and, on the first tile, of the block's rows. The readers
    // of the previous tile's col_scale_s have all passed the barriers of the D loop above.
    if (tid >= kRows && tid < kRows + kCents) {
      const int c = tid - kRows;
      const int j = j0 + c;
      float sj = 0.f;
      if (j < p.k) {
        if (p.col_scale != nullptr) {
          sj = p.col_scale[j];
        } else {
          // 1 / ||c_j||; no finite float32 (norm below about 2.9e-39): a zero centroid, as on the CPU.
          const double inv = col_sq > 0.0 ? 1.0 / sqrt(col_sq) : 0.0;
          sj = inv <= 3.4028234663852886e38 ? static_cast<float>(inv) : 0.f;
        }
      }
      col_scale_s[c] = sj;
    }
    if (j0 == 0 && tid < kRows) {
      row_scale_s[tid] = tid < rows ? cuda_detail::row_scale_of(p.row_scale, row0 + tid, row_sq) : 0.f;
    }
    __syncthreads();

    // Fold this tile into the running best of each row: own 4 centroids in increasing j with a
    // strict '>', then the 16 threads of the row (lanes of one half-warp) by a butterfly that
    // prefers the lower index on equal values. All indices of this tile exceed those of earlier
    // tiles, so a strict '>' against the running best keeps the smallest index.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float bv = -INFINITY;
      int bi = INT_MAX;
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int c = 4 * tx + jj;
        if (j0 + c < p.k) {
          const float v = col_scale_s[c] * acc[i][jj];
          if (v > bv) {
            bv = v;
            bi = j0 + c;
          }
        }
      }
#pragma unroll
      for (int offset = 8; offset > 0; offset >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, offset);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, offset);
        if (cuda_detail::better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (bv > run_val[i]) {
        run_val[i] = bv;
        run_idx[i] = bi;
      }
    }
  }

  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      best_s[4 * ty + i] = run_val[i];
      label_s[4 * ty + i] = run_idx[i];
    }
  }
  __syncthreads();

  if (tid < rows) {
    const float r = row_scale_s[tid];
    int label = 0;
    float score = 0.f;
    if (r > 0.f) {  // r == 0 (a zero row, or a zero row_scale): label 0, score 0
      label = label_s[tid];
      // -inf only when every score was NaN (unchecked non-finite input): NaN, as on the CPU.
      score = best_s[tid] == -INFINITY ? NAN : r * best_s[tid];
    }
    p.labels[row0 + tid] = label;
    p.scores[row0 + tid] = score;
    label_s[tid] = label;  // only this thread touches entry tid until the barrier below
  }

  if (p.sums == nullptr) return;  // uniform over the block
  __syncthreads();

  cuda_detail::add_block_sums<kThreads>(x, p.x_stride, p.d, p.center, p.sums, p.counts, row0, rows,
                                        label_s, row_scale_s, order_s, tid);
}

}  // namespace

void assign_cuda(const AssignArgs& args, Stream stream) {
  const TensorView& x = args.x;
  cuda_detail::DeviceGuard guard(x.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);

  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  const int64_t k = args.centroids.size(0);
  if (d < 1 || d > cuda_detail::kMaxExtent || k < 1 || k > cuda_detail::kMaxExtent) {
    fail("assign: need 1 <= D, k <= 2^30, got x " + x.shape_str() + " and centroids " +
         args.centroids.shape_str());
  }

  AssignParams p{};
  p.x = x.data;
  p.x_stride = x.stride(0);
  p.n = n;
  p.d = static_cast<int>(d);
  p.k = static_cast<int>(k);
  p.centroids = args.centroids.ptr<const float>();
  p.center = args.center.present ? args.center.ptr<const float>() : nullptr;
  p.row_scale = args.row_scale.present ? args.row_scale.ptr<const float>() : nullptr;
  p.col_scale = args.col_scale.present ? args.col_scale.ptr<const float>() : nullptr;
  p.labels = args.labels.ptr<int64_t>();
  p.scores = args.scores.ptr<float>();
  p.sums = args.sums.present ? args.sums.ptr<double>() : nullptr;
  p.counts = (args.sums.present && args.counts.present)
                 ? reinterpret_cast<unsigned long long*>(args.counts.ptr<int64_t>())
                 : nullptr;

  // The kernel accumulates with atomics, so the outputs start at zero (also when N == 0).
  if (p.sums != nullptr) {
    EDPAIRS_CUDA_CHECK(cudaMemsetAsync(p.sums, 0, static_cast<size_t>(k * d) * sizeof(double), s));
  }
  if (p.counts != nullptr) {
    EDPAIRS_CUDA_CHECK(cudaMemsetAsync(p.counts, 0, static_cast<size_t>(k) * sizeof(int64_t), s));
  }
  if (n == 0) return;

  if (args.precision == AssignPrecision::TensorCoreHalf) {
    cuda_detail::assign_tensor_core_half(args, s);
    return;
  }
  if (args.precision == AssignPrecision::TensorCore && x.dtype != DType::Float64) {
    cuda_detail::assign_tensor_core(args, s);
    return;
  }

  const int64_t blocks = cuda_detail::ceil_div(n, kRows);
  if (blocks > INT_MAX) fail("assign: too many rows for one launch: N = " + std::to_string(n));

  cuda_detail::dispatch_input_dtype(x, [&](auto tag) {
    using T = typename decltype(tag)::type;
    assign_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(p);
    EDPAIRS_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace edpairs
