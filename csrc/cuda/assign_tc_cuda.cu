// Tensor-core fused cosine assignment (ops.h §1 with AssignPrecision::TensorCore): the products
// x . c_j on mma.sync (TF32 m16n8k8 for float32 x, m16n8k16 for float16 / bfloat16 x, float32
// accumulation), the argmax folded into the epilogue of every centroid tile, never an N x k
// matrix.
//
// Two launches on the caller's stream:
//  1. prepare_centroids: the centroids rounded to the operand type (TF32 bits in float32
//     storage, or float16 / bfloat16), zero-padded to (k_pad, d_pad) so the main kernel never
//     bounds-checks them; per centroid the scale s_j (col_scale or 1/||c_j||, 0 for padding)
//     and the offset o_j = center . c~_j (float64 sum), so that x~ . c~ = x . c~ - o_j.
//  2. assign_tc_kernel: a block owns kRows rows of x and loops over all centroid tiles of
//     kCents; each tile is a kRows x kCents x d_pad product, streamed through shared memory in
//     slices of 128 bytes per row with a kStages-deep cp.async pipeline. 4 warps as 2 (rows) x 2
//     (centroids), each a 64 x 64 warp tile of 4 x 8 mma tiles (0.125 shared-memory bytes per
//     TF32 multiply-add; two blocks per multiprocessor). The row norms of the centred
//     rows are summed in float32 from the shared slices during the first centroid tile. After the
//     last tile the block writes labels / scores and adds its rows into the cluster sums
//     (add_block_sums, shared with the float32 kernel).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k8 / m16n8k16"), with
// g = lane / 4 and t = lane % 4, counting in 32-bit words w of a row of the operand (one TF32
// element, or two consecutive 16-bit elements):
//   A (16 x 8 words, row-major): reg r holds (row g + 8 (r % 2), word t + 4 (r / 2));
//   B (8 x 8 words, stored as C[n][k]): reg r holds (n = g, word t + 4 r);
//   C (16 x 8): reg r holds (row g + 8 (r / 2), col 2 t + r % 2).
// benchmarks/emulate_assign_tc.py replays this kernel's indexing with those layouts in numpy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>

#include "edpairs/assign_knobs.h"

#include "assign_sums.cuh"
#include "assign_tc.cuh"
#include "assign_wgmma.cuh"
#include "half_rows.cuh"
#include "label_rule.cuh"
#include "cp_async.cuh"
#include "cuda_check.cuh"
#include "dtype_load.cuh"
#include "ptx.cuh"

namespace edpairs {
namespace cuda_detail {

using namespace ::edpairs::knobs;  // the knobs' readers (edpairs/assign_knobs.h)

namespace {

constexpr int kRows = 128;                 // rows of x per block
constexpr int kCents = 128;                // centroids per tile
constexpr int kWarpsM = 2;                 // warps along rows ...
constexpr int kWarpsN = 2;                 // ... and along centroids
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kStages = 3;                 // cp.async pipeline depth
constexpr int kSliceBytes = 128;           // bytes of one row per slice (BK elements)
constexpr int kPitchWords = 36;            // row pitch in shared memory: 128 + 16 bytes
constexpr int kTileWords = (kRows + kCents) * kPitchWords;  // one stage: x tile then C tile
constexpr int kSmemBytes = kStages * kTileWords * 4;        // 110592 bytes
constexpr int kWarpRows = kRows / kWarpsM;    // warp tile: 64 rows ...
constexpr int kWarpCents = kCents / kWarpsN;  // ... x 64 centroids
constexpr int kMi = kWarpRows / 16;        // mma tiles per warp along rows
constexpr int kNj = kWarpCents / 8;        // ... and along centroids
constexpr int kLoadRows = kThreads / 8;    // rows one pass of the loader covers (8 chunks a row)
static_assert(kRows == kThreads, "one thread per row for the row norms and the final merge");
static_assert(kRows % kLoadRows == 0 && kCents == kRows, "the loader moves equal x and C tiles");

template <class T>
constexpr int slice_elems() { return kSliceBytes / static_cast<int>(sizeof(T)); }

// Raw bits of an element, for the unaligned (element-by-element) loader.
template <class T>
using Bits = typename std::conditional<sizeof(T) == 4, uint32_t, uint16_t>::type;

// 32-bit words of K per mma_16x8 step (ptx.cuh): k8 TF32, or k16 of 16-bit values.
constexpr int kMmaWordsPerStep = 8;

// A fragment word: TF32 operands are rounded here (x arrives as float32 bits); 16-bit pairs
// are used as stored.
template <class T>
__device__ __forceinline__ uint32_t a_word(const uint32_t* w) {
  return *w;
}
template <>
__device__ __forceinline__ uint32_t a_word<float>(const uint32_t* w) {
  return tf32_bits(__uint_as_float(*w));
}

// Centroid element rounded to the operand type, as raw bits in the workspace.
__device__ __forceinline__ void store_operand(float* dst, float v, float& rounded) {
  const uint32_t bits = tf32_bits(v);
  rounded = __uint_as_float(bits);
  *dst = rounded;
}
__device__ __forceinline__ void store_operand(__half* dst, float v, float& rounded) {
  const __half h = __float2half_rn(v);
  rounded = __half2float(h);
  *dst = h;
}
__device__ __forceinline__ void store_operand(__nv_bfloat16* dst, float v, float& rounded) {
  const __nv_bfloat16 h = __float2bfloat16_rn(v);
  rounded = __bfloat162float(h);
  *dst = h;
}

// One warp per (padded) centroid row j: cw[j] = c~_j zero-padded to d_pad, s[j], o[j]. With
// kScaled (the float16 rows of AssignPrecision::TensorCoreHalf; no center) c~_j is c_j times
// the power of two 2^e_j of half_rows (half_rows.cuh: its largest magnitude into [2^7, 2^8),
// exact), so that float16 holds centroids of any magnitude, and s[j] = 1 / ||c~_j|| (or
// col_scale[j] 2^-e_j): s_j (x . c~_j) stays the cosine (or col_scale_j x . c_j).
template <class T, bool kScaled = false>
__global__ void __launch_bounds__(256)
    prepare_centroids(const float* __restrict__ c, const int k, const int d, const int k_pad,
                      const int d_pad, const float* __restrict__ center,
                      const float* __restrict__ col_scale, T* __restrict__ cw,
                      float* __restrict__ s_out, float* __restrict__ o_out) {
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int j = static_cast<int>(blockIdx.x) * 8 + warp;
  if (j >= k_pad) return;  // no barriers in this kernel
  T* row = cw + static_cast<int64_t>(j) * d_pad;
  float scale = 1.f;
  if (kScaled) {
    float big = 0.f;
    for (int col = lane; j < k && col < d; col += 32) big = fmaxf(big, fabsf(c[static_cast<int64_t>(j) * d + col]));
    scale = warp_half_row_scale(big);
  }
  double sq = 0.0;
  double off = 0.0;
  for (int col = lane; col < d_pad; col += 32) {
    const float v = (j < k && col < d) ? __fmul_rn(c[static_cast<int64_t>(j) * d + col], scale) : 0.f;
    float rounded;
    store_operand(row + col, v, rounded);
    sq += static_cast<double>(v) * static_cast<double>(v);
    if (center != nullptr && col < d) {
      off += static_cast<double>(center[col]) * static_cast<double>(rounded);
    }
  }
#pragma unroll
  for (int step = 16; step > 0; step >>= 1) {
    sq += __shfl_xor_sync(0xffffffffu, sq, step);
    off += __shfl_xor_sync(0xffffffffu, off, step);
  }
  if (lane == 0) {
    float sj = 0.f;
    if (j < k) {
      if (col_scale != nullptr) {
        sj = col_scale[j] / scale;
      } else {
        // 1 / ||c~_j||; a centroid whose own 1 / ||c_j|| (2^e_j times that) is no finite float32
        // (norm below about 2.9e-39) counts as a zero centroid, as on the CPU (it was +Inf here).
        const double inv = sq > 0.0 ? 1.0 / sqrt(sq) : 0.0;
        sj = inv * static_cast<double>(scale) <= 3.4028234663852886e38 ? static_cast<float>(inv) : 0.f;
      }
    }
    s_out[j] = sj;
    o_out[j] = j < k ? static_cast<float>(off) : 0.f;
  }
}

struct TcParams {
  const void* x;  // (N, D), row stride x_stride, unit column stride
  int64_t x_stride;
  int64_t n;
  int d;
  int k;
  int d_pad;              // multiple of the slice width
  int k_tiles;            // k_pad / kCents
  const void* cw;         // (k_pad, d_pad) operand-type centroids
  const float* col_s;     // (k_pad,)
  const float* col_o;     // (k_pad,)
  const float* center;    // (D,) or null
  const float* row_scale; // (N,) or null
  int64_t* labels;
  float* scores;
  double* sums;               // (k, D) or null (zeroed before the launch): block sums in-kernel
  unsigned long long* counts; // (k,) or null (zeroed before the launch)
  float* row_scale_out;       // (N,) or null: r_n of every row, for the sorted sums pass
};

// Issues the loads of slice kt (columns kt * BK ..) of the block's rows and of centroid tile j0
// into `stage`. Thread tid moves 16-byte chunk tid % 8 of rows tid / 8 + kLoadRows i of both
// the x tile and the C tile.
template <class T, bool kAligned>
__device__ __forceinline__ void load_stage(const TcParams& p, uint32_t* stage, int kt, int j0,
                                           int64_t row0, int tid) {
  constexpr int kElems = slice_elems<T>();
  constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ cw = static_cast<const T*>(p.cw);
  const int chunk = tid % 8;
  const int col = kt * kElems + chunk * kChunkElems;  // first column of this chunk
  // Unrolled for the asynchronous copies; the element-wise fallback loops (registers).
#pragma unroll(kAligned ? kRows / kLoadRows : 1)
  for (int i = 0; i < kRows / kLoadRows; ++i) {
    const int r = tid / 8 + kLoadRows * i;
    uint32_t* dst_a = stage + r * kPitchWords + chunk * 4;
    uint32_t* dst_c = stage + (kRows + r) * kPitchWords + chunk * 4;
    const int64_t grow = row0 + r;
    if constexpr (kAligned) {
      int valid = 0;  // elements of this chunk inside x
      if (grow < p.n) valid = p.d - col < kChunkElems ? (p.d - col > 0 ? p.d - col : 0) : kChunkElems;
      const T* src = valid > 0 ? x + grow * p.x_stride + col : x;
      cp_async_16(smem_addr(dst_a), src, valid * static_cast<int>(sizeof(T)));
    } else {
      Bits<T>* dst = reinterpret_cast<Bits<T>*>(dst_a);
      const Bits<T>* src = reinterpret_cast<const Bits<T>*>(x);
#pragma unroll
      for (int e = 0; e < kChunkElems; ++e) {
        Bits<T> v = 0;
        if (grow < p.n && col + e < p.d) v = src[grow * p.x_stride + col + e];
        dst[e] = v;
      }
    }
    cp_async_16(smem_addr(dst_c), cw + static_cast<int64_t>(j0 + r) * p.d_pad + col, 16);
  }
}

template <class T, bool kAligned>
__global__ void __launch_bounds__(kThreads, 2) assign_tc_kernel(const TcParams p) {
  extern __shared__ __align__(16) uint32_t smem[];
  __shared__ float row_scale_s[kRows];
  __shared__ int label_s[kRows];
  __shared__ int order_s[kRows];
  // Cross-warp merge of the running bests: in the pipeline's memory, free after the last tile.
  float (*red_val)[kRows] = reinterpret_cast<float (*)[kRows]>(smem);
  int (*red_idx)[kRows] = reinterpret_cast<int (*)[kRows]>(smem + kWarpsN * kRows);

  constexpr int kElems = slice_elems<T>();
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / kWarpsN;  // rows warp_m * kWarpRows ..
  const int warp_n = warp % kWarpsN;  // centroids warp_n * kWarpCents .. of each tile
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(p.n - row0 < kRows ? p.n - row0 : kRows);  // 1..kRows
  const int k_steps = p.d_pad / kElems;

  // Row norms: thread tid sums row tid of each slice, in column order (first tile only).
  const bool sums_row_norm = p.row_scale == nullptr;
  float row_sq = 0.f;

  // Running best of this thread's rows (mi, h) over the tiles so far, for its warp_n slice.
  float run_val[kMi][2];
  int run_idx[kMi][2];
#pragma unroll
  for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      run_val[mi][h] = -INFINITY;
      run_idx[mi][h] = 0;
    }
  }

