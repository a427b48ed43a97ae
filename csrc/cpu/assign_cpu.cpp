// Fused cosine assignment on the CPU: a blocked float32 GEMM of row blocks of X against the
// packed centroids whose epilogue (argmax, scores, per-cluster sums) runs while the block's
// scores are still in cache. Only an (MC x NC) score tile per thread ever exists.
#include <limits>

#include "cpu_common.h"
#include "edpairs/ops.h"

namespace edpairs {
namespace cpu {
namespace {

constexpr int64_t MC = 72;    // rows per block (a multiple of MR)
constexpr int64_t NC = 1024;  // centroids per score tile (a multiple of NR)

// Depth chunk: the whole of D when it is small enough, else equal chunks of <= 512.
int64_t depth_chunk(int64_t D) {
  int64_t chunks = ceil_div(D, 512);
  return round_up(ceil_div(D, chunks), 8);
}

struct PackedCentroids {
  Buffer<float> data;  // chunk pc (offset pc*kpad) holds kpad/NR panels of kc x NR
  int64_t kpad, KC;
};

PackedCentroids pack_centroids(const Matrix& C, int64_t D, bool check_finite) {
  PackedCentroids P{aligned_buffer<float>(D * round_up(C.rows, NR)), round_up(C.rows, NR), depth_chunk(D)};
  int64_t panels = P.kpad / NR, chunks = ceil_div(D, P.KC);
  const int threads = parallel_width(panels * chunks);
  FiniteFlags flags(threads);
  parallel_for(panels * chunks, [&](int64_t task, int thread) {
    int64_t jr = (task % panels) * NR, pc = (task / panels) * P.KC;
    int64_t kc = std::min(P.KC, D - pc);
    flags.add(thread, pack_b_rows(C, nullptr, jr, pc, kc, P.data.get() + pc * P.kpad + jr * kc));
  }, threads);
  if (check_finite) require_finite(flags.combined(), "C");
  return P;
}

// 1 / sqrt(sumsq) as float32, 0 for a zero vector and for one so short (norm below about
// 2.9e-39) that its inverse is beyond float32: it counts as a zero vector, as on CUDA, where
// its squares underflow.
inline float inverse_norm(const double sumsq) {
  const double inv = sumsq > 0 ? 1.0 / std::sqrt(sumsq) : 0.0;
  return inv <= static_cast<double>(std::numeric_limits<float>::max()) ? static_cast<float>(inv) : 0.f;
}

std::vector<float> default_col_scale(const Matrix& C) {
  std::vector<float> scale(static_cast<size_t>(C.rows));
  std::vector<float> row(static_cast<size_t>(C.cols));
  for (int64_t j = 0; j < C.rows; ++j) {
    load_row(C, nullptr, j, 0, C.cols, row.data());
    double sq = 0;
    for (float v : row) sq += static_cast<double>(v) * v;
    scale[static_cast<size_t>(j)] = inverse_norm(sq);
  }
  return scale;
}

}  // namespace
}  // namespace cpu

void assign_cpu(const AssignArgs& a, Stream) {
  using namespace cpu;
  const Matrix X = matrix_of(a.x), C = matrix_of(a.centroids);
  const int64_t N = X.rows, D = X.cols, k = C.rows;
  const float* center = optional_f32(a.center);
  const float* row_scale = optional_f32(a.row_scale);
  const bool accumulate = a.sums.present;
  if (a.check_finite) {
    require_finite_vector(a.center, "center");
    require_finite_vector(a.row_scale, "row_scale");
    require_finite_vector(a.col_scale, "col_scale");
  }

  const PackedCentroids B = pack_centroids(C, D, a.check_finite);
  std::vector<float> col_scale_default;
  const float* col_scale = optional_f32(a.col_scale);
  if (!col_scale) {
    col_scale_default = default_col_scale(C);
    col_scale = col_scale_default.data();
  }

  int64_t* labels = a.labels.ptr<int64_t>();
  float* scores = a.scores.ptr<float>();
  const int64_t blocks = ceil_div(N, MC);
  const int threads = parallel_width(blocks);
  const int64_t nc_max = std::min<int64_t>(B.kpad, NC);
  const MicroKernel kernel = micro_kernel();
  const ArgmaxFold fold = argmax_fold();

  struct ThreadState {
    Buffer<float> Ap, Ct, row;
    Buffer<double> sums;
    std::vector<int64_t> counts;
  };
  std::vector<ThreadState> state(static_cast<size_t>(threads));
  for (auto& s : state) {
    s.Ap = aligned_buffer<float>(MC * D);
    s.Ct = aligned_buffer<float>(MC * nc_max);
    s.row = aligned_buffer<float>(D);
    if (accumulate) {
      s.sums = aligned_buffer<double>(k * D);
      std::fill(s.sums.get(), s.sums.get() + k * D, 0.0);
      s.counts.assign(static_cast<size_t>(k), 0);
    }
  }
  FiniteFlags flags(threads);

  parallel_for(blocks, [&](int64_t block, int thread) {
    ThreadState& s = state[static_cast<size_t>(thread)];
    const int64_t r0 = block * MC, mc = std::min(MC, N - r0), mpad = round_up(mc, MR);
    float* Ap = s.Ap.get();
    float* Ct = s.Ct.get();

    // Pack the block once for all depth chunks: chunk pc of panel ir sits at ir*D + pc*MR.
    double sumsq[MC] = {};
    float flag = 0.f;
    for (int64_t pc = 0; pc < D; pc += B.KC) {
      const int64_t kc = std::min(B.KC, D - pc);
      for (int64_t ir = 0; ir < mpad; ir += MR) {
        flag += pack_a_rows(X, center, r0 + ir, pc, kc, Ap + ir * D + pc * MR, row_scale ? nullptr : sumsq + ir);
      }
    }
    flags.add(thread, flag);

    float best[MC];
    int64_t best_j[MC];
    for (int64_t i = 0; i < mc; ++i) {
      best[i] = -std::numeric_limits<float>::infinity();
      best_j[i] = 0;
    }
    for (int64_t j0 = 0; j0 < B.kpad; j0 += NC) {
      const int64_t nc = std::min(NC, B.kpad - j0);
      for (int64_t pc = 0; pc < D; pc += B.KC) {
        const int64_t kc = std::min(B.KC, D - pc);
        const float* Bc = B.data.get() + pc * B.kpad;
        for (int64_t jr = 0; jr < nc; jr += NR)
          for (int64_t ir = 0; ir < mpad; ir += MR)
            kernel(kc, Ap + ir * D + pc * MR, Bc + (j0 + jr) * kc, Ct + ir * nc + jr, nc, pc > 0);
      }
      // Fold this tile into the running argmax; strict '>' keeps the lowest index on ties.
      const int64_t jend = std::min(nc, k - j0);
      for (int64_t i = 0; i < mc; ++i) fold(Ct + i * nc, col_scale + j0, jend, j0, best[i], best_j[i]);
    }

    for (int64_t i = 0; i < mc; ++i) {
      const int64_t n = r0 + i;
      const float r = row_scale ? row_scale[n] : inverse_norm(sumsq[i]);
      int64_t label = 0;
      float score = 0.f;
      if (r > 0) {
        label = best_j[i];
        // best stays -inf only when every score was NaN (unchecked non-finite input).
        score = best[i] == -std::numeric_limits<float>::infinity() ? std::numeric_limits<float>::quiet_NaN()
                                                                    : r * best[i];
      }
      labels[n] = label;
      scores[n] = score;
      if (accumulate) {
        s.counts[static_cast<size_t>(label)] += 1;
        if (r > 0) {
          float* row = s.row.get();
          load_row(X, center, n, 0, D, row);
          double* dst = s.sums.get() + label * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += static_cast<double>(r * row[d]);
        }
      }
    }
  }, threads);
  if (a.check_finite) require_finite(flags.combined(), "X");

  if (accumulate) {
    double* sums = a.sums.ptr<double>();
    int64_t* counts = a.counts.ptr<int64_t>();
    parallel_for(k, [&](int64_t j, int) {
      double* dst = sums + j * D;
      std::fill(dst, dst + D, 0.0);
      int64_t cnt = 0;
      for (const auto& s : state) {
        const double* src = s.sums.get() + j * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
        cnt += s.counts[static_cast<size_t>(j)];
      }
      counts[j] = cnt;
    });
  }
}

}  // namespace edpairs
