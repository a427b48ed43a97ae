// The centred Gram matrix of float32 rows on Hopper's warpgroup MMA (ops.h 3f): for
// x~_n = x_n - shift, m2[d1][d2] += sum_n x~_nd1 x~_nd2 (d1 <= d2, TF32 products, float32 within
// a block's rows, float64 atomics across blocks) and colsum[d] += sum_n x~_nd, in one read of x
// and without a centred copy: the centring happens on the way into shared memory.
//
// The product runs over rows, so its K dimension is n, while x stores a row's features
// contiguously; TF32 wgmma reads only K-major operands. Each slice of 32 rows therefore goes
// through registers: lane l of a warp loads row n0 + l, 4 features at a time (16 bytes), takes
// the shift off, rounds to TF32 (round_tf32: wgmma itself would truncate, a bias that run 5 on
// an H100 measured as a 7.3e-4 relative error against cuBLAS's 3.6e-5), and stores the 4 values
// into 4 rows (features) of the K-major tile, at column l of the 128-byte swizzle of wgmma.cuh.
// For a fixed feature the 32 lanes write the 32 words of one 128-byte row: no bank conflicts.
//
// Output tiles: 128 x 128 features (two warpgroups x 64 rows), only those on or above the
// diagonal (for D = 512: 10 of 16, 62.5% of the full product). Block = one tile and one
// contiguous share of the row slices; blocks of tile row 0 also sum the columns of the
// unrounded centred values (each thread into its own float32 slots in shared memory as it stores
// its B groups, the 32 lanes' slots of a feature added in float64 at the end; float64 slots
// spilled). One block per multiprocessor: 64 accumulators, 8 staged float4 and the loop-invariant
// store offsets take 249 registers (capped at 128 for two blocks, ptxas spilled 360 bytes);
// 128 x 256 tiles (128 accumulators, 12 staged float4) spilled at 255. The loads of slice it + 1
// are in flight while the tensor cores work on slice it.
//
// Pipeline: 3 stages of 32 KB (A and B, 128 features x 32 floats each). In iteration it each
// thread issues the loads of slice it + 1, then each warpgroup its four m64n128k8 wgmma on stage
// it % 3 (one batch kept in flight), then the centred values of slice it + 1 are stored into
// stage (it + 1) % 3, whose last reader (the batch of it - 2) every warpgroup has waited for
// before the barrier that ended iteration it - 1; a fence.proxy.async and one barrier publish it.
// tests/test_tc_emulation.py replays the loader, the tiles and the epilogue in numpy.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>

#include "cp_async.cuh"
#include "cuda_check.cuh"
#include "gram_wgmma.cuh"
#include "wgmma.cuh"

namespace edpairs {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;                 // two warpgroups
constexpr int kSliceRows = 32;                // rows of x per slice: the K of one stage
constexpr int kTileD = 128;                   // output tile: features d1 (64 per warpgroup) ...
constexpr int kTileE = 128;                   // ... x features d2
constexpr int kAcc = 64;                      // accumulators per thread (m64n128)
constexpr int kATileBytes = kTileD * 128;     // 128 features x 32 floats
constexpr int kBTileBytes = kTileE * 128;
constexpr int kStageBytes = kATileBytes + kBTileBytes;  // 32768
constexpr int kStages = 3;
constexpr int kGroups = (kTileD + kTileE) / 4;          // float4 feature groups per slice row
constexpr int kGroupsPerWarp = kGroups / (kThreads / 32);  // 8: groups j < 4 in A, j >= 4 in B
// Column sums (blocks of tile row 0): each thread adds the unrounded centred values it stores
// into B to its own float32 slots, slot (j - 4) * 4 + u at [slot][tid] (conflict-free).
constexpr int kColSlots = (kGroupsPerWarp / 2) * 4;     // 16
constexpr int kSmemBytes = kStages * kStageBytes + kColSlots * kThreads * 4 + 1024;
static_assert(kGroups % (kThreads / 32) == 0 && kTileD % 4 == 0, "loader groups");

// Byte offset of element (row r, K column k) of a K-major swizzled float32 operand tile.
__device__ __forceinline__ uint32_t element_offset(int r, int k) {
  return swizzled(r, k >> 2) + static_cast<uint32_t>((k & 3) * 4);
}

struct Tile {
  int ti, tj;
};

// The t-th tile (row-major over ti, then tj) on or above the diagonal: tile (ti, tj) covers
// d1 in [128 ti, 128 ti + 128), d2 in [128 tj, 128 tj + 128), tj >= ti.
__device__ __forceinline__ Tile tile_of(int t, int n_t) {
  int ti = 0;
  for (; ti < n_t; ++ti) {
    const int count = n_t - ti;
    if (t < count) break;
    t -= count;
  }
  return Tile{ti, ti + t};
}

__global__ void __launch_bounds__(kThreads, 1)
    centred_gram_kernel(const WgmmaGramParams p, const int n_t, const int n_tiles, const int splits) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;
  unsigned char* ring_ptr = smem_raw + (ring - raw);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int wg = tid / 128;
  const Tile tile = tile_of(static_cast<int>(blockIdx.x) % n_tiles, n_t);
  const int split = static_cast<int>(blockIdx.x) / n_tiles;
  const int64_t slices = (p.n + kSliceRows - 1) / kSliceRows;
  const int64_t s_begin = slices * split / splits;
  const int64_t count = slices * (split + 1) / splits - s_begin;
  if (count == 0) return;  // uniform over the block
  const bool sums_columns = tile.ti == 0;

  // The thread's feature groups: q = warp + 8 j; q < 32: A (d1 = 128 ti + 4 q), else B.
  float4 staged[kGroupsPerWarp];