  for (int tile = 0; tile < p.k_tiles; ++tile) {
    const int j0 = tile * kCents;
    float acc[kMi][kNj][4];
#pragma unroll
    for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
      for (int nj = 0; nj < kNj; ++nj) {
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.f;
      }
    }

    // Prologue: slices 0 .. kStages - 2. One commit group per slice, empty groups included, so
    // that wait_group<kStages - 2> at step kt always means "slice kt has landed".
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_steps) load_stage<T, kAligned>(p, smem + s * kTileWords, s, j0, row0, tid);
      cp_async_commit();
    }

    for (int kt = 0; kt < k_steps; ++kt) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // slice kt visible to all; everyone is done with slice kt - 1's stage
      {
        const int next = kt + kStages - 1;
        if (next < k_steps) {
          load_stage<T, kAligned>(p, smem + (next % kStages) * kTileWords, next, j0, row0, tid);
        }
        cp_async_commit();
      }
      const uint32_t* xs = smem + (kt % kStages) * kTileWords;
      const uint32_t* cs = xs + kRows * kPitchWords;

#pragma unroll
      for (int ks = 0; ks < kSliceBytes / 4 / kMmaWordsPerStep; ++ks) {
        const int w = ks * kMmaWordsPerStep + t;  // word column of reg 0
        uint32_t a[kMi][4];
        uint32_t b[kNj][2];
#pragma unroll
        for (int mi = 0; mi < kMi; ++mi) {
          const uint32_t* base = xs + (warp_m * kWarpRows + mi * 16 + g) * kPitchWords + w;
          a[mi][0] = a_word<T>(base);
          a[mi][1] = a_word<T>(base + 8 * kPitchWords);
          a[mi][2] = a_word<T>(base + 4);
          a[mi][3] = a_word<T>(base + 8 * kPitchWords + 4);
        }
#pragma unroll
        for (int nj = 0; nj < kNj; ++nj) {
          const uint32_t* base = cs + (warp_n * kWarpCents + nj * 8 + g) * kPitchWords + w;
          b[nj][0] = base[0];
          b[nj][1] = base[4];
        }
#pragma unroll
        for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
          for (int nj = 0; nj < kNj; ++nj) mma_16x8<T>(acc[mi][nj], a[mi], b[nj]);
        }
      }

      if (sums_row_norm && tile == 0) {
        const T* xr = reinterpret_cast<const T*>(xs + tid * kPitchWords);
#pragma unroll 8
        for (int e = 0; e < kElems; ++e) {
          const int col = kt * kElems + e;
          if (col < p.d) {
            const float v = to_float(xr[e]) - (p.center != nullptr ? p.center[col] : 0.f);
            row_sq = fmaf(v, v, row_sq);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next tile's prologue overwrites the stages

    // Fold this tile into the running best: own 2 kNj columns in increasing order (strict '>'),
    // then the 4 lanes of the quad that share the rows, with the tie rule.
    float s_col[kNj][2];
    float o_col[kNj][2];
#pragma unroll
    for (int nj = 0; nj < kNj; ++nj) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j0 + warp_n * kWarpCents + nj * 8 + 2 * t + e;  // < k_pad
        s_col[nj][e] = p.col_s[col];
        o_col[nj][e] = p.col_o[col];
      }
    }
#pragma unroll
    for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float bv = -INFINITY;
        int bi = INT_MAX;
#pragma unroll
        for (int nj = 0; nj < kNj; ++nj) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = j0 + warp_n * kWarpCents + nj * 8 + 2 * t + e;
            if (col < p.k) {
              const float v = s_col[nj][e] * (acc[mi][nj][2 * h + e] - o_col[nj][e]);
              if (v > bv) {
                bv = v;
                bi = col;
              }
            }
          }
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {
          const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
          const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
          if (better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
          }
        }
        if (better(bv, bi, run_val[mi][h], run_idx[mi][h])) {
          run_val[mi][h] = bv;
          run_idx[mi][h] = bi;
        }
      }
    }
  }

  // Merge the kWarpsN slices of every row; row scales. (The stages are free: every thread has
  // passed the barrier after its last read of them.)
  if (t == 0) {
#pragma unroll
    for (int mi = 0; mi < kMi; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_m * kWarpRows + mi * 16 + g + 8 * h;
        red_val[warp_n][r] = run_val[mi][h];
        red_idx[warp_n][r] = run_idx[mi][h];
      }
    }
  }
  {
    float r = 0.f;
    if (tid < rows) r = row_scale_of(p.row_scale, row0 + tid, row_sq);
    row_scale_s[tid] = r;
  }
  __syncthreads();

  if (tid < rows) {
    float bv = red_val[0][tid];
    int bi = red_idx[0][tid];
#pragma unroll
    for (int wn = 1; wn < kWarpsN; ++wn) {
      if (better(red_val[wn][tid], red_idx[wn][tid], bv, bi)) {
        bv = red_val[wn][tid];
        bi = red_idx[wn][tid];
      }
    }
    const float r = row_scale_s[tid];
    int label = 0;
    float score = 0.f;
    if (r > 0.f) {  // r == 0 (a zero row, or a zero row_scale): label 0, score 0
      label = bi >= 0 && bi < p.k ? bi : 0;  // bi stays 0 when every score was NaN
      score = bv == -INFINITY ? NAN : r * bv;  // (then NaN, as on the CPU)
    }
    p.labels[row0 + tid] = label;
    p.scores[row0 + tid] = score;
    if (p.row_scale_out != nullptr) p.row_scale_out[row0 + tid] = r;
    label_s[tid] = label;
  }

  if (p.sums == nullptr) return;  // uniform over the block
  __syncthreads();
  add_block_sums<kThreads>(static_cast<const T*>(p.x), p.x_stride, p.d, p.center, p.sums,
                           p.counts, row0, rows, label_s, row_scale_s, order_s, tid);
}

// ---- cluster sums as a sorted segmented reduction (a second, memory-bound read of x) ------
// counts[l] = #rows labelled l (histogram), offsets = exclusive scan of counts, rows scattered
// to perm in label order, then each block sums a contiguous range of perm column by column in
// float64 and flushes one atomic per (label, column) at each label change: about
// (N / kSegRows + k) * D atomics instead of one per (block, label, column).

constexpr int kSegThreads = 128;  // columns in flight per block (x kSegCols)
constexpr int kSegCols = 4;
constexpr int kSegAhead = 4;      // rows whose loads are issued together
constexpr int kScanThreads = 1024;

__global__ void histogram_kernel(const int64_t* __restrict__ labels, const int64_t n,
                                 unsigned long long* __restrict__ counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(counts + labels[i], 1ull);
}

