// Moments of a chunk on the CPU: float64 column means, then the centred scatter matrix as a
// symmetric rank-N update (upper macro-tiles only) with float32 micro-tiles summed over
// superblocks of rows and added into float64.
#include "cpu_common.h"
#include "edpairs/ops.h"

namespace edpairs {
namespace cpu {
namespace {

constexpr int64_t kRowsPerTask = 2048;  // pass 1
constexpr int64_t R = 512;              // rows per superblock in pass 2 (float32 depth)
constexpr int64_t kPackRows = 64;       // rows per packing task

void column_sums(const Matrix& X, bool check_finite, double* sums) {
  const int64_t N = X.rows, D = X.cols, tasks = ceil_div(N, kRowsPerTask);
  const int threads = parallel_width(tasks);
  std::vector<std::vector<double>> partial(static_cast<size_t>(threads), std::vector<double>(static_cast<size_t>(D), 0.0));
  FiniteFlags flags(threads);
  parallel_for(tasks, [&](int64_t task, int thread) {
    std::vector<float> row(static_cast<size_t>(D));
    double* acc = partial[static_cast<size_t>(thread)].data();
    float flag = 0.f;
    for (int64_t n = task * kRowsPerTask; n < std::min(N, (task + 1) * kRowsPerTask); ++n) {
      load_row(X, nullptr, n, 0, D, row.data());
      for (int64_t d = 0; d < D; ++d) acc[d] += row[static_cast<size_t>(d)];
      flag += nonfinite_flag(row.data(), D);
    }
    flags.add(thread, flag);
  }, threads);
  if (check_finite) require_finite(flags.combined(), "X");
  std::fill(sums, sums + D, 0.0);
  for (const auto& p : partial)
    for (int64_t d = 0; d < D; ++d) sums[d] += p[static_cast<size_t>(d)];
}

}  // namespace
}  // namespace cpu

void moments_cpu(const MomentsArgs& a, Stream) {
  using namespace cpu;
  const Matrix X = matrix_of(a.x);
  const int64_t N = X.rows, D = X.cols;
  double* mean = a.mean.ptr<double>();
  double* m2 = a.m2.ptr<double>();

  column_sums(X, a.check_finite, mean);
  for (int64_t d = 0; d < D; ++d) mean[d] /= static_cast<double>(N);
  std::vector<float> center(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) center[static_cast<size_t>(d)] = static_cast<float>(mean[d]);
  std::fill(m2, m2 + D * D, 0.0);

  // Column panels of the centred superblock in both packed layouts.
  const int64_t a_panels = ceil_div(D, MR), b_panels = ceil_div(D, NR);
  Buffer<float> Ap = aligned_buffer<float>(a_panels * MR * R);
  Buffer<float> Bp = aligned_buffer<float>(b_panels * NR * R);
  // Upper-triangle macro-tiles (those holding an element with column >= row).
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = 0; i0 < D; i0 += TM)
    for (int64_t j0 = 0; j0 < D; j0 += TN)
      if (j0 + TN - 1 >= i0) tiles.emplace_back(i0, j0);
  const int threads = parallel_width(static_cast<int64_t>(tiles.size()));
  std::vector<Buffer<float>> tile_acc;
  for (int t = 0; t < threads; ++t) tile_acc.push_back(aligned_buffer<float>(TM * TN));

  const int pack_threads = parallel_width(R / kPackRows);
  std::vector<Buffer<float>> row_scratch;
  for (int t = 0; t < pack_threads; ++t) row_scratch.push_back(aligned_buffer<float>(column_panels_row(D)));

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    parallel_for(ceil_div(rows, kPackRows), [&](int64_t task, int thread) {
      const int64_t p0 = task * kPackRows;
      pack_column_panels(X, center.data(), r0 + p0, std::min(kPackRows, rows - p0), p0, R, Ap.get(), Bp.get(),
                         row_scratch[static_cast<size_t>(thread)].get());
    }, pack_threads);
    parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t t, int thread) {
      const auto [i0, j0] = tiles[static_cast<size_t>(t)];
      add_macro_tile(rows, Ap.get(), Bp.get(), R, i0, j0, D, D, m2, D, tile_acc[static_cast<size_t>(thread)].get());
    }, threads);
  }

  // Centred at the float32-rounded mean: remove N * delta delta^T exactly, then mirror.
  std::vector<double> delta(static_cast<size_t>(D));
  for (int64_t d = 0; d < D; ++d) delta[static_cast<size_t>(d)] = mean[d] - static_cast<double>(center[static_cast<size_t>(d)]);
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = i; j < D; ++j) {
      double v = m2[i * D + j] - static_cast<double>(N) * delta[static_cast<size_t>(i)] * delta[static_cast<size_t>(j)];
      m2[i * D + j] = v;
      m2[j * D + i] = v;
    }
}

}  // namespace edpairs
