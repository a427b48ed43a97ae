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
#include "gram_tc.cuh"

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


// Which scatter kernel `moments` uses: exact float32 products (gram_kernel; the default) or, with
// precision TensorCore or EDPAIRS_MOMENTS=tf32 (a knob to switch it without code), TF32 ones
// (gram_tf32_kernel of gram_tc.cuh for float32 x with 16-byte
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
      if ((args.precision == AssignPrecision::TensorCore || use_tf32_moments()) &&
          cuda_detail::tcg_aligned(xp, x.stride(0))) {
        using cuda_detail::kTcgTile;
        const int64_t tc_tiles = ceil_div(d, kTcgTile);
        const int64_t per = cuda_detail::gram_tf32_rows_per_split(n, tc_tiles * (tc_tiles + 1) / 2, sms);
        const cuda_detail::TcgOperand op{xp, x.stride(0), di, mean, nullptr};
        auto kernel = cuda_detail::gram_tf32_kernel<AddToM2>;
        EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                cuda_detail::kTcgSmemBytes));
        EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                cudaSharedmemCarveoutMaxShared));
        kernel<<<dim3(static_cast<unsigned>(tc_tiles * tc_tiles), static_cast<unsigned>(ceil_div(n, per))),
                 cuda_detail::kTcgThreads, cuda_detail::kTcgSmemBytes, s>>>(
            op, op, AddToM2{m2, di}, n, static_cast<int>(tc_tiles), per, true);
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