// cursor[l] = sum_{l' < l} counts[l'] (one block; k may exceed the block size).
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(const unsigned long long* __restrict__ counts, const int k,
                int* __restrict__ cursor) {
  __shared__ long long part[kScanThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int per = (k + kScanThreads - 1) / kScanThreads;
  const int begin = tid * per;
  const int end = begin + per < k ? begin + per : k;
  long long sum = 0;
  for (int l = begin; l < end; ++l) sum += static_cast<long long>(counts[l]);
  part[tid] = sum;
  __syncthreads();
  if (tid == 0) {  // 1024 partials, serially: negligible next to the passes over x
    long long run = 0;
    for (int i = 0; i < kScanThreads; ++i) {
      const long long v = part[i];
      part[i] = run;
      run += v;
    }
  }
  __syncthreads();
  long long run = part[tid];
  for (int l = begin; l < end; ++l) {
    cursor[l] = static_cast<int>(run);
    run += static_cast<long long>(counts[l]);
  }
}

__global__ void scatter_kernel(const int64_t* __restrict__ labels, const int64_t n,
                               int* __restrict__ cursor, int* __restrict__ perm) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) perm[atomicAdd(cursor + labels[i], 1)] = static_cast<int>(i);
}

// The same histogram and scatter with the counting done in shared memory, for k up to
// kBlockLabels: each block counts its kBlockRows rows' labels there and adds one global atomic
// per label it holds, where the kernels above add one per row. Those serialise on a few
// addresses when k is small (H200 run 6b, k = 64, 1M rows: histogram 0.22 ms and scatter
// 0.30 ms of a 2.75 ms step; k = 1024: 0.05 and 0.10 ms). The scatter reserves each label's
// range of perm with one atomic, then writes its rows at the reserved base plus their rank
// among the block's rows of that label (the order of the shared-memory atomics: rows within a
// label stay in no set order, as before).
constexpr int kBlockThreads = 256;
constexpr int kBlockRowsPerThread = 16;
constexpr int kBlockRows = kBlockThreads * kBlockRowsPerThread;
constexpr int kBlockLabels = 12288;  // 48 KB of shared counters: no opt-in needed
// The kernels below have no static shared memory: their k counters alone must stay within the
// 48 KB a launch may ask for without opting in.
static_assert(kBlockLabels * sizeof(unsigned) <= 48 * 1024, "shared counters past 48 KB");

// Both kernels' first half: count_s (k, shared) zeroed, then the block's labels counted there;
// each thread's labels (-1 past n) and their ranks among the block's rows of their label (the
// order of the shared atomics). Ends after a barrier: count_s holds the block's counts.
__device__ __forceinline__ void count_block_labels(const int64_t* __restrict__ labels, const int64_t n, const int k,
                                                   unsigned* count_s, int (&label)[kBlockRowsPerThread],
                                                   unsigned (&rank)[kBlockRowsPerThread]) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int l = tid; l < k; l += kBlockThreads) count_s[l] = 0u;
  __syncthreads();
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBlockRows + tid;
#pragma unroll
  for (int i = 0; i < kBlockRowsPerThread; ++i) {  // (all loads issued before the first atomic)
    const int64_t r = r0 + static_cast<int64_t>(i) * kBlockThreads;
    label[i] = r < n ? static_cast<int>(labels[r]) : -1;
  }
#pragma unroll
  for (int i = 0; i < kBlockRowsPerThread; ++i) {
    rank[i] = label[i] >= 0 ? atomicAdd(count_s + label[i], 1u) : 0u;
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kBlockThreads)
    block_histogram_kernel(const int64_t* __restrict__ labels, const int64_t n, const int k,
                           unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned count_s[];  // k
  int label[kBlockRowsPerThread];
  unsigned rank[kBlockRowsPerThread];
  count_block_labels(labels, n, k, count_s, label, rank);
  for (int l = static_cast<int>(threadIdx.x); l < k; l += kBlockThreads) {
    const unsigned c = count_s[l];
    if (c != 0u) atomicAdd(counts + l, static_cast<unsigned long long>(c));
  }
}

__global__ void __launch_bounds__(kBlockThreads)
    block_scatter_kernel(const int64_t* __restrict__ labels, const int64_t n, const int k,
                         int* __restrict__ cursor, int* __restrict__ perm) {
  extern __shared__ unsigned count_s[];  // k: counts, then each label's base in perm
  int label[kBlockRowsPerThread];
  unsigned rank[kBlockRowsPerThread];
  count_block_labels(labels, n, k, count_s, label, rank);
  for (int l = static_cast<int>(threadIdx.x); l < k; l += kBlockThreads) {
    const unsigned c = count_s[l];
    if (c != 0u) count_s[l] = static_cast<unsigned>(atomicAdd(cursor + l, static_cast<int>(c)));
  }
  __syncthreads();
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kBlockRows + static_cast<int>(threadIdx.x);
#pragma unroll
  for (int i = 0; i < kBlockRowsPerThread; ++i) {
    if (label[i] >= 0) {
      perm[count_s[label[i]] + rank[i]] = static_cast<int>(r0 + static_cast<int64_t>(i) * kBlockThreads);
    }
  }
}

template <class T, int kRowsPerBlock>
__global__ void __launch_bounds__(kSegThreads)
    segmented_sums_kernel(const T* __restrict__ x, const int64_t x_stride, const int64_t n,
                          const int d, const float* __restrict__ center,
                          const int64_t* __restrict__ labels, const float* __restrict__ rscale,
                          const int* __restrict__ perm, double* __restrict__ sums) {
  __shared__ int row_s[kRowsPerBlock];
  __shared__ int label_s[kRowsPerBlock];
  __shared__ float r_s[kRowsPerBlock];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int count = static_cast<int>(n - q0 < kRowsPerBlock ? n - q0 : kRowsPerBlock);  // 1..kRowsPerBlock
  for (int q = tid; q < count; q += kSegThreads) {
    const int row = perm[q0 + q];
    row_s[q] = row;
    label_s[q] = static_cast<int>(labels[row]);
    r_s[q] = rscale[row];
  }
  __syncthreads();
  for (int c0 = 0; c0 < d; c0 += kSegThreads * kSegCols) {
    float ctr[kSegCols];
    double acc[kSegCols];
#pragma unroll
    for (int u = 0; u < kSegCols; ++u) {
      const int c = c0 + tid + kSegThreads * u;
      ctr[u] = (center != nullptr && c < d) ? center[c] : 0.f;
      acc[u] = 0.0;
    }
    bool any = false;
    for (int q0 = 0; q0 < count; q0 += kSegAhead) {
      // The loads of kSegAhead rows first (more of x in flight), then their sums in order. The
      // loads only load (see col_load in assign_sums.cuh): arithmetic on a value next to its
      // load made each row's loads wait for the previous row's (run 6b's machine code).
      T v[kSegAhead][kSegCols];
#pragma unroll
      for (int g = 0; g < kSegAhead; ++g) {
        const int q = q0 + g;
        const int qc = q < count ? q : count - 1;  // (no shared-memory read behind a branch)
        const bool live = q < count && r_s[qc] > 0.f;  // zero rows add nothing
        const T* xr = x + static_cast<int64_t>(live ? row_s[qc] : 0) * x_stride;
#pragma unroll
        for (int u = 0; u < kSegCols; ++u) {
          const int c = c0 + tid + kSegThreads * u;
          v[g][u] = (live && c < d) ? xr[c] : T{};
        }
      }
#pragma unroll
      for (int g = 0; g < kSegAhead; ++g) {
        const int q = q0 + g;
        if (q >= count) break;  // (the same for every thread of the block)
        const float r = r_s[q];
        if (r > 0.f) {
#pragma unroll
          for (int u = 0; u < kSegCols; ++u) {
            acc[u] += static_cast<double>(r) * static_cast<double>(minus_center(v[g][u], ctr[u]));
          }
          any = true;
        }
        const int label = label_s[q];
        if (q + 1 == count || label_s[q + 1] != label) {
          if (any) {
#pragma unroll
            for (int u = 0; u < kSegCols; ++u) {
              const int c = c0 + tid + kSegThreads * u;
              if (c < d) atomicAdd(sums + static_cast<int64_t>(label) * d + c, acc[u]);
              acc[u] = 0.0;
            }
          }
          any = false;
        }
      }
    }
  }
}

template <class T, int kRowsPerBlock>
void launch_segmented_sums(const T* x, const int64_t x_stride, const int64_t n, const int d, const float* center,
                           const int64_t* labels, const float* rscale, const int* perm, double* sums,
                           const cudaStream_t s) {
  segmented_sums_kernel<T, kRowsPerBlock><<<static_cast<unsigned>(ceil_div(n, kRowsPerBlock)), kSegThreads, 0, s>>>(
      x, x_stride, n, d, center, labels, rscale, perm, sums);
}

// The sorted sums of rows already labelled: counts (k, zeroed by the caller) by histogram,
// cursor (k ints) by scan, perm (n ints) by scatter, then the segmented float64 sums into
// sums (k x d, zeroed by the caller).
template <class T>
void launch_sorted_sums(const T* x, const int64_t x_stride, const int64_t n, const int d, const int k,
                        const float* center, const int64_t* labels, const float* rscale, int* perm,
                        int* cursor, unsigned long long* counts, double* sums, const SortedKnobs knobs,
                        const cudaStream_t s) {
  const bool in_block = knobs.shared_counting && k <= kBlockLabels;  // the counting in shared memory
  const unsigned row_blocks = static_cast<unsigned>(ceil_div(n, in_block ? kBlockRows : 256));
  const size_t count_bytes = static_cast<size_t>(k) * sizeof(unsigned);
  if (in_block) {
    block_histogram_kernel<<<row_blocks, kBlockThreads, count_bytes, s>>>(labels, n, k, counts);
  } else {
    histogram_kernel<<<row_blocks, 256, 0, s>>>(labels, n, counts);
  }
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
  scan_kernel<<<1, kScanThreads, 0, s>>>(counts, k, cursor);
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
  if (in_block) {
    block_scatter_kernel<<<row_blocks, kBlockThreads, count_bytes, s>>>(labels, n, k, cursor, perm);
  } else {
    scatter_kernel<<<row_blocks, 256, 0, s>>>(labels, n, cursor, perm);
  }
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
  switch (knobs.seg_rows) {
    case 64: launch_segmented_sums<T, 64>(x, x_stride, n, d, center, labels, rscale, perm, sums, s); break;
    case 128: launch_segmented_sums<T, 128>(x, x_stride, n, d, center, labels, rscale, perm, sums, s); break;
    default: launch_segmented_sums<T, kSegRows>(x, x_stride, n, d, center, labels, rscale, perm, sums, s);
  }
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

// Scratch memory from the stream-ordered allocator: freed in stream order when the owner goes
// out of scope (also when a launch check throws), or by free() with its error checked.
class StreamScratch {
 public:
  StreamScratch(const size_t bytes, const cudaStream_t s) : stream_(s) {
    EDPAIRS_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, s));
  }
  ~StreamScratch() {
    if (ptr_ != nullptr) (void)cudaFreeAsync(ptr_, stream_);
  }
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  void* get() const { return ptr_; }
  void free() {
    void* p = ptr_;
    ptr_ = nullptr;
    EDPAIRS_CUDA_CHECK(cudaFreeAsync(p, stream_));
  }

 private:
  void* ptr_ = nullptr;
  cudaStream_t stream_;
};

