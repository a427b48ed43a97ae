// Tensor-core assignment on Hopper's warpgroup MMA (wgmma, sm_90a): the products x . c_j of a
// 128-row block against centroid tiles of N = 64, 128 or 256 (wgmma_tile_cents: the narrowest
// that holds k, else 256), the argmax folded into each tile's epilogue, never an N x k matrix.
// The labelling kernel of the tensor-core path (assign_tc_cuda.cu) on compute capability 9.0
// (EDPAIRS_ASSIGN_KERNEL auto or wgmma); prepare_centroids and the cluster-sum passes stay
// there. Below, assign_wgmma_sums_kernel: the same labelling for k <= 64 with the cluster sums
// in the same pass (EDPAIRS_ASSIGN_SUMS=fused). Both prefetch x's slices into L2 p.prefetch
// iterations beyond their ring (EDPAIRS_WGMMA_PREFETCH).
//
// Block: 256 threads = two warpgroups; warpgroup w owns rows 64 w .. 64 w + 63 of the block and
// both share each centroid tile. Per iteration one 128-byte slice of every row (32 float32 or
// 64 16-bit elements) of x and of the tile's centroids lands in shared memory, and each
// warpgroup issues four m64nN wgmma (k8 TF32 / k16 16-bit, 32 bytes of K each) on it. The
// iterations run over (centroid tile, slice) pairs in one sequence, so the pipeline does not
// drain between tiles; x's slices are re-read for every tile (from L2: 132 blocks x 256 KB in
// flight).
//
// Pipeline (Ring<N>): stages of x 16 KB + centroids N x 128 bytes filled by cp.async from all
// threads, kAhead = kStages - 2 iterations ahead: N = 256 four stages of 48 KB, two ahead, one
// block per multiprocessor; N = 128 six of 32 KB, four ahead, one block; N = 64 four of 24 KB,
// two ahead, two blocks per multiprocessor (at small k the kernel streams x: 64 KB of it in
// flight per multiprocessor either way). wgmma keeps one batch in flight (wait_group 1), so the
// stage a load overwrites, that of iteration it - 2 (kAhead = kStages - 2), is free once every
// thread has passed the barrier of iteration it. cp.async writes through the generic proxy and
// wgmma reads through the async proxy: each thread fences (fence.proxy.async) after its copies
// land, before the barrier.
//
// Shared layout: the 128-byte swizzle of wgmma.cuh. Thread tid copies chunk tid % 8 of rows
// tid / 8 + 32 i, so the 8 threads of a quarter warp read 128 contiguous bytes of one row and
// write 8 distinct banks.
//
// TF32: float32 x is read by the tensor cores as stored (the low 13 mantissa bits ignored, a
// relative error below 2^-10 per element) and the centroids are rounded to TF32 by
// prepare_centroids, so each product's relative error stays below 1.5 x 2^-10 - inside the
// 2^-10-per-operand-pair model of the mma.sync kernel's tests with their factor 2 of slack.
//
// Accumulators: the layout of wgmma.cuh. tests/test_tc_emulation.py replays the loader, the
// swizzle, the descriptors' addressing and that layout in numpy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "assign_sums.cuh"
#include "assign_wgmma.cuh"
#include "cp_async.cuh"
#include "cuda_check.cuh"
#include "dtype_load.cuh"
#include "ptx.cuh"
#include "assign_wgmma_epilogue.cuh"
#include "wgmma.cuh"

