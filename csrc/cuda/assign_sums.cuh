// The per-block accumulation of cluster sums and counts shared by the assignment kernels
// (SIMT float32 and tensor-core): once a block knows the labels and row scales of its rows,
// it groups the rows by label and adds each group's sum of r_n x~_n with one float64 atomic
// per (label, column).
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

}  // namespace cuda_detail
}  // namespace edpairs
