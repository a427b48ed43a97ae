// CUDA implementation of the masked per-concept statistics (ops.h §3b). Rows are processed R at
// a time (R = workspace rows); for each step:
//   kernel A (signal_z_kernel): z = W^T x~ + (W^T center - b) for the step's rows, tiled like the
//     assignment GEMM; writes workspace[r] = [M, M * Z] (M = Z > 0) and adds count, sum_z and
//     sum_zz (block-reduced first, then int64 / float64 atomics);
//   kernel B (gram_kernel): [M, M * Z]^T x~ (2I x D) into sum_x (first I rows) and sum_xz
//     (last I rows); computing the transposed product makes these (I, D) writes coalesced.
// The workspace is reused from step to step: stream order puts kernel B of a step before
// kernel A of the next.
#include <cuda_fp16.h>
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

using cuda_detail::accumulate_4x4;
using cuda_detail::ceil_div;
using cuda_detail::minus_center;

constexpr int kThreads = 256;  // 16 x 16: ty picks 4 rows, tx picks 4 concepts
constexpr int kRows = 64;      // rows per block (BM)
constexpr int kConcepts = 64;  // concepts per tile (BN)
constexpr int kStep = 16;      // slice of D staged in shared memory (BK)
constexpr int kPad = 4;
constexpr int kWarps = kThreads / 32;

struct SignalZParams {
  const void* x;         // first row of the step; (rows, D) with row stride x_stride
  int64_t x_stride;
  int64_t rows;          // rows in this step (<= R)
  int d;
  int concepts;          // I
  const float* w;        // (D, I) contiguous
  const float* b;        // (I,)
  const float* center;   // (D,) or null
  float* workspace;      // (R, 2I) contiguous: [mask | mask * z]
  unsigned long long* count;  // (I,) int64
  double* sum_z;         // (I,)
  double* sum_zz;        // (I,)
};