// ---- small k: cluster sums fused into the assignment, one read of x from DRAM -------------
// For k <= kFCents with k x D float32 sums that fit in shared memory next to the pipeline
// (D <= 576 at k = 64 on Hopper's 227 KB): a persistent grid (one block per multiprocessor),
// each block looping over 128-row tiles:
//  phase 1: the kRows x kFCents product through the cp.async ring (x and centroid slices),
//           8 warps of 16 rows x 64 centroids, no padding tile; argmax, labels, scores;
//  phase 2: the same 128 rows are streamed through the ring memory a second time (x slices
//           only, 4 stages, the prologue issued before the argmax: from L2, which still holds
//           them - 132 blocks x 256 KB = 34 MB in flight); warp w adds rows w, w + 8, .. of each
//           slice into the block's float32 sums in shared memory with shared-memory atomics
//           (lane = word of the slice: 32 banks, no conflicts; four rows' compare-and-swaps in
//           flight at once, shared_add_batch). Version 3 walked label groups in a rank-sorted order instead (one
//           writer per label, no atomics): a chain of dependent shared loads per row, measured
//           at 5.8 ms at k = 64 against 2.3 ms for the sorted pass. The float32 block sums now
//           depend on the order of the atomics: bit-identical run to run is given up, the
//           block-order float64 reduction stays;
//  end:     the block writes its k x D float32 partial sums and its counts to a workspace; a
//           second kernel adds the partials of all blocks in block order in float64.
// x is read once from DRAM; the centroid slices and the second pass come from L2.
constexpr int kFCents = 64;                       // centroids of the only tile (k <= 64)
constexpr int kFWarps = 8;                        // warps, each 16 rows x all 64 centroids
constexpr int kFThreads = 32 * kFWarps;
constexpr int kFWarpRows = kRows / kFWarps;       // 16
constexpr int kFNj = kFCents / 8;                 // mma tiles per warp along centroids
constexpr int kFTileWords = (kRows + kFCents) * kPitchWords;
constexpr int kFPipeBytes = kStages * kFTileWords * 4;  // 82944 bytes
constexpr int kFLoadRows = kFThreads / 8;         // rows one loader pass covers
// Phase 2 moves x slices only (18 KB): the same memory holds 4 of them, 3 in flight.
constexpr int kF2StageWords = kRows * kPitchWords;
constexpr int kF2Stages = kFPipeBytes / 4 / kF2StageWords;  // 4
static_assert(kF2Stages >= 3, "phase 2 ring");
static_assert(kFWarpRows == 16 && kRows % kFLoadRows == 0 && kFCents % kFLoadRows == 0,
              "fused kernel tiling");

struct FusedParams {
  TcParams p;
  int n_tiles;            // ceil(n / kRows)
  float* part_sums;       // (gridDim.x, k, d) float32
  unsigned* part_counts;  // (gridDim.x, k)
};

// Slice kt of the block's rows (and, with kWithC, of the centroid tile) into `stage`.
template <class T, bool kWithC>
__device__ __forceinline__ void fused_load_stage(const TcParams& p, uint32_t* stage, int kt,
                                                 int64_t row0, int tid) {
  constexpr int kElems = slice_elems<T>();
  constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ cw = static_cast<const T*>(p.cw);
  const int chunk = tid % 8;
  const int col = kt * kElems + chunk * kChunkElems;
#pragma unroll
  for (int i = 0; i < kRows / kFLoadRows; ++i) {
    const int r = tid / 8 + kFLoadRows * i;
    const int64_t grow = row0 + r;
    int valid = 0;
    if (grow < p.n) valid = p.d - col < kChunkElems ? (p.d - col > 0 ? p.d - col : 0) : kChunkElems;
    const T* src = valid > 0 ? x + grow * p.x_stride + col : x;
    cp_async_16(smem_addr(stage + r * kPitchWords + chunk * 4), src,
                valid * static_cast<int>(sizeof(T)));
  }
  if constexpr (kWithC) {
#pragma unroll
    for (int i = 0; i < kFCents / kFLoadRows; ++i) {
      const int r = tid / 8 + kFLoadRows * i;
      cp_async_16(smem_addr(stage + (kRows + r) * kPitchWords + chunk * 4),
                  cw + static_cast<int64_t>(r) * p.d_pad + col, 16);
    }
  }
}

// The two elements (16-bit x) or one element (float32 x) of a shared word, centred.
template <class T>
__device__ __forceinline__ void word_values(const uint32_t* w, float c0, float c1, float (&v)[2]) {
  if constexpr (sizeof(T) == 4) {
    v[0] = __uint_as_float(*w) - c0;
    v[1] = 0.f;
  } else {
    const T* e = reinterpret_cast<const T*>(w);
    v[0] = to_float(e[0]) - c0;
    v[1] = to_float(e[1]) - c1;
  }
}

// *dst[u] += v[u] in shared memory where on[u]. Float atomics on shared memory are a
// compare-and-swap loop on sm_90 (ATOMS.CAST.SPIN), one loop per value, which would serialise a
// warp's rows; here the first attempts of all kN values go out back to back, and the few that
// lose a race with another warp (or with an earlier value of the batch at the same address)
// retry through atomicAdd.
template <int kN>
__device__ __forceinline__ void shared_add_batch(float* const (&dst)[kN], const float (&v)[kN],
                                                 const bool (&on)[kN]) {
  int seen[kN];
  int got[kN];
#pragma unroll
  for (int u = 0; u < kN; ++u) seen[u] = on[u] ? load_relaxed(reinterpret_cast<const int*>(dst[u])) : 0;
#pragma unroll
  for (int u = 0; u < kN; ++u) {
    got[u] = seen[u];
    if (on[u]) {
      got[u] = atomicCAS(reinterpret_cast<int*>(dst[u]), seen[u], __float_as_int(__int_as_float(seen[u]) + v[u]));
    }
  }
#pragma unroll
  for (int u = 0; u < kN; ++u) {
    if (on[u] && got[u] != seen[u]) atomicAdd(dst[u], v[u]);
  }
}

template <class T>
__global__ void __launch_bounds__(kFThreads, 1) assign_tc_fused_kernel(const FusedParams fp) {
  extern __shared__ __align__(16) uint32_t smem[];
  float* sums_s = reinterpret_cast<float*>(smem + kFPipeBytes / 4);  // (k, d) float32
  __shared__ float best_val_s[kRows];
  __shared__ int best_idx_s[kRows];
  __shared__ float row_scale_s[kRows];
  __shared__ int label_s[kRows];
  __shared__ unsigned counts_s[kFCents];

  const TcParams& p = fp.p;
  constexpr int kElems = slice_elems<T>();
  constexpr int kEpw = 4 / static_cast<int>(sizeof(T));  // elements per 32-bit word
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int k_steps = p.d_pad / kElems;
  const int kd = p.k * p.d;
  for (int i = tid; i < kd; i += kFThreads) sums_s[i] = 0.f;
  for (int i = tid; i < kFCents; i += kFThreads) counts_s[i] = 0u;
  // (made visible by the first barrier of the loop below)

  for (int tile = static_cast<int>(blockIdx.x); tile < fp.n_tiles; tile += static_cast<int>(gridDim.x)) {
    const int64_t row0 = static_cast<int64_t>(tile) * kRows;
    const int rows = static_cast<int>(p.n - row0 < kRows ? p.n - row0 : kRows);

    // ---- phase 1: products and argmax -------------------------------------------------
    float acc[kFNj][4];
#pragma unroll
    for (int nj = 0; nj < kFNj; ++nj) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[nj][r] = 0.f;
    }
    // Row norms from the thread's own copies (chunk tid % 8 of rows tid / 8 + 32 i): 16-byte
    // reads a quarter warp shares one row of, no bank conflicts.
    float row_part[kRows / kFLoadRows];
#pragma unroll
    for (int i = 0; i < kRows / kFLoadRows; ++i) row_part[i] = 0.f;
    const bool sums_row_norm = p.row_scale == nullptr;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_steps) fused_load_stage<T, true>(p, smem + s * kFTileWords, s, row0, tid);
      cp_async_commit();
    }
    for (int kt = 0; kt < k_steps; ++kt) {
      cp_async_wait<kStages - 2>();
      __syncthreads();
      {
        const int next = kt + kStages - 1;
        if (next < k_steps) {
          fused_load_stage<T, true>(p, smem + (next % kStages) * kFTileWords, next, row0, tid);
        }
        cp_async_commit();
      }
      const uint32_t* xs = smem + (kt % kStages) * kFTileWords;
      const uint32_t* cs = xs + kRows * kPitchWords;
#pragma unroll
      for (int ks = 0; ks < kSliceBytes / 4 / kMmaWordsPerStep; ++ks) {
        const int w = ks * kMmaWordsPerStep + t;
        uint32_t a[4];
        {
          const uint32_t* base = xs + (warp * kFWarpRows + g) * kPitchWords + w;
          a[0] = a_word<T>(base);
          a[1] = a_word<T>(base + 8 * kPitchWords);
          a[2] = a_word<T>(base + 4);
          a[3] = a_word<T>(base + 8 * kPitchWords + 4);
        }
#pragma unroll
        for (int nj = 0; nj < kFNj; ++nj) {
          const uint32_t* base = cs + (nj * 8 + g) * kPitchWords + w;
          const uint32_t b[2] = {base[0], base[4]};
          mma_16x8<T>(acc[nj], a, b);
        }
      }
      if (sums_row_norm) {
        constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
        const int col0 = kt * kElems + (tid % 8) * kChunkElems;
        float ctr[kChunkElems];
#pragma unroll
        for (int u = 0; u < kChunkElems; ++u) {
          ctr[u] = (p.center != nullptr && col0 + u < p.d) ? p.center[col0 + u] : 0.f;
        }
#pragma unroll
        for (int i = 0; i < kRows / kFLoadRows; ++i) {
          const uint4 raw = *reinterpret_cast<const uint4*>(xs + (tid / 8 + kFLoadRows * i) * kPitchWords + (tid % 8) * 4);
          const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int u = 0; u < kChunkElems; ++u) {
            if (col0 + u < p.d) {
              const float v = to_float(e[u]) - ctr[u];
              row_part[i] = fmaf(v, v, row_part[i]);
            }
          }
        }
      }
    }
    cp_async_wait<0>();
    // Each row's 8 partials (lanes 8 m .. 8 m + 7 of a warp) summed, into best_val_s.