namespace edpairs {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;             // two warpgroups
constexpr int kSliceBytes = 128;
constexpr int kXTileBytes = kWgmmaRows * kSliceBytes;   // 16384
constexpr int kLoadRows = kThreads / 8;   // rows one loader pass covers
static_assert(kWgmmaRows % kLoadRows == 0, "loader passes");

// The ring of the N-centroid form (see the top of the file).
template <int N>
struct Ring {
  static constexpr int kCTileBytes = N * kSliceBytes;
  static constexpr int kStageBytes = kXTileBytes + kCTileBytes;  // a multiple of 1024
  static constexpr int kStages = N == 128 ? 6 : 4;
  static constexpr int kAhead = kStages - 2;  // iterations whose copies are in flight
  static constexpr int kBlocksPerSm = N == 64 ? 2 : 1;
  static constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + slack to align the ring to 1024
  static_assert(kStageBytes % 1024 == 0 && N % kLoadRows == 0, "descriptor alignment, loader passes");
  static_assert(kBlocksPerSm * (kSmemBytes + 2048) <= 228 * 1024, "shared memory of a multiprocessor");
};

// Issues the copies of iteration `it` (centroid tile it / k_steps, slice it % k_steps) into
// stage `stage` (shared address): chunk tid % 8 of x rows and centroid rows tid / 8 + 32 i.
template <class T, int N>
__device__ __forceinline__ void load_iteration(const WgmmaAssignParams& p, uint32_t stage, int it,
                                               int k_steps, int64_t row0, int tid) {
  constexpr int kElems = kSliceBytes / static_cast<int>(sizeof(T));
  constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  const int tile = it / k_steps;
  const int kt = it - tile * k_steps;
  const int c = tid % 8;
  const int col = kt * kElems + c * kChunkElems;
  const T* x = static_cast<const T*>(p.x);
  const T* cw = static_cast<const T*>(p.cw);
#pragma unroll
  for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) {
    const int r = tid / 8 + kLoadRows * i;
    const int64_t grow = row0 + r;
    int valid = 0;  // elements of this chunk inside x (zero-filled past them)
    if (grow < p.n) valid = p.d - col < kChunkElems ? (p.d - col > 0 ? p.d - col : 0) : kChunkElems;
    const T* src = valid > 0 ? x + grow * p.x_stride + col : x;
    cp_async_16(stage + swizzled(r, c), src, valid * static_cast<int>(sizeof(T)));
  }
  const T* cbase = cw + static_cast<int64_t>(tile) * N * p.d_pad + col;
#pragma unroll
  for (int i = 0; i < N / kLoadRows; ++i) {
    const int r = tid / 8 + kLoadRows * i;
    cp_async_16(stage + kXTileBytes + swizzled(r, c), cbase + static_cast<int64_t>(r) * p.d_pad, 16);
  }
}

constexpr int kBarMma = 1;  // the labellers' barrier (named: the fused kernel has other threads)

// A hint to L2 for x's slice of iteration `it` (within its row tile: centroid tile it / k_steps)
// of the row tile at row0: thread tid < 128 names the first and the last byte of row tid's
// slice (two lines where the slice straddles them). Only for centroid tile 0: later tiles read
// x again from L2 anyway.
template <class T>
__device__ __forceinline__ void prefetch_slice(const WgmmaAssignParams& p, const int it, const int k_steps,
                                               const int64_t row0, const int tid) {
  constexpr int kElems = kSliceBytes / static_cast<int>(sizeof(T));
  const int64_t row = row0 + tid;
  if (it >= k_steps || tid >= kWgmmaRows || row >= p.n) return;
  const int first = it * kElems;
  const int last = (first + kElems < p.d ? first + kElems : p.d) - 1;
  const T* base = static_cast<const T*>(p.x) + row * p.x_stride;
  prefetch_l2(base + first);
  if ((reinterpret_cast<uintptr_t>(base + last) >> 7) != (reinterpret_cast<uintptr_t>(base + first) >> 7)) {
    prefetch_l2(base + last);
  }
}

