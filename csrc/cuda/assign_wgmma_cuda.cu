// Tensor-core assignment on Hopper's warpgroup MMA (wgmma, sm_90a): the products x . c_j of a
// 128-row block against 256-centroid tiles, the argmax folded into each tile's epilogue, never
// an N x k matrix. The labelling kernel of the tensor-core path (assign_tc_cuda.cu) where
// EDPAIRS_ASSIGN_KERNEL=wgmma selects it; prepare_centroids and the sorted sums stay there.
//
// Block: 256 threads = two warpgroups; warpgroup w owns rows 64 w .. 64 w + 63 of the block and
// both share each centroid tile. Per iteration one 128-byte slice of every row (32 float32 or
// 64 16-bit elements) of x and of the tile's centroids lands in shared memory, and each
// warpgroup issues four m64n256 wgmma (k8 TF32 / k16 16-bit, 32 bytes of K each) on it. The
// iterations run over (centroid tile, slice) pairs in one sequence, so the pipeline does not
// drain between tiles; x's slices are re-read for every tile (from L2: 132 blocks x 256 KB in
// flight).
//
// Pipeline: 4 stages of 48 KB (x 16 KB + centroids 32 KB) filled by cp.async from all threads,
// two iterations ahead; wgmma keeps one batch in flight (wait_group 1), so the stage a load
// overwrites (that of iteration it - 2) is free once every thread has passed the barrier of
// iteration it. cp.async writes through the generic proxy and wgmma reads through the async
// proxy: each thread fences (fence.proxy.async) after its copies land, before the barrier.
//
// Shared layout (the 128-byte swizzle of the wgmma operand descriptors, K-major): row r of an
// operand tile holds its slice in 8 chunks of 16 bytes; chunk c is stored at
//   (r / 8) * 1024 + (r % 8) * 128 + ((c ^ (r % 8)) * 16)
// in 1024-byte aligned tiles. Thread tid copies chunk tid % 8 of rows tid / 8 + 32 i, so the 8
// threads of a quarter warp read 128 contiguous bytes of one row and write 8 distinct banks.
// The descriptor of a wgmma step s (32 bytes of K) starts 32 s bytes into the tile's first row
// (the hardware applies the XOR to the address bits 4-6 with bits 7-9), with stride byte offset
// 1024 between 8-row groups; the leading byte offset is unused with this swizzle.
//
// TF32: float32 x is read by the tensor cores as stored (the low 13 mantissa bits ignored, a
// relative error below 2^-10 per element) and the centroids are rounded to TF32 by
// prepare_centroids, so each product's relative error stays below 1.5 x 2^-10 - inside the
// 2^-10-per-operand-pair model of the mma.sync kernel's tests with their factor 2 of slack.
//
// Accumulators (PTX ISA, "wgmma register fragment layout for accumulator matrix D"): in a
// warpgroup, warp v holds rows 16 v .. 16 v + 15; register i of lane l holds
//   row 16 v + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4) + i % 2.
// tests/test_tc_emulation.py replays the loader, the swizzle, the descriptors' addressing and
// this layout in numpy.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "assign_wgmma.cuh"
#include "cp_async.cuh"
#include "cuda_check.cuh"
#include "dtype_load.cuh"

