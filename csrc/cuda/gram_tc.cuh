// TF32 tensor-core "A^T B" over rows (opt-in for `moments` and `signal_moments`):
// C (P x Q) += sum_n (A[n, :] - a_off)^T (B[n, :] - b_off), float32 operands 16-byte aligned.
// 128 x 128 output tiles (with `symmetric`, P == Q and A == B: only tiles on or above the
// diagonal, whose diagonal ones load one operand), each block a contiguous range of rows:
// slices of 32 rows x 512 bytes per operand through a 3-stage cp.async ring; each thread
// centres the chunks it copied (offsets held as float pairs, so a float64 mean keeps its
// precision) and rounds them to TF32 in place before the barrier that publishes the slice;
// 4 warps of 64 x 64 on mma.sync m16n8k8 with the rows as the reduction dimension; float32
// accumulation over the block's range (TF32 rounding dominates its error), then one float64
// store call per entry and block. Shared tiles are [row n][column] with a pitch of 136 words:
// the fragment loads (lanes g + 8 t apart) hit 32 distinct banks.
// tests/test_tc_emulation.py replays the indexing in numpy.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cp_async.cuh"
#include "ptx.cuh"

namespace edpairs {
namespace cuda_detail {

constexpr int kTcgTile = 128;
constexpr int kTcgThreads = 128;
constexpr int kTcgSliceRows = 32;
constexpr int kTcgPitch = kTcgTile + 8;                          // words
constexpr int kTcgStageWords = 2 * kTcgSliceRows * kTcgPitch;    // A slice then B slice
constexpr int kTcgStages = 3;
constexpr int kTcgSmemBytes = kTcgStages * kTcgStageWords * 4;   // 104448
constexpr int kTcgChunkRows = kTcgThreads / 32;                  // rows one loader pass covers

// One operand: rows n of `data` (row stride `ld` floats, 16-byte aligned), `cols` columns,
// minus off64[c] (float64) or off32[c] (float32) or nothing.
struct TcgOperand {
  const float* data;
  int64_t ld;
  int cols;
  const double* off64;
  const float* off32;
};

// Grid: x = tile_p * tiles_q + tile_q, y = row range (rows_per_split rows, a multiple of 32).
template <class Store>
__global__ void __launch_bounds__(kTcgThreads, 2)
    gram_tf32_kernel(const TcgOperand opa, const TcgOperand opb, const Store store,
                     const int64_t n, const int tiles_q, const int64_t rows_per_split,
                     const bool symmetric) {
  extern __shared__ __align__(16) uint32_t smem[];
  const int tile_p = static_cast<int>(blockIdx.x) / tiles_q;
  const int tile_q = static_cast<int>(blockIdx.x) % tiles_q;
  if (symmetric && tile_q < tile_p) return;  // whole block, before any barrier
  const bool shared_operand = symmetric && tile_p == tile_q;  // B = A: one slice, read twice
  const int p0 = tile_p * kTcgTile;
  const int q0 = tile_q * kTcgTile;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  if (n_begin >= n) return;
  const int64_t n_end = n < n_begin + rows_per_split ? n : n_begin + rows_per_split;
  const int steps = static_cast<int>((n_end - n_begin + kTcgSliceRows - 1) / kTcgSliceRows);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / 2;  // p rows warp_m * 64 ..
  const int warp_n = warp % 2;  // q cols warp_n * 64 ..
  const int g = lane / 4;
  const int t = lane % 4;

  // Loader: thread tid copies 16-byte chunk tid % 32 (columns 4 c .. 4 c + 3 of the tile) of
  // slice rows tid / 32 + 4 i, for A (columns p0 + ..) and, unless shared, B (q0 + ..).
  const int chunk = tid % 32;
  const int operands = shared_operand ? 1 : 2;
  float off_hi[2][4];
  float off_lo[2][4];
  int valid_cols[2];
#pragma unroll
  for (int o = 0; o < 2; ++o) {
    const TcgOperand& op = o == 0 ? opa : opb;
    const int c0 = (o == 0 ? p0 : q0) + 4 * chunk;
    const int rem = op.cols - c0;
    valid_cols[o] = rem < 0 ? 0 : (rem < 4 ? rem : 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      double m = 0.0;
      if (e < valid_cols[o]) {
        if (op.off64 != nullptr) m = op.off64[c0 + e];
        else if (op.off32 != nullptr) m = op.off32[c0 + e];
      }
      off_hi[o][e] = static_cast<float>(m);
      off_lo[o][e] = static_cast<float>(m - static_cast<double>(off_hi[o][e]));
    }
  }

  auto load = [&](int step, uint32_t* stage) {
    const int64_t r0 = n_begin + static_cast<int64_t>(step) * kTcgSliceRows;
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      if (o >= operands) break;
      const TcgOperand& op = o == 0 ? opa : opb;
      const int c0 = (o == 0 ? p0 : q0) + 4 * chunk;
#pragma unroll
      for (int i = 0; i < kTcgSliceRows / kTcgChunkRows; ++i) {
        const int r = tid / 32 + kTcgChunkRows * i;
        const int64_t row = r0 + r;
        const int valid = row < n_end ? valid_cols[o] : 0;
        const float* src = valid > 0 ? op.data + row * op.ld + c0 : op.data;
        cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(
                            stage + (o * kTcgSliceRows + r) * kTcgPitch + 4 * chunk)),
                        src, valid * 4);
      }
    }
  };
  // Centre and round this thread's own chunks of a landed slice (rows past n_end stay 0).
  auto centre = [&](int step, uint32_t* stage) {
    const int64_t r0 = n_begin + static_cast<int64_t>(step) * kTcgSliceRows;
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      if (o >= operands) break;
#pragma unroll
      for (int i = 0; i < kTcgSliceRows / kTcgChunkRows; ++i) {
        const int r = tid / 32 + kTcgChunkRows * i;
        if (r0 + r < n_end) {
          uint32_t* w = stage + (o * kTcgSliceRows + r) * kTcgPitch + 4 * chunk;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float v = e < valid_cols[o] ? (__uint_as_float(w[e]) - off_hi[o][e]) - off_lo[o][e] : 0.f;
            w[e] = tf32_bits(v);
          }
        }
      }
    }
  };

  float acc[4][8][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int nj = 0; nj < 8; ++nj) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.f;
    }
  }
