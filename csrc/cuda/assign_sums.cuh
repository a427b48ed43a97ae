// The accumulation of cluster sums and counts shared by the assignment kernels:
//  * add_block_sums (SIMT float32 and mma kernels): once a block knows the labels and row
//    scales of its rows, it groups the rows by label and adds each group's sum of r_n x~_n with
//    one float64 atomic per (label, column);
//  * col_sum_slice (the owned-column pass of assign_tc_cuda.cu and the fused wgmma kernel of
//    assign_wgmma_cuda.cu): one warp adds a run of rows into its own columns of float32 sums in
//    shared memory, with no atomics.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "dtype_load.cuh"

namespace edpairs {
namespace cuda_detail {

// label_s[m], row_scale_s[m] (m < rows) hold the final label and r_n of row row0 + m and are
// visible to the whole block (the caller synchronises before calling); order_s has room for
// `rows` entries. Every thread of the block calls this (it contains barriers).
// Group the block's rows by label (a rank sort of at most kThreads keys (label, row)), so that
// each distinct label costs one float64 atomic per column instead of one per row: with few
// clusters, per-row atomics would all collide on the same addresses.
template <int kThreads, class T>
__device__ __forceinline__ void add_block_sums(const T* __restrict__ x, int64_t x_stride, int d,
                                               const float* __restrict__ center,
                                               double* __restrict__ sums,
                                               unsigned long long* __restrict__ counts,
                                               int64_t row0, int rows, const int* label_s,
                                               const float* row_scale_s, int* order_s, int tid) {
  if (tid < rows) {
    const int label = label_s[tid];
    int rank = 0;
    int same = 0;
    bool first = true;
    for (int m = 0; m < rows; ++m) {
      const int l = label_s[m];
      rank += (l < label || (l == label && m < tid)) ? 1 : 0;
      if (l == label) {
        ++same;
        if (m < tid) first = false;
      }
    }
    order_s[rank] = tid;
    if (first && counts != nullptr) {
      atomicAdd(counts + label, static_cast<unsigned long long>(same));
    }
  }
  __syncthreads();

  // Threads stride over the columns (coalesced); each walks the sorted rows in order, so the
  // block's contribution to every sums entry is deterministic.
  for (int c = tid; c < d; c += kThreads) {
    const float ctr = center != nullptr ? center[c] : 0.f;
    double acc = 0.0;
    bool any = false;
    for (int q = 0; q < rows; ++q) {
      const int m = order_s[q];
      const int label = label_s[m];
      const float r = row_scale_s[m];
      if (r > 0.f) {  // zero rows add nothing
        const float v = minus_center(x[(row0 + m) * x_stride + c], ctr);  // as in the tiles
        acc += static_cast<double>(r) * static_cast<double>(v);
        any = true;
      }
      const bool group_ends = q + 1 == rows || label_s[order_s[q + 1]] != label;
      if (group_ends) {
        if (any) atomicAdd(sums + static_cast<int64_t>(label) * d + c, acc);
        acc = 0.0;
        any = false;
      }
    }
  }
}

// ---- owned columns -----------------------------------------------------------------------
// A warp owns a slice of 32 lanes x col_elems columns (128 bytes of a float32 or 16-bit row);
// it reads those columns of each row (coalesced) and adds r x~ into its label's float32 sums,
// rows in order: each sums entry has one writer. Two groups of rows are in flight per lane
// (the one being added and the next).
// The loop is kept lean, as every lane runs it for every row (run 6b: 2.46 ms at k = 64):
//  * a group's loads only load: the elements stay as they came (T) until col_add converts and
//    centres them. Arithmetic on a load's value in the loading code sits right behind the load
//    (the compiler puts each row's load and its use in one branch), and the warp then waits out
//    each row's memory latency before it issues the next row's load (run 6b's machine code);
//  * a row's label and scale come from shared memory as one ColRow (its sums row's offset and
//    r_n), staged once per block and run of rows, not loaded by every lane from global memory;
//  * the rows are counted where they are staged, not in the adding loop.

constexpr int kColMaxWarps = 16;     // warps of a block of the owned-column pass
constexpr int kColMaxRows = 4096;    // rows per block at most (the float32 runs)
constexpr int kColMinRows = 256;     // at most n / kColMinRows blocks (small inputs: few partials)
constexpr int kColStageRows = 1024;  // rows whose ColRows the owned-column pass stages at a time

// The owned-column pass's blocks for n rows with `resident` blocks on the device at once: whole
// waves of equal blocks of at most kColMaxRows rows, no more than n / kColMinRows of them.
struct ColPartition {
  int64_t blocks;
  int64_t rows_per_block;
};
inline ColPartition column_partition(const int64_t n, const int64_t resident) {
  int64_t blocks = resident * ((n + resident * kColMaxRows - 1) / (resident * kColMaxRows));
  const int64_t most = (n + kColMinRows - 1) / kColMinRows;
  if (blocks > most) blocks = most;
  const int64_t rows = (n + blocks - 1) / blocks;
  return {(n + rows - 1) / rows, rows};
}

template <class T>
constexpr int col_elems() { return sizeof(T) < 4 ? 4 / static_cast<int>(sizeof(T)) : 1; }  // columns per lane
template <class T>
constexpr int col_group() { return 16 / col_elems<T>(); }  // rows per group: 16 float32, 8 16-bit

// A row as the adding lanes see it: the offset of its label's sums row (label x d) and r_n.
struct ColRow {
  int off;
  float r;
};

// Rows begin .. end - 1 (labels int64, r_n float32 in global memory) into table[0 ..] and
// counted into counts_s, by the `threads` threads of a block (shared-memory atomics: integer
// counts, exact in any order).
__device__ __forceinline__ void col_stage(const int64_t* __restrict__ labels, const float* __restrict__ rscale,
                                          const int64_t begin, const int64_t end, const int d, ColRow* table,
                                          unsigned* counts_s, const int tid, const int threads) {
  for (int64_t i = tid; i < end - begin; i += threads) {
    const int label = static_cast<int>(labels[begin + i]);
    table[i] = ColRow{label * d, rscale[begin + i]};
    atomicAdd(counts_s + label, 1u);
  }
}

// A run's rows from a staged table (the owned-column pass).
struct TableRows {
  const ColRow* table;
  __device__ __forceinline__ ColRow row(const int i) const { return table[i]; }
};

template <class T>
struct ColGroup {
  T v[col_group<T>()][col_elems<T>()];  // as loaded (zero past the run or the columns)
};

// The group of rows at p (row stride x_stride), `left` of them still in the run.
template <class T>
__device__ __forceinline__ void col_load(ColGroup<T>& g, const T* p, const int64_t x_stride, const int left,
                                         const int c0, const int d) {
#pragma unroll
  for (int u = 0; u < col_group<T>(); ++u) {
#pragma unroll
    for (int e = 0; e < col_elems<T>(); ++e) g.v[u][e] = (u < left && c0 + e < d) ? p[e] : T{};
    p += x_stride;
  }
}

// Rows i0 .. of a group into the lane's columns of sums_s, `left` of them still in the run.
template <class T, class Rows>
__device__ __forceinline__ void col_add(const ColGroup<T>& g, const Rows& rows, const int i0, const int left,
                                        const float (&ctr)[col_elems<T>()], float* sums_s, const int c0,
                                        const int d) {
#pragma unroll
  for (int u = 0; u < col_group<T>(); ++u) {
    if (u >= left) break;
    const ColRow row = rows.row(i0 + u);
    if (row.r > 0.f) {  // zero rows add nothing
      float* dst = sums_s + row.off + c0;
#pragma unroll
      for (int e = 0; e < col_elems<T>(); ++e) {
        if (c0 + e < d) dst[e] = fmaf(row.r, minus_center(g.v[u][e], ctr[e]), dst[e]);
      }
    }
  }
}

// The `count` rows from begin (rows.row(0) is row begin's) into the float32 sums_s (k x d) at
// the calling lane's columns c0 .. c0 + col_elems - 1 (its warp's slice).
template <class T, class Rows>
__device__ __forceinline__ void col_sum_slice(const T* __restrict__ x, const int64_t x_stride, const int64_t begin,
                                              const int count, const int c0, const int d,
                                              const float* __restrict__ center, const Rows& rows, float* sums_s) {
  constexpr int kE = col_elems<T>();
  constexpr int kG = col_group<T>();
  float ctr[kE];
#pragma unroll
  for (int e = 0; e < kE; ++e) ctr[e] = (center != nullptr && c0 + e < d) ? center[c0 + e] : 0.f;
  const T* p = x + begin * x_stride + c0;
  const int64_t step = kG * x_stride;
  ColGroup<T> a, b;
  col_load<T>(a, p, x_stride, count, c0, d);
  for (int i = 0; i < count; i += 2 * kG) {
    col_load<T>(b, p + step, x_stride, count - i - kG, c0, d);
    col_add<T>(a, rows, i, count - i, ctr, sums_s, c0, d);
    p += 2 * step;
    col_load<T>(a, p, x_stride, count - i - 2 * kG, c0, d);
    col_add<T>(b, rows, i + kG, count - i - kG, ctr, sums_s, c0, d);
  }
}

// Column slices of d columns (one warp's 32 lanes x col_elems columns each).
template <class T>
__host__ __device__ inline int col_slices(const int d) {
  return (d + 32 * col_elems<T>() - 1) / (32 * col_elems<T>());
}

// The `count` rows from begin into sums_s by the `warps` warps of a block: warp w owns the
// slices w, w + warps, ...
template <class T, class Rows>
__device__ __forceinline__ void add_owned_columns(const T* __restrict__ x, const int64_t x_stride,
                                                  const int64_t begin, const int count, const int d,
                                                  const float* __restrict__ center, const Rows& rows, float* sums_s,
                                                  const int warp, const int warps, const int lane) {
  constexpr int kE = col_elems<T>();
  for (int sl = warp; sl < col_slices<T>(d); sl += warps) {
    col_sum_slice<T>(x, x_stride, begin, count, sl * 32 * kE + lane * kE, d, center, rows, sums_s);
  }
}

}  // namespace cuda_detail
}  // namespace edpairs
