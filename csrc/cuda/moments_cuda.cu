// CUDA implementation of the moments of one chunk (ops.h §3a): the float64 mean of x and the
// centred scatter m2 = sum_n (x_n - mean)(x_n - mean)^T, symmetric with both triangles written.
//
// Queue: zero mean/m2 -> column sums (float64 atomics) -> divide by N -> gram kernel over the
// tiles on or above the diagonal, each x centred on the float64 mean before its rounding to
// float32 -> mirror the upper triangle into the lower one.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "cuda_check.cuh"
#include "dtype_load.cuh"
#include "edpairs/ops.h"
#include "gram.cuh"

namespace edpairs {
namespace {

using cuda_detail::ceil_div;
using cuda_detail::minus_mean;
using cuda_detail::to_double;

constexpr int kSumCols = 32;  // column-sum block: 32 columns (one warp, coalesced) ...
constexpr int kSumRows = 8;   // ... x 8 row lanes

// mean[c] += sum of x[r][c] over the block's rows, in float64 (exact conversion of x).
// Grid: x over column groups of kSumCols, y over row ranges of rows_per_block.
template <class T>
__global__ void __launch_bounds__(kSumCols * kSumRows)
    column_sum_kernel(const T* __restrict__ x, const int64_t x_stride, const int64_t n,
                      const int d, const int64_t rows_per_block, double* __restrict__ mean) {
  __shared__ double partial[kSumRows][kSumCols + 1];
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  const int col = static_cast<int>(blockIdx.x) * kSumCols + tx;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r_end = n < r_begin + rows_per_block ? n : r_begin + rows_per_block;

  double sum = 0.0;
  if (col < d) {
    for (int64_t r = r_begin + ty; r < r_end; r += kSumRows) sum += to_double(x[r * x_stride + col]);
  }
  partial[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && col < d) {
    double total = 0.0;
#pragma unroll
    for (int i = 0; i < kSumRows; ++i) total += partial[i][tx];
    atomicAdd(mean + col, total);
  }
}

__global__ void divide_kernel(double* __restrict__ values, const int count, const double divisor) {
  const int i = static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) +
                static_cast<int>(threadIdx.x);
  if (i < count) values[i] /= divisor;
}

// Rows of x minus the float64 mean (gram_kernel loader): centring before the rounding to
// float32 keeps the products precise however large the mean is compared with the spread.
template <class T>
struct MeanCentredRows {
  using Offset = double;
  const T* x;
  int64_t x_stride;
  const double* mean;
  __device__ Offset offset(int col) const { return mean[col]; }
  __device__ float value(int64_t row, int col, Offset off) const {
    return minus_mean(x[row * x_stride + col], off);
  }
};

struct AddToM2 {
  double* m2;  // (D, D)
  int d;
  __device__ void operator()(int p, int q, double v) const {
    atomicAdd(m2 + static_cast<int64_t>(p) * d + q, v);
  }
};

constexpr int kMirrorTile = 32;  // mirror block: 32 x 8 threads over a 32 x 32 tile
constexpr int kMirrorRows = 8;

// m2[q][p] = m2[p][q] for p < q: the gram kernel computed the tiles on or above the diagonal
// (the diagonal tiles in full); copying makes m2 exactly symmetric. Through shared memory so
// that both the reads and the transposed writes are coalesced. Only upper entries are read and
// only lower entries written, so blocks never race.
// Grid: (tiles, tiles) over 32 x 32 tiles; blocks strictly below the diagonal exit.
__global__ void __launch_bounds__(kMirrorTile * kMirrorRows)
    mirror_upper_kernel(double* __restrict__ m2, const int d) {
  __shared__ double tile[kMirrorTile][kMirrorTile + 1];
  const int tile_p = static_cast<int>(blockIdx.y);
  const int tile_q = static_cast<int>(blockIdx.x);
  if (tile_q < tile_p) return;  // whole block, before the barrier
  const int p0 = tile_p * kMirrorTile;
  const int q0 = tile_q * kMirrorTile;
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);

  const int q = q0 + tx;
  for (int i = ty; i < kMirrorTile; i += kMirrorRows) {
    const int p = p0 + i;
    if (p < d && q < d && p < q) tile[i][tx] = m2[static_cast<int64_t>(p) * d + q];
  }
  __syncthreads();
  // Lower entry (q0 + i, p0 + tx) takes the upper entry (p0 + tx, q0 + i) = tile[tx][i].
  for (int i = ty; i < kMirrorTile; i += kMirrorRows) {
    const int row = q0 + i;
    const int col = p0 + tx;
    if (row < d && col < row) m2[static_cast<int64_t>(row) * d + col] = tile[tx][i];
  }
}