#pragma unroll
    for (int i = 0; i < kRows / kFLoadRows; ++i) {
      const float sq = sum_over_chunk_lanes(row_part[i]);
      if (tid % 8 == 0) best_val_s[tid / 8 + kFLoadRows * i] = sq;
    }
    __syncthreads();  // phase 2's prologue overwrites the stages; the sums are visible
    float row_sq = 0.f;
    if (tid < kRows) row_sq = best_val_s[tid];
    __syncthreads();  // best_val_s is written next

    // Phase 2's prologue now, so that its L2 reads overlap the argmax and the rank sort.
#pragma unroll
    for (int s = 0; s < kF2Stages - 1; ++s) {
      if (s < k_steps) fused_load_stage<T, false>(p, smem + s * kF2StageWords, s, row0, tid);
      cp_async_commit();
    }

    // Best of each row over the 64 centroids: own columns in increasing order, then the quad.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float bv = -INFINITY;
      int bi = INT_MAX;
#pragma unroll
      for (int nj = 0; nj < kFNj; ++nj) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = nj * 8 + 2 * t + e;
          if (col < p.k) {
            const float v = p.col_s[col] * (acc[nj][2 * h + e] - p.col_o[col]);
            if (v > bv) {
              bv = v;
              bi = col;
            }
          }
        }
      }
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, off);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, off);
        if (better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if (t == 0) {
        const int r = warp * kFWarpRows + g + 8 * h;
        best_val_s[r] = bv;
        best_idx_s[r] = bi;
      }
    }
    if (tid < kRows) row_scale_s[tid] = tid < rows ? row_scale_of(p.row_scale, row0 + tid, row_sq) : 0.f;
    __syncthreads();
    if (tid < rows) {
      const float bv = best_val_s[tid];
      const int bi = best_idx_s[tid];
      const float r = row_scale_s[tid];
      int label = 0;
      float score = 0.f;
      if (r > 0.f) {
        label = bi >= 0 && bi < p.k ? bi : 0;
        score = bv == -INFINITY ? NAN : r * bv;  // (every score NaN: NaN, as on the CPU)
      }
      p.labels[row0 + tid] = label;
      p.scores[row0 + tid] = score;
      label_s[tid] = label;
      atomicAdd(counts_s + label, 1u);
    }
    // (the first barrier of phase 2 publishes label_s)

    // ---- phase 2: the rows again (L2), each into its label's shared sums ------------------
    // Warp w adds rows w, w + 8, .. of each slice; lane = word of the slice.
    for (int kt = 0; kt < k_steps; ++kt) {
      cp_async_wait<kF2Stages - 2>();
      __syncthreads();
      {
        const int next = kt + kF2Stages - 1;
        if (next < k_steps) {
          fused_load_stage<T, false>(p, smem + (next % kF2Stages) * kF2StageWords, next, row0, tid);
        }
        cp_async_commit();
      }
      const uint32_t* xs = smem + (kt % kF2Stages) * kF2StageWords;
      const int col0 = kt * kElems + lane * kEpw;  // first column of this lane's word
      if (col0 < p.d) {
        float ctr[2] = {0.f, 0.f};
        if (p.center != nullptr) {
          ctr[0] = p.center[col0];
          if (kEpw == 2 && col0 + 1 < p.d) ctr[1] = p.center[col0 + 1];
        }
        // Four rows per batch: their compare-and-swaps go out together (shared_add_batch).
        for (int b = 0; b < kFWarpRows; b += 4) {
          float* dst[4 * kEpw];
          float val[4 * kEpw];
          bool on[4 * kEpw];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int m = warp + kFWarps * (b + u);  // < kRows; row_scale_s is 0 past `rows`
            const float r = row_scale_s[m];
            float v[2];
            word_values<T>(xs + m * kPitchWords + lane, ctr[0], ctr[1], v);
#pragma unroll
            for (int e = 0; e < kEpw; ++e) {
              dst[u * kEpw + e] = sums_s + label_s[m] * p.d + col0 + e;
              val[u * kEpw + e] = r * v[e];
              on[u * kEpw + e] = r > 0.f && col0 + e < p.d;  // zero rows add nothing
            }
          }
          shared_add_batch(dst, val, on);
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // the next tile's prologue overwrites the stages, label_s and row_scale_s
  }

  // The block's partials, reduced in block order by reduce_fused_partials.
  float* dst = fp.part_sums + static_cast<int64_t>(blockIdx.x) * kd;
  for (int i = tid; i < kd; i += kFThreads) dst[i] = sums_s[i];
  for (int i = tid; i < p.k; i += kFThreads) {
    fp.part_counts[static_cast<int64_t>(blockIdx.x) * p.k + i] = counts_s[i];
  }
}

// sums[i] += sum over blocks b (in order) of part[b][i], in float64; the same for counts.
template <class P>
__global__ void reduce_fused_partials(const P* __restrict__ part_sums,
                                      const unsigned* __restrict__ part_counts, const int blocks,
                                      const int kd, const int k, double* __restrict__ sums,
                                      unsigned long long* __restrict__ counts) {
  const int i = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
  if (i < kd) {
    double acc = 0.0;
    for (int b = 0; b < blocks; ++b) acc += static_cast<double>(part_sums[static_cast<int64_t>(b) * kd + i]);
    sums[i] += acc;
  }
  if (counts != nullptr && i < k) {
    unsigned long long c = 0;
    for (int b = 0; b < blocks; ++b) c += part_counts[static_cast<int64_t>(b) * k + i];
    counts[i] += c;
  }
}

// ---- cluster sums with owned columns: one sequential read of x, no atomics ---------------
// Where the k x D float32 sums fit in shared memory. Block b adds rows
// b * rows_per_block .. (a contiguous range, at most kColMaxRows) into its shared sums; warp w
// owns column slices w, w + warps, .. (32 lanes x kE columns each: 128 bytes of a row), so each
// sums entry has one writer and takes its rows in row order: plain shared-memory adds, no
// atomics, deterministic. The block stages its rows' labels and scales kColStageRows at a time
// (col_stage, which also counts them); each lane keeps two groups of rows' loads in flight (the
// group it adds and the next). Every block writes its partial sums and counts;
// reduce_fused_partials adds them in block order in float64. Against the sorted pass: x read
// once in order instead of gathered in label order, no histogram, scan or scatter, no float64
// atomics; the float32 runs are at most kColMaxRows rows long.

// Shared memory of the owned-column pass: k x d float32 sums, k counts, the staged rows.
inline int64_t column_sums_smem(const int64_t k, const int64_t d) {
  return (k * d + k) * 4 + kColStageRows * static_cast<int64_t>(sizeof(ColRow));
}

template <class T>
__global__ void __launch_bounds__(32 * kColMaxWarps)
    column_sums_kernel(const T* __restrict__ x, const int64_t x_stride, const int64_t n, const int d, const int k,
                       const float* __restrict__ center, const int64_t* __restrict__ labels,
                       const float* __restrict__ rscale, const int64_t rows_per_block,
                       float* __restrict__ part_sums, unsigned* __restrict__ part_counts) {
  extern __shared__ float sums_s[];  // (k, d) float32, then k counts, then the staged rows
  unsigned* counts_s = reinterpret_cast<unsigned*>(sums_s + static_cast<int64_t>(k) * d);
  ColRow* table_s = reinterpret_cast<ColRow*>(counts_s + k);
  const int tid = static_cast<int>(threadIdx.x);
  const int threads = static_cast<int>(blockDim.x);
  const int kd = k * d;
  for (int i = tid; i < kd; i += threads) sums_s[i] = 0.f;
  for (int i = tid; i < k; i += threads) counts_s[i] = 0u;

  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = begin + rows_per_block < n ? begin + rows_per_block : n;
  for (int64_t run = begin; run < end; run += kColStageRows) {
    const int64_t run_end = run + kColStageRows < end ? run + kColStageRows : end;
    __syncthreads();  // the sums zeroed, or the previous run's table read by every warp
    col_stage(labels, rscale, run, run_end, d, table_s, counts_s, tid, threads);
    __syncthreads();
    add_owned_columns<T>(x, x_stride, run, static_cast<int>(run_end - run), d, center, TableRows{table_s}, sums_s,
                         tid / 32, threads / 32, tid % 32);
  }
  __syncthreads();
  float* dst = part_sums + static_cast<int64_t>(blockIdx.x) * kd;
  for (int i = tid; i < kd; i += threads) dst[i] = sums_s[i];
  for (int i = tid; i < k; i += threads) part_counts[static_cast<int64_t>(blockIdx.x) * k + i] = counts_s[i];
}

