// A first end-to-end check of the emulator: the tensor-core assignment against float64.
#include "harness.h"

using namespace edpairs;
using namespace emu_test;

namespace {

void run_case(int64_t n, int64_t d, int64_t k, AssignPrecision prec) {
  std::vector<float> x = normal(static_cast<size_t>(n * d)), c = normal(static_cast<size_t>(k * d));
  std::vector<int64_t> labels(n, -7), counts(k, -7);
  std::vector<float> scores(n, -7.0f);
  std::vector<double> sums(static_cast<size_t>(k * d), -7.0);
  AssignArgs a;
  a.x = view(x, {n, d}, Device::CUDA);
  a.centroids = view(c, {k, d}, Device::CUDA);
  a.labels = view(labels, {n}, Device::CUDA);
  a.scores = view(scores, {n}, Device::CUDA);
  a.sums = view(sums, {k, d}, Device::CUDA);
  a.counts = view(counts, {k}, Device::CUDA);
  a.check_finite = false;
  a.precision = prec;
  const long wg0 = ::emu::stats().wgmma, mma0 = ::emu::stats().mma_sync;
  assign_cuda(a, nullptr);
  std::printf("  wgmma %ld, mma.sync %ld\n", ::emu::stats().wgmma - wg0, ::emu::stats().mma_sync - mma0);
  std::vector<double> cn(k), best(n, -2.0), ref_sums(static_cast<size_t>(k * d), 0.0);
  std::vector<int64_t> ref_counts(k, 0);
  for (int64_t j = 0; j < k; ++j) {
    double s = 0;
    for (int64_t e = 0; e < d; ++e) s += double(c[j * d + e]) * c[j * d + e];
    cn[j] = std::sqrt(s);
  }
  for (int64_t i = 0; i < n; ++i) {
    double xn = 0;
    for (int64_t e = 0; e < d; ++e) xn += double(x[i * d + e]) * x[i * d + e];
    xn = std::sqrt(xn);
    auto cosine = [&](int64_t j) {
      double s = 0;
      for (int64_t e = 0; e < d; ++e) s += double(x[i * d + e]) * c[j * d + e];
      return s / (xn * cn[j]);
    };
    for (int64_t j = 0; j < k; ++j) best[i] = std::max(best[i], cosine(j));
    const int64_t l = labels[i];
    CHECK(l >= 0 && l < k, "row %ld label %ld", (long)i, (long)l);
    if (l < 0 || l >= k) continue;
    CHECK(cosine(l) >= best[i] - 2e-3, "row %ld: label %ld cos %.6f, best %.6f", (long)i, (long)l, cosine(l), best[i]);
    CHECK(close(scores[i], cosine(l), 0, 2e-3), "row %ld: score %.6f, cos %.6f", (long)i, scores[i], cosine(l));
    ref_counts[l] += 1;
    for (int64_t e = 0; e < d; ++e) ref_sums[l * d + e] += x[i * d + e] / xn;
  }
  for (int64_t j = 0; j < k; ++j) {
    CHECK(counts[j] == ref_counts[j], "cluster %ld: count %ld, labels say %ld", (long)j, (long)counts[j], (long)ref_counts[j]);
    for (int64_t e = 0; e < d; ++e)
      CHECK(close(sums[j * d + e], ref_sums[j * d + e], 1e-4, 1e-5), "sums[%ld][%ld] = %.7g, labels say %.7g", (long)j,
            (long)e, sums[j * d + e], ref_sums[j * d + e]);
  }
}

}  // namespace

EMU_TEST(smoke_assign_wgmma_k200) { run_case(300, 64, 200, AssignPrecision::TensorCore); }
EMU_TEST(smoke_assign_mma_k100) { run_case(300, 64, 100, AssignPrecision::TensorCore); }
EMU_TEST(smoke_assign_small_k40) { run_case(300, 64, 40, AssignPrecision::TensorCore); }
EMU_TEST(smoke_assign_half_k200) { run_case(300, 64, 200, AssignPrecision::TensorCoreHalf); }
EMU_TEST(smoke_assign_simt_k50) { run_case(300, 40, 50, AssignPrecision::Float32); }