// The labelling loop of both kernels: threads 0..255 (two warpgroups, warpgroup w the rows
// 64 w .. of each tile) label `row_tiles` tiles of 128 rows (tile j at row row0_of(j)) against
// every centroid tile. Iteration it is (row tile, centroid tile, slice) in that nesting, one
// cp.async ring running across all of them (the next row tile's copies are in flight during a
// tile's epilogue). Row norms come from the thread's own copies during centroid tile 0 (rows
// tid / 8 + 32 i, chunk tid % 8). After each row tile, done(j, row0, row_sq, run_val, run_idx)
// gets the thread's partial squared norms and running bests (and must not touch the ring).
template <class T, int N, class Row0, class Done>
__device__ __forceinline__ void label_tiles(const WgmmaAssignParams& p, const uint32_t ring,
                                            const unsigned char* ring_ptr, const int row_tiles, const Row0& row0_of,
                                            const int tid, const Done& done) {
  constexpr int kElems = kSliceBytes / static_cast<int>(sizeof(T));
  constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  constexpr int kStages = Ring<N>::kStages;
  constexpr int kAhead = Ring<N>::kAhead;
  constexpr int kStageBytes = Ring<N>::kStageBytes;
  const int wg = tid / 128;
  const int t = tid % 4;
  const int k_steps = p.d_pad / kElems;
  const int per_row_tile = p.k_tiles * k_steps;
  const int total = row_tiles * per_row_tile;
  const bool sums_row_norm = p.row_scale == nullptr;
  float row_sq[kWgmmaRows / kLoadRows];
#pragma unroll
  for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) row_sq[i] = 0.f;
  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
  float run_val[2] = {-INFINITY, -INFINITY};
  int run_idx[2] = {0, 0};
  const auto issue = [&](const int it) {
    const int j = it / per_row_tile;
    load_iteration<T, N>(p, ring + (it % kStages) * kStageBytes, it - j * per_row_tile, k_steps, row0_of(j), tid);
  };
  const auto prefetch = [&](const int it) {
    if (it >= total) return;
    const int j = it / per_row_tile;
    prefetch_slice<T>(p, it - j * per_row_tile, k_steps, row0_of(j), tid);
  };

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < total) issue(s);
    cp_async_commit();
  }
  for (int s = kAhead; s < kAhead + p.prefetch; ++s) prefetch(s);
  for (int it = 0; it < total; ++it) {
    const int stage = it % kStages;
    const int j = it / per_row_tile;
    const int tile = (it - j * per_row_tile) / k_steps;
    const int kt = it - j * per_row_tile - tile * k_steps;
    cp_async_wait<kAhead - 1>();  // this thread's copies of iteration it have landed
    if (sums_row_norm && tile == 0) {
      const int c = tid % 8;
#pragma unroll
      for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) {
        const int r = tid / 8 + kLoadRows * i;
        // One 16-byte read per chunk: a quarter warp reads one row's 128 bytes, all 32 banks.
        const uint4 raw = *reinterpret_cast<const uint4*>(ring_ptr + stage * kStageBytes + swizzled(r, c));
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int u = 0; u < kChunkElems; ++u) {
          const int col = kt * kElems + c * kChunkElems + u;
          if (col < p.d) {
            const float v = to_float(e[u]) - (p.center != nullptr ? p.center[col] : 0.f);
            row_sq[i] = fmaf(v, v, row_sq[i]);
          }
        }
      }
    }
    fence_proxy_async();
    named_sync(kBarMma, kThreads);  // iteration it visible to all labellers; every wgmma of it - 2 done
    if (it + kAhead < total) issue(it + kAhead);
    cp_async_commit();
    if (p.prefetch > 0) prefetch(it + kAhead + p.prefetch);

    const uint32_t xs = ring + stage * kStageBytes + wg * (kXTileBytes / 2);
    const uint32_t cs = ring + stage * kStageBytes + kXTileBytes;
    mma_slice<T, N>(acc, xs, cs, kt == 0);

    if (kt == k_steps - 1) {  // the centroid tile is complete: fold it into the running best
      fold_tile<N>(acc, p, tile * N, t, run_val, run_idx);
      if (tile == p.k_tiles - 1) {  // and so is the row tile
        done(j, row0_of(j), row_sq, run_val, run_idx);
#pragma unroll
        for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) row_sq[i] = 0.f;
        run_val[0] = run_val[1] = -INFINITY;
        run_idx[0] = run_idx[1] = 0;
      }
    }
  }
  wgmma_wait<0>();  // (already so after the last tile's epilogue; said here for ptxas)
  cp_async_wait<0>();
}