// Whether launch_cluster_sums takes the owned-column pass: `mode` asks for it, x is not
// float64 (float32 runs would cost it its precision) and the k x d float32 sums (with k counts
// and the staged rows) fit in one block's shared memory.
template <class T>
bool columns_apply(const int64_t k, const int64_t d, const SumsMode mode) {
  if (mode != SumsMode::Columns || sizeof(T) > 4) return false;
  int device = 0;
  int optin = 0;
  EDPAIRS_CUDA_CHECK(cudaGetDevice(&device));
  EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return column_sums_smem(k, d) <= optin;
}

// The cluster sums of rows already labelled (labels, rscale: r_n of every row), into sums
// (k x d float64) and counts (k), both zeroed by the caller: the owned-column pass where
// `mode` asks for it and its shared memory fits, else the sorted pass.
template <class T>
void launch_cluster_sums(const T* x, const int64_t x_stride, const int64_t n, const int d, const int k,
                         const float* center, const int64_t* labels, const float* rscale,
                         unsigned long long* counts, double* sums, const SumsMode mode, const SortedKnobs knobs,
                         const cudaStream_t s) {
  if constexpr (sizeof(T) <= 4) if (columns_apply<T>(k, d, mode)) {
    int device = 0;
    int sms = 0;
    EDPAIRS_CUDA_CHECK(cudaGetDevice(&device));
    EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t smem = column_sums_smem(k, d);
    auto kernel = column_sums_kernel<T>;
    const int slices = col_slices<T>(d);
    const int threads = 32 * (slices < kColMaxWarps ? slices : kColMaxWarps);
    int per_sm = 0;
    {
      const std::lock_guard<std::mutex> lock(smem_attribute_mutex());  // set again at the launch
      EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                              cudaSharedmemCarveoutMaxShared));
      EDPAIRS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, static_cast<size_t>(smem)));
    }
    const ColPartition part = column_partition(n, static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1));
    const int64_t blocks = part.blocks;
    const int64_t rows_per_block = part.rows_per_block;
    StreamScratch workspace(static_cast<size_t>(blocks) * static_cast<size_t>(k) * (static_cast<size_t>(d) + 1) * 4, s);
    float* part_sums = static_cast<float*>(workspace.get());
    unsigned* part_counts = reinterpret_cast<unsigned*>(part_sums + blocks * k * d);
    launch_with_smem(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), smem, s, x, x_stride, n, d, k, center,
                     labels, rscale, rows_per_block, part_sums, part_counts);
    const int kd = k * d;
    const int items = kd > k ? kd : k;
    reduce_fused_partials<float><<<static_cast<unsigned>(ceil_div(items, 256)), 256, 0, s>>>(
        part_sums, part_counts, static_cast<int>(blocks), kd, k, sums, counts);
    EDPAIRS_CUDA_CHECK(cudaGetLastError());
    workspace.free();
    return;
  }
  StreamScratch workspace(static_cast<size_t>(n + k) * sizeof(int), s);
  int* perm = static_cast<int*>(workspace.get());
  launch_sorted_sums<T>(x, x_stride, n, d, k, center, labels, rscale, perm, perm + n, counts, sums, knobs, s);
  workspace.free();
}

// Shared memory the assignment kernel asks for. Two blocks per SM by default; with
// EDPAIRS_ASSIGN_BLOCKS_PER_SM=1 one (by asking for more than half of the SM's memory), which
// halves the rows of x in flight: 132 blocks x 128 rows x 2 KB (D = 512, float32) = 33 MB stay
// in the 50 MB L2 between the re-reads for successive centroid tiles, 264 blocks (67 MB) do
// not. A benchmark knob until measurements pick one.
inline int assign_smem_bytes() {
  const char* v = std::getenv("EDPAIRS_ASSIGN_BLOCKS_PER_SM");
  return (v != nullptr && std::string(v) == "1") ? 160 * 1024 : kSmemBytes;
}

// label_kernel() with "auto" resolved for k centroids (mma, wgmma or wgmma-tma).
inline LabelKernel resolved_label_kernel(const int64_t k) {
  const LabelKernel choice = label_kernel();
  if (choice != LabelKernel::Auto) return choice;
  return k >= kWgmmaAutoMinK ? LabelKernel::Wgmma : LabelKernel::Mma;
}


// The current device's side stream for the overlapped sums: non-blocking, of the highest
// priority (its blocks go first when the labelling's retire), created once per device and
// shared by every caller in the process (concurrent overlapped assignments queue their sums
// one after another on it; each caller's stream waits for all queued so far).
inline cudaStream_t side_stream() {
  static std::mutex mutex;
  static cudaStream_t streams[64] = {};
  int device = 0;
  EDPAIRS_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= 64) fail("assign: device index " + std::to_string(device) + " beyond 63");
  std::lock_guard<std::mutex> lock(mutex);
  if (streams[device] == nullptr) {
    int least = 0;
    int greatest = 0;
    EDPAIRS_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    EDPAIRS_CUDA_CHECK(cudaStreamCreateWithPriority(&streams[device], cudaStreamNonBlocking, greatest));
  }
  return streams[device];
}

__global__ void add_counts(unsigned long long* __restrict__ counts, const unsigned long long* __restrict__ part,
                           const int k) {
  const int i = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
  if (i < k) counts[i] += part[i];
}

// An event that is destroyed with its owner (cudaEventDestroy of a pending event is safe).
class ScopedEvent {
 public:
  ScopedEvent() { EDPAIRS_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~ScopedEvent() { (void)cudaEventDestroy(event_); }
  ScopedEvent(const ScopedEvent&) = delete;
  ScopedEvent& operator=(const ScopedEvent&) = delete;
  cudaEvent_t get() const { return event_; }

 private:
  cudaEvent_t event_ = nullptr;
};

// The main stream waits for all work queued on the side stream so far, so that memory freed
// later in the main stream's order is no longer in use there: finish() on the way out (errors
// reported), else on scope exit (a throw); should the event not be recorded or waited for
// there, the side stream is synchronised instead (an event never recorded is no wait at all).
class JoinSide {
 public:
  JoinSide(const cudaStream_t side, const cudaStream_t main) : side_(side), main_(main) {}
  void finish() {
    EDPAIRS_CUDA_CHECK(cudaEventRecord(done_.get(), side_));
    EDPAIRS_CUDA_CHECK(cudaStreamWaitEvent(main_, done_.get(), 0));
    joined_ = true;  // (only now: a throw above leaves the join to the destructor)
  }
  ~JoinSide() {
    if (joined_) return;
    if (cudaEventRecord(done_.get(), side_) != cudaSuccess || cudaStreamWaitEvent(main_, done_.get(), 0) != cudaSuccess) {
      (void)cudaStreamSynchronize(side_);
    }
  }
  JoinSide(const JoinSide&) = delete;
  JoinSide& operator=(const JoinSide&) = delete;

 private:
  ScopedEvent done_;
  cudaStream_t side_;
  cudaStream_t main_;
  bool joined_ = false;
};

inline bool wgmma_device() {
#ifdef EDPAIRS_HAVE_WGMMA
  return compute_capability() == "9.0";
#else
  return false;
#endif
}

// Static shared memory of the fused kernel (best value, best index, row scale and label
// arrays and the counts), kept out of the dynamic budget.
constexpr int kFStaticBytes = 4 * kRows * 4 + kFCents * 4;

// The mma fused kernel (assign_tc_fused_kernel) on prepared centroids, into the partials.
template <class T>
void launch_fused_mma(const TcParams& p, const T* cw, const float* col_s, const float* col_o, const int64_t d_pad,
                      const int64_t n_tiles, const int64_t grid, float* part_sums, unsigned* part_counts,
                      const int64_t smem_bytes, const cudaStream_t s) {
  FusedParams fp{};
  fp.p = p;
  fp.p.d_pad = static_cast<int>(d_pad);
  fp.p.k_tiles = 1;
  fp.p.cw = cw;
  fp.p.col_s = col_s;
  fp.p.col_o = col_o;
  fp.p.row_scale_out = nullptr;
  fp.n_tiles = static_cast<int>(n_tiles);
  fp.part_sums = part_sums;
  fp.part_counts = part_counts;
  auto kernel = assign_tc_fused_kernel<T>;
  EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          cudaSharedmemCarveoutMaxShared));
  launch_with_smem(kernel, dim3(static_cast<unsigned>(grid)), dim3(kFThreads), smem_bytes, s, fp);
}

