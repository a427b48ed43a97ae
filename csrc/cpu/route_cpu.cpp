// CPU versions of the assignment's pieces on the library-product route (ops.h 3d). On CUDA
// they run between cuBLAS products; here they serve CPU torch tensors that call the route's
// code directly (its tests) and are the reference the CUDA versions are checked against.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "edpairs/ops.h"

namespace edpairs {

void argmax_rows_cpu(const ArgmaxRowsArgs& a, Stream) {
  using namespace cpu;
  const Matrix X = matrix_of(a.x);
  const int64_t R = a.scores.size(0), k = a.scores.size(1), D = X.cols;
  const float* center = optional_f32(a.center);
  const float* row_scale = optional_f32(a.row_scale);
  const float* scores = a.scores.ptr<const float>();
  const float* s = a.col_scale.ptr<const float>();
  const float* C = optional_f32(a.centroids);
  const float* cnorm = C != nullptr ? a.cnorm.ptr<const float>() : nullptr;
  int64_t* labels = a.labels.ptr<int64_t>();
  float* best = a.best.ptr<float>();
  float* rscale = a.rscale.ptr<float>();
  constexpr int64_t kBlock = 256;  // rows per task: one row buffer per task, not per row
  const bool need_row = row_scale == nullptr || C != nullptr;
  parallel_for((R + kBlock - 1) / kBlock, [&](int64_t task, int) {
    std::vector<float> row(need_row ? static_cast<size_t>(D) : 0);  // x - center
    for (int64_t r = task * kBlock; r < std::min(R, (task + 1) * kBlock); ++r) {
      if (need_row) load_row(X, center, r, 0, D, row.data());
      float rs;
      if (row_scale != nullptr) {
        rs = row_scale[r];
      } else {
        float ss = 0.f;
        for (float v : row) ss += v * v;
        rs = ss > 0.f ? 1.0f / std::sqrt(ss) : 0.f;
      }
      // The first maximum and the runner-up (larger value, then smaller index).
      const float* sr = scores + r * k;
      constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
      float bv = -std::numeric_limits<float>::infinity(), sv = bv;
      int64_t bi = kNone, si = kNone;
      for (int64_t j = 0; j < k; ++j) {
        const float v = sr[j] * s[j];
        if (v > bv) {
          sv = bv, si = bi;
          bv = v, bi = j;
        } else if (v > sv) {
          sv = v, si = j;
        }
      }
      if (C != nullptr && rs > 0.f && bi != kNone && si != kNone) {
        // The bound of the TF32 product of the centred row (the route centres before it).
        double xx = 0.0;
        for (float v : row) xx += static_cast<double>(v) * v;
        const double tol = std::ldexp(1.0, -9) * std::sqrt(xx) *
                           (std::fabs(static_cast<double>(s[bi])) * cnorm[bi] +
                            std::fabs(static_cast<double>(s[si])) * cnorm[si]);
        if (static_cast<double>(bv) - static_cast<double>(sv) <= tol) {
          double db = 0.0, ds = 0.0;
          for (int64_t d = 0; d < D; ++d) {
            db += static_cast<double>(row[static_cast<size_t>(d)]) * C[bi * D + d];
            ds += static_cast<double>(row[static_cast<size_t>(d)]) * C[si * D + d];
          }
          const double vb = s[bi] * db, vs = s[si] * ds;
          if (vs > vb || (vs == vb && si < bi)) {
            bv = static_cast<float>(vs), bi = si;
          } else {
            bv = static_cast<float>(vb);
          }
        }
      }
      // bi stays kNone only when every score was NaN (unchecked non-finite input): label 0 and,
      // as in assign, score NaN.
      const bool scored = rs > 0.f && bi != kNone;
      labels[r] = scored ? bi : 0;
      best[r] = scored ? rs * bv : (rs > 0.f ? std::numeric_limits<float>::quiet_NaN() : 0.f);
      rscale[r] = rs;
    }
  });
}

void cluster_sums_cpu(const ClusterSumsArgs& a, Stream) {
  using namespace cpu;
  const Matrix X = matrix_of(a.x);
  const int64_t N = X.rows, D = X.cols, k = a.sums.size(0);
  const float* center = optional_f32(a.center);
  const int64_t* labels = a.labels.ptr<const int64_t>();
  const float* rscale = a.rscale.ptr<const float>();
  double* sums = a.sums.ptr<double>();
  int64_t* counts = a.counts.ptr<int64_t>();
  std::fill(sums, sums + k * D, 0.0);
  std::fill(counts, counts + k, int64_t{0});
  std::vector<float> row(static_cast<size_t>(D));
  for (int64_t n = 0; n < N; ++n) {
    const int64_t j = labels[n];
    if (j < 0 || j >= k)
      fail("cluster_sums: labels must lie in [0, " + std::to_string(k) + "), got " + std::to_string(j) +
           " at row " + std::to_string(n));
    counts[j] += 1;
    const double r = rscale[n];
    if (r == 0.0) continue;
    load_row(X, center, n, 0, D, row.data());
    for (int64_t d = 0; d < D; ++d) sums[j * D + d] += r * static_cast<double>(row[static_cast<size_t>(d)]);
  }
}

namespace {

// out[r] = x_r - shift (float32, rows of D), or float16((x_r - shift) * scale) into out16;
// colsum += the float32 values' column sums (float64) when given; colmax (with out16) the
// largest |scaled value| of each column (NaN passed over).
void centre_rows_into(const cpu::Matrix& X, const float* shift, float* out, double* colsum,
                      uint16_t* out16 = nullptr, const float* scale = nullptr, float* colmax = nullptr) {
  using namespace cpu;
  const int64_t R = X.rows, D = X.cols;
  constexpr int64_t kBlock = 256;  // rows per task; the tasks' column sums are added in order
  const int64_t tasks = (R + kBlock - 1) / kBlock;
  std::vector<double> part(colsum != nullptr ? static_cast<size_t>(tasks * D) : 0, 0.0);
  std::vector<float> top(colmax != nullptr ? static_cast<size_t>(tasks * D) : 0, 0.f);
  parallel_for(tasks, [&](int64_t task, int) {
    std::vector<float> row(out16 != nullptr ? static_cast<size_t>(D) : 0);
    for (int64_t r = task * kBlock; r < std::min(R, (task + 1) * kBlock); ++r) {
      float* o = out16 != nullptr ? row.data() : out + r * D;
      load_row(X, shift, r, 0, D, o);
      if (out16 != nullptr)
        for (int64_t d = 0; d < D; ++d) out16[r * D + d] = half_bits(o[d] * scale[d]);
      if (colmax != nullptr) {
        float* t = top.data() + task * D;
        for (int64_t d = 0; d < D; ++d) t[d] = std::fmax(t[d], std::fabs(o[d] * scale[d]));
      }
      if (colsum != nullptr) {
        double* p = part.data() + task * D;
        for (int64_t d = 0; d < D; ++d) p[d] += static_cast<double>(o[d]);
      }
    }
  });
  if (colsum != nullptr) {
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t d = 0; d < D; ++d) colsum[d] += part[static_cast<size_t>(t * D + d)];
  }
  if (colmax != nullptr) {
    for (int64_t t = 0; t < tasks; ++t)
      for (int64_t d = 0; d < D; ++d) colmax[d] = std::fmax(colmax[d], top[static_cast<size_t>(t * D + d)]);
  }
}

}  // namespace

