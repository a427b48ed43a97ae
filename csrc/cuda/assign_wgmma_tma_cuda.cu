// The wgmma labelling kernel with its loads on the tensor memory accelerator (TMA) and the
// centroid tile shared by a cluster of two blocks (EDPAIRS_ASSIGN_KERNEL=wgmma-tma, float32 x).
// Same products, epilogue and outputs as assign_wgmma_cuda.cu; what changes is how the operands
// reach shared memory:
//  * the kernel of assign_wgmma_cuda.cu moves 48 KB from L2 per slice and block (x 16 KB, the
//    256 centroids 32 KB): about 11 TB/s at the tensor cores' TF32 rate, more than L2 gives.
//    Here the two blocks of a cluster (two row blocks) each load half of the centroid tile and
//    the TMA multicasts it into both: 32 KB per slice and block.
//  * one thread issues two bulk tensor copies per slice instead of 256 threads' 12 cp.async;
//    copies complete on an mbarrier (`full`), and the tiles land in the 128-byte swizzle of
//    wgmma.cuh (the TMA's SWIZZLE_128B is the same pattern).
// Block: 9 warps - warps 0-7 two consumer warpgroups (rows 64 w .. of the block, as in
// assign_wgmma_cuda.cu), warp 8 the producer (lane 0). 4 stages of 48 KB; a stage is refilled
// only after the consumers of both blocks have released it (`empty` counts 2 warpgroups x 2
// blocks: the peer's multicast writes into this block's memory too). Every wait on an mbarrier
// gives up after about 2^22 tries and traps, so a protocol error ends in an error, not a hang.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "assign_wgmma.cuh"
#include "cp_async.cuh"
#include "cuda_check.cuh"
#include "assign_wgmma_epilogue.cuh"
#include "wgmma.cuh"

namespace edpairs {
namespace cuda_detail {
namespace {

constexpr int kConsumers = 256;                      // two warpgroups
constexpr int kThreads = kConsumers + 32;            // + the producer warp
constexpr int kStages = 4;
constexpr int kXTileBytes = kWgmmaRows * 128;        // 16384
constexpr int kCTileBytes = kWgmmaCents * 128;       // 32768
constexpr int kCHalfBytes = kCTileBytes / 2;         // the part one block of the pair loads
constexpr int kStageBytes = kXTileBytes + kCTileBytes;
constexpr int kSmemBytes = kStages * kStageBytes + 1024;
constexpr uint32_t kSpinLimit = 1u << 22;

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t ok;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok != 0;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t spins = 0;
  while (!mbar_try_wait(bar, parity)) {
    if (++spins > kSpinLimit) __trap();
  }
}
// Arrive on the barrier at the same offset in block `cta` of the cluster (this one included).
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [remote];\n}\n" ::"r"(bar),
      "r"(cta)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void consumers_sync() {  // the 256 consumer threads only
  asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers) : "memory");
}
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_load_multicast(uint32_t dst, const CUtensorMap* map, int x, int y, uint32_t bar,
                                                   uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
      " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar), "h"(mask)
      : "memory");
}