// Grid: x over blocks of kRows rows of the step, y over concept tiles (looping when there are
// more than gridDim.y tiles).
template <class T>
__global__ void __launch_bounds__(kThreads) signal_z_kernel(const SignalZParams p) {
  __shared__ __align__(16) float xs[kStep][kRows + kPad];  // xs[kk][m] = x~[row0 + m][k0 + kk]
  __shared__ __align__(16) float ws[kStep][kConcepts];     // ws[kk][c] = W[k0 + kk][i0 + c]
  __shared__ float bias_s[kConcepts];                      // w_i . center - b_i
  __shared__ double red_z[kWarps][kConcepts];
  __shared__ double red_zz[kWarps][kConcepts];
  __shared__ int red_n[kWarps][kConcepts];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(p.rows - row0 < kRows ? p.rows - row0 : kRows);  // 1..kRows
  const int64_t ld = 2 * static_cast<int64_t>(p.concepts);  // workspace row length

  // x slice loading as in assign: rows ld_m + 16 s, element k0 + ld_k.
  const int ld_k = tid % kStep;
  const int ld_m = tid / kStep;
  // W slice loading: row k0 + w_r + 4 s, column i0 + w_c (coalesced along I).
  const int w_c = tid % kConcepts;
  const int w_r = tid / kConcepts;
  // Threads 64..127 accumulate w_i . center for concept i0 + tid - 64 (increasing k).
  const bool sums_wc = p.center != nullptr && tid >= kRows && tid < kRows + kConcepts;

  const int tiles = (p.concepts + kConcepts - 1) / kConcepts;
  for (int tile = static_cast<int>(blockIdx.y); tile < tiles; tile += static_cast<int>(gridDim.y)) {
    const int i0 = tile * kConcepts;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    }
    float wc = 0.f;

    for (int k0 = 0; k0 < p.d; k0 += kStep) {
      const int kcol = k0 + ld_k;
      const bool k_in = kcol < p.d;
      const float ctr = (k_in && p.center != nullptr) ? p.center[kcol] : 0.f;
#pragma unroll
      for (int s = 0; s < kRows / 16; ++s) {
        const int m = ld_m + 16 * s;
        float v = 0.f;
        if (k_in && m < rows) v = minus_center(x[(row0 + m) * p.x_stride + kcol], ctr);
        xs[ld_k][m] = v;
      }
#pragma unroll
      for (int s = 0; s < kStep / 4; ++s) {
        const int r = w_r + 4 * s;
        const int i = i0 + w_c;
        float v = 0.f;
        if (k0 + r < p.d && i < p.concepts) v = p.w[static_cast<int64_t>(k0 + r) * p.concepts + i];
        ws[r][w_c] = v;
      }
      __syncthreads();

      accumulate_4x4(acc, xs, ws, 4 * ty, 4 * tx);
      if (sums_wc) {
        const int c = tid - kRows;
#pragma unroll
        for (int kk = 0; kk < kStep; ++kk) {
          if (k0 + kk < p.d) wc = fmaf(ws[kk][c], p.center[k0 + kk], wc);
        }
      }
      __syncthreads();  // xs / ws are overwritten by the next slice
    }

    // The readers of the previous tile's bias_s and red_* have passed the barriers of the D
    // loop above (D >= 1), so they can be overwritten now.
    if (tid >= kRows && tid < kRows + kConcepts) {
      const int c = tid - kRows;
      bias_s[c] = i0 + c < p.concepts ? wc - p.b[i0 + c] : 0.f;
    }
    __syncthreads();

    // One concept column jj at a time (keeps few float64 registers live): this thread's 4 rows,
    // then the two ty of a warp (lanes l and l + 16); the 8 warps are summed in order below.
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int c = 4 * tx + jj;
      const int concept_id = i0 + c;
      int cnt = 0;
      double sz = 0.0;
      double szz = 0.0;
      if (concept_id < p.concepts) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = 4 * ty + i;
          if (m >= rows) continue;
          const float z = acc[i][jj] + bias_s[c];
          const bool positive = z > 0.f;
          float* __restrict__ out_row = p.workspace + (row0 + m) * ld;
          out_row[concept_id] = positive ? 1.f : 0.f;
          out_row[p.concepts + concept_id] = positive ? z : 0.f;
          if (positive) {
            cnt += 1;
            sz += static_cast<double>(z);
            szz += static_cast<double>(z) * static_cast<double>(z);
          }
        }
      }
      cnt += __shfl_xor_sync(0xffffffffu, cnt, 16);
      sz += __shfl_xor_sync(0xffffffffu, sz, 16);
      szz += __shfl_xor_sync(0xffffffffu, szz, 16);
      if (lane < 16) {
        red_n[warp][c] = cnt;
        red_z[warp][c] = sz;
        red_zz[warp][c] = szz;
      }
    }
    __syncthreads();
    if (tid < kConcepts && i0 + tid < p.concepts) {
      int n_pos = 0;
      double total_z = 0.0;
      double total_zz = 0.0;
      for (int w = 0; w < kWarps; ++w) {
        n_pos += red_n[w][tid];
        total_z += red_z[w][tid];
        total_zz += red_zz[w][tid];
      }
      if (n_pos > 0) {
        atomicAdd(p.count + i0 + tid, static_cast<unsigned long long>(n_pos));
        atomicAdd(p.sum_z + i0 + tid, total_z);
        atomicAdd(p.sum_zz + i0 + tid, total_zz);
      }
    }
  }
}

// gram_kernel operands for kernel B.
struct WorkspaceRows {  // A: (rows, 2I) workspace, taken as it is
  using Offset = float;
  const float* workspace;
  int64_t ld;
  __device__ Offset offset(int) const { return 0.f; }
  __device__ float value(int64_t row, int col, Offset) const { return workspace[row * ld + col]; }
};

template <class T>
struct CentredRows {  // B: x~ = x - center for the step's rows
  const T* x;
  int64_t x_stride;
  const float* center;  // or null
  using Offset = float;
  __device__ Offset offset(int col) const { return center != nullptr ? center[col] : 0.f; }
  __device__ float value(int64_t row, int col, Offset off) const {
    return minus_center(x[row * x_stride + col], off);
  }
};