void centre_rows_cpu(const CentreRowsArgs& a, Stream) {
  const bool half = a.out.dtype == DType::Float16;
  centre_rows_into(cpu::matrix_of(a.x), a.shift.ptr<const float>(), half ? nullptr : a.out.ptr<float>(),
                   a.colsum.present ? a.colsum.ptr<double>() : nullptr, half ? a.out.ptr<uint16_t>() : nullptr,
                   half ? a.scale.ptr<const float>() : nullptr, a.colmax.present ? a.colmax.ptr<float>() : nullptr);
}

void half_rows_cpu(const HalfRowsArgs& a, Stream) {
  const cpu::Matrix X = cpu::matrix_of(a.x);
  const int64_t R = X.rows, D = X.cols;
  uint16_t* out = a.out.ptr<uint16_t>();
  float* rscale = a.rscale.ptr<float>();
  cpu::parallel_for(R, [&](int64_t r, int) {
    std::vector<float> x(static_cast<size_t>(D));
    cpu::load_row(X, nullptr, r, 0, D, x.data());
    float big = 0.f;
    for (int64_t d = 0; d < D; ++d) big = std::fmax(big, std::fabs(x[d]));
    int e = 0;
    std::frexp(big, &e);  // big = m 2^e, m in [0.5, 1)
    const float k = std::ldexp(1.f, std::clamp(8 - e, -126, 127));
    float ss = 0.f;  // of the scaled row: no overflow or underflow
    for (int64_t d = 0; d < D; ++d) ss = std::fma(x[d] * k, x[d] * k, ss);
    const double inv = ss > 0 ? static_cast<double>(k) / std::sqrt(static_cast<double>(ss)) : 0.0;
    const bool zero = !(big > 0) || !(inv <= static_cast<double>(std::numeric_limits<float>::max()));
    rscale[r] = zero ? 0.f : static_cast<float>(inv);
    for (int64_t d = 0; d < D; ++d) out[r * D + d] = zero ? 0 : cpu::half_bits(x[d] * k);
  });
}

void centred_gram_cpu(const CentredGramArgs& a, Stream) {
  using namespace cpu;
  const Matrix X = matrix_of(a.x);
  const int64_t N = X.rows, D = X.cols;
  double* m2 = a.m2.ptr<double>();
  std::vector<float> xc(static_cast<size_t>(N * D));  // the centred rows, float32 as on the GPU
  centre_rows_into(X, a.shift.ptr<const float>(), xc.data(), a.colsum.ptr<double>());
  parallel_for(D, [&](int64_t d1, int) {  // task d1 owns row d1 of m2
    for (int64_t n = 0; n < N; ++n) {
      const float* r = xc.data() + n * D;
      const double v = r[d1];
      for (int64_t d2 = d1; d2 < D; ++d2) m2[d1 * D + d2] += v * static_cast<double>(r[d2]);
    }
  });
}

}  // namespace edpairs