// Row scales of the labellers' row tile at row0 into dst (128 floats): the 8 lanes that copied
// a row's chunks hold its partial sums.
__device__ __forceinline__ void store_row_scales(const WgmmaAssignParams& p, const int64_t row0,
                                                 const float (&row_sq)[kWgmmaRows / kLoadRows], float* dst,
                                                 const int tid) {
#pragma unroll
  for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) {
    const float sq = sum_over_chunk_lanes(row_sq[i]);
    const int r = tid / 8 + kLoadRows * i;
    if (tid % 8 == 0) dst[r] = wgmma_row_scale(p, row0, r, sq);
  }
}

template <class T, int N>
__global__ void __launch_bounds__(kThreads, Ring<N>::kBlocksPerSm) assign_wgmma_kernel(const WgmmaAssignParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float row_scale_s[kWgmmaRows];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;  // stages at ring + s * kStageBytes
  const int tid = static_cast<int>(threadIdx.x);
  label_tiles<T, N>(
      p, ring, smem_raw + (ring - raw), 1, [](int) { return static_cast<int64_t>(blockIdx.x) * kWgmmaRows; }, tid,
      [&](int, const int64_t row0, const float (&row_sq)[kWgmmaRows / kLoadRows], const float (&run_val)[2],
          const int (&run_idx)[2]) {
        store_row_scales(p, row0, row_sq, row_scale_s, tid);
        named_sync(kBarMma, kThreads);  // the row scales visible to all
        if (tid % 4 == 0) write_rows(p, row0, quad_row(tid), row_scale_s, run_val, run_idx);
      });
}

// ---- k <= 64 with the cluster sums in the same pass (EDPAIRS_ASSIGN_SUMS=fused) ----------
// One persistent block per multiprocessor walks the row tiles blockIdx.x, + gridDim.x, ..:
//  * threads 0-255 (two warpgroups) label them as assign_wgmma_kernel<T, 64> does, the ring
//    running on across row tiles (the copies of the next tile are in flight during a tile's
//    epilogue); their per-iteration barrier is named barrier 1 (256 threads);
//  * threads 256-511 (8 warps) add each labelled tile into the block's float32 sums in shared
//    memory with owned columns (col_sum_slice), reading its rows again from global memory:
//    the tile was loaded by this block a tile ago, so from L2 (132 blocks x 256 KB = 34 MB
//    in flight); every 32 tiles (4096 rows, as the owned-column pass's blocks) and after the
//    last, each warp folds its columns into the block's float64 partial in global memory;
//  * the hand-over: two buffers of a tile's labels and row scales (tile j uses buffer j % 2).
//    The labellers fill buffer b and arrive at FULL_b (named barrier 2 + b, 512 threads); the
//    summers wait there, add the tile, and arrive at EMPTY_b (4 + b) where the labellers wait
//    before they fill buffer b again (tile j + 2; the summers arrive only where that tile
//    exists, so that every arrival has its wait).
// Shared memory (from the 1024-aligned ring): ring 4 x 24 KB | sums k x d float32 | counts k |
// row scales 2 x 128 float32 | labels 2 x 128 bytes: 226.5 KB at k = 64, d = 512 (the limit is
// 227 KB). x is read from DRAM once; the partials are added by the caller in block order.
constexpr int kSumsThreads = 512;
constexpr int kSumWarps = (kSumsThreads - kThreads) / 32;  // 8
constexpr int kBarFull = 2;   // + buffer
constexpr int kBarEmpty = 4;  // + buffer

