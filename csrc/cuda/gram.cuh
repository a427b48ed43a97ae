// Tile machinery shared by the CUDA kernels:
//  * accumulate_4x4: the per-thread 4x4 register micro-kernel over BK slices in shared memory;
//  * gram_kernel: a tiled "A^T B" product over rows, C (P x Q) += sum_n A[n, :]^T B[n, :],
//    used for the centred scatter of `moments` and the masked cross-moments of
//    `signal_moments`. Products are summed in float32 over chunks of at most kGramChunk rows,
//    then in float64 registers, then added into C with float64 atomics.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace edpairs {
namespace cuda_detail {

// acc[i][j] += sum_kk a[kk][a_col + i] * b[kk][b_col + j]. a_col, b_col are multiples of 4 and
// the row lengths kLdA, kLdB multiples of 4, so the float4 reads are 16-byte aligned.
// The sum over kk runs in increasing order with one fmaf per term for every (i, j), so equal
// inputs give bit-identical results wherever they sit in the tile (the tie rule relies on it).
template <int kSteps, int kLdA, int kLdB>
__device__ __forceinline__ void accumulate_4x4(float (&acc)[4][4], const float (&a)[kSteps][kLdA],
                                               const float (&b)[kSteps][kLdB], int a_col,
                                               int b_col) {
  static_assert(kLdA % 4 == 0 && kLdB % 4 == 0, "rows must keep float4 alignment");
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    const float4 av = *reinterpret_cast<const float4*>(&a[kk][a_col]);
    const float4 bv = *reinterpret_cast<const float4*>(&b[kk][b_col]);
    const float ar[4] = {av.x, av.y, av.z, av.w};
    const float br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
  }
}

constexpr int kGramThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kGramTile = 64;      // output tile: 64 (P) x 64 (Q)
constexpr int kGramStep = 16;      // rows staged in shared memory at a time
constexpr int kGramChunk = 256;    // rows summed in float32 before going to float64

// A loader describes one operand, a (rows x cols) matrix read column-block by column-block:
//   using Offset = float or double;
//   __device__ Offset offset(int col) const;   offset of column col, staged once per block
//   __device__ float value(int64_t row, int col, Offset off) const;
//                                              element (row, col) minus off, both in range
// A store adds one finished float64 entry into the output:
//   __device__ void operator()(int p, int q, double v) const;
//
// Grid: blockIdx.x = tile_p * tiles_q + tile_q over the (P x Q) output tiles; blockIdx.y splits
// the chunks of kGramChunk rows (block y takes chunks y, y + gridDim.y, ...). With upper_only
// (P == Q, symmetric product) the blocks of tiles strictly below the diagonal exit at once.
template <class LoadA, class LoadB, class Store>
__global__ void __launch_bounds__(kGramThreads)
    gram_kernel(const LoadA load_a, const LoadB load_b, const Store store, const int64_t rows,
                const int P, const int Q, const int tiles_q, const bool upper_only) {
  __shared__ __align__(16) float a_s[kGramStep][kGramTile];  // a_s[r][p] = A[n0 + r][p0 + p]
  __shared__ __align__(16) float b_s[kGramStep][kGramTile];  // b_s[r][q] = B[n0 + r][q0 + q]
  __shared__ typename LoadA::Offset a_off[kGramTile];
  __shared__ typename LoadB::Offset b_off[kGramTile];

  const int tile = static_cast<int>(blockIdx.x);
  const int tile_p = tile / tiles_q;
  const int tile_q = tile % tiles_q;
  if (upper_only && tile_q < tile_p) return;  // whole block, before any barrier
  const int p0 = tile_p * kGramTile;
  const int q0 = tile_q * kGramTile;

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;  // output columns q0 + 4 tx .. + 3
  const int ty = tid / 16;  // output rows    p0 + 4 ty .. + 3

  if (tid < kGramTile) {
    a_off[tid] = p0 + tid < P ? load_a.offset(p0 + tid) : typename LoadA::Offset(0);
  } else if (tid < 2 * kGramTile) {
    const int c = tid - kGramTile;
    b_off[c] = q0 + c < Q ? load_b.offset(q0 + c) : typename LoadB::Offset(0);
  }
  __syncthreads();

  // Loading: consecutive threads read consecutive columns of one row (coalesced).
  const int ld_col = tid % kGramTile;
  const int ld_row = tid / kGramTile;  // 0..3; rows ld_row + 4 s, s = 0..3
  const int pa = p0 + ld_col;
  const int qb = q0 + ld_col;
  const bool a_in = pa < P;
  const bool b_in = qb < Q;
  const typename LoadA::Offset a_sub = a_off[ld_col];
  const typename LoadB::Offset b_sub = b_off[ld_col];

  double total[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) total[i][j] = 0.0;
  }

  const int64_t chunks = (rows + kGramChunk - 1) / kGramChunk;
  for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
    const int64_t n_begin = c * kGramChunk;
    const int64_t n_end = rows < n_begin + kGramChunk ? rows : n_begin + kGramChunk;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
    for (int64_t s0 = n_begin; s0 < n_end; s0 += kGramStep) {
#pragma unroll
      for (int s = 0; s < kGramStep / 4; ++s) {
        const int r = ld_row + 4 * s;
        const int64_t n = s0 + r;
        const bool row_in = n < n_end;
        a_s[r][ld_col] = (row_in && a_in) ? load_a.value(n, pa, a_sub) : 0.f;
        b_s[r][ld_col] = (row_in && b_in) ? load_b.value(n, qb, b_sub) : 0.f;
      }
      __syncthreads();
      accumulate_4x4(acc, a_s, b_s, 4 * ty, 4 * tx);
      __syncthreads();  // a_s / b_s are overwritten by the next step
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) total[i][j] += static_cast<double>(acc[i][j]);
    }
  }

  if (static_cast<int64_t>(blockIdx.y) >= chunks) return;  // took no rows: nothing to add
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int p = p0 + 4 * ty + i;
    if (p >= P) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int q = q0 + 4 * tx + j;
      if (q < Q) store(p, q, total[i][j]);
    }
  }
}

// gridDim.y for gram_kernel: enough blocks to fill the device a few times over, never more
// splits than chunks of rows, and within the grid's y limit.
inline int gram_row_splits(int64_t rows, int64_t tiles, int multiprocessors) {
  const int64_t chunks = (rows + kGramChunk - 1) / kGramChunk;
  const int64_t target_blocks = 4 * static_cast<int64_t>(multiprocessors);
  int64_t splits = (target_blocks + tiles - 1) / tiles;
  splits = std::min<int64_t>(splits, chunks);
  splits = std::min<int64_t>(splits, 65535);
  return static_cast<int>(std::max<int64_t>(splits, 1));
}

}  // namespace cuda_detail
}  // namespace edpairs