// Runs the fused small-k path and returns true where it applies (EDPAIRS_ASSIGN_SUMS=fused,
// sums requested, k <= 64, 16-byte aligned rows, the k x D sums fit in shared memory);
// returns false, having launched nothing, otherwise. The kernel labels as the separate passes
// would (EDPAIRS_ASSIGN_KERNEL; "auto" is mma below kWgmmaAutoMinK): on wgmma (a "wgmma" or
// "wgmma-tma" choice on Hopper), assign_wgmma_sums_kernel (assign_wgmma_cuda.cu: labelling
// warpgroups and summing warps in one persistent block, the labels of the 64-wide wgmma
// kernel bit for bit); else the mma kernel above. Of the sums modes only "block" (the mma
// kernel's own atomics) changes the labeller: it puts every assignment on mma.
template <class T>
bool launch_fused(const AssignArgs& args, TcParams p, cudaStream_t s) {
  if (p.sums == nullptr || sums_mode() != SumsMode::Fused) return false;
  const int64_t n = args.x.size(0);
  const int64_t d = args.x.size(1);
  const int64_t k = args.centroids.size(0);
  if (k > kFCents) return false;
  const bool aligned = rows_16b(p.x, p.x_stride, sizeof(T));
  if (!aligned) return false;
  int device = 0;
  EDPAIRS_CUDA_CHECK(cudaGetDevice(&device));
  int optin = 0;
  int sms = 0;
  EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const LabelKernel choice = resolved_label_kernel(k);
  const bool on_wgmma = choice != LabelKernel::Mma && wgmma_device();  // (wgmma-tma too: the 64-wide kernel)
  const int64_t smem_bytes = kFPipeBytes + k * d * 4;  // the mma kernel's
  if (on_wgmma) {
#ifdef EDPAIRS_HAVE_WGMMA
    if (!wgmma_sums_fits(args.x.dtype, k, d)) return false;
#endif
  } else if (smem_bytes + kFStaticBytes > optin) {
    return false;
  }
  const int64_t n_tiles = ceil_div(n, kRows);
  if (n_tiles > INT_MAX) return false;
  constexpr int kElems = slice_elems<T>();
  const int64_t d_pad = ceil_div(d, kElems) * kElems;
  const int64_t k_pad = kFCents;
  const int64_t grid = n_tiles < sms ? n_tiles : sms;  // persistent: one block per SM

  // Workspace: centroids (k_pad, d_pad) of T (16-byte aligned for cp.async: first), s and o
  // (k_pad floats each), partial counts (grid, k), partial sums (grid, k, d): float32 (mma) or
  // float64 (wgmma, zeroed; 8-byte aligned).
  const size_t cw_bytes = static_cast<size_t>(k_pad * d_pad) * sizeof(T);
  const size_t counts_at = cw_bytes + 2 * static_cast<size_t>(k_pad) * 4;
  const size_t sums_at = (counts_at + static_cast<size_t>(grid * k) * 4 + 7) / 8 * 8;
  const size_t part_bytes = static_cast<size_t>(grid * k * d) * (on_wgmma ? 8 : 4);
  StreamScratch workspace(sums_at + part_bytes, s);
  char* ws = static_cast<char*>(workspace.get());
  T* cw = reinterpret_cast<T*>(ws);
  float* col_s = reinterpret_cast<float*>(ws + cw_bytes);
  float* col_o = col_s + k_pad;
  unsigned* part_counts = reinterpret_cast<unsigned*>(ws + counts_at);

  prepare_centroids<T><<<static_cast<unsigned>(ceil_div(k_pad, 8)), 256, 0, s>>>(
      args.centroids.ptr<const float>(), static_cast<int>(k), static_cast<int>(d),
      static_cast<int>(k_pad), static_cast<int>(d_pad), p.center,
      args.col_scale.present ? args.col_scale.ptr<const float>() : nullptr, cw, col_s, col_o);
  EDPAIRS_CUDA_CHECK(cudaGetLastError());

  const int kd = static_cast<int>(k * d);
  const unsigned reduce_blocks = static_cast<unsigned>(ceil_div(kd > k ? kd : static_cast<int>(k), 256));
  if (on_wgmma) {
#ifdef EDPAIRS_HAVE_WGMMA
    double* part_sums = reinterpret_cast<double*>(ws + sums_at);
    EDPAIRS_CUDA_CHECK(cudaMemsetAsync(part_sums, 0, part_bytes, s));
    const WgmmaAssignParams w{p.x, p.x_stride, p.n, p.d, p.k, static_cast<int>(d_pad), 1, cw, col_s, col_o,
                              p.center, p.row_scale, p.labels, p.scores, nullptr, wgmma_prefetch()};
    launch_assign_wgmma_sums(w, args.x.dtype, static_cast<int>(grid), part_sums, part_counts, s);
    reduce_fused_partials<double><<<reduce_blocks, 256, 0, s>>>(part_sums, part_counts, static_cast<int>(grid), kd,
                                                                static_cast<int>(k), p.sums, p.counts);
#endif
  } else {
    float* part_sums = reinterpret_cast<float*>(ws + sums_at);
    launch_fused_mma<T>(p, cw, col_s, col_o, d_pad, n_tiles, grid, part_sums, part_counts, smem_bytes, s);
    reduce_fused_partials<float><<<reduce_blocks, 256, 0, s>>>(part_sums, part_counts, static_cast<int>(grid), kd,
                                                               static_cast<int>(k), p.sums, p.counts);
  }
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
  workspace.free();
  return true;
}

template <class T>
void launch(const AssignArgs& args, TcParams p, cudaStream_t s) {
  const int knob_chunks = overlap_chunks();  // (read first, so validated wherever it is set)
  const SortedKnobs sorted = sorted_knobs();  // (the same)
  if (launch_fused<T>(args, p, s)) return;
  const int64_t n = args.x.size(0);
  const int64_t d = args.x.size(1);
  const int64_t k = args.centroids.size(0);
  constexpr int kElems = slice_elems<T>();
  // 16-byte cp.async of x needs 16-byte aligned rows.
  const bool aligned = rows_16b(p.x, p.x_stride, sizeof(T));
  const SumsMode mode = sums_mode();
  // Sums, where asked, in a pass of their own after the labels (launch_cluster_sums), except
  // with "block" (in the mma kernel).
  const bool separate = p.sums != nullptr && n <= INT_MAX && mode != SumsMode::Block;
  // The wgmma kernel only labels.
  const LabelKernel choice = resolved_label_kernel(k);
  const bool wgmma = choice != LabelKernel::Mma && aligned && (p.sums == nullptr || separate) && wgmma_device();
  const bool tma = wgmma && choice == LabelKernel::WgmmaTma && std::is_same<T, float>::value;
  const int64_t cent_tile = wgmma ? (tma ? kWgmmaCents : wgmma_tile_cents(k)) : kCents;
  const int64_t d_pad = ceil_div(d, kElems) * kElems;
  const int64_t k_pad = ceil_div(k, cent_tile) * cent_tile;
  const int64_t blocks = ceil_div(n, kRows);
  if (blocks > INT_MAX || d_pad > INT_MAX || k_pad > INT_MAX) {
    fail("assign: too large for one launch: x " + args.x.shape_str() + ", centroids " +
         args.centroids.shape_str());
  }

  // Workspace: centroids (k_pad, d_pad) of T, then s and o (k_pad floats each); with the sums
  // in a pass of their own also the row scales (N floats).
  const size_t cw_bytes = static_cast<size_t>(k_pad) * static_cast<size_t>(d_pad) * sizeof(T);
  size_t bytes = cw_bytes + 2 * static_cast<size_t>(k_pad) * sizeof(float);
  if (separate) bytes += static_cast<size_t>(n) * 4;
  StreamScratch workspace(bytes, s);
  void* ws = workspace.get();
  T* cw = static_cast<T*>(ws);
  float* col_s = reinterpret_cast<float*>(static_cast<char*>(ws) + cw_bytes);
  float* col_o = col_s + k_pad;
  float* rscale = col_o + k_pad;  // separate sums only

  prepare_centroids<T><<<static_cast<unsigned>(ceil_div(k_pad, 8)), 256, 0, s>>>(
      args.centroids.ptr<const float>(), static_cast<int>(k), static_cast<int>(d),
      static_cast<int>(k_pad), static_cast<int>(d_pad), p.center,
      args.col_scale.present ? args.col_scale.ptr<const float>() : nullptr, cw, col_s, col_o);
  EDPAIRS_CUDA_CHECK(cudaGetLastError());

  p.d_pad = static_cast<int>(d_pad);
  p.k_tiles = static_cast<int>(k_pad / cent_tile);
  p.cw = cw;
  p.col_s = col_s;
  p.col_o = col_o;

  double* sums = p.sums;
  unsigned long long* counts = p.counts;
  if (separate) {  // the assignment kernel only labels; launch_cluster_sums accumulates
    p.sums = nullptr;
    p.counts = nullptr;
    p.row_scale_out = rscale;
  }
  // What every chunk's labelling launches with, read and set once per call (a bad
  // EDPAIRS_WGMMA_PREFETCH is refused here, before the first labels).
  [[maybe_unused]] const int prefetch = wgmma ? wgmma_prefetch() : 0;
  const auto tc_kernel = aligned ? assign_tc_kernel<T, true> : assign_tc_kernel<T, false>;
  const int smem_bytes = wgmma ? 0 : assign_smem_bytes();
  if (!wgmma) {
    EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(tc_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    // Two blocks per multiprocessor need (nearly) all of its memory as shared memory.
    EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(tc_kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                            cudaSharedmemCarveoutMaxShared));
  }
  // Labels (scores, row scales) of the rows r0 .. r0 + rows - 1 on the caller's stream.
  const auto label = [&](const int64_t r0, const int64_t rows) {
    TcParams q = p;
    q.x = static_cast<const T*>(p.x) + r0 * p.x_stride;
    q.n = rows;
    q.labels = p.labels + r0;
    q.scores = p.scores + r0;
    if (p.row_scale != nullptr) q.row_scale = p.row_scale + r0;
    if (p.row_scale_out != nullptr) q.row_scale_out = p.row_scale_out + r0;
    if (wgmma) {
#ifdef EDPAIRS_HAVE_WGMMA
      const WgmmaAssignParams w{q.x, q.x_stride, q.n, q.d, q.k, q.d_pad, q.k_tiles, q.cw, q.col_s, q.col_o,
                                q.center, q.row_scale, q.labels, q.scores, q.row_scale_out, prefetch};
      if (tma) {
        launch_assign_wgmma_tma(w, s);
      } else {
        launch_assign_wgmma(w, args.x.dtype, s);
      }
#endif
    } else {
      tc_kernel<<<static_cast<unsigned>(ceil_div(rows, kRows)), kThreads, smem_bytes, s>>>(q);
      EDPAIRS_CUDA_CHECK(cudaGetLastError());
    }
  };

  const int chunks = separate ? knob_chunks : 0;
  if (chunks > 1 && n >= static_cast<int64_t>(chunks) * kRows && !columns_apply<T>(k, d, mode)) {
    // Overlapped: chunk c's sorted sums on the side stream while chunk c + 1 is labelled. Each
    // chunk sorts its own rows; the float64 sums add up across chunks. The chunks' passes run
    // one after another on the side stream, so they share one set of counts, cursor and perm.
    const int64_t rc = ceil_div(ceil_div(n, chunks), kRows) * kRows;  // rows per chunk
    const int64_t used = ceil_div(n, rc);
    const cudaStream_t side = side_stream();
    // counts (k int64), cursor (k int), perm (rc int).
    StreamScratch chunk_ws(static_cast<size_t>(k) * 12 + static_cast<size_t>(rc) * 4, s);
    JoinSide join(side, s);  // (destroyed before chunk_ws: s waits for the side stream first)
    ScopedEvent ready;
    for (int64_t c = 0; c < used; ++c) {
      const int64_t r0 = c * rc;
      const int64_t rows = rc < n - r0 ? rc : n - r0;
      label(r0, rows);
      EDPAIRS_CUDA_CHECK(cudaEventRecord(ready.get(), s));  // (re-recorded: the wait takes the latest)
      EDPAIRS_CUDA_CHECK(cudaStreamWaitEvent(side, ready.get(), 0));
      char* base = static_cast<char*>(chunk_ws.get());
      auto* chunk_counts = reinterpret_cast<unsigned long long*>(base);
      int* cursor = reinterpret_cast<int*>(base + static_cast<size_t>(k) * 8);
      int* perm = cursor + k;
      EDPAIRS_CUDA_CHECK(cudaMemsetAsync(chunk_counts, 0, static_cast<size_t>(k) * 8, side));
      launch_sorted_sums<T>(static_cast<const T*>(p.x) + r0 * p.x_stride, p.x_stride, rows, static_cast<int>(d),
                            static_cast<int>(k), p.center, p.labels + r0, rscale + r0, perm, cursor, chunk_counts,
                            sums, sorted, side);
      if (counts != nullptr) {
        add_counts<<<static_cast<unsigned>(ceil_div(k, 256)), 256, 0, side>>>(counts, chunk_counts, static_cast<int>(k));
        EDPAIRS_CUDA_CHECK(cudaGetLastError());
      }
    }
    join.finish();  // the caller's stream waits for the sums; then chunk_ws and workspace are freed
    chunk_ws.free();
    workspace.free();
    return;
  }

  label(0, n);
  if (separate) {
    launch_cluster_sums<T>(static_cast<const T*>(p.x), p.x_stride, n, static_cast<int>(d), static_cast<int>(k),
                           p.center, p.labels, rscale, counts, sums, mode, sorted, s);
  }
  workspace.free();
}

}  // namespace