  auto load = [&](int64_t slice) {
    const int64_t row = slice * kSliceRows + lane;
#pragma unroll
    for (int j = 0; j < kGroupsPerWarp; ++j) {
      const int q = warp + 8 * j;
      const int f = q < kTileD / 4 ? tile.ti * kTileD + 4 * q : tile.tj * kTileE + 4 * (q - kTileD / 4);
      staged[j] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (row < p.n && f < p.d) staged[j] = *reinterpret_cast<const float4*>(p.x + row * p.ld + f);
    }
  };
  float* col_slots = reinterpret_cast<float*>(ring_ptr + kStages * kStageBytes);
  float* own_slots = col_slots + tid;  // slot i at own_slots[i * kThreads]
  if (sums_columns) {
#pragma unroll
    for (int i = 0; i < kColSlots; ++i) own_slots[i * kThreads] = 0.f;
  }
  auto store = [&](int64_t slice, int stage) {
    const int64_t row = slice * kSliceRows + lane;
    unsigned char* base = ring_ptr + stage * kStageBytes;
#pragma unroll
    for (int j = 0; j < kGroupsPerWarp; ++j) {
      const int q = warp + 8 * j;
      const bool in_a = q < kTileD / 4;
      const int r0 = in_a ? 4 * q : 4 * (q - kTileD / 4);  // first tile row of the group
      const int f = in_a ? tile.ti * kTileD + r0 : tile.tj * kTileE + r0;
      float v[4] = {staged[j].x, staged[j].y, staged[j].z, staged[j].w};
      if (row < p.n && f < p.d) {  // padding stays 0, not -shift
        const float4 s = *reinterpret_cast<const float4*>(p.shift + f);
        v[0] -= s.x, v[1] -= s.y, v[2] -= s.z, v[3] -= s.w;
      }
      if (!in_a && sums_columns) {
#pragma unroll
        for (int u = 0; u < 4; ++u) own_slots[((j - kGroupsPerWarp / 2) * 4 + u) * kThreads] += v[u];
      }
      unsigned char* t = base + (in_a ? 0 : kATileBytes);
#pragma unroll
      for (int u = 0; u < 4; ++u) *reinterpret_cast<float*>(t + element_offset(r0 + u, lane)) = round_tf32(v[u]);
    }
  };

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;

  load(s_begin);
  store(s_begin, 0);
  fence_proxy_async();
  __syncthreads();

  for (int64_t it = 0; it < count; ++it) {
    const int stage = static_cast<int>(it % kStages);
    if (it + 1 < count) load(s_begin + it + 1);
    const uint32_t a = ring + stage * kStageBytes + wg * (kATileBytes / 2);
    const uint32_t b = ring + stage * kStageBytes + kATileBytes;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s) wgmma_mma<float, 128>(acc, make_desc(a + 32 * s), make_desc(b + 32 * s), (it == 0 && s == 0) ? 0 : 1);
    wgmma_commit();
    wgmma_wait<1>();
    if (it + 1 < count) store(s_begin + it + 1, static_cast<int>((it + 1) % kStages));
    fence_proxy_async();
    __syncthreads();
  }
  wgmma_wait<0>();
  fence_accumulators(acc);  // (else the compiler converts some before the wait: C7514)

  // Upper-triangle entries of this thread's accumulators (the layout of wgmma.cuh).
  const int g = lane / 4, t4 = lane % 4, v = warp % 4;
#pragma unroll
  for (int i = 0; i < kAcc; ++i) {
    const int d1 = tile.ti * kTileD + 64 * wg + 16 * v + g + 8 * ((i / 2) % 2);
    const int d2 = tile.tj * kTileE + 8 * (i / 4) + 2 * t4 + i % 2;
    if (d1 < p.d && d2 < p.d && d2 >= d1) atomicAdd(p.m2 + static_cast<int64_t>(d1) * p.d + d2, static_cast<double>(acc[i]));
  }
  // Feature e = tid of the B tile: group q = 32 + e / 4 (warp q % 8, j = q / 8), component e % 4,
  // summed over the warp's 32 lanes (rows); the loop's last barrier published every slot.
  if (sums_columns && tid < kTileE && tile.tj * kTileE + tid < p.d) {
    const int q = kTileD / 4 + tid / 4;
    const float* slot = col_slots + ((q / 8 - kGroupsPerWarp / 2) * 4 + tid % 4) * kThreads + (q % 8) * 32;
    double sum = 0.0;
    for (int l = 0; l < 32; ++l) sum += static_cast<double>(slot[l]);
    atomicAdd(p.colsum + tile.tj * kTileE + tid, sum);
  }
}

}  // namespace

void launch_centred_gram_wgmma(const WgmmaGramParams& p, const cudaStream_t stream) {
  if (p.n < 1) return;
  const int n_t = static_cast<int>(ceil_div(p.d, kTileD));
  const int n_tiles = n_t * (n_t + 1) / 2;
  // One wave: row splits for every multiprocessor, each split at least 8 slices.
  const int64_t slices = ceil_div(p.n, kSliceRows);
  const int64_t by_rows = ceil_div(slices, 8);
  int64_t splits = multiprocessor_count() / n_tiles;
  splits = splits < 1 ? 1 : (splits > by_rows ? by_rows : splits);
  const int64_t blocks = splits * n_tiles;
  if (blocks > INT_MAX || n_t > 46340) fail("centred_gram: too many tiles for D = " + std::to_string(p.d));
  EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(centred_gram_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  centred_gram_kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(
      p, n_t, n_tiles, static_cast<int>(splits));
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace cuda_detail
}  // namespace edpairs