// ---- opt-in TF32 tensor-core scatter (EDPAIRS_MOMENTS=tf32; float32 x, 16-byte aligned rows)
// m2 tiles of 128 x 128 on or above the diagonal, each block summing a contiguous range of
// rows: slices of 32 rows of x (columns p0.. and q0.., 512 bytes per row) through a 3-stage
// cp.async ring; each thread centres the chunks it copied on the float64 mean (as a float
// pair, so the subtraction keeps the mean's precision) and rounds them to TF32 in place before
// the barrier that publishes the slice; 4 warps of 64 x 64 on mma.sync m16n8k8 with the rows of
// x as the reduction dimension. float32 accumulation over the block's range (TF32 rounding
// dominates its error), then one float64 atomic per entry and block. Shared tiles are stored
// [row n][column] with a pitch of 136 words: the fragment loads (lanes g + 8 t apart) hit 32
// distinct banks.
constexpr int kTcTile = 128;
constexpr int kTcThreads = 128;
constexpr int kTcSliceRows = 32;
constexpr int kTcPitch = kTcTile + 8;                        // words
constexpr int kTcStageWords = 2 * kTcSliceRows * kTcPitch;   // A slice then B slice
constexpr int kTcStages = 3;
constexpr int kTcSmemBytes = kTcStages * kTcStageWords * 4;  // 104448
constexpr int kTcChunkRows = kTcThreads / 32;                // rows one loader pass covers

__device__ __forceinline__ uint32_t tf32_bits(float v) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(out) : "f"(v));
  return out;
}
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

struct TcGramParams {
  const float* x;
  int64_t x_stride;
  int64_t n;
  int d;
  int tiles;              // ceil(d / 128)
  int64_t rows_per_split; // multiple of kTcSliceRows
  const double* mean;
  double* m2;
};

