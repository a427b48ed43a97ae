// The epilogue shared by the wgmma labelling kernels (assign_wgmma_cuda.cu,
// assign_wgmma_tma_cuda.cu, assign_wgmma_resident_cuda.cu): a 64 x N accumulator tile (the
// layout of wgmma.cuh) folded into each thread's running best of its two rows, and the rows'
// labels / scores / scales written; with the named barrier the kernels share.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "assign_wgmma.cuh"
#include "label_rule.cuh"
#include "wgmma.cuh"

namespace edpairs {
namespace cuda_detail {

// Folds the tile of centroids j0 .. j0 + N - 1 into run_val / run_idx (rows g and g + 8 of the
// thread's warp): s_j (dot - o_j) over the thread's own columns in increasing order (strict '>'
// keeps the first maximum), then the 4 lanes of the quad with the tie rule. Waits for the
// warpgroup's wgmma batches first (wgmma_wait<0>, fence_accumulators): acc is final then.
// s_j and o_j of kFoldJ groups of the thread's columns (8 columns) are loaded together (col_s and col_o hold
// k_pad entries: no bounds test), and the columns past k are left out by a select, not a
// branch: with the loads behind the test, each column's pair waited for the previous one's
// (one latency per column and tile; nvdisasm, tools/load_use.py).
template <int N>
__device__ __forceinline__ void fold_tile(float (&acc)[N / 2], const WgmmaAssignParams& p, int j0,
                                          int t, float (&run_val)[2], int (&run_idx)[2]) {
  constexpr int kFoldJ = N / 8 < 4 ? N / 8 : 4;  // groups of 8 columns per batch of loads: 8 columns a thread
  wgmma_wait<0>();
  fence_accumulators(acc);
  float bv[2] = {-INFINITY, -INFINITY};
  int bi[2] = {INT_MAX, INT_MAX};
#pragma unroll
  for (int jb = 0; jb < N / 8; jb += kFoldJ) {
    float sj[kFoldJ][2], oj[kFoldJ][2];
#pragma unroll
    for (int j = 0; j < kFoldJ; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j0 + 8 * (jb + j) + 2 * t + e;  // < k_pad
        sj[j][e] = p.col_s[col];
        oj[j][e] = p.col_o[col];
      }
    }
#pragma unroll
    for (int j = 0; j < kFoldJ; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j0 + 8 * (jb + j) + 2 * t + e;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float v = sj[j][e] * (acc[4 * (jb + j) + 2 * h + e] - oj[j][e]);
          const bool take = col < p.k && v > bv[h];
          bv[h] = take ? v : bv[h];
          bi[h] = take ? col : bi[h];
        }
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv[h], off);
      const int oi = __shfl_xor_sync(0xffffffffu, bi[h], off);
      if (better(ov, oi, bv[h], bi[h])) {
        bv[h] = ov;
        bi[h] = oi;
      }
    }
    if (better(bv[h], bi[h], run_val[h], run_idx[h])) {
      run_val[h] = bv[h];
      run_idx[h] = bi[h];
    }
  }
}

// The scale r of row `r` of the block from its summed squares (or row_scale); 0 past n.
__device__ __forceinline__ float wgmma_row_scale(const WgmmaAssignParams& p, int64_t row0, int r, float sq) {
  if (row0 + r >= p.n) return 0.f;
  return row_scale_of(p.row_scale, row0 + r, sq);
}

// Lane t == 0 of each quad writes its two rows (block rows first_row and first_row + 8); with
// label_s also each row's label there (rows inside x; labels < 256).
__device__ __forceinline__ void write_rows(const WgmmaAssignParams& p, int64_t row0, int first_row,
                                           const float* row_scale_s, const float (&run_val)[2],
                                           const int (&run_idx)[2], unsigned char* label_s = nullptr) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = first_row + 8 * h;
    const int64_t row = row0 + r;
    if (row < p.n) {
      const float rs = row_scale_s[r];
      int label = 0;
      float score = 0.f;
      if (rs > 0.f) {  // rs == 0 (a zero row, or a zero row_scale): label 0, score 0
        const int bi = run_idx[h];
        label = bi >= 0 && bi < p.k ? bi : 0;  // stays 0 when every score was NaN
        score = run_val[h] == -INFINITY ? NAN : rs * run_val[h];  // (then NaN, as on the CPU)
      }
      p.labels[row] = label;
      p.scores[row] = score;
      if (p.row_scale_out != nullptr) p.row_scale_out[row] = rs;
      if (label_s != nullptr) label_s[r] = static_cast<unsigned char>(label);
    }
  }
}

// The first of the two rows that lane t == 0 of thread tid's quad writes (write_rows).
__device__ __forceinline__ int quad_row(const int tid) {
  return (tid / 128) * 64 + ((tid % 128) / 32) * 16 + (tid % 32) / 4;
}

}  // namespace cuda_detail
}  // namespace edpairs
