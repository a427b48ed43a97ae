#include "gemm_cpu.h"

#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EDPAIRS_X86 1
#endif

namespace edpairs::cpu {
namespace {

// ---- element loaders --------------------------------------------------------------------

float half_bits_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal half: renormalise
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// All 65536 halves, so a float16 element costs one table load.
const float* half_table() {
  static const float* table = [] {
    float* t = new float[65536];
    for (uint32_t i = 0; i < 65536; ++i) t[i] = half_bits_to_float(static_cast<uint16_t>(i));
    return t;
  }();
  return table;
}

struct LoadF32 {
  float operator()(const void* p, int64_t i) const { return static_cast<const float*>(p)[i]; }
};
struct LoadF64 {
  float operator()(const void* p, int64_t i) const {
    return static_cast<float>(static_cast<const double*>(p)[i]);
  }
};
struct LoadF16 {
  const float* table = half_table();
  float operator()(const void* p, int64_t i) const { return table[static_cast<const uint16_t*>(p)[i]]; }
};
struct LoadBF16 {
  float operator()(const void* p, int64_t i) const {
    uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};

template <class F>
auto with_loader(DType t, F&& f) {
  switch (t) {
    case DType::Float32: return f(LoadF32{});
    case DType::Float64: return f(LoadF64{});
    case DType::Float16: return f(LoadF16{});
    case DType::BFloat16: return f(LoadBF16{});
    default: throw std::invalid_argument("edpairs: unsupported input dtype in packing");
  }
}

// Row r of m, columns [c0, c0+n), converted into out (unit-stride fast path vectorises).
template <class L>
inline void convert_row(const Matrix& m, const L& load, int64_t r, int64_t c0, int64_t n, float* __restrict out) {
  const int64_t base = r * m.s0 + c0 * m.s1;
  if (m.s1 == 1) {
    for (int64_t p = 0; p < n; ++p) out[p] = load(m.data, base + p);
  } else {
    for (int64_t p = 0; p < n; ++p) out[p] = load(m.data, base + p * m.s1);
  }
}

inline void subtract(float* __restrict v, const float* __restrict c, int64_t n) {
  for (int64_t p = 0; p < n; ++p) v[p] -= c[p];
}

// Copies a slice of m into a panel of width W: dst[p*W + i], zero beyond the operand, centre
// subtracted along columns. Rows case: i walks rows r0+i and p walks columns c0+p; columns
// case: i walks columns c0+i and p walks rows r0+p.
template <int W, class L>
float pack_panel(const Matrix& m, const L& load, const float* center, int64_t r0, int64_t c0,
                 int64_t kc, bool panel_runs_down_rows, float* dst, double* row_sumsq = nullptr) {
  float check = 0.f;
  if (!panel_runs_down_rows) {
    // Convert whole row segments first (vectorisable), then interleave them into the panel.
    constexpr int64_t kChunk = 256;
    alignas(64) float tmp[W][kChunk];
    const int64_t valid = std::min<int64_t>(W, m.rows - r0);
    for (int64_t p0 = 0; p0 < kc; p0 += kChunk) {
      const int64_t n = std::min(kChunk, kc - p0);
      for (int64_t i = 0; i < W; ++i) {
        if (i >= valid) {
          std::fill(tmp[i], tmp[i] + n, 0.f);
          continue;
        }
        convert_row(m, load, r0 + i, c0 + p0, n, tmp[i]);
        if (center) subtract(tmp[i], center + c0 + p0, n);
        check += nonfinite_flag(tmp[i], n);
        if (row_sumsq) row_sumsq[i] += sum_squares(tmp[i], n);
      }
      float* out = dst + p0 * W;
      for (int64_t p = 0; p < n; ++p)
        for (int i = 0; i < W; ++i) out[p * W + i] = tmp[i][p];
    }
  } else {
    const int64_t valid = std::min<int64_t>(W, m.cols - c0);
    for (int64_t p = 0; p < kc; ++p) {
      float* out = dst + p * W;
      convert_row(m, load, r0 + p, c0, valid, out);
      if (center) subtract(out, center + c0, valid);
      check += nonfinite_flag(out, valid);
      for (int64_t i = valid; i < W; ++i) out[i] = 0.f;
    }
  }
  return check;
}

// ---- micro-kernels ----------------------------------------------------------------------

void micro_generic(int64_t kc, const float* A, const float* B, float* C, int64_t ldc, bool accumulate) {
  float acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p) {
    const float* a = A + p * MR;
    const float* b = B + p * NR;
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) C[i * ldc + j] = (accumulate ? C[i * ldc + j] : 0.f) + acc[i][j];
}

void fold_generic(const float* c, const float* scale, int64_t n, int64_t j0, float& best, int64_t& best_j) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = scale[j] * c[j];
    if (v > best) {
      best = v;
      best_j = j0 + j;
    }
  }
}

#ifdef EDPAIRS_X86
// Vector maximum first, then the first index attaining it: the same answer as fold_generic.
__attribute__((target("avx2,fma"))) void fold_avx2(const float* c, const float* scale, int64_t n, int64_t j0,
                                                     float& best, int64_t& best_j) {
  __m256 vmax = _mm256_set1_ps(-__builtin_inff());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)  // max(v, vmax) keeps vmax when v is NaN
    vmax = _mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(scale + j), _mm256_loadu_ps(c + j)), vmax);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = lanes[l] > m ? lanes[l] : m;
  for (; j < n; ++j) {
    const float v = scale[j] * c[j];
    m = v > m ? v : m;
  }
  if (!(m > best)) return;
  for (j = 0; j < n; ++j)
    if (scale[j] * c[j] == m) break;
  best = m;
  best_j = j0 + j;
}