namespace edpairs {
namespace cuda_detail {
namespace {

constexpr int kThreads = 256;             // two warpgroups
constexpr int kStages = 4;
constexpr int kAhead = 2;                 // iterations whose copies are in flight
constexpr int kSliceBytes = 128;
constexpr int kXTileBytes = kWgmmaRows * kSliceBytes;   // 16384
constexpr int kCTileBytes = kWgmmaCents * kSliceBytes;  // 32768
constexpr int kStageBytes = kXTileBytes + kCTileBytes;  // 49152: a multiple of 1024
constexpr int kSmemBytes = kStages * kStageBytes + 1024;  // + slack to align the ring to 1024
constexpr int kLoadRows = kThreads / 8;   // rows one loader pass covers
constexpr int kAcc = kWgmmaCents / 2;     // accumulators per thread (64 x 256 / 128)
static_assert(kAhead <= kStages - 2, "a load may only overwrite the stage of iteration it - 2");
static_assert(kWgmmaRows % kLoadRows == 0 && kWgmmaCents % kLoadRows == 0, "loader passes");

// Byte offset of chunk c of row r in a swizzled operand tile.
__device__ __forceinline__ uint32_t swizzled(int r, int c) {
  return static_cast<uint32_t>((r >> 3) * 1024 + (r & 7) * 128 + ((c ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t make_desc(uint32_t saddr) {
  return static_cast<uint64_t>((saddr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EDPAIRS_WGMMA_AVAILABLE 1
#endif

#define EDPAIRS_WGMMA_D_REGS \
  "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15," \
  "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31," \
  "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47," \
  "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63," \
  "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79," \
  "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95," \
  "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111," \
  "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127"
#define EDPAIRS_WGMMA_D_OPERANDS(d) \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define EDPAIRS_WGMMA_FENCE_OPERANDS(d) \

// d (+)= A(desc) B(desc)^T for one 64 x 256 x (32 bytes of K) step; scale_d = 0 overwrites d.
template <class T>
__device__ __forceinline__ void wgmma_step(float (&d)[kAcc], uint64_t a_desc, uint64_t b_desc, int scale_d) {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  if constexpr (sizeof(T) == 4) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k8.f32.tf32.tf32 {" EDPAIRS_WGMMA_D_REGS
                 "}, %128, %129, p, 1, 1;\n}\n"
                 : EDPAIRS_WGMMA_D_OPERANDS(d)
                 : "l"(a_desc), "l"(b_desc), "r"(scale_d));
  } else if constexpr (std::is_same<T, __half>::value) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {" EDPAIRS_WGMMA_D_REGS
                 "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : EDPAIRS_WGMMA_D_OPERANDS(d)
                 : "l"(a_desc), "l"(b_desc), "r"(scale_d));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {" EDPAIRS_WGMMA_D_REGS
                 "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : EDPAIRS_WGMMA_D_OPERANDS(d)
                 : "l"(a_desc), "l"(b_desc), "r"(scale_d));
  }
#else
  (void)d, (void)a_desc, (void)b_desc, (void)scale_d;
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
#ifdef EDPAIRS_WGMMA_AVAILABLE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
#endif
}
// Pins the accumulators after wgmma_wait<0>: the compiler may not read them earlier. Only there:
// touching them while a batch is in flight makes ptxas insert a wait (warning C7517).
__device__ __forceinline__ void fence_accumulators(float (&d)[kAcc]) {
#pragma unroll
  for (int i = 0; i < kAcc; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Is (v1, i1) better than (v0, i0)? Larger value, then smaller index (ops.h's tie rule).
__device__ __forceinline__ bool better(float v1, int i1, float v0, int i0) {
  return v1 > v0 || (v1 == v0 && i1 < i0);
}

// Issues the copies of iteration `it` (centroid tile it / k_steps, slice it % k_steps) into
// stage `stage` (shared address): chunk tid % 8 of x rows and centroid rows tid / 8 + 32 i.
template <class T>
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
  const T* cbase = cw + static_cast<int64_t>(tile) * kWgmmaCents * p.d_pad + col;
#pragma unroll
  for (int i = 0; i < kWgmmaCents / kLoadRows; ++i) {
    const int r = tid / 8 + kLoadRows * i;
    cp_async_16(stage + kXTileBytes + swizzled(r, c), cbase + static_cast<int64_t>(r) * p.d_pad, 16);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads, 1) assign_wgmma_kernel(const WgmmaAssignParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float row_scale_s[kWgmmaRows];
  constexpr int kElems = kSliceBytes / static_cast<int>(sizeof(T));
  constexpr int kChunkElems = 16 / static_cast<int>(sizeof(T));
  const uint32_t raw = smem_addr(smem_raw);
  const uint32_t ring = (raw + 1023u) & ~1023u;  // stages at ring + s * kStageBytes
  const unsigned char* ring_ptr = smem_raw + (ring - raw);

  const int tid = static_cast<int>(threadIdx.x);
  const int wg = tid / 128;           // warpgroup: rows 64 wg ..
  const int lane = tid % 32;
  const int warp_in_wg = (tid % 128) / 32;
  const int g = lane / 4;
  const int t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kWgmmaRows;
  const int k_steps = p.d_pad / kElems;
  const int total = p.k_tiles * k_steps;

  // Row norms from the thread's own copies of tile 0: rows tid / 8 + 32 i, chunk tid % 8.
  const bool sums_row_norm = p.row_scale == nullptr;
  float row_sq[kWgmmaRows / kLoadRows];
#pragma unroll
  for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) row_sq[i] = 0.f;

  float acc[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
  float run_val[2] = {-INFINITY, -INFINITY};
  int run_idx[2] = {0, 0};

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < total) load_iteration<T>(p, ring + s * kStageBytes, s, k_steps, row0, tid);
    cp_async_commit();
  }

  for (int it = 0; it < total; ++it) {
    const int stage = it % kStages;
    const int tile = it / k_steps;
    const int kt = it - tile * k_steps;
    cp_async_wait<kAhead - 1>();  // this thread's copies of iteration it have landed
    if (sums_row_norm && tile == 0) {
      const int c = tid % 8;
#pragma unroll
      for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) {
        const int r = tid / 8 + kLoadRows * i;
        const T* e = reinterpret_cast<const T*>(ring_ptr + stage * kStageBytes + swizzled(r, c));
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
    __syncthreads();  // iteration it visible to all; every wgmma of iteration it - 2 is done
    if (it + kAhead < total) {
      load_iteration<T>(p, ring + ((it + kAhead) % kStages) * kStageBytes, it + kAhead, k_steps, row0, tid);
    }
    cp_async_commit();

    const uint32_t xs = ring + stage * kStageBytes + wg * (kXTileBytes / 2);
    const uint32_t cs = ring + stage * kStageBytes + kXTileBytes;
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < kSliceBytes / 32; ++s) {
      wgmma_step<T>(acc, make_desc(xs + 32 * s), make_desc(cs + 32 * s), (kt == 0 && s == 0) ? 0 : 1);
    }
    wgmma_commit();
    wgmma_wait<1>();

    if (kt == k_steps - 1) {  // the tile is complete: fold it into the running best
      wgmma_wait<0>();
      fence_accumulators(acc);
      const int j0 = tile * kWgmmaCents;
      float bv[2] = {-INFINITY, -INFINITY};
      int bi[2] = {INT_MAX, INT_MAX};
#pragma unroll
      for (int j = 0; j < kWgmmaCents / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = j0 + 8 * j + 2 * t + e;  // < k_pad
          if (col < p.k) {
            const float sj = p.col_s[col];
            const float oj = p.col_o[col];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float v = sj * (acc[4 * j + 2 * h + e] - oj);
              if (v > bv[h]) {  // own columns in increasing order: the first maximum stays
                bv[h] = v;
                bi[h] = col;
              }
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
  }
  wgmma_wait<0>();  // (already so after the last tile's epilogue; said here for ptxas)
  cp_async_wait<0>();

  // Row scales: the 8 lanes that copied a row's chunks hold its partial sums.
#pragma unroll
  for (int i = 0; i < kWgmmaRows / kLoadRows; ++i) {
    float sq = row_sq[i];
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    const int r = tid / 8 + kLoadRows * i;
    if (tid % 8 == 0) {
      float rs = 0.f;
      if (row0 + r < p.n) {
        if (p.row_scale != nullptr) {
          rs = p.row_scale[row0 + r];
        } else {
          rs = sq > 0.f ? 1.f / sqrtf(sq) : 0.f;
        }
      }
      row_scale_s[r] = rs;
    }
  }
  __syncthreads();

  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wg * 64 + warp_in_wg * 16 + g + 8 * h;
      const int64_t row = row0 + r;
      if (row < p.n) {
        const float rs = row_scale_s[r];
        int label = 0;
        float score = 0.f;
        if (rs > 0.f) {  // rs == 0 (a zero row, or a zero row_scale): label 0, score 0
          const int bi = run_idx[h];
          label = bi >= 0 && bi < p.k ? bi : 0;  // stays 0 when every score was NaN
          score = rs * run_val[h];
        }
        p.labels[row] = label;
        p.scores[row] = score;
        if (p.row_scale_out != nullptr) p.row_scale_out[row] = rs;
      }
    }
  }
}

}  // namespace

void launch_assign_wgmma(const WgmmaAssignParams& p, const DType dtype, const cudaStream_t stream) {
  const int64_t blocks = ceil_div(p.n, kWgmmaRows);
  if (blocks > INT_MAX) fail("assign (wgmma): too many rows for one launch: " + std::to_string(p.n));
  const auto run = [&](auto kernel) {
    EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    kernel<<<static_cast<unsigned>(blocks), kThreads, kSmemBytes, stream>>>(p);
    EDPAIRS_CUDA_CHECK(cudaGetLastError());
  };
  switch (dtype) {
    case DType::Float32: run(assign_wgmma_kernel<float>); return;
    case DType::Float16: run(assign_wgmma_kernel<__half>); return;
    case DType::BFloat16: run(assign_wgmma_kernel<__nv_bfloat16>); return;
    default: fail(std::string("assign (wgmma): x must be float32, float16 or bfloat16, got ") + dtype_name(dtype));
  }
}

}  // namespace cuda_detail
}  // namespace edpairs