#pragma unroll
  for (int s = 0; s < kTcgStages - 1; ++s) {
    if (s < steps) load(s, smem + s * kTcgStageWords);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    uint32_t* stage = smem + (step % kTcgStages) * kTcgStageWords;
    cp_async_wait<kTcgStages - 2>();
    centre(step, stage);
    __syncthreads();  // slice `step` centred and visible; the stage of step - 1 is free
    {
      const int next = step + kTcgStages - 1;
      if (next < steps) load(next, smem + (next % kTcgStages) * kTcgStageWords);
      cp_async_commit();
    }
    const uint32_t* as = stage;
    const uint32_t* bs = shared_operand ? stage : stage + kTcgSliceRows * kTcgPitch;
#pragma unroll
    for (int ks = 0; ks < kTcgSliceRows / 8; ++ks) {
      const uint32_t* arow = as + (ks * 8 + t) * kTcgPitch;
      const uint32_t* brow = bs + (ks * 8 + t) * kTcgPitch;
      uint32_t a[4][4];
      uint32_t b[8][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int pc = warp_m * 64 + mi * 16 + g;
        a[mi][0] = arow[pc];
        a[mi][1] = arow[pc + 8];
        a[mi][2] = arow[4 * kTcgPitch + pc];
        a[mi][3] = arow[4 * kTcgPitch + pc + 8];
      }
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) {
        const int qc = warp_n * 64 + nj * 8 + g;
        b[nj][0] = brow[qc];
        b[nj][1] = brow[4 * kTcgPitch + qc];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int nj = 0; nj < 8; ++nj) {
          mma_16x8<float>(acc[mi][nj], a[mi], b[nj]);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int nj = 0; nj < 8; ++nj) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int pp = p0 + warp_m * 64 + mi * 16 + g + 8 * (r / 2);
        const int qq = q0 + warp_n * 64 + nj * 8 + 2 * t + r % 2;
        if (pp < opa.cols && qq < opb.cols) store(pp, qq, static_cast<double>(acc[mi][nj][r]));
      }
    }
  }
}

// Rows per block of gram_tf32_kernel: at most two full waves of two blocks per SM over `tiles`
// output tiles (rounded down: 530 blocks on 264 slots would take three waves, 520 take two),
// each range at least 4 slices and a whole number of them.
inline int64_t gram_tf32_rows_per_split(int64_t rows, int64_t tiles, int multiprocessors) {
  int64_t splits = std::max<int64_t>(1, 4 * static_cast<int64_t>(multiprocessors) / tiles);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (rows + 4 * kTcgSliceRows - 1) / (4 * kTcgSliceRows)));
  splits = std::min<int64_t>(splits, 65535);
  const int64_t per = (rows + splits - 1) / splits;
  return (per + kTcgSliceRows - 1) / kTcgSliceRows * kTcgSliceRows;
}

// Whether a float32 operand can be copied 16 bytes at a time.
inline bool tcg_aligned(const void* p, int64_t ld_floats) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld_floats % 4 == 0;
}

}  // namespace cuda_detail
}  // namespace edpairs
