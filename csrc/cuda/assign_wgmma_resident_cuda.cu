// Cosine labels of float32 rows from float16 values made in shared memory (ops.h:
// AssignPrecision::TensorCoreHalf; Python's EDPAIRS_ASSIGN_HALF=1 for TF32 cosine assignments
// with k >= 129 of float32 rows on Hopper with D <= 512, 16-byte aligned rows, no center or
// row scales).
//
// Why: at large k the TF32 labelling kernel (assign_wgmma_cuda.cu) is bound by L2, not by the
// tensor cores. Each 128-row block reads every centroid once per row tile and its own rows once
// per 256-centroid tile: at N = 1M, D = 512, k = 1024 that is 16 GB of float32 centroids and
// 4 x 2 GB of rows through L2 (run 5, H100: 6.3 ms for the step, 43% of the TF32 peak). Here a
// persistent block (one per multiprocessor) converts a tile of 128 rows once into float16,
// keeps it in shared memory (128 KB at D = 512) and streams float16 centroids past it: per row
// tile 1 MB of centroids and one read of its rows from DRAM: about 10 GB of L2 traffic in all
// against the TF32 kernel's 24 GB.
//
// The float16 values are those of half_rows (ops.h 3e', half_rows.cuh): each row times a power
// of two of its own that brings its largest magnitude into [2^7, 2^8), rounded to nearest.
// A cosine does not change with a row's positive scale, so the labels are those of x at
// float16's 11 significant bits (TF32's, rounded where the tensor cores truncate float32
// operands); prepare_centroids<__half, true> writes each centroid times a power of two of its
// own too (centroids of any magnitude; s_j = 1 / ||c~_j||). Scores are s_j (x_s . c~_j) / ||x_s||
// with ||x_s|| from the scaled float32 values, so rows of any finite magnitude score right (no
// float32 squares of the raw values); 1 / ||x|| goes to row_scale_out for the cluster sums of
// the float32 rows.
//
// Block: 256 threads, two warpgroups (rows 64 w .. 64 w + 63 of the tile each), persistent
// over the row tiles blockIdx.x, + gridDim.x, ... Per row tile:
//  1. convert: warp v takes rows 16 v .. 16 v + 15 in groups of eight (32 float4 loads in flight
//     per lane: 128 KB of the tile per multiprocessor, two round trips; 244 registers, no spills); lane l holds columns 128 m + 4 l .. + 3 (m = 0..3: float4 loads of 512
//     contiguous bytes per warp), the row's largest magnitude and scaled squares reduced over
//     the warp, and stores its four float16 (8 bytes) at slice 2 m + l / 16, chunk (l % 16) / 2,
//     byte 8 (l % 2) of the swizzled row: 16 lanes fill one row's 128-byte slice line, all 32
//     banks, two wavefronts per 256 bytes. Columns past d are stored as zeros (the centroids'
//     padding is zero too, and 0 x NaN would not be).
//  2. label: iterations (centroid tile of 128, slice of 64 float16) in one sequence across
//     row tiles; a ring of kStages 16 KB centroid slices filled by cp.async kAhead iterations
//     ahead (the next tile's first slices land while this tile converts); per iteration each
//     warpgroup issues four m64n128k16 wgmma from its half of the resident slice and the ring
//     stage; after each centroid tile the epilogue of the other wgmma kernels (fold_tile,
//     write_rows) keeps each row's running best.
// With p.prefetch > 0 (EDPAIRS_WGMMA_PREFETCH: here on or off, not a depth), threads 0..127
// name the next row tile's rows to L2
// (prefetch.global.L2) during the first iterations of the current one, so that its conversion
// reads L2 rather than DRAM.
//
// Shared memory: resident tile d_pad / 64 slices x 16 KB (<= 128 KB), ring 6 x 16 KB, 1 KB to
// align both to 1024 bytes, 512 bytes of row factors: 225.5 KB at D = 512 (the limit: 227 KB).
// tests/test_tc_emulation.py replays the conversion's stores against the descriptors' reads and
// the ring's schedule across row tiles.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "assign_wgmma.cuh"
#include "assign_wgmma_epilogue.cuh"
#include "cp_async.cuh"
#include "cuda_check.cuh"
#include "half_rows.cuh"
#include "ptx.cuh"
#include "wgmma.cuh"

