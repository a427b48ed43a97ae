// Spherical centroid update on the CPU: normalised cluster sums, empty clusters keep their
// previous centroid (the estimator re-seeds them).
#include "cpu_common.h"
#include "edpairs/ops.h"

namespace edpairs {

void normalize_centroids_cpu(const NormalizeArgs& a, Stream) {
  const int64_t k = a.sums.size(0), D = a.sums.size(1);
  const double* sums = a.sums.ptr<const double>();
  const int64_t* counts = a.counts.ptr<const int64_t>();
  const float* previous = a.previous.ptr<const float>();
  float* out = a.out.ptr<float>();
  cpu::parallel_for(k, [&](int64_t j, int) {
    const double* s = sums + j * D;
    // The norm is taken of the row scaled by a power of two that brings its largest element
    // into [1, 2): exact, the same result as unscaled where s.s neither overflows nor
    // underflows, and right beyond that (sums of 1e200 or 1e-200).
    double big = 0;
    for (int64_t d = 0; d < D; ++d) big = std::fmax(big, std::fabs(s[d]));
    const int e = big > 0 && std::isfinite(big) ? std::ilogb(big) : 0;
    double sq = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double t = std::ldexp(s[d], -e);
      sq += t * t;
    }
    float* o = out + j * D;
    if (counts[j] > 0 && big > 0 && std::isfinite(big) && sq > 0 && std::isfinite(sq)) {
      const double inv = 1.0 / std::sqrt(sq);
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(std::ldexp(s[d], -e) * inv);
    } else {
      const float* p = previous + j * D;
      std::copy(p, p + D, o);
    }
  });
}

}  // namespace edpairs