// Byte offsets from the ring of the fused kernel's shared arrays.
struct SumsLayout {
  int64_t sums, counts, scales, labels, end;
};
__host__ __device__ constexpr SumsLayout sums_layout(const int64_t k, const int64_t d) {
  SumsLayout l{};
  l.sums = Ring<64>::kStages * Ring<64>::kStageBytes;
  l.counts = l.sums + 4 * k * d;
  l.scales = l.counts + 4 * k;
  l.labels = l.scales + 2 * kWgmmaRows * 4;
  l.end = l.labels + 2 * kWgmmaRows;
  return l;
}
// The benchmark's shape (k = 64, D = 512) fits Hopper's 232,448 bytes of opt-in shared memory
// per block with 513 bytes to spare (+ 1023 of alignment slack; the kernel has no static shared
// memory). wgmma_sums_fits refuses a shape that does not fit and the step takes the separate
// passes without a word, so a change that grows this layout must fail here instead.
static_assert(sums_layout(kWgmmaSumsMaxK, 512).end + 1023 <= 232448, "fused k = 64, D = 512 no longer fits Hopper");

// The labels and row scales of one labelled tile, for col_sum_slice (i: the tile's i-th row).
struct TileRows {
  const unsigned char* labels;
  const float* scales;
  int d;
  __device__ __forceinline__ ColRow row(const int i) const { return ColRow{labels[i] * d, scales[i]}; }
};

__device__ __forceinline__ int64_t sums_tile_row0(const int j) {
  return (static_cast<int64_t>(blockIdx.x) + static_cast<int64_t>(j) * gridDim.x) * kWgmmaRows;
}

template <class T>
__device__ __forceinline__ void sums_labeller(const WgmmaAssignParams& p, const uint32_t ring,
                                              const unsigned char* ring_ptr, const int tiles, float* scales_s,
                                              unsigned char* labels_s, const int tid) {
  label_tiles<T, 64>(
      p, ring, ring_ptr, tiles, [](const int j) { return sums_tile_row0(j); }, tid,
      [&](const int j, const int64_t row0, const float (&row_sq)[kWgmmaRows / kLoadRows], const float (&run_val)[2],
          const int (&run_idx)[2]) {
        const int b = j & 1;
        if (j >= 2) named_sync(kBarEmpty + b, kSumsThreads);  // the summers are done with tile j - 2
        store_row_scales(p, row0, row_sq, scales_s + b * kWgmmaRows, tid);
        named_sync(kBarMma, kThreads);  // the row scales visible to the labellers
        if (tid % 4 == 0) {
          write_rows(p, row0, quad_row(tid), scales_s + b * kWgmmaRows, run_val, run_idx, labels_s + b * kWgmmaRows);
        }
        __threadfence_block();
        named_arrive(kBarFull + b, kSumsThreads);  // tile j handed over
      });
}

constexpr int kFoldTiles = kColMaxRows / kWgmmaRows;  // 32: the float32 runs' longest, in tiles

