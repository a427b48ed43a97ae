// Masked per-concept statistics on the CPU. Per superblock of rows: (1) Z = X~ W with the
// detector epilogue (mask, per-concept count / sum z / sum z^2), writing [M, M*Z] straight
// into packed panels; (2) one masked product X~^T [M, M*Z] over output macro-tiles, float32
// over the superblock and float64 across superblocks.
#include "cpu_common.h"
#include "edpairs/ops.h"

namespace edpairs {
namespace cpu {
namespace {

constexpr int64_t MC = 72;       // rows per phase-1 task
constexpr int64_t R = 7 * MC;    // rows per superblock (float32 depth of phase 2)

int64_t depth_chunk(int64_t D) {
  int64_t chunks = ceil_div(D, 512);
  return round_up(ceil_div(D, chunks), 8);
}

}  // namespace
}  // namespace cpu

void signal_moments_cpu(const SignalMomentsArgs& a, Stream) {
  using namespace cpu;
  const Matrix X = matrix_of(a.x), W = matrix_of(a.w);
  const int64_t N = X.rows, D = X.cols, I = W.cols, I2 = 2 * I;
  const float* center = optional_f32(a.center);
  const float* b = a.b.ptr<const float>();
  if (a.check_finite) {
    require_finite_vector(a.center, "center");
    require_finite_vector(a.b, "b");
  }

  // z = w . x~ + (w . center - b): the constant is formed in float64 once.
  const float* w = a.w.ptr<const float>();
  std::vector<float> zoff(static_cast<size_t>(I));
  for (int64_t i = 0; i < I; ++i) {
    double v = -static_cast<double>(b[i]);
    if (center)
      for (int64_t d = 0; d < D; ++d) v += static_cast<double>(w[d * W.s0 + i * W.s1]) * center[d];
    zoff[static_cast<size_t>(i)] = static_cast<float>(v);
  }

  // W packed as the B operand of phase 1: depth chunk pc at pc*Ipad, panels of kc x NR.
  const int64_t Ipad = round_up(I, NR), KC = depth_chunk(D);
  Buffer<float> Wp = aligned_buffer<float>(D * Ipad);
  float wflag = 0.f;
  for (int64_t pc = 0; pc < D; pc += KC) {
    const int64_t kc = std::min(KC, D - pc);
    for (int64_t jr = 0; jr < Ipad; jr += NR) wflag += pack_b_cols(W, nullptr, pc, jr, kc, Wp.get() + pc * Ipad + jr * kc);
  }
  if (a.check_finite) require_finite(wflag, "W");

  const int64_t a_panels = ceil_div(D, MR), z_panels = ceil_div(I2, NR);
  Buffer<float> Acols = aligned_buffer<float>(a_panels * MR * R);  // X~ of the superblock, transposed panels
  Buffer<float> Zp = aligned_buffer<float>(z_panels * NR * R);      // [M, M*Z] of the superblock, B panels
  std::vector<double> S(static_cast<size_t>(D * I2), 0.0);          // X~^T [M, M*Z], float64

  const int threads1 = parallel_width(R / MC);
  struct Phase1State {
    Buffer<float> Ap, Ct, row;
    std::vector<int64_t> count;
    std::vector<double> sz, szz;
  };
  std::vector<Phase1State> st(static_cast<size_t>(threads1));
  for (auto& s : st) {
    s.Ap = aligned_buffer<float>(MC * D);
    s.Ct = aligned_buffer<float>(MC * Ipad);
    s.row = aligned_buffer<float>(std::max(column_panels_row(D), round_up(I2, NR)));
    s.count.assign(static_cast<size_t>(I), 0);
    s.sz.assign(static_cast<size_t>(I), 0.0);
    s.szz.assign(static_cast<size_t>(I), 0.0);
  }
  FiniteFlags flags(threads1);

  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t i0 = 0; i0 < D; i0 += TM)
    for (int64_t j0 = 0; j0 < I2; j0 += TN) tiles.emplace_back(i0, j0);
  const int threads2 = parallel_width(static_cast<int64_t>(tiles.size()));
  std::vector<Buffer<float>> tile_acc;
  for (int t = 0; t < threads2; ++t) tile_acc.push_back(aligned_buffer<float>(TM * TN));
  const MicroKernel kernel = micro_kernel();

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    // Phase 1: tasks of MC rows; each packs its rows for both phases and applies the detector.
    parallel_for(ceil_div(rows, MC), [&](int64_t task, int thread) {
      Phase1State& s = st[static_cast<size_t>(thread)];
      const int64_t t0 = task * MC, mc = std::min(MC, rows - t0), mpad = round_up(mc, MR);
      float flag = 0.f;
      for (int64_t pc = 0; pc < D; pc += KC) {
        const int64_t kc = std::min(KC, D - pc);
        for (int64_t ir = 0; ir < mpad; ir += MR)
          flag += pack_a_rows(X, center, r0 + t0 + ir, pc, kc, s.Ap.get() + ir * D + pc * MR);
      }
      flags.add(thread, flag);
      pack_column_panels(X, center, r0 + t0, mc, t0, R, Acols.get(), nullptr, s.row.get());
      for (int64_t pc = 0; pc < D; pc += KC) {
        const int64_t kc = std::min(KC, D - pc);
        for (int64_t jr = 0; jr < Ipad; jr += NR)
          for (int64_t ir = 0; ir < mpad; ir += MR)
            kernel(kc, s.Ap.get() + ir * D + pc * MR, Wp.get() + pc * Ipad + jr * kc, s.Ct.get() + ir * Ipad + jr, Ipad, pc > 0);
      }
      float* zm = s.row.get();  // [M, M*Z] of one row, padded to whole B panels
      for (int64_t r = 0; r < mc; ++r) {
        const float* zrow = s.Ct.get() + r * Ipad;
        std::fill(zm + I2, zm + round_up(I2, NR), 0.f);
        for (int64_t i = 0; i < I; ++i) {
          const float z = zrow[i] + zoff[static_cast<size_t>(i)];
          const bool positive = z > 0;
          zm[i] = positive ? 1.f : 0.f;
          zm[I + i] = positive ? z : 0.f;
          if (positive) {
            s.count[static_cast<size_t>(i)] += 1;
            s.sz[static_cast<size_t>(i)] += z;
            s.szz[static_cast<size_t>(i)] += static_cast<double>(z) * z;
          }
        }
        for (int64_t q = 0; q < z_panels; ++q) std::memcpy(Zp.get() + q * NR * R + (t0 + r) * NR, zm + q * NR, NR * sizeof(float));
      }
    }, threads1);
    // Phase 2: S += X~^T [M, M*Z] over this superblock.
    parallel_for(static_cast<int64_t>(tiles.size()), [&](int64_t t, int thread) {
      const auto [i0, j0] = tiles[static_cast<size_t>(t)];
      add_macro_tile(rows, Acols.get(), Zp.get(), R, i0, j0, D, I2, S.data(), I2, tile_acc[static_cast<size_t>(thread)].get());
    }, threads2);
  }
  if (a.check_finite) require_finite(flags.combined(), "X");

  int64_t* count = a.count.ptr<int64_t>();
  double* sum_x = a.sum_x.ptr<double>();
  double* sum_z = a.sum_z.ptr<double>();
  double* sum_zz = a.sum_zz.ptr<double>();
  double* sum_xz = a.sum_xz.ptr<double>();
  for (int64_t i = 0; i < I; ++i) {
    count[i] = 0;
    sum_z[i] = 0;
    sum_zz[i] = 0;
    for (const auto& s : st) {
      count[i] += s.count[static_cast<size_t>(i)];
      sum_z[i] += s.sz[static_cast<size_t>(i)];
      sum_zz[i] += s.szz[static_cast<size_t>(i)];
    }
    for (int64_t d = 0; d < D; ++d) {
      sum_x[i * D + d] = S[static_cast<size_t>(d * I2 + i)];
      sum_xz[i * D + d] = S[static_cast<size_t>(d * I2 + I + i)];
    }
  }
}