__global__ void __launch_bounds__(kTcThreads, 2) moments_tf32_kernel(const TcGramParams p) {
  extern __shared__ __align__(16) uint32_t smem[];
  const int tile_p = static_cast<int>(blockIdx.x) / p.tiles;
  const int tile_q = static_cast<int>(blockIdx.x) % p.tiles;
  if (tile_q < tile_p) return;  // whole block, before any barrier
  const bool diag = tile_p == tile_q;  // B = A: one slice loaded, read twice
  const int p0 = tile_p * kTcTile;
  const int q0 = tile_q * kTcTile;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * p.rows_per_split;
  if (n_begin >= p.n) return;
  const int64_t n_end = p.n < n_begin + p.rows_per_split ? p.n : n_begin + p.rows_per_split;
  const int steps = static_cast<int>((n_end - n_begin + kTcSliceRows - 1) / kTcSliceRows);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warp_m = warp / 2;  // p rows warp_m * 64 ..
  const int warp_n = warp % 2;  // q cols warp_n * 64 ..
  const int g = lane / 4;
  const int t = lane % 4;

  // Loader: thread tid copies 16-byte chunk c = tid % 32 (columns 4c .. 4c + 3) of slice rows
  // tid / 32 + 4 i, for A (columns p0 + ..) and, off the diagonal, B (q0 + ..).
  const int chunk = tid % 32;
  float mean_hi[2][4];
  float mean_lo[2][4];
  int valid_cols[2];
#pragma unroll
  for (int o = 0; o < 2; ++o) {
    const int c0 = (o == 0 ? p0 : q0) + 4 * chunk;
    const int rem = p.d - c0;
    valid_cols[o] = rem < 0 ? 0 : (rem < 4 ? rem : 4);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const double m = e < valid_cols[o] ? p.mean[c0 + e] : 0.0;
      mean_hi[o][e] = static_cast<float>(m);
      mean_lo[o][e] = static_cast<float>(m - static_cast<double>(mean_hi[o][e]));
    }
  }
  const int operands = diag ? 1 : 2;

  auto load = [&](int step, uint32_t* stage) {
    const int64_t r0 = n_begin + static_cast<int64_t>(step) * kTcSliceRows;
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      if (o >= operands) break;
      const int c0 = (o == 0 ? p0 : q0) + 4 * chunk;
#pragma unroll
      for (int i = 0; i < kTcSliceRows / kTcChunkRows; ++i) {
        const int r = tid / 32 + kTcChunkRows * i;
        const int64_t n = r0 + r;
        const int valid = n < n_end ? valid_cols[o] : 0;
        const float* src = valid > 0 ? p.x + n * p.x_stride + c0 : p.x;
        cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(
                        stage + (o * kTcSliceRows + r) * kTcPitch + 4 * chunk)),
                    src, valid * 4);
      }
    }
  };
  // Centre and round this thread's own chunks of a landed slice (rows past n_end stay 0).
  auto centre = [&](int step, uint32_t* stage) {
    const int64_t r0 = n_begin + static_cast<int64_t>(step) * kTcSliceRows;
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      if (o >= operands) break;
#pragma unroll
      for (int i = 0; i < kTcSliceRows / kTcChunkRows; ++i) {
        const int r = tid / 32 + kTcChunkRows * i;
        if (r0 + r < n_end) {
          uint32_t* w = stage + (o * kTcSliceRows + r) * kTcPitch + 4 * chunk;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float v = e < valid_cols[o] ? (__uint_as_float(w[e]) - mean_hi[o][e]) - mean_lo[o][e] : 0.f;
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
  for (int s = 0; s < kTcStages - 1; ++s) {
    if (s < steps) load(s, smem + s * kTcStageWords);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    uint32_t* stage = smem + (step % kTcStages) * kTcStageWords;
    cp_async_wait<kTcStages - 2>();
    centre(step, stage);
    __syncthreads();  // slice `step` centred and visible; the stage of step - 1 is free
    {
      const int next = step + kTcStages - 1;
      if (next < steps) load(next, smem + (next % kTcStages) * kTcStageWords);
      cp_async_commit();
    }
    const uint32_t* as = stage;
    const uint32_t* bs = diag ? stage : stage + kTcSliceRows * kTcPitch;
#pragma unroll
    for (int ks = 0; ks < kTcSliceRows / 8; ++ks) {
      const uint32_t* arow = as + (ks * 8 + t) * kTcPitch;
      const uint32_t* brow = bs + (ks * 8 + t) * kTcPitch;
      uint32_t a[4][4];
      uint32_t b[8][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int pc = warp_m * 64 + mi * 16 + g;
        a[mi][0] = arow[pc];
        a[mi][1] = arow[pc + 8];
        a[mi][2] = arow[4 * kTcPitch + pc];
        a[mi][3] = arow[4 * kTcPitch + pc + 8];
      }
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) {
        const int qc = warp_n * 64 + nj * 8 + g;
        b[nj][0] = brow[qc];
        b[nj][1] = brow[4 * kTcPitch + qc];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int nj = 0; nj < 8; ++nj) {
          asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
              "{%8,%9}, {%0,%1,%2,%3};\n"
              : "+f"(acc[mi][nj][0]), "+f"(acc[mi][nj][1]), "+f"(acc[mi][nj][2]), "+f"(acc[mi][nj][3])
              : "r"(a[mi][0]), "r"(a[mi][1]), "r"(a[mi][2]), "r"(a[mi][3]), "r"(b[nj][0]), "r"(b[nj][1]));
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
        if (pp < p.d && qq < p.d) {
          atomicAdd(p.m2 + static_cast<int64_t>(pp) * p.d + qq, static_cast<double>(acc[mi][nj][r]));
        }
      }
    }
  }
}

// Which scatter kernel `moments` uses: "float32" (default; exact float32 products, gram_kernel)
// or "tf32" (EDPAIRS_MOMENTS=tf32: the tensor-core kernel above for float32 x with 16-byte
// aligned rows, the exact kernel otherwise). Opt-in until the device run measures it.
inline bool use_tf32_moments() {
  const char* v = std::getenv("EDPAIRS_MOMENTS");
  return v != nullptr && std::string(v) == "tf32";
}
}  // namespace

