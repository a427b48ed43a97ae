// The library-product route's kernels: argmax_rows (ops.h 3d), centre_rows (3e) and the
// dispatch of centred_gram (3f, on wgmma: gram_wgmma_cuda.cu).
// argmax_rows on CUDA: the per-row half of the assignment on the library-product
// route, run on each block of scores right after cuBLAS formed it (still in L2 when the block
// is a few tens of MB). One warp per row: the row norm from x (unless row_scale is given),
// then the first maximum of the row's k scores, lanes striding the row (coalesced).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "cuda_check.cuh"
#include "dtype_load.cuh"
#include "gram_wgmma.cuh"
#include "half_rows.cuh"
#include "label_rule.cuh"
#include "edpairs/ops.h"

namespace edpairs {
namespace {

using cuda_detail::ceil_div;
using cuda_detail::half_row_rscale;
using cuda_detail::warp_half_row_scale;
using cuda_detail::minus_center;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

// (v1, i1) before (v0, i0): larger value, then smaller index.
__device__ __forceinline__ bool ahead(float v1, int i1, float v0, int i0) {
  return v1 > v0 || (v1 == v0 && i1 < i0);
}

template <class T>
__global__ void __launch_bounds__(kThreads)
argmax_rows_kernel(const float* __restrict__ scores, const float* __restrict__ col_scale,
                   const int k, const T* __restrict__ x,
                   const int64_t x_stride, const int d, const float* __restrict__ center,
                   const float* __restrict__ row_scale, const int64_t rows,
                   int64_t* __restrict__ labels, float* __restrict__ best,
                   float* __restrict__ rscale, const float* __restrict__ cents,
                   const float* __restrict__ cnorm) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + warp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kWarps) {
    const T* xr = x + r * x_stride;
    float rs;
    float ss = 0.f;  // ||x_r - center||^2: the row norm, and the re-score's bound (the route
                     // multiplies the centred rows)
    if (row_scale != nullptr && cents == nullptr) {
      rs = row_scale[r];
    } else {
      for (int c = lane; c < d; c += 32) {
        const float v = minus_center(xr[c], center != nullptr ? center[c] : 0.f);
        ss = fmaf(v, v, ss);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(kFull, ss, off);
      rs = cuda_detail::row_scale_of(row_scale, r, ss);
    }
    // The first maximum and the runner-up: a lane's indices increase, so '>' keeps its first.
    const float* sr = scores + r * k;
    float bv = -INFINITY, sv = -INFINITY;
    int bi = INT_MAX, si = INT_MAX;
    for (int j = lane; j < k; j += 32) {
      const float v = sr[j] * col_scale[j];
      if (v > bv) {
        sv = bv, si = bi;
        bv = v, bi = j;
      } else if (v > sv) {
        sv = v, si = j;
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float obv = __shfl_xor_sync(kFull, bv, off), osv = __shfl_xor_sync(kFull, sv, off);
      const int obi = __shfl_xor_sync(kFull, bi, off), osi = __shfl_xor_sync(kFull, si, off);
      if (ahead(obv, obi, bv, bi)) {  // the other lane's best leads; ours competes for second
        if (ahead(bv, bi, osv, osi)) {
          sv = bv, si = bi;
        } else {
          sv = osv, si = osi;
        }
        bv = obv, bi = obi;
      } else if (ahead(obv, obi, sv, si)) {
        sv = obv, si = obi;
      }
    }
    if (cents != nullptr && rs > 0.f && bi != INT_MAX && si != INT_MAX) {  // warp-uniform
      const double tol = ldexp(1.0, -9) * sqrt(static_cast<double>(ss)) *
                         (fabs(static_cast<double>(col_scale[bi])) * cnorm[bi] +
                          fabs(static_cast<double>(col_scale[si])) * cnorm[si]);
      if (static_cast<double>(bv) - static_cast<double>(sv) <= tol) {
        double db = 0.0, ds = 0.0;
        for (int c = lane; c < d; c += 32) {
          const double v = minus_center(xr[c], center != nullptr ? center[c] : 0.f);
          db += v * cents[static_cast<int64_t>(bi) * d + c];
          ds += v * cents[static_cast<int64_t>(si) * d + c];
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
          db += __shfl_xor_sync(kFull, db, off);
          ds += __shfl_xor_sync(kFull, ds, off);
        }
        const double vb = col_scale[bi] * db, vs = col_scale[si] * ds;
        if (vs > vb || (vs == vb && si < bi)) {
          bv = static_cast<float>(vs), bi = si;
        } else {
          bv = static_cast<float>(vb);
        }
      }
    }
    if (lane == 0) {
      // bi stays INT_MAX only when every score was NaN (unchecked non-finite input): label 0 and,
      // as on the CPU, score NaN.
      const bool scored = rs > 0.f && bi != INT_MAX;
      labels[r] = scored ? bi : 0;
      best[r] = scored ? rs * bv : (rs > 0.f ? NAN : 0.f);
      rscale[r] = rs;
    }
  }
}

// centre_rows (ops.h 3e): a block owns kCentreRows rows and kCentreThreads groups of 4
// columns; each thread walks its rows, reading its 4 elements (16 bytes for float32: coalesced
// across the warp), writing the 4 centred floats (one 16-byte store where out's rows allow; with
// a float16 out, the 4 values times their power-of-two scales, one 8-byte store) and summing the
// float32 values in float64 (the loads of kCentreAhead rows issued first), then adds its 4 sums
// to colsum (kCentreRows rows per atomic) and,
// with colmax, its 4 largest |scaled values| (an atomicMax on their bits each).
constexpr int kCentreThreads = 128;
constexpr int kCentreRows = 128;

__device__ __forceinline__ void store4(float* o, const float (&v)[4], const float (&)[4]) {
  *reinterpret_cast<float4*>(o) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store4(__half* o, const float (&v)[4], const float (&k)[4]) {
  const __half2 lo = __floats2half2_rn(v[0] * k[0], v[1] * k[1]);
  const __half2 hi = __floats2half2_rn(v[2] * k[2], v[3] * k[3]);
  uint2 q;
  memcpy(&q.x, &lo, 4);
  memcpy(&q.y, &hi, 4);
  *reinterpret_cast<uint2*>(o) = q;
}
__device__ __forceinline__ void store1(float* o, float v, float) { *o = v; }
__device__ __forceinline__ void store1(__half* o, float v, float k) { *o = __float2half_rn(v * k); }

// A thread's 4 elements of a row as loaded (one 16-byte load for float32 in the aligned case).
template <class T>
struct Four {
  T v[4];
};
template <class T>
__device__ __forceinline__ Four<T> load4(const T* xr) {
  Four<T> q;
  if constexpr (std::is_same<T, float>::value) {
    const float4 f = *reinterpret_cast<const float4*>(xr);
    q.v[0] = f.x, q.v[1] = f.y, q.v[2] = f.z, q.v[3] = f.w;
  } else {
#pragma unroll
    for (int u = 0; u < 4; ++u) q.v[u] = xr[u];
  }
  return q;
}

// Rows whose loads a thread of the aligned kernel issues before it uses any (a load's value used
// right behind it made each row wait for the previous one's: tools/load_use.py).
constexpr int kCentreAhead = 4;

template <class T, class OutT, bool kVec>
__global__ void __launch_bounds__(kCentreThreads)
centre_rows_kernel(const T* __restrict__ x, const int64_t x_stride, const int64_t rows, const int d,
                   const float* __restrict__ shift, const float* __restrict__ scale, OutT* __restrict__ out,
                   double* __restrict__ colsum, float* __restrict__ colmax) {
  const int c0 = (static_cast<int>(blockIdx.y) * kCentreThreads + static_cast<int>(threadIdx.x)) * 4;
  if (c0 >= d) return;  // no barriers in this kernel
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kCentreRows;
  const int64_t r1 = r0 + kCentreRows < rows ? r0 + kCentreRows : rows;
  float s[4], k[4];
  float top[4] = {0.f, 0.f, 0.f, 0.f};  // largest |scaled value| (colmax)
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    s[u] = c0 + u < d ? shift[c0 + u] : 0.f;
    k[u] = scale != nullptr && c0 + u < d ? scale[c0 + u] : 1.f;
  }
  const auto add = [&](const float (&v)[4]) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      acc[u] += static_cast<double>(v[u]);
      top[u] = fmaxf(top[u], fabsf(v[u] * k[u]));
    }
  };
  int64_t r = r0;
  if constexpr (kVec) {  // d % 4 == 0, 16-byte aligned rows of x (float32) and of out
    // Whole batches only: a test between a load and its use lets the compiler sink the load
    // behind it (nvdisasm); the last rows go one by one below.
    for (; r + kCentreAhead <= r1; r += kCentreAhead) {
      Four<T> q[kCentreAhead];
#pragma unroll
      for (int a = 0; a < kCentreAhead; ++a) q[a] = load4(x + (r + a) * x_stride + c0);
#pragma unroll
      for (int a = 0; a < kCentreAhead; ++a) {
        float v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = minus_center(q[a].v[u], s[u]);
        store4(out + (r + a) * d + c0, v, k);
        add(v);
      }
    }
  }
  for (; r < r1; ++r) {  // (store1 rounds as store4 does)
    const T* xr = x + r * x_stride + c0;
    OutT* o = out + r * d + c0;
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      v[u] = c0 + u < d ? minus_center(xr[u], s[u]) : 0.f;
      if (c0 + u < d) store1(o + u, v[u], k[u]);
    }
    add(v);
  }
  if (colsum != nullptr) {
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (c0 + u < d) atomicAdd(colsum + c0 + u, acc[u]);
  }
  if (colmax != nullptr) {  // non-negative floats order as their bits do
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (c0 + u < d) atomicMax(reinterpret_cast<unsigned*>(colmax) + c0 + u, __float_as_uint(top[u]));
  }
}