// 6x16 tile in 12 ymm accumulators; per depth step two B loads, six broadcasts, twelve FMAs.
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t kc, const float* A, const float* B,
                                                      float* C, int64_t ldc, bool accumulate) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(B);
    const __m256 b1 = _mm256_load_ps(B + 8);
    __m256 a;
    a = _mm256_broadcast_ss(A + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(A + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(A + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(A + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(A + 4); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(A + 5); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
    A += MR;
    B += NR;
  }
  auto store = [&](int i, __m256 lo, __m256 hi) __attribute__((target("avx2,fma"))) {
    float* c = C + i * ldc;
    if (accumulate) {
      lo = _mm256_add_ps(lo, _mm256_loadu_ps(c));
      hi = _mm256_add_ps(hi, _mm256_loadu_ps(c + 8));
    }
    _mm256_storeu_ps(c, lo);
    _mm256_storeu_ps(c + 8, hi);
  };
  store(0, c00, c01);
  store(1, c10, c11);
  store(2, c20, c21);
  store(3, c30, c31);
  store(4, c40, c41);
  store(5, c50, c51);
}

bool cpu_has_avx2_fma() {
  if (const char* env = std::getenv("EDPAIRS_CPU_KERNEL")) {
    if (std::strcmp(env, "generic") == 0) return false;
  }
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

struct Selected {
  MicroKernel kernel;
  ArgmaxFold fold;
  const char* isa;
};

const Selected& selected() {
  static const Selected s = [] {
#ifdef EDPAIRS_X86
    if (cpu_has_avx2_fma()) return Selected{&micro_avx2, &fold_avx2, "avx2+fma"};
#endif
    return Selected{&micro_generic, &fold_generic, "generic"};
  }();
  return s;
}

}  // namespace

MicroKernel micro_kernel() { return selected().kernel; }
ArgmaxFold argmax_fold() { return selected().fold; }
const char* micro_kernel_isa() { return selected().isa; }

float pack_a_rows(const Matrix& m, const float* center, int64_t r0, int64_t c0, int64_t kc, float* Ap,
                  double* row_sumsq) {
  return with_loader(m.dtype, [&](auto load) { return pack_panel<MR>(m, load, center, r0, c0, kc, false, Ap, row_sumsq); });
}
float pack_b_rows(const Matrix& m, const float* center, int64_t r0, int64_t c0, int64_t kc, float* Bp) {
  return with_loader(m.dtype, [&](auto load) { return pack_panel<NR>(m, load, center, r0, c0, kc, false, Bp); });
}
float pack_b_cols(const Matrix& m, const float* center, int64_t r0, int64_t c0, int64_t kc, float* Bp) {
  return with_loader(m.dtype, [&](auto load) { return pack_panel<NR>(m, load, center, r0, c0, kc, true, Bp); });
}

float pack_column_panels(const Matrix& m, const float* center, int64_t r0, int64_t rows, int64_t p0,
                         int64_t ld, float* Ap, float* Bp, float* row) {
  const int64_t D = m.cols, a_panels = ceil_div(D, MR), b_panels = ceil_div(D, NR);
  std::fill(row + D, row + column_panels_row(D), 0.f);  // the zero columns of the last panels
  float check = 0.f;
  for (int64_t r = 0; r < rows; ++r) {
    load_row(m, center, r0 + r, 0, D, row);
    check += nonfinite_flag(row, D);
    const int64_t p = p0 + r;
    if (Ap)
      for (int64_t q = 0; q < a_panels; ++q) std::memcpy(Ap + q * MR * ld + p * MR, row + q * MR, MR * sizeof(float));
    if (Bp)
      for (int64_t q = 0; q < b_panels; ++q) std::memcpy(Bp + q * NR * ld + p * NR, row + q * NR, NR * sizeof(float));
  }
  return check;
}

void add_macro_tile(int64_t depth, const float* Ap, const float* Bp, int64_t ld, int64_t i0, int64_t j0,
                    int64_t rows, int64_t cols, double* out, int64_t ldo, float* acc) {
  const MicroKernel kernel = micro_kernel();
  const int64_t tm = std::min(TM, round_up(rows - i0, MR)), tn = std::min(TN, round_up(cols - j0, NR));
  for (int64_t jr = 0; jr < tn; jr += NR)
    for (int64_t ir = 0; ir < tm; ir += MR)
      kernel(depth, Ap + (i0 + ir) * ld, Bp + (j0 + jr) * ld, acc + ir * TN + jr, TN, false);
  const int64_t iend = std::min(tm, rows - i0), jend = std::min(tn, cols - j0);
  for (int64_t i = 0; i < iend; ++i) {
    double* dst = out + (i0 + i) * ldo + j0;
    const float* src = acc + i * TN;
    for (int64_t j = 0; j < jend; ++j) dst[j] += src[j];
  }
}

void load_row(const Matrix& m, const float* center, int64_t r, int64_t c0, int64_t n, float* out) {
  with_loader(m.dtype, [&](auto load) {
    convert_row(m, load, r, c0, n, out);
    if (center) subtract(out, center + c0, n);
    return 0;
  });
}

}  // namespace edpairs::cpu