namespace edpairs {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;                           // two warpgroups
constexpr int kN = kWgmmaResidentCents;                 // centroids per tile (m64n128k16)
constexpr int kSliceBytes = 128;                        // 64 float16 of K
constexpr int kSliceElems = kSliceBytes / 2;
constexpr int kXSliceBytes = kWgmmaRows * kSliceBytes;  // 16 KB: one slice of the 128 rows
constexpr int kCStageBytes = kN * kSliceBytes;          // 16 KB: one slice of a centroid tile
constexpr int kStages = 6;
constexpr int kAhead = kStages - 2;  // the stage a copy overwrites (it - 2) is free, as in label_tiles
constexpr int kLoadRows = kThreads / 8;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kWgmmaRows / kWarps;  // 16
constexpr int kRowGroup = 8;                       // rows a warp converts at once
constexpr int kGroups = kWgmmaResidentMaxD / 128;  // 128-column groups of a lane (4)
constexpr int kBar = 1;
static_assert(kN % kLoadRows == 0 && kRowsPerWarp % kRowGroup == 0, "loader passes, row groups");
static_assert(kXSliceBytes % 1024 == 0 && kCStageBytes % 1024 == 0, "descriptor alignment");

// Centroid slice q of a row tile's iterations (tile q / slices, slice q % slices) into stage:
// chunk tid % 8 of centroid rows tid / 8 + 32 i.
__device__ __forceinline__ void load_cents(const WgmmaAssignParams& p, const uint32_t stage, const int q,
                                           const int slices, const int tid) {
  const int tile = q / slices;
  const int kt = q - tile * slices;
  const int c = tid % 8;
  const __half* base = static_cast<const __half*>(p.cw) + static_cast<int64_t>(tile) * kN * p.d_pad +
                       kt * kSliceElems + c * 8;
#pragma unroll
  for (int i = 0; i < kN / kLoadRows; ++i) {
    const int r = tid / 8 + kLoadRows * i;
    cp_async_16(stage + swizzled(r, c), base + static_cast<int64_t>(r) * p.d_pad, 16);
  }
}

// Names to L2 the lines q, q + per_tile, ... of row tid of the row tile at row0 (threads < 128):
// over a row tile's iterations, every line of each of its rows once.
__device__ __forceinline__ void prefetch_rows(const WgmmaAssignParams& p, const int64_t row0, const int q,
                                             const int per_tile, const int tid) {
  const int64_t row = row0 + tid;
  if (tid >= kWgmmaRows || row >= p.n) return;
  const float* base = static_cast<const float*>(p.x) + row * p.x_stride;
  // 128-byte lines a row of d float32 starting on a 16-byte boundary can touch; the last one
  // named at the row's last element.
  const int lines = (p.d + 31) / 32 + 1;
  for (int line = q; line < lines; line += per_tile) {
    const int col = 32 * line < p.d ? 32 * line : p.d - 1;
    prefetch_l2(base + col);
  }
}

// Step 1 (top of the file): the rows row0 .. row0 + 127 as float16 into the resident tile xres,
// their score factors 1 / ||x_s|| into fac_s (0 for zero rows and rows past n) and 1 / ||x||
// into p.row_scale_out.
__device__ __forceinline__ void convert_tile(const WgmmaAssignParams& p, unsigned char* xres, float* fac_s,
                                             const int64_t row0, const int slices, const int tid) {
  const int warp = tid / 32;
  const int lane = tid % 32;
  const float* x = static_cast<const float*>(p.x);
#pragma unroll 1
  for (int g = 0; g < kRowsPerWarp; g += kRowGroup) {
    float4 v[kRowGroup][kGroups];
#pragma unroll
    for (int i = 0; i < kRowGroup; ++i) {
      const int64_t row = row0 + warp * kRowsPerWarp + g + i;
      const float* xr = x + (row < p.n ? row : 0) * p.x_stride;
#pragma unroll
      for (int m = 0; m < kGroups; ++m) {
        const int col = 128 * m + 4 * lane;
        float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
        if (row < p.n && col < p.d) {
          if (col + 4 <= p.d) {
            f = *reinterpret_cast<const float4*>(xr + col);  // rows are 16-byte aligned
          } else {
            f.x = xr[col];
            if (col + 1 < p.d) f.y = xr[col + 1];
            if (col + 2 < p.d) f.z = xr[col + 2];
          }
        }
        v[i][m] = f;
      }
    }
#pragma unroll
    for (int i = 0; i < kRowGroup; ++i) {
      const int r = warp * kRowsPerWarp + g + i;
      float big = 0.f;
#pragma unroll
      for (int m = 0; m < kGroups; ++m) {
        big = fmaxf(big, fmaxf(fmaxf(fabsf(v[i][m].x), fabsf(v[i][m].y)), fmaxf(fabsf(v[i][m].z), fabsf(v[i][m].w))));
      }
      const float k = warp_half_row_scale(big);
      float ss = 0.f;
#pragma unroll
      for (int m = 0; m < kGroups; ++m) {
        const float a0 = __fmul_rn(v[i][m].x, k), a1 = __fmul_rn(v[i][m].y, k);
        const float a2 = __fmul_rn(v[i][m].z, k), a3 = __fmul_rn(v[i][m].w, k);
        ss = fmaf(a0, a0, ss);
        ss = fmaf(a1, a1, ss);
        ss = fmaf(a2, a2, ss);
        ss = fmaf(a3, a3, ss);
        const int slice = 2 * m + lane / 16;
        if (slice < slices) {
          const __half2 lo = __floats2half2_rn(a0, a1), hi = __floats2half2_rn(a2, a3);
          uint2 u;
          memcpy(&u.x, &lo, 4);
          memcpy(&u.y, &hi, 4);
          *reinterpret_cast<uint2*>(xres + slice * kXSliceBytes + swizzled(r, (lane % 16) / 2) + 8 * (lane % 2)) = u;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (lane == 0) {
        const int64_t row = row0 + r;
        bool zero = false;
        const float inv = row < p.n ? half_row_rscale(big, ss, k, zero) : 0.f;  // (0 also for NaN / Inf rows)
        fac_s[r] = inv > 0.f ? 1.f / sqrtf(ss) : 0.f;
        if (row < p.n && p.row_scale_out != nullptr) p.row_scale_out[row] = inv;
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1) assign_wgmma_resident_kernel(const WgmmaAssignParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float fac_s[kWgmmaRows];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t xres = (raw + 1023u) & ~1023u;
  unsigned char* xres_ptr = smem_raw + (xres - raw);
  const int slices = p.d_pad / kSliceElems;
  const uint32_t ring = xres + static_cast<uint32_t>(slices * kXSliceBytes);
  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid / 128;
  const int t = tid % 4;
  const int64_t n_tiles = (p.n + kWgmmaRows - 1) / kWgmmaRows;
  const int64_t tiles = n_tiles > blockIdx.x ? (n_tiles - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int per_tile = p.k_tiles * slices;
  const int64_t total = tiles * per_tile;
  WgmmaAssignParams out = p;
  out.row_scale_out = nullptr;  // (convert_tile writes 1 / ||x||; write_rows gets the score factors)

  float acc[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) acc[i] = 0.f;
  float run_val[2] = {-INFINITY, -INFINITY};
  int run_idx[2] = {0, 0};

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < total) load_cents(p, ring + s * kCStageBytes, s % per_tile, slices, tid);
    cp_async_commit();
  }
  int64_t it = 0;
  for (int64_t j = 0; j < tiles; ++j) {
    const int64_t row0 = (static_cast<int64_t>(blockIdx.x) + j * gridDim.x) * kWgmmaRows;
    const int64_t next_row0 = row0 + static_cast<int64_t>(gridDim.x) * kWgmmaRows;
    // Every thread arrives after its warpgroup's last wgmma of the previous tile completed
    // (wgmma_wait<0> in its epilogue) and its rows were written: the tile and fac_s are free.
    // The fence orders those tensor-core reads before the generic stores that overwrite the
    // tile, as the ring's fence does before each refill (once per row tile: no cost to speak of).
    fence_proxy_async();
    named_sync(kBar, kThreads);
    convert_tile(p, xres_ptr, fac_s, row0, slices, tid);
    fence_proxy_async();         // the generic-proxy stores, visible to the tensor cores
    named_sync(kBar, kThreads);  // ... and to both warpgroups; fac_s too
    for (int q = 0; q < per_tile; ++q, ++it) {
      const int stage = static_cast<int>(it % kStages);
      const int tile = q / slices;
      const int kt = q - tile * slices;
      cp_async_wait<kAhead - 1>();  // this thread's copies of iteration it have landed
      fence_proxy_async();
      named_sync(kBar, kThreads);  // iteration it visible to all; every wgmma of it - 2 done
      if (it + kAhead < total) {
        load_cents(p, ring + static_cast<uint32_t>(((it + kAhead) % kStages) * kCStageBytes),
                   static_cast<int>((it + kAhead) % per_tile), slices, tid);
      }
      cp_async_commit();

      const uint32_t xs = xres + static_cast<uint32_t>(kt * kXSliceBytes + wg * (kXSliceBytes / 2));
      const uint32_t cs = ring + static_cast<uint32_t>(stage * kCStageBytes);
      mma_slice<__half, kN>(acc, xs, cs, kt == 0);
      if (p.prefetch > 0 && j + 1 < tiles) prefetch_rows(p, next_row0, q, per_tile, tid);  // beside the batch
      if (kt == slices - 1) {  // the centroid tile is complete: fold it into the running best
        fold_tile<kN>(acc, p, tile * kN, t, run_val, run_idx);
        if (tile == p.k_tiles - 1) {  // and so is the row tile
          if (tid % 4 == 0) write_rows(out, row0, quad_row(tid), fac_s, run_val, run_idx);
          run_val[0] = run_val[1] = -INFINITY;
          run_idx[0] = run_idx[1] = 0;
        }
      }
    }
  }
  wgmma_wait<0>();
  cp_async_wait<0>();
}

int64_t resident_smem_bytes(const int d_pad) {
  return static_cast<int64_t>(d_pad / kSliceElems) * kXSliceBytes + static_cast<int64_t>(kStages) * kCStageBytes + 1024;
}

}  // namespace

void launch_assign_wgmma_resident(const WgmmaAssignParams& p, const cudaStream_t stream) {
  require_wgmma_operands(p, sizeof(float), "assign (wgmma, float16 rows)");
  if (p.d_pad % kSliceElems != 0 || p.d_pad > kWgmmaResidentMaxD || p.d_pad < p.d ||
      static_cast<int64_t>(p.k_tiles) * kN < p.k || p.row_scale != nullptr || p.center != nullptr) {
    fail("assign (wgmma, float16 rows): d = " + std::to_string(p.d) + " padded to " + std::to_string(p.d_pad) +
         ", k = " + std::to_string(p.k) + " in " + std::to_string(p.k_tiles) +
         " tiles, with a center or row scales (an internal error)");
  }
  const int64_t n_tiles = ceil_div(p.n, kWgmmaRows);
  int device = 0;
  int sms = 0;
  EDPAIRS_CUDA_CHECK(cudaGetDevice(&device));
  EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t grid = n_tiles < sms ? n_tiles : sms;  // persistent: one block per multiprocessor
  if (grid < 1) return;
  const int64_t smem = resident_smem_bytes(p.d_pad);
  launch_with_smem(assign_wgmma_resident_kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), smem, stream, p);
}

}  // namespace cuda_detail
}  // namespace edpairs