template <class T, class OutT>
void launch_centre_rows(const CentreRowsArgs& a, const T* x, OutT* out, dim3 grid, cudaStream_t s) {
  const int64_t d = a.x.size(1);
  const int64_t align = std::is_same<T, float>::value ? 16 : static_cast<int64_t>(sizeof(T));
  const bool vec = d % 4 == 0 && reinterpret_cast<uintptr_t>(x) % align == 0 &&
                   (a.x.stride(0) * static_cast<int64_t>(sizeof(T))) % align == 0 &&
                   reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const float* scale = a.scale.present ? a.scale.ptr<const float>() : nullptr;
  double* colsum = a.colsum.present ? a.colsum.ptr<double>() : nullptr;
  float* colmax = a.colmax.present ? a.colmax.ptr<float>() : nullptr;
  const auto kernel = vec ? centre_rows_kernel<T, OutT, true> : centre_rows_kernel<T, OutT, false>;
  kernel<<<grid, kCentreThreads, 0, s>>>(x, a.x.stride(0), a.x.size(0), static_cast<int>(d),
                                         a.shift.ptr<const float>(), scale, out, colsum, colmax);
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

// half_rows (ops.h 3e'): one warp per row, kHalfWarps rows per block. The row is read twice:
// its largest magnitude first, then the scaled values (the second read from L1/L2: a row is a
// few KB), so DRAM sees one read of x and one write of the float16 rows.
constexpr int kHalfWarps = 8;

__global__ void __launch_bounds__(kHalfWarps * 32)
half_rows_kernel(const float* __restrict__ x, const int64_t x_stride, const int64_t rows, const int d,
                 __half* __restrict__ out, float* __restrict__ rscale) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kHalfWarps + static_cast<int>(threadIdx.x) / 32;
  if (r >= rows) return;  // whole warps leave together: no block barriers here
  const float* xr = x + r * x_stride;
  float big = 0.f;
  for (int c = lane; c < d; c += 32) big = fmaxf(big, fabsf(xr[c]));
  const float k = warp_half_row_scale(big);
  float ss = 0.f;  // of the scaled row: no overflow or underflow
  for (int c = lane; c < d; c += 32) {
    const float v = __fmul_rn(xr[c], k);
    ss = fmaf(v, v, ss);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  bool zero = false;
  const float inv = half_row_rscale(big, ss, k, zero);
  if (lane == 0) rscale[r] = inv;
  __half* o = out + r * d;
  for (int c = lane; c < d; c += 32) o[c] = zero ? __float2half_rn(0.f) : __float2half_rn(__fmul_rn(xr[c], k));
}

}  // namespace