void assign_tensor_core(const AssignArgs& args, cudaStream_t stream) {
  TcParams p{};
  p.x = args.x.data;
  p.x_stride = args.x.stride(0);
  p.n = args.x.size(0);
  p.d = static_cast<int>(args.x.size(1));
  p.k = static_cast<int>(args.centroids.size(0));
  p.center = args.center.present ? args.center.ptr<const float>() : nullptr;
  p.row_scale = args.row_scale.present ? args.row_scale.ptr<const float>() : nullptr;
  p.labels = args.labels.ptr<int64_t>();
  p.scores = args.scores.ptr<float>();
  p.sums = args.sums.present ? args.sums.ptr<double>() : nullptr;
  p.counts = (args.sums.present && args.counts.present)
                 ? reinterpret_cast<unsigned long long*>(args.counts.ptr<int64_t>())
                 : nullptr;
  if (p.n < 1) return;
  switch (args.x.dtype) {
    case DType::Float32: launch<float>(args, p, stream); return;
    case DType::Float16: launch<__half>(args, p, stream); return;
    case DType::BFloat16: launch<__nv_bfloat16>(args, p, stream); return;
    default:
      fail(std::string("assign (tensor cores): x must be float32, float16 or bfloat16, got ") +
           dtype_name(args.x.dtype));
  }
}

void assign_tensor_core_half(const AssignArgs& args, cudaStream_t s) {
  (void)overlap_chunks();  // validated, though this path labels in one kernel and does not overlap
  const SortedKnobs sorted = sorted_knobs();  // validated before the labels, as on the other paths
  const int64_t n = args.x.size(0);
  const int64_t d = args.x.size(1);
  const int64_t k = args.centroids.size(0);
  const bool aligned = rows_16b(args.x.data, args.x.stride(0), sizeof(float));
  if (args.x.dtype != DType::Float32 || !aligned || d > kWgmmaResidentMaxD || args.center.present ||
      args.row_scale.present || !wgmma_device()) {
    fail("assign with precision 'tf32-half' needs float32 X with 16-byte aligned rows, D <= " +
         std::to_string(kWgmmaResidentMaxD) +
         ", no center or row_scale, and a compute capability 9.0 GPU with edpairs' sm_90a kernels; got " +
         std::string(dtype_name(args.x.dtype)) + " X " + args.x.shape_str() + (aligned ? "" : " (unaligned rows)") +
         (args.center.present ? " with a center" : "") + (args.row_scale.present ? " with row_scale" : "") +
         " on compute capability " + compute_capability());
  }
  if (n < 1) return;
  if (args.sums.present && n > INT_MAX) {
    fail("assign: too many rows for one pass of the cluster sums: X " + args.x.shape_str());
  }
#ifdef EDPAIRS_HAVE_WGMMA
  const int64_t d_pad = ceil_div(d, 64) * 64;
  const int64_t k_pad = ceil_div(k, kWgmmaResidentCents) * kWgmmaResidentCents;
  if (k_pad > INT_MAX) fail("assign: too many centroids for one launch: C " + args.centroids.shape_str());
  // Workspace: float16 centroids (k_pad, d_pad), s and o (k_pad floats each), with the sums
  // 1 / ||x|| (n floats).
  const size_t cw_bytes = static_cast<size_t>(k_pad * d_pad) * sizeof(__half);
  StreamScratch workspace(cw_bytes + static_cast<size_t>(2 * k_pad + (args.sums.present ? n : 0)) * 4, s);
  __half* cw = static_cast<__half*>(workspace.get());
  float* col_s = reinterpret_cast<float*>(static_cast<char*>(workspace.get()) + cw_bytes);
  float* col_o = col_s + k_pad;
  float* rscale = args.sums.present ? col_o + k_pad : nullptr;
  prepare_centroids<__half, true><<<static_cast<unsigned>(ceil_div(k_pad, 8)), 256, 0, s>>>(
      args.centroids.ptr<const float>(), static_cast<int>(k), static_cast<int>(d), static_cast<int>(k_pad),
      static_cast<int>(d_pad), nullptr, args.col_scale.present ? args.col_scale.ptr<const float>() : nullptr, cw,
      col_s, col_o);
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
  const WgmmaAssignParams w{args.x.data, args.x.stride(0), n, static_cast<int>(d), static_cast<int>(k),
                            static_cast<int>(d_pad), static_cast<int>(k_pad / kWgmmaResidentCents), cw, col_s, col_o,
                            nullptr, nullptr, args.labels.ptr<int64_t>(), args.scores.ptr<float>(), rscale,
                            wgmma_prefetch()};
  launch_assign_wgmma_resident(w, s);
  if (args.sums.present) {
    launch_cluster_sums<float>(args.x.ptr<const float>(), args.x.stride(0), n, static_cast<int>(d),
                               static_cast<int>(k), nullptr, args.labels.ptr<const int64_t>(), rscale,
                               reinterpret_cast<unsigned long long*>(args.counts.ptr<int64_t>()),
                               args.sums.ptr<double>(), sums_mode(), sorted, s);
  }
  workspace.free();
#endif
}

}  // namespace cuda_detail

// The sorted cluster sums above on their own, for labels formed elsewhere (the assignment's
// library-product route, ops.h 3d): float64 throughout, as the route's exact float32 products
// deserve (the owned-column pass's float32 runs serve the tensor-core path).
void cluster_sums_cuda(const ClusterSumsArgs& a, Stream stream) {
  using namespace cuda_detail;
  const int64_t n = a.x.size(0), d = a.x.size(1), k = a.sums.size(0);
  DeviceGuard guard(a.x.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  auto* counts = reinterpret_cast<unsigned long long*>(a.counts.ptr<int64_t>());
  double* sums = a.sums.ptr<double>();
  const SortedKnobs sorted = sorted_knobs();  // (a bad value refused before anything is written)
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(sums, 0, static_cast<size_t>(k * d) * sizeof(double), s));
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(counts, 0, static_cast<size_t>(k) * sizeof(int64_t), s));
  if (n == 0) return;
  if (n > INT_MAX || k > INT_MAX || d > INT_MAX) {
    fail("cluster_sums: too large for one launch: x " + a.x.shape_str() + ", sums " + a.sums.shape_str());
  }
  const float* center = a.center.present ? a.center.ptr<const float>() : nullptr;
  dispatch_input_dtype(a.x, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_cluster_sums<T>(static_cast<const T*>(a.x.data), a.x.stride(0), n, static_cast<int>(d), static_cast<int>(k),
                           center, a.labels.ptr<const int64_t>(), a.rscale.ptr<const float>(), counts, sums,
                           SumsMode::Sorted, sorted, s);
  });
}

}  // namespace edpairs