struct AddToSignalSums {  // C: (2I, D) -> rows < I into sum_x, the others into sum_xz
  double* sum_x;   // (I, D)
  double* sum_xz;  // (I, D)
  int concepts;
  int d;
  __device__ void operator()(int p, int q, double v) const {
    double* row = p < concepts ? sum_x + static_cast<int64_t>(p) * d
                               : sum_xz + static_cast<int64_t>(p - concepts) * d;
    atomicAdd(row + q, v);
  }
};

// Which kernel computes kernel B: exact float32 products (gram_kernel; the default) or, with
// precision TensorCore or EDPAIRS_SIGNAL_MOMENTS=tf32 (a knob), TF32 ones (gram_tf32_kernel of gram_tc.cuh, for float32 x with
// 16-byte aligned rows and a 16-byte aligned workspace, the exact kernel otherwise). Opt-in
// until the device run measures it; kernel A stays float32 (the masks are exact either way).
inline bool use_tf32_signal() {
  const char* v = std::getenv("EDPAIRS_SIGNAL_MOMENTS");
  return v != nullptr && std::string(v) == "tf32";
}

}  // namespace

void signal_moments_cuda(const SignalMomentsArgs& args, Stream stream) {
  const TensorView& x = args.x;
  cuda_detail::DeviceGuard guard(x.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);

  const int64_t n = x.size(0);
  const int64_t d = x.size(1);
  const int64_t concepts = args.w.size(1);
  if (d < 1 || d > cuda_detail::kMaxExtent || concepts < 1 ||
      2 * concepts > cuda_detail::kMaxExtent) {
    fail("signal_moments: need 1 <= D <= 2^30 and 1 <= I <= 2^29, got x " +
         x.shape_str() + " and W " + args.w.shape_str());
  }
  const int64_t step_rows = args.workspace.size(0);
  if (args.workspace.ndim != 2 || args.workspace.size(1) != 2 * concepts || step_rows < 1) {
    fail("signal_moments: workspace must be (R, 2I) = (R, " + std::to_string(2 * concepts) +
         ") with R >= 1, got " + args.workspace.shape_str());
  }

  auto* count = reinterpret_cast<unsigned long long*>(args.count.ptr<int64_t>());
  double* sum_x = args.sum_x.ptr<double>();
  double* sum_z = args.sum_z.ptr<double>();
  double* sum_zz = args.sum_zz.ptr<double>();
  double* sum_xz = args.sum_xz.ptr<double>();
  const size_t per_concept = static_cast<size_t>(concepts) * sizeof(double);
  const size_t per_matrix = static_cast<size_t>(concepts * d) * sizeof(double);
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(count, 0, static_cast<size_t>(concepts) * sizeof(int64_t), s));
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(sum_x, 0, per_matrix, s));
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(sum_z, 0, per_concept, s));
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(sum_zz, 0, per_concept, s));
  EDPAIRS_CUDA_CHECK(cudaMemsetAsync(sum_xz, 0, per_matrix, s));
  if (n == 0) return;

  const int di = static_cast<int>(d);
  const int ii = static_cast<int>(concepts);
  const int sms = cuda_detail::multiprocessor_count();
  const int64_t concept_tiles = ceil_div(concepts, kConcepts);
  const int64_t tiles_p = ceil_div(2 * concepts, cuda_detail::kGramTile);
  const int64_t tiles_q = ceil_div(d, cuda_detail::kGramTile);
  if (ceil_div(std::min(step_rows, n), kRows) > INT_MAX || tiles_p * tiles_q > INT_MAX) {
    fail("signal_moments: sizes too large for one launch: x " + x.shape_str() + ", W " +
         args.w.shape_str() + ", workspace " + args.workspace.shape_str());
  }

  SignalZParams zp{};
  zp.x_stride = x.stride(0);
  zp.d = di;
  zp.concepts = ii;
  zp.w = args.w.ptr<const float>();
  zp.b = args.b.ptr<const float>();
  zp.center = args.center.present ? args.center.ptr<const float>() : nullptr;
  zp.workspace = args.workspace.ptr<float>();
  zp.count = count;
  zp.sum_z = sum_z;
  zp.sum_zz = sum_zz;

  cuda_detail::dispatch_input_dtype(x, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* xp = static_cast<const T*>(x.data);
    for (int64_t first = 0; first < n; first += step_rows) {
      const int64_t rows = std::min(step_rows, n - first);
      const T* x_step = xp + first * x.stride(0);

      zp.x = x_step;
      zp.rows = rows;
      const dim3 z_grid(static_cast<unsigned>(ceil_div(rows, kRows)),
                        static_cast<unsigned>(std::min<int64_t>(concept_tiles, 65535)));
      signal_z_kernel<T><<<z_grid, kThreads, 0, s>>>(zp);
      EDPAIRS_CUDA_CHECK(cudaGetLastError());

      if constexpr (std::is_same<T, float>::value) {
        if ((args.precision == AssignPrecision::TensorCore || use_tf32_signal()) &&
            cuda_detail::tcg_aligned(x_step, x.stride(0)) &&
            cuda_detail::tcg_aligned(zp.workspace, 2 * concepts)) {
          using cuda_detail::kTcgTile;
          const int64_t tc_p = ceil_div(2 * concepts, kTcgTile);
          const int64_t tc_q = ceil_div(d, kTcgTile);
          const int64_t per = cuda_detail::gram_tf32_rows_per_split(rows, tc_p * tc_q, sms);
          const cuda_detail::TcgOperand opa{zp.workspace, 2 * concepts, 2 * ii, nullptr, nullptr};
          const cuda_detail::TcgOperand opb{x_step, x.stride(0), di, nullptr, zp.center};
          auto kernel = cuda_detail::gram_tf32_kernel<AddToSignalSums>;
          EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                  cuda_detail::kTcgSmemBytes));
          EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                  cudaSharedmemCarveoutMaxShared));
          kernel<<<dim3(static_cast<unsigned>(tc_p * tc_q), static_cast<unsigned>(ceil_div(rows, per))),
                   cuda_detail::kTcgThreads, cuda_detail::kTcgSmemBytes, s>>>(
              opa, opb, AddToSignalSums{sum_x, sum_xz, ii, di}, rows, static_cast<int>(tc_q), per, false);
          EDPAIRS_CUDA_CHECK(cudaGetLastError());
          continue;
        }
      }
      const WorkspaceRows masks{zp.workspace, 2 * concepts};
      const CentredRows<T> centred{x_step, x.stride(0), zp.center};
      const int splits = cuda_detail::gram_row_splits(rows, tiles_p * tiles_q, sms);
      cuda_detail::gram_kernel<<<dim3(static_cast<unsigned>(tiles_p * tiles_q),
                                      static_cast<unsigned>(splits)),
                                 cuda_detail::kGramThreads, 0, s>>>(
          masks, centred, AddToSignalSums{sum_x, sum_xz, ii, di}, rows, 2 * ii, di,
          static_cast<int>(tiles_q), false);
      EDPAIRS_CUDA_CHECK(cudaGetLastError());
    }
  });
}