__global__ void __launch_bounds__(kThreads, 1)
    assign_wgmma_tma_kernel(const WgmmaAssignParams p, const __grid_constant__ CUtensorMap tmap_x,
                            const __grid_constant__ CUtensorMap tmap_c) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[kStages];
  __shared__ __align__(8) uint64_t empty_bar[kStages];
  __shared__ float row_scale_s[kWgmmaRows];
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;
  const unsigned char* ring_ptr = smem_raw + (ring - raw);

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int lane = tid % 32;
  const uint32_t rank = cluster_rank();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kWgmmaRows;
  const int k_steps = p.d_pad / 32;
  const int total = p.k_tiles * k_steps;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(smem_addr(&full_bar[s]), 1);      // the producer's arrive (with the bytes)
      mbar_init(smem_addr(&empty_bar[s]), 4);     // 2 consumer warpgroups x 2 blocks
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  cluster_sync();

  if (warp == kConsumers / 32) {  // the producer warp
    if (lane == 0) {
      for (int it = 0; it < total; ++it) {
        const int s = it % kStages;
        if (it >= kStages) mbar_wait(smem_addr(&empty_bar[s]), static_cast<uint32_t>((it / kStages - 1) & 1));
        const uint32_t full = smem_addr(&full_bar[s]);
        mbar_arrive_expect_tx(full, kStageBytes);
        const int tile = it / k_steps;
        const int kt = it - tile * k_steps;
        const uint32_t stage = ring + s * kStageBytes;
        tma_load(stage, &tmap_x, kt * 32, static_cast<int>(row0), full);
        tma_load_multicast(stage + kXTileBytes + rank * kCHalfBytes, &tmap_c, kt * 32,
                           tile * kWgmmaCents + static_cast<int>(rank) * (kWgmmaCents / 2), full, 0x3);
      }
    }
    __syncwarp();
  } else {
    const int wg = tid / 128;
    const int warp_in_wg = (tid % 128) / 32;
    const int g = lane / 4;
    const int t = lane % 4;
    const bool sums_row_norm = p.row_scale == nullptr;
    float row_sq = 0.f;  // row tid / 2, half tid % 2 of each slice (tile 0)
    float acc[kWgmmaCents / 2];
#pragma unroll
    for (int i = 0; i < kWgmmaCents / 2; ++i) acc[i] = 0.f;
    float run_val[2] = {-INFINITY, -INFINITY};
    int run_idx[2] = {0, 0};

    for (int it = 0; it < total; ++it) {
      const int s = it % kStages;
      const int tile = it / k_steps;
      const int kt = it - tile * k_steps;
      mbar_wait(smem_addr(&full_bar[s]), static_cast<uint32_t>((it / kStages) & 1));
      if (sums_row_norm && tile == 0) {
        const int r = tid / 2;
        const unsigned char* xs = ring_ptr + s * kStageBytes;
#pragma unroll
        for (int c = 4 * (tid % 2); c < 4 * (tid % 2) + 4; ++c) {
          const float4 q = *reinterpret_cast<const float4*>(xs + swizzled(r, c));
          const float v4[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int col = kt * 32 + 4 * c + u;
            if (col < p.d) {
              const float v = v4[u] - (p.center != nullptr ? p.center[col] : 0.f);
              row_sq = fmaf(v, v, row_sq);
            }
          }
        }
      }
      const uint32_t xs = ring + s * kStageBytes + wg * (kXTileBytes / 2);
      const uint32_t cs = ring + s * kStageBytes + kXTileBytes;
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        wgmma_mma<float, kWgmmaCents>(acc, make_desc(xs + 32 * k), make_desc(cs + 32 * k), (kt == 0 && k == 0) ? 0 : 1);
      }
      wgmma_commit();
      wgmma_wait<1>();
      // The batch of it - 1 is complete: its stage goes back to both blocks' producers.
      if (it > 0 && tid % 128 == 0) {
        const uint32_t empty = smem_addr(&empty_bar[(it - 1) % kStages]);
        mbar_arrive_cluster(empty, 0);
        mbar_arrive_cluster(empty, 1);
      }
      if (kt == k_steps - 1) {
        fold_tile<kWgmmaCents>(acc, p, tile * kWgmmaCents, t, run_val, run_idx);
      }
    }
    wgmma_wait<0>();

    row_sq += __shfl_xor_sync(0xffffffffu, row_sq, 1);  // the two halves of row tid / 2
    if (tid % 2 == 0) row_scale_s[tid / 2] = wgmma_row_scale(p, row0, tid / 2, row_sq);
    consumers_sync();
    if (t == 0) write_rows(p, row0, wg * 64 + warp_in_wg * 16 + g, row_scale_s, run_val, run_idx);
  }
  cluster_sync();  // neither block leaves while its peer may still write into it or arrive on it
}

using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;

EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    EDPAIRS_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    if (f == nullptr || q != cudaDriverEntryPointSuccess) fail("assign (wgmma-tma): the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A 2-D float32 tensor map over (outer, inner) with row pitch `pitch` bytes, boxes of 32 x
// box_outer, the 128-byte swizzle, zero fill outside.
CUtensorMap tensor_map(const void* base, uint64_t inner, uint64_t outer, uint64_t pitch, uint32_t box_outer) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {pitch};
  const cuuint32_t box[2] = {32, box_outer};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, const_cast<void*>(base), dims, strides, box, elem,
                                    CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) fail("assign (wgmma-tma): cuTensorMapEncodeTiled failed with CUresult " + std::to_string(static_cast<int>(r)));
  return map;
}

}  // namespace

void launch_assign_wgmma_tma(const WgmmaAssignParams& p, const cudaStream_t stream) {
  require_wgmma_operands(p, sizeof(float), "assign (wgmma-tma)");
  if (p.x_stride <= 0) {  // a tensor map's pitch is unsigned: reversed or broadcast rows cannot be mapped
    fail("assign (wgmma-tma, EDPAIRS_ASSIGN_KERNEL=wgmma-tma) needs rows in increasing memory order (a positive "
         "row stride), got a row stride of " + std::to_string(p.x_stride) + "; unset the knob or pass a copy");
  }
  const int64_t blocks = 2 * ceil_div(ceil_div(p.n, kWgmmaRows), 2);  // whole clusters of two
  if (blocks > INT_MAX) fail("assign (wgmma-tma): too many rows for one launch: " + std::to_string(p.n));
  const CUtensorMap tx = tensor_map(p.x, static_cast<uint64_t>(p.d), static_cast<uint64_t>(p.n),
                                    static_cast<uint64_t>(p.x_stride) * 4, kWgmmaRows);
  const CUtensorMap tc = tensor_map(p.cw, static_cast<uint64_t>(p.d_pad),
                                    static_cast<uint64_t>(p.k_tiles) * kWgmmaCents, static_cast<uint64_t>(p.d_pad) * 4,
                                    kWgmmaCents / 2);
  EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(assign_wgmma_tma_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(blocks));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 2;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  EDPAIRS_CUDA_CHECK(cudaLaunchKernelEx(&cfg, assign_wgmma_tma_kernel, p, tx, tc));
}

}  // namespace cuda_detail
}  // namespace edpairs