void half_rows_cuda(const HalfRowsArgs& a, Stream stream) {
  const int64_t rows = a.x.size(0), d = a.x.size(1);
  if (rows < 1 || d < 1) return;
  if (d > INT_MAX - 32) fail("half_rows: D too large: x " + a.x.shape_str());  // (int lane loops)
  cuda_detail::DeviceGuard guard(a.x.device_id);
  const int64_t blocks = ceil_div(rows, kHalfWarps);
  if (blocks > INT_MAX) fail("half_rows: too many rows for one launch: x " + a.x.shape_str());
  half_rows_kernel<<<static_cast<unsigned>(blocks), kHalfWarps * 32, 0, static_cast<cudaStream_t>(stream)>>>(
      a.x.ptr<const float>(), a.x.stride(0), rows, static_cast<int>(d), a.out.ptr<__half>(), a.rscale.ptr<float>());
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

void centre_rows_cuda(const CentreRowsArgs& a, Stream stream) {
  const int64_t rows = a.x.size(0), d = a.x.size(1);
  if (rows < 1 || d < 1) return;
  if (d > INT_MAX - 4 * kCentreThreads) fail("centre_rows: D too large: x " + a.x.shape_str());
  cuda_detail::DeviceGuard guard(a.x.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t row_blocks = ceil_div(rows, kCentreRows);
  const int64_t col_blocks = ceil_div(d, 4 * kCentreThreads);
  if (row_blocks > INT_MAX || col_blocks > 65535) fail("centre_rows: too large for one launch: x " + a.x.shape_str());
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
  cuda_detail::dispatch_input_dtype(a.x, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = static_cast<const T*>(a.x.data);
    if (a.out.dtype == DType::Float16) {
      launch_centre_rows(a, x, a.out.ptr<__half>(), grid, s);
    } else {
      launch_centre_rows(a, x, a.out.ptr<float>(), grid, s);
    }
  });
}

void centred_gram_cuda(const CentredGramArgs& a, Stream stream) {
  const int64_t n = a.x.size(0), d = a.x.size(1);
  if (n < 1 || d < 1) return;
#ifdef EDPAIRS_HAVE_WGMMA
  cuda_detail::DeviceGuard guard(a.x.device_id);
  const std::string cc = cuda_detail::compute_capability();
  if (cc != "9.0") fail("centred_gram runs on compute capability 9.0 (Hopper) only, this GPU is " + cc);
  if (d % 4 != 0 || d > INT_MAX || reinterpret_cast<uintptr_t>(a.x.data) % 16 != 0 || a.x.stride(0) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(a.shift.data) % 16 != 0) {
    fail("centred_gram needs D % 4 == 0 and 16-byte aligned rows of x and shift, got x " + a.x.shape_str() +
         " with row stride " + std::to_string(a.x.stride(0)));
  }
  cuda_detail::WgmmaGramParams p{a.x.ptr<const float>(), a.x.stride(0), n, static_cast<int>(d),
                                 a.shift.ptr<const float>(), a.m2.ptr<double>(), a.colsum.ptr<double>()};
  cuda_detail::launch_centred_gram_wgmma(p, static_cast<cudaStream_t>(stream));
#else
  (void)stream;
  fail("centred_gram: this build has no sm_90a code (90 was not among its CUDA architectures)");
#endif
}

void argmax_rows_cuda(const ArgmaxRowsArgs& a, Stream stream) {
  const int64_t rows = a.scores.size(0), k = a.scores.size(1), d = a.x.size(1);
  if (rows < 1) return;
  if (k < 1 || k > INT_MAX - 32 || d < 1 || d > INT_MAX - 32) {  // (int lane loops step by 32)
    fail("argmax_rows: need 1 <= k, D < 2^31 - 32, got scores " + a.scores.shape_str() + " and x " +
         a.x.shape_str());
  }
  cuda_detail::DeviceGuard guard(a.x.device_id);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, kWarps), 1 << 20));
  cuda_detail::dispatch_input_dtype(a.x, [&](auto tag) {
    using T = typename decltype(tag)::type;
    argmax_rows_kernel<T><<<grid, kThreads, 0, s>>>(
        a.scores.ptr<const float>(), a.col_scale.ptr<const float>(), static_cast<int>(k),
        static_cast<const T*>(a.x.data),
        a.x.stride(0), static_cast<int>(d), a.center.present ? a.center.ptr<const float>() : nullptr,
        a.row_scale.present ? a.row_scale.ptr<const float>() : nullptr, rows,
        a.labels.ptr<int64_t>(), a.best.ptr<float>(), a.rscale.ptr<float>(),
        a.centroids.present ? a.centroids.ptr<const float>() : nullptr,
        a.centroids.present ? a.cnorm.ptr<const float>() : nullptr);
    EDPAIRS_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace edpairs