void signal_masks_cpu(const SignalMasksArgs& a, Stream) {
  const int64_t R = a.z.size(0), I = a.z.size(1);
  const float* z = a.z.ptr<const float>();
  const bool half = a.out.dtype == DType::Float16;
  float* out = half ? nullptr : a.out.ptr<float>();
  uint16_t* out16 = half ? a.out.ptr<uint16_t>() : nullptr;
  const float* scale = half ? a.scale.ptr<const float>() : nullptr;
  int64_t* count = a.count.ptr<int64_t>();
  double* sum_z = a.sum_z.ptr<double>();
  double* sum_zz = a.sum_zz.ptr<double>();
  const float* shift = a.shift.present ? a.shift.ptr<const float>() : nullptr;
  const float* alpha = a.alpha.present ? a.alpha.ptr<const float>() : nullptr;
  constexpr uint16_t kHalfOne = 0x3c00u;
  for (int64_t r = 0; r < R; ++r) {
    const float* zr = z + r * I;
    for (int64_t i = 0; i < I; ++i) {
      const float v = shift != nullptr ? zr[i] * alpha[i] + shift[i] : zr[i];
      const bool positive = v > 0.0f;
      if (half) {
        uint16_t* mr = out16 + r * 2 * I;
        mr[i] = positive ? kHalfOne : 0;
        mr[I + i] = positive ? cpu::half_bits(v * scale[i]) : 0;
      } else {
        float* mr = out + r * 2 * I;
        mr[i] = positive ? 1.0f : 0.0f;
        mr[I + i] = positive ? v : 0.0f;
      }
      if (positive) {
        count[i] += 1;
        sum_z[i] += v;
        sum_zz[i] += static_cast<double>(v) * v;
      }
    }
  }
}

}  // namespace edpairs