void moments_cuda(const MomentsArgs& args, Stream stream) {
  const TensorView& x = args.x;
  cuda_detail::DeviceGuard guard(x.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);

  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  if (d < 1 || d > cuda_detail::kMaxExtent) {
    fail("moments: need 1 <= D <= 2^30, got x " + x.shape_str());
  }
  double* mean = args.mean.ptr<double>();
  double* m2 = args.m2.ptr<double>();

  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(mean, 0, static_cast<size_t>(d) * sizeof(double), s));
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(m2, 0, static_cast<size_t>(d * d) * sizeof(double), s));
  if (n == 0) return;  // ops.h requires N >= 1; leave zeros rather than divide by zero

  const int di = static_cast<int>(d);
  const int sms = cuda_detail::multiprocessor_count();

  // Column sums: enough row ranges to give each SM a few blocks, at least 64 rows per block.
  const int64_t col_blocks = ceil_div(d, kSumCols);
  const int64_t want_y = std::max<int64_t>(1, 4 * static_cast<int64_t>(sms) / col_blocks);
  int64_t rows_per_block = std::max<int64_t>(64, ceil_div(n, want_y));
  rows_per_block = std::max<int64_t>(rows_per_block, ceil_div(n, 65535));
  const int64_t row_blocks = ceil_div(n, rows_per_block);

  // Gram over the tiles on or above the diagonal.
  const int64_t tiles = ceil_div(d, cuda_detail::kGramTile);
  const int64_t upper_tiles = tiles * (tiles + 1) / 2;
  const int splits = cuda_detail::gram_row_splits(n, upper_tiles, sms);
  const int64_t mirror_tiles = ceil_div(d, kMirrorTile);
  if (col_blocks > INT_MAX || tiles * tiles > INT_MAX || mirror_tiles > 65535) {
    fail("moments: D too large for one launch, got x " + x.shape_str());
  }

  cuda_detail::dispatch_input_dtype(x, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = static_cast<const T*>(x.data);

    column_sum_kernel<T>
        <<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks)),
           dim3(kSumCols, kSumRows), 0, s>>>(xp, x.stride(0), n, di, rows_per_block, mean);
    EDPAIRS_CUDA_CHECK(cudaGetLastError());

    divide_kernel<<<static_cast<unsigned>(ceil_div(d, 256)), 256, 0, s>>>(
        mean, di, static_cast<double>(n));
    EDPAIRS_CUDA_CHECK(cudaGetLastError());

    if constexpr (std::is_same<T, float>::value) {
      const bool aligned = reinterpret_cast<uintptr_t>(xp) % 16 == 0 && x.stride(0) % 4 == 0;
      if (use_tf32_moments() && aligned && tiles * tiles <= INT_MAX) {
        const int64_t tc_tiles = ceil_div(d, kTcTile);
        const int64_t tc_upper = tc_tiles * (tc_tiles + 1) / 2;
        // Row ranges: about 4 blocks per SM over the upper tiles, each range at least 4 slices
        // and a whole number of them.
        int64_t splits_tc = std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(sms), tc_upper));
        splits_tc = std::min<int64_t>(splits_tc, std::max<int64_t>(1, ceil_div(n, 4 * kTcSliceRows)));
        splits_tc = std::min<int64_t>(splits_tc, 65535);
        int64_t per = ceil_div(ceil_div(n, splits_tc), kTcSliceRows) * kTcSliceRows;
        splits_tc = ceil_div(n, per);
        TcGramParams tp{xp, x.stride(0), n, di, static_cast<int>(tc_tiles), per, mean, m2};
        EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(moments_tf32_kernel,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize, kTcSmemBytes));
        EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(moments_tf32_kernel,
                                                cudaFuncAttributePreferredSharedMemoryCarveout,
                                                cudaSharedmemCarveoutMaxShared));
        moments_tf32_kernel<<<dim3(static_cast<unsigned>(tc_tiles * tc_tiles),
                                   static_cast<unsigned>(splits_tc)),
                              kTcThreads, kTcSmemBytes, s>>>(tp);
        EDPAIRS_CUDA_CHECK(cudaGetLastError());
        return;
      }
    }
    const MeanCentredRows<T> rows{xp, x.stride(0), mean};
    cuda_detail::gram_kernel<<<dim3(static_cast<unsigned>(tiles * tiles),
                                    static_cast<unsigned>(splits)),
                               cuda_detail::kGramThreads, 0, s>>>(
        rows, rows, AddToM2{m2, di}, n, di, di, static_cast<int>(tiles), true);
    EDPAIRS_CUDA_CHECK(cudaGetLastError());
  });

  mirror_upper_kernel<<<dim3(static_cast<unsigned>(mirror_tiles),
                             static_cast<unsigned>(mirror_tiles)),
                        dim3(kMirrorTile, kMirrorRows), 0, s>>>(m2, di);
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace edpairs