template <class T>
__device__ __forceinline__ void sums_summer(const WgmmaAssignParams& p, const int tiles, float* sums_s,
                                            unsigned* counts_s, const float* scales_s,
                                            const unsigned char* labels_s, double* part, const int stid) {
  constexpr int kE = col_elems<T>();
  const int warp = stid / 32;
  const int lane = stid % 32;
  const int slices = col_slices<T>(p.d);
  const T* x = static_cast<const T*>(p.x);
  for (int j = 0; j < tiles; ++j) {
    const int b = j & 1;
    const int64_t row0 = sums_tile_row0(j);
    const int64_t end = row0 + kWgmmaRows < p.n ? row0 + kWgmmaRows : p.n;
    named_sync(kBarFull + b, kSumsThreads);  // tile j labelled
    const int rows = static_cast<int>(end - row0);
    if (warp == 0) {  // the counts (shared-memory atomics: exact in any order)
      for (int i = lane; i < rows; i += 32) atomicAdd(counts_s + labels_s[b * kWgmmaRows + i], 1u);
    }
    add_owned_columns<T>(x, p.x_stride, row0, rows, p.d, p.center,
                         TileRows{labels_s + b * kWgmmaRows, scales_s + b * kWgmmaRows, p.d}, sums_s, warp, kSumWarps,
                         lane);
    if (j + 2 < tiles) named_arrive(kBarEmpty + b, kSumsThreads);  // buffer b free for tile j + 2
    if ((j + 1) % kFoldTiles == 0 || j + 1 == tiles) {
      // Fold the warp's own columns into the block's float64 partial and start a new float32 run;
      // kFoldLoads partial entries are read before any is added to (one read-modify-write in
      // flight at a time kept the labellers waiting on a latency per entry).
      constexpr int kFoldLoads = 8;
      for (int sl = warp; sl < slices; sl += kSumWarps) {
        for (int e = 0; e < kE; ++e) {
          const int c = sl * 32 * kE + lane * kE + e;
          if (c >= p.d) continue;
          for (int l0 = 0; l0 < p.k; l0 += kFoldLoads) {
            double old[kFoldLoads];
#pragma unroll
            for (int u = 0; u < kFoldLoads; ++u) {
              old[u] = l0 + u < p.k ? part[static_cast<int64_t>(l0 + u) * p.d + c] : 0.0;
            }
#pragma unroll
            for (int u = 0; u < kFoldLoads; ++u) {
              if (l0 + u < p.k) {
                float& v = sums_s[static_cast<int64_t>(l0 + u) * p.d + c];
                part[static_cast<int64_t>(l0 + u) * p.d + c] = old[u] + static_cast<double>(v);
                v = 0.f;
              }
            }
          }
        }
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kSumsThreads, 1)
    assign_wgmma_sums_kernel(const WgmmaAssignParams p, double* __restrict__ part_sums,
                             unsigned* __restrict__ part_counts) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;
  unsigned char* base = smem_raw + (ring - raw);
  const SumsLayout l = sums_layout(p.k, p.d);
  float* sums_s = reinterpret_cast<float*>(base + l.sums);
  unsigned* counts_s = reinterpret_cast<unsigned*>(base + l.counts);
  float* scales_s = reinterpret_cast<float*>(base + l.scales);
  unsigned char* labels_s = base + l.labels;
  const int tid = static_cast<int>(threadIdx.x);
  const int kd = p.k * p.d;
  for (int i = tid; i < kd; i += kSumsThreads) sums_s[i] = 0.f;
  for (int i = tid; i < p.k; i += kSumsThreads) counts_s[i] = 0u;
  __syncthreads();
  const int64_t n_tiles = (p.n + kWgmmaRows - 1) / kWgmmaRows;
  const int tiles = n_tiles > blockIdx.x ? static_cast<int>((n_tiles - 1 - blockIdx.x) / gridDim.x + 1) : 0;
  if (tid < kThreads) {
    sums_labeller<T>(p, ring, base, tiles, scales_s, labels_s, tid);
  } else {
    sums_summer<T>(p, tiles, sums_s, counts_s, scales_s, labels_s, part_sums + static_cast<int64_t>(blockIdx.x) * kd,
                   tid - kThreads);
  }
  __syncthreads();  // (the summers folded every sum into part_sums after their last tile)
  for (int i = tid; i < p.k; i += kSumsThreads) part_counts[static_cast<int64_t>(blockIdx.x) * p.k + i] = counts_s[i];
}

}  // namespace

namespace {

template <int N>
void launch_width(const WgmmaAssignParams& p, const DType dtype, const int64_t blocks, const cudaStream_t stream) {
  const auto run = [&](auto kernel) {
    EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Ring<N>::kSmemBytes));
    if (Ring<N>::kBlocksPerSm > 1) {  // the carveout that lets two blocks' rings share a multiprocessor
      EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                              cudaSharedmemCarveoutMaxShared));
    }
    kernel<<<static_cast<unsigned>(blocks), kThreads, Ring<N>::kSmemBytes, stream>>>(p);
    EDPAIRS_CUDA_CHECK(cudaGetLastError());
  };
  switch (dtype) {
    case DType::Float32: run(assign_wgmma_kernel<float, N>); return;
    case DType::Float16: run(assign_wgmma_kernel<__half, N>); return;
    case DType::BFloat16: run(assign_wgmma_kernel<__nv_bfloat16, N>); return;
    default: fail(std::string("assign (wgmma): x must be float32, float16 or bfloat16, got ") + dtype_name(dtype));
  }
}

}  // namespace

