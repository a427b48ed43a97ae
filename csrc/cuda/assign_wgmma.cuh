// Entry point of the wgmma (sm_90a) labelling kernel, assign_wgmma_cuda.cu. That file is built
// for sm_90a only (a separate target; EDPAIRS_HAVE_WGMMA is defined where it was built), so the
// caller checks for a compute capability 9.0 device before launching it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "edpairs/errors.h"
#include "edpairs/ops.h"
#include "edpairs/tensor_view.h"

namespace edpairs {
namespace cuda_detail {

constexpr int kWgmmaRows = 128;   // rows of x per block (two warpgroups of 64)
constexpr int kWgmmaCents = 256;  // centroids per tile of the widest form (and of wgmma-tma)

// Centroids per tile of assign_wgmma_kernel for k centroids: 64 (k <= 64) or 128 (k <= 128),
// one tile without padding work; 256 beyond, k padded to a multiple of 256. The caller pads
// the prepared centroids to a multiple of this and passes k_tiles accordingly.
inline int wgmma_tile_cents(const int64_t k) { return k <= 64 ? 64 : (k <= 128 ? 128 : kWgmmaCents); }

struct WgmmaAssignParams {
  const void* x;            // (n, d), row stride x_stride elements, 16-byte aligned rows
  int64_t x_stride;
  int64_t n;
  int d;
  int k;
  int d_pad;                // multiple of the 128-byte slice, in elements
  int k_tiles;              // k_pad / the tile width (wgmma_tile_cents, or kWgmmaCents for wgmma-tma)
  const void* cw;           // (k_pad, d_pad) centroids rounded to the operand type
  const float* col_s;       // (k_pad,) s_j, 0 for padding
  const float* col_o;       // (k_pad,) o_j = center . c~_j
  const float* center;      // (d,) or null
  const float* row_scale;   // (n,) or null: the row norms are computed
  int64_t* labels;          // (n,)
  float* scores;            // (n,)
  float* row_scale_out;     // (n,) or null: r_n of every row, for the sorted sums pass
  int prefetch = 0;         // iterations beyond the cp.async ring whose x slices are prefetched
                            // into L2 (assign_wgmma_kernel, assign_wgmma_sums_kernel; 0: none)
};

// Whether rows of elem-byte elements at x, stride elements apart, start on 16-byte boundaries
// (what the kernels' 16-byte copies need; the rule that chooses a wgmma kernel and the one that
// guards its launch).
inline bool rows_16b(const void* x, const int64_t stride, const size_t elem) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && (stride * static_cast<int64_t>(elem)) % 16 == 0;
}

// What every wgmma launcher needs of its parameters, checked on the host before the launch: x's
// rows (x_elem bytes a value) and the prepared centroids start on 16-byte boundaries (the
// kernels' 16-byte copies, the TMA's maps), at least one feature and one centroid. The callers
// choose a wgmma kernel only for such operands; a slip there fails here with a message instead
// of a misaligned-address fault, which would end the process's CUDA context.
inline void require_wgmma_operands(const WgmmaAssignParams& p, const int x_elem, const char* what) {
  const bool x_rows = rows_16b(p.x, p.x_stride, static_cast<size_t>(x_elem));
  if (!x_rows || reinterpret_cast<uintptr_t>(p.cw) % 16 != 0 || p.n < 0 || p.d < 1 || p.k < 1 || p.k_tiles < 1) {
    fail(std::string(what) + ": rows of x and the centroids must be 16-byte aligned, with n >= 0, d >= 1, k >= 1 "
         "in at least one tile (x stride " + std::to_string(p.x_stride) + " of " + std::to_string(x_elem) +
         "-byte values, n = " + std::to_string(p.n) + ", d = " + std::to_string(p.d) + ", k = " + std::to_string(p.k) +
         " in " + std::to_string(p.k_tiles) + " tiles; an internal error)");
  }
}

// Labels, scores (and row_scale_out) of every row on `stream`; x of `dtype` (float32: TF32
// products; float16 / bfloat16: 16-bit products), float32 accumulation.
void launch_assign_wgmma(const WgmmaAssignParams& p, DType dtype, cudaStream_t stream);

// The same for float32 x with the operands loaded by the TMA and the centroid tile multicast
// to clusters of two blocks (assign_wgmma_tma_cuda.cu).
void launch_assign_wgmma_tma(const WgmmaAssignParams& p, cudaStream_t stream);

// Float32 x labelled from float16 values made in shared memory (assign_wgmma_resident_cuda.cu,
// AssignPrecision::TensorCoreHalf): centroid tiles of kWgmmaResidentCents float16 centroids
// (p.cw prepared as __half, k padded to a multiple of 128), d_pad = d rounded up to 64 and at
// most kWgmmaResidentMaxD (a 128-row tile of float16 rows stays in shared memory), no center or
// row_scale; p.row_scale_out gets 1 / ||x|| of every row (for the cluster sums).
// (kWgmmaResidentMaxD: ops.h.)
constexpr int kWgmmaResidentCents = 128;
void launch_assign_wgmma_resident(const WgmmaAssignParams& p, cudaStream_t stream);

// k <= kWgmmaSumsMaxK with the cluster sums in the same pass (assign_wgmma_sums_kernel): `grid`
// persistent blocks over the ceil(n / 128) row tiles; block b adds its sums (k x d, float32 runs
// of at most 32 tiles = 4096 rows, folded into float64) to part_sums + b k d (zeroed by the
// caller) and writes its counts to part_counts + b k, which the caller adds (with p.k_tiles = 1:
// the centroids prepared with k_pad = 64, and p.row_scale_out unused).
constexpr int kWgmmaSumsMaxK = 64;
// Whether it runs for x of `dtype` with k x d sums on the current device: k <= 64 and its
// shared memory (ring, sums, counts, two tiles' labels and scales, alignment slack) granted.
bool wgmma_sums_fits(DType dtype, int64_t k, int64_t d);
void launch_assign_wgmma_sums(const WgmmaAssignParams& p, DType dtype, int grid, double* part_sums,
                              unsigned* part_counts, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace edpairs