// ---- the detector epilogue alone (ops.h 3c), for the library-product route ----------------

namespace {

constexpr int kMaskThreads = 256;  // concepts per block (consecutive threads: coalesced rows)
constexpr int kMaskRows = 64;      // rows per block: one float64 atomic per concept and block
constexpr int kMaskAhead = 8;      // rows whose loads a thread issues before it uses any

__device__ __forceinline__ void put_mask(float* o, bool positive, float, float) {
  o[0] = positive ? 1.0f : 0.0f;
}
__device__ __forceinline__ void put_mask(__half* o, bool positive, float, float) {
  o[0] = __float2half_rn(positive ? 1.0f : 0.0f);
}
__device__ __forceinline__ void put_value(float* o, bool positive, float v, float) { o[0] = positive ? v : 0.0f; }
__device__ __forceinline__ void put_value(__half* o, bool positive, float v, float k) {
  o[0] = __float2half_rn(positive ? v * k : 0.0f);
}

// Grid: x over blocks of kMaskThreads concepts, y over blocks of kMaskRows rows (looping when
// there are more row blocks than gridDim.y). OutT float, or __half with scale (ops.h 3c).
template <class OutT>
__global__ void __launch_bounds__(kMaskThreads)
signal_masks_kernel(const float* __restrict__ z, const int64_t rows, const int concepts,
                    OutT* __restrict__ out, const float* __restrict__ scale, const float* __restrict__ shift,
                    const float* __restrict__ alpha, unsigned long long* __restrict__ count,
                    double* __restrict__ sum_z, double* __restrict__ sum_zz) {
  const int i = blockIdx.x * kMaskThreads + threadIdx.x;
  if (i >= concepts) return;
  const float k = scale != nullptr ? scale[i] : 1.0f;
  const float b = shift != nullptr ? shift[i] : 0.0f;
  const float g = shift != nullptr ? alpha[i] : 1.0f;
  const int64_t width = 2 * static_cast<int64_t>(concepts);
  for (int64_t r0 = static_cast<int64_t>(blockIdx.y) * kMaskRows; r0 < rows;
       r0 += static_cast<int64_t>(gridDim.y) * kMaskRows) {
    const int64_t r1 = r0 + kMaskRows < rows ? r0 + kMaskRows : rows;
    unsigned long long c = 0;
    double s = 0.0, ss = 0.0;
    const auto add = [&](const int64_t r, const float zr) {
      const float v = shift != nullptr ? __fadd_rn(__fmul_rn(zr, g), b) : zr;
      const bool positive = v > 0.0f;
      put_mask(out + r * width + i, positive, v, k);
      put_value(out + r * width + concepts + i, positive, v, k);
      if (positive) {
        ++c;
        s += v;
        ss += static_cast<double>(v) * v;
      }
    };
    // Whole batches of kMaskAhead rows: their loads first, then their values (the shift's
    // arithmetic right behind each load made every row wait for the previous one: nvdisasm).
    int64_t r = r0;
    for (; r + kMaskAhead <= r1; r += kMaskAhead) {
      float zr[kMaskAhead];
#pragma unroll
      for (int a = 0; a < kMaskAhead; ++a) zr[a] = z[(r + a) * concepts + i];
#pragma unroll
      for (int a = 0; a < kMaskAhead; ++a) add(r + a, zr[a]);
    }
    for (; r < r1; ++r) add(r, z[r * concepts + i]);
    if (c != 0) {
      atomicAdd(count + i, c);
      atomicAdd(sum_z + i, s);
      atomicAdd(sum_zz + i, ss);
    }
  }
}

}  // namespace