namespace {

// Calls f(assign_wgmma_sums_kernel<T>) for x's dtype; false for other dtypes.
template <class F>
bool with_sums_kernel(const DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(assign_wgmma_sums_kernel<float>); return true;
    case DType::Float16: f(assign_wgmma_sums_kernel<__half>); return true;
    case DType::BFloat16: f(assign_wgmma_sums_kernel<__nv_bfloat16>); return true;
    default: return false;
  }
}

int64_t sums_smem_bytes(const int64_t k, const int64_t d) { return sums_layout(k, d).end + 1023; }

}  // namespace

bool wgmma_sums_fits(const DType dtype, const int64_t k, const int64_t d) {
  if (k > kWgmmaSumsMaxK) return false;
  const int64_t smem = sums_smem_bytes(k, d);
  if (smem > INT_MAX) return false;
  cudaError_t status = cudaErrorInvalidValue;  // (for dtypes without the kernel)
  with_sums_kernel(dtype, [&](auto kernel) {
    const std::lock_guard<std::mutex> lock(smem_attribute_mutex());  // (set again at the launch)
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  });
  if (status != cudaSuccess) (void)cudaGetLastError();  // a refused size is an answer here, not an error
  return status == cudaSuccess;
}

void launch_assign_wgmma_sums(const WgmmaAssignParams& p, const DType dtype, const int grid, double* part_sums,
                              unsigned* part_counts, const cudaStream_t stream) {
  require_wgmma_operands(p, element_size(dtype), "assign (wgmma, fused sums)");
  if (p.k > kWgmmaSumsMaxK || p.k_tiles != 1 || grid < 1) {
    fail("assign (wgmma, fused sums): k = " + std::to_string(p.k) + " with " + std::to_string(p.k_tiles) +
         " centroid tiles on " + std::to_string(grid) + " blocks (an internal error)");
  }
  const int64_t smem = sums_smem_bytes(p.k, p.d);
  const bool known = with_sums_kernel(dtype, [&](auto kernel) {
    launch_with_smem(kernel, dim3(static_cast<unsigned>(grid)), dim3(kSumsThreads), smem, stream, p, part_sums,
                     part_counts);
  });
  if (!known) fail(std::string("assign (wgmma): x must be float32, float16 or bfloat16, got ") + dtype_name(dtype));
}

void launch_assign_wgmma(const WgmmaAssignParams& p, const DType dtype, const cudaStream_t stream) {
  require_wgmma_operands(p, element_size(dtype), "assign (wgmma)");
  const int64_t blocks = ceil_div(p.n, kWgmmaRows);
  if (blocks > INT_MAX) fail("assign (wgmma): too many rows for one launch: " + std::to_string(p.n));
  const int width = wgmma_tile_cents(p.k);
  if (static_cast<int64_t>(p.k_tiles) * width < p.k) {
    fail("assign (wgmma): " + std::to_string(p.k_tiles) + " tiles of " + std::to_string(width) +
         " centroids cannot hold k = " + std::to_string(p.k) + " (an internal error)");
  }
  switch (width) {
    case 64: launch_width<64>(p, dtype, blocks, stream); return;
    case 128: launch_width<128>(p, dtype, blocks, stream); return;
    default: launch_width<kWgmmaCents>(p, dtype, blocks, stream); return;
  }
}

}  // namespace cuda_detail
}  // namespace edpairs