void signal_masks_cuda(const SignalMasksArgs& a, Stream stream) {
  const int64_t rows = a.z.size(0), concepts = a.z.size(1);
  if (rows < 1) return;
  if (concepts < 1 || 2 * concepts > cuda_detail::kMaxExtent) {
    fail("signal_masks: need 1 <= I <= 2^29, got z " + a.z.shape_str());
  }
  cuda_detail::DeviceGuard guard(a.z.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(ceil_div(concepts, kMaskThreads)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kMaskRows), 65535)));
  auto* count = reinterpret_cast<unsigned long long*>(a.count.ptr<int64_t>());
  const float* shift = a.shift.present ? a.shift.ptr<const float>() : nullptr;
  const float* alpha = a.alpha.present ? a.alpha.ptr<const float>() : nullptr;
  if (a.out.dtype == DType::Float16) {
    signal_masks_kernel<__half><<<grid, kMaskThreads, 0, s>>>(
        a.z.ptr<const float>(), rows, static_cast<int>(concepts), a.out.ptr<__half>(), a.scale.ptr<const float>(),
        shift, alpha, count, a.sum_z.ptr<double>(), a.sum_zz.ptr<double>());
  } else {
    signal_masks_kernel<float><<<grid, kMaskThreads, 0, s>>>(
        a.z.ptr<const float>(), rows, static_cast<int>(concepts), a.out.ptr<float>(), nullptr, shift, alpha,
        count, a.sum_z.ptr<double>(), a.sum_zz.ptr<double>());
  }
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace edpairs
