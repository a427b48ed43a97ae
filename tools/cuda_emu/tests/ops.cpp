// The CUDA ops of ops.h sections 2 and 3a-3f on the emulator, against the CPU ops and float64
// references: normalize_centroids, moments (SIMT and mma.sync TF32 scatter), signal_moments
// (SIMT and TF32 kernel B), signal_masks, argmax_rows, cluster_sums, centre_rows, half_rows and
// centred_gram (wgmma).
//
// Tolerances come from the arithmetic of each kernel (u = 2^-24, float32's unit roundoff):
//  * a float32 sum of L terms (fmaf chains, tree reductions) is off by at most about L u times
//    the sum of the terms' magnitudes; float64 sums by L 2^-53 times it;
//  * a TF32 operand (10 mantissa bits, rounded to nearest) is off by at most 2^-11 of itself, a
//    product of two by 2^-10 (1 + 2^-11); over many rows these errors are independent and of
//    either sign, so Hoeffding's inequality bounds their sum by 6.5 * 2^-10 sqrt(sum (ab)^2)
//    except with probability 1e-9 (and never beyond 2^-10 sum |ab|, whichever is smaller);
//  * where the contract promises a rounding (float16 outputs: nearest even), outputs must be
//    bit-identical.
// Every comparison prints the worst |diff| / tolerance it saw, so that a tolerance that is far
// too loose shows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "harness.h"

using namespace edpairs;
using namespace emu_test;

namespace {

constexpr double kU32 = 0x1p-24;  // unit roundoff of float32
constexpr double kU64 = 0x1p-53;  // of float64
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const float kNaNf = std::numeric_limits<float>::quiet_NaN();
const float kInff = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------- which kernels ran

struct Ran {
  long launches, mma, wgmma, cp;
};
Ran counters() {
  auto& s = ::emu::stats();
  return {s.launches.load(), s.mma_sync.load(), s.wgmma.load(), s.cp_async.load()};
}
Ran since(const Ran& a) {
  const Ran b = counters();
  return {b.launches - a.launches, b.mma - a.mma, b.wgmma - a.wgmma, b.cp - a.cp};
}
enum class Path { Simt, Mma, Wgmma };
const char* path_name(Path p) { return p == Path::Simt ? "SIMT" : p == Path::Mma ? "mma.sync TF32" : "wgmma"; }
void expect_path(const Ran& r, Path p, const std::string& what) {
  std::printf("  %s: %ld launches, %ld mma.sync, %ld wgmma, %ld cp.async (want %s)\n", what.c_str(), r.launches,
              r.mma, r.wgmma, r.cp, path_name(p));
  CHECK(r.launches > 0, "%s: nothing launched", what.c_str());
  switch (p) {
    case Path::Simt:
      CHECK(r.mma == 0 && r.wgmma == 0 && r.cp == 0, "%s: expected the SIMT kernels only", what.c_str());
      break;
    case Path::Mma:
      CHECK(r.mma > 0 && r.cp > 0 && r.wgmma == 0, "%s: expected the mma.sync TF32 kernel", what.c_str());
      break;
    case Path::Wgmma:
      CHECK(r.wgmma > 0 && r.mma == 0, "%s: expected the wgmma kernel", what.c_str());
      break;
  }
}

// ---------------------------------------------------------------- comparisons

// got against want within tol (equal values, both NaN or |got - want| <= tol); prints the worst
// |diff| / tol of the values that passed when it goes.
class Cmp {
 public:
  explicit Cmp(std::string what) : what_(std::move(what)) {}
  ~Cmp() {
    std::printf("  %-58s %7ld values, %ld bad, worst |diff|/tol %.3g\n", what_.c_str(), n_, bad_, worst_);
  }
  Cmp(const Cmp&) = delete;
  Cmp& operator=(const Cmp&) = delete;
  bool operator()(double got, double want, double tol, int64_t i, int64_t j = -1) {
    ++n_;
    if (got == want || (std::isnan(got) && std::isnan(want))) return true;
    const double diff = std::fabs(got - want);
    if (diff <= tol) {
      if (tol > 0) worst_ = std::max(worst_, diff / tol);
      return true;
    }
    ++bad_;
    CHECK(diff <= tol, "%s[%ld%s%s]: got %.17g, want %.17g (|diff| %.3g, tol %.3g)", what_.c_str(), (long)i,
          j >= 0 ? "," : "", j >= 0 ? std::to_string(j).c_str() : "", got, want, diff, tol);
    return false;
  }

 private:
  std::string what_;
  long n_ = 0, bad_ = 0;
  double worst_ = 0;
};

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}
uint16_t bits16(__half h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
bool half_nan(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x03ffu) != 0; }
// Two float16 results: the same bits, or both NaN (the contract rounds to nearest even but names
// no NaN payload: the GPU writes 0x7fff, the CPU 0x7e00).
bool half_same(uint16_t a, uint16_t b) { return a == b || (half_nan(a) && half_nan(b)); }
bool float_same(float a, float b) { return same_bits(a, b) || (std::isnan(a) && std::isnan(b)); }

// ---------------------------------------------------------------- data

// Rows of a matrix at row stride ld, starting off elements into buf, which holds exactly
// off + (n - 1) ld + d elements (a read past the last row shows under AddressSanitizer), the
// gaps NaN (a read of one shows in the results).
template <class T>
struct Rows {
  int64_t n = 0, d = 0, ld = 0, off = 0;
  std::vector<T> buf;
  T& at(int64_t r, int64_t c) { return buf[static_cast<size_t>(off + r * ld + c)]; }
  double val(int64_t r, int64_t c) const { return as_double(buf[static_cast<size_t>(off + r * ld + c)]); }
  TensorView view(Device dev) {
    TensorView t = emu_test::view(buf, {n, d}, dev, {ld, 1});
    t.data = buf.data() + off;
    return t;
  }
};

// N(offset, scale^2) values in T; float_exact: values of float32 first (so that float64 x holds
// numbers that the CPU's float32 loads keep exactly).
template <class T>
Rows<T> make_rows(std::mt19937& g, int64_t n, int64_t d, int64_t ld, int64_t off, double scale, double offset,
                  bool float_exact = true) {
  Rows<T> m;
  m.n = n, m.d = d, m.ld = ld, m.off = off;
  m.buf.assign(static_cast<size_t>(off + (n - 1) * ld + d), from_double<T>(kNaN));
  std::normal_distribution<double> nd;
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c) {
      double v = offset + scale * nd(g);
      if (float_exact) v = static_cast<float>(v);
      m.at(r, c) = from_double<T>(v);
    }
  return m;
}

std::vector<float> randn(std::mt19937& g, size_t n, double scale = 1.0, double offset = 0.0) {
  std::normal_distribution<double> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(offset + scale * nd(g));
  return v;
}

template <class T>
TensorView vec_view(std::vector<T>& v, Device dev) {
  return view(v, {static_cast<int64_t>(v.size())}, dev);
}

template <class T>
const char* dtype_tag() {
  return dtype_name(dtype_of<T>());
}

// ---------------------------------------------------------------- error bounds of sums of products

// For columns p of A and q of B (n rows each, row-major): S = sum_n |A_np B_nq| and
// Q = sqrt(sum_n (A_np B_nq)^2), the scales of the rounding errors of sum_n A_np B_nq.
struct ProductScales {
  std::vector<double> exact, s, q;  // (P, Q) each
};
ProductScales product_scales(const std::vector<double>& a, int64_t p_cols, const std::vector<double>& b,
                             int64_t q_cols, int64_t n) {
  ProductScales r;
  const size_t pq = static_cast<size_t>(p_cols * q_cols);
  r.exact.assign(pq, 0.0);
  r.s.assign(pq, 0.0);
  r.q.assign(pq, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < p_cols; ++p) {
      const double av = a[static_cast<size_t>(i * p_cols + p)];
      if (av == 0.0) continue;
      for (int64_t q = 0; q < q_cols; ++q) {
        const double t = av * b[static_cast<size_t>(i * q_cols + q)];
        const size_t e = static_cast<size_t>(p * q_cols + q);
        r.exact[e] += t;
        r.s[e] += std::fabs(t);
        r.q[e] += t * t;
      }
    }
  for (auto& v : r.q) v = std::sqrt(v);
  return r;
}

// Exact float32 products of values rounded once to float32, summed in float32 over runs of at
// most `run` terms (fmaf: one rounding per term) and in float64 beyond: the centring's rounding
// (u per operand) plus run u per term.
double simt_bound(double s, int64_t run) { return static_cast<double>(run + 4) * kU32 * s + 1e-300; }
// TF32 operands (round to nearest: 2^-11 each), float32 accumulation over `run` rows: the
// smaller of the worst case and the Hoeffding bound (see the file's head), plus the float32 sum.
double tf32_bound(double s, double q, int64_t run) {
  const double product = std::min(0x1p-10 * (1 + 0x1p-11) * s, 6.5 * 0x1p-10 * q);
  return product + static_cast<double>(run + 12) * kU32 * s + 1e-300;
}

// ================================================================ 2. normalize_centroids

void normalize_case(uint32_t seed, int64_t k, int64_t d, bool in_place) {
  std::printf("  normalize k=%ld D=%ld%s\n", (long)k, (long)d, in_place ? " (out = previous)" : "");
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  std::vector<double> sums(static_cast<size_t>(k * d));
  std::vector<int64_t> counts(static_cast<size_t>(k));
  std::vector<float> prev = randn(g, static_cast<size_t>(k * d));
  std::vector<int> kind(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    const int t = static_cast<int>(j % 9);
    kind[static_cast<size_t>(j)] = t;
    counts[static_cast<size_t>(j)] = t == 1 ? 0 : 1 + j;
    for (int64_t c = 0; c < d; ++c) {
      double v = nd(g);
      if (t == 2 || t == 8) v = 0.0;
      if (t == 3) v *= 1e200;
      if (t == 4) v *= 1e-200;
      if (t == 7) v *= 1e300;
      sums[static_cast<size_t>(j * d + c)] = v;
    }
    double* row = sums.data() + j * d;
    if (t == 5) row[d / 2] = kNaN;
    if (t == 6) row[d - 1] = std::numeric_limits<double>::infinity();
    if (t == 7) row[0] = 1.7e308;  // s.s overflows float64 unscaled
    if (t == 8) {                   // float64 subnormals only: s.s underflows unscaled
      row[d - 1] = 4.9e-322;
      if (d > 1) row[0] = -1e-320;
    }
  }
  std::vector<float> out_gpu(static_cast<size_t>(k * d), kNaNf), out_cpu(static_cast<size_t>(k * d), kNaNf);
  if (in_place) out_gpu = prev;
  std::vector<float> prev_gpu = prev;  // previous as the GPU sees it (out itself when in place)

  NormalizeArgs a;
  a.sums = view(sums, {k, d}, Device::CUDA);
  a.counts = vec_view(counts, Device::CUDA);
  a.previous = in_place ? view(out_gpu, {k, d}, Device::CUDA) : view(prev_gpu, {k, d}, Device::CUDA);
  a.out = view(out_gpu, {k, d}, Device::CUDA);
  const Ran r0 = counters();
  normalize_centroids_cuda(a, nullptr);
  expect_path(since(r0), Path::Simt, "normalize_centroids_cuda");
  NormalizeArgs c = a;
  c.sums.device = c.counts.device = Device::CPU;
  c.previous = view(prev, {k, d}, Device::CPU);
  c.out = view(out_cpu, {k, d}, Device::CPU);
  normalize_centroids_cpu(c, nullptr);

  Cmp vs_ref("normalize: GPU vs float64"), vs_cpu("normalize: GPU vs CPU");
  for (int64_t j = 0; j < k; ++j) {
    const int t = kind[static_cast<size_t>(j)];
    const bool update = t == 0 || t == 3 || t == 4 || t == 7 || t == 8;
    const double* s = sums.data() + j * d;
    double big = 0;
    for (int64_t e = 0; e < d; ++e) big = std::max(big, std::fabs(s[e]));
    const int ex = std::ilogb(big);
    double sq = 0;
    for (int64_t e = 0; e < d; ++e) sq += std::ldexp(s[e], -ex) * std::ldexp(s[e], -ex);
    const double norm = std::sqrt(sq);
    for (int64_t e = 0; e < d; ++e) {
      const size_t at = static_cast<size_t>(j * d + e);
      if (!update) {
        CHECK(same_bits(out_gpu[at], prev[at]), "centroid %ld (kind %d) col %ld: %.9g, previous %.9g", (long)j, t,
              (long)e, out_gpu[at], prev[at]);
        continue;
      }
      const double ref = std::ldexp(s[e], -ex) / norm;
      // float32 rounding of a float64 quotient (half an ulp, 2^-24 relative, or half the
      // smallest subnormal) over a float64 norm good to d 2^-53.
      vs_ref(out_gpu[at], ref, 0x1p-24 * std::fabs(ref) + static_cast<double>(d + 4) * kU64 * std::fabs(ref) + 0x1p-150,
             j, e);
      vs_cpu(out_gpu[at], out_cpu[at], 0x1p-23 * std::fabs(ref) + 0x1p-149, j, e);
    }
  }
}

// ================================================================ 3a. moments

template <class T>
void moments_case(uint32_t seed, int64_t n, int64_t d, int64_t ld, int64_t off, double scale, double offset,
                  AssignPrecision prec, Path want, bool float_exact = true, bool compare_cpu = true) {
  std::printf("  moments %s N=%ld D=%ld ld=%ld off=%ld offset=%g %s\n", dtype_tag<T>(), (long)n, (long)d, (long)ld,
              (long)off, offset, prec == AssignPrecision::TensorCore ? "TensorCore" : "Float32");
  std::mt19937 g(seed);
  Rows<T> x = make_rows<T>(g, n, d, ld, off, scale, offset, float_exact);
  std::vector<double> mean(static_cast<size_t>(d), kNaN), m2(static_cast<size_t>(d * d), kNaN);
  std::vector<double> mean_cpu(static_cast<size_t>(d), kNaN), m2_cpu(static_cast<size_t>(d * d), kNaN);
  MomentsArgs a;
  a.x = x.view(Device::CUDA);
  a.mean = vec_view(mean, Device::CUDA);
  a.m2 = view(m2, {d, d}, Device::CUDA);
  a.check_finite = false;
  a.precision = prec;
  const Ran r0 = counters();
  moments_cuda(a, nullptr);
  expect_path(since(r0), want, "moments_cuda");
  if (compare_cpu) {
    MomentsArgs c;
    c.x = x.view(Device::CPU);
    c.mean = vec_view(mean_cpu, Device::CPU);
    c.m2 = view(m2_cpu, {d, d}, Device::CPU);
    c.check_finite = true;
    moments_cpu(c, nullptr);
  }

  // float64 reference: the mean, the centred values, the scatter and its error scales.
  std::vector<double> mref(static_cast<size_t>(d), 0.0), sabs(static_cast<size_t>(d), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c) {
      mref[static_cast<size_t>(c)] += x.val(r, c);
      sabs[static_cast<size_t>(c)] += std::fabs(x.val(r, c));
    }
  for (auto& v : mref) v /= static_cast<double>(n);
  std::vector<double> xc(static_cast<size_t>(n * d));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c) xc[static_cast<size_t>(r * d + c)] = x.val(r, c) - mref[static_cast<size_t>(c)];
  const ProductScales ps = product_scales(xc, d, xc, d, n);

  Cmp mean_ref("moments mean: GPU vs float64"), mean_cpu_cmp("moments mean: GPU vs CPU");
  for (int64_t c = 0; c < d; ++c) {
    // float64 sums of exact conversions: n 2^-53 of sum |x| (over n for the mean).
    const double tol = static_cast<double>(n + 4) * kU64 * sabs[static_cast<size_t>(c)] / static_cast<double>(n);
    mean_ref(mean[static_cast<size_t>(c)], mref[static_cast<size_t>(c)], tol, c);
    if (compare_cpu) mean_cpu_cmp(mean[static_cast<size_t>(c)], mean_cpu[static_cast<size_t>(c)], 2 * tol, c);
  }
  const bool tc = want == Path::Mma;
  Cmp m2_ref(std::string("moments m2: GPU vs float64 (") + path_name(want) + ")");
  Cmp m2_cpu_cmp(std::string("moments m2: GPU vs CPU (") + path_name(want) + ")");
  for (int64_t p = 0; p < d; ++p)
    for (int64_t q = 0; q < d; ++q) {
      const size_t e = static_cast<size_t>(p * d + q);
      // GPU: SIMT products summed in float32 over 256-row chunks, TF32 over a block's rows (at
      // most n); the CPU: float32 over 512-row superblocks.
      const double gpu_tol = tc ? tf32_bound(ps.s[e], ps.q[e], n) : simt_bound(ps.s[e], 256);
      m2_ref(m2[e], ps.exact[e], gpu_tol, p, q);
      if (compare_cpu) m2_cpu_cmp(m2[e], m2_cpu[e], gpu_tol + simt_bound(ps.s[e], 512), p, q);
      if (q < p) CHECK(same_bits(m2[e], m2[static_cast<size_t>(q * d + p)]), "m2 not symmetric at (%ld, %ld): %.17g vs %.17g",
                       (long)p, (long)q, m2[e], m2[static_cast<size_t>(q * d + p)]);
    }
}

// ================================================================ 3b. signal_moments

// The biases: for most concepts the middle of the widest gap between the middle half of the
// rows' w_i . x~ values, so that no z lies near 0 (the masks then do not depend on rounding);
// every fifth concept has no positive rows, the one before it only positive ones.
std::vector<float> pick_biases(const std::vector<double>& z0, int64_t n, int64_t concepts, std::vector<double>& margin) {
  std::vector<float> b(static_cast<size_t>(concepts));
  margin.assign(static_cast<size_t>(concepts), 0.0);
  for (int64_t i = 0; i < concepts; ++i) {
    std::vector<double> v(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) v[static_cast<size_t>(r)] = z0[static_cast<size_t>(r * concepts + i)];
    std::sort(v.begin(), v.end());
    double bi;
    if (i % 5 == 4) {
      bi = v.back() + 1.0;
    } else if (i % 5 == 3 || n == 1) {
      bi = v.front() - 1.0;
    } else {
      const int64_t lo = n / 4, hi = std::max<int64_t>(lo + 1, (3 * n) / 4);
      int64_t best = lo;
      for (int64_t t = lo; t < hi && t + 1 < n; ++t)
        if (v[static_cast<size_t>(t + 1)] - v[static_cast<size_t>(t)] > v[static_cast<size_t>(best + 1)] - v[static_cast<size_t>(best)]) best = t;
      bi = 0.5 * (v[static_cast<size_t>(best)] + v[static_cast<size_t>(best + 1)]);
    }
    b[static_cast<size_t>(i)] = static_cast<float>(bi);
    double m = std::numeric_limits<double>::infinity();
    for (double z : v) m = std::min(m, std::fabs(z - b[static_cast<size_t>(i)]));
    margin[static_cast<size_t>(i)] = m;
  }
  return b;
}

template <class T>
void signal_case(uint32_t seed, int64_t n, int64_t d, int64_t concepts, int64_t step_rows, int64_t ld, bool centred,
                 AssignPrecision prec, Path want) {
  std::printf("  signal_moments %s N=%ld D=%ld I=%ld R=%ld ld=%ld%s %s\n", dtype_tag<T>(), (long)n, (long)d,
              (long)concepts, (long)step_rows, (long)ld, centred ? " center" : "",
              prec == AssignPrecision::TensorCore ? "TensorCore" : "Float32");
  std::mt19937 g(seed);
  Rows<T> x = make_rows<T>(g, n, d, ld, 0, 1.0, 0.3);
  std::vector<float> w = randn(g, static_cast<size_t>(d * concepts), 1.0 / std::sqrt(static_cast<double>(d)));
  std::vector<float> center = centred ? randn(g, static_cast<size_t>(d), 0.3, 0.3) : std::vector<float>();
  const int64_t i2 = 2 * concepts;

  // x~ and w . x in float64; then the biases and z.
  std::vector<double> xc(static_cast<size_t>(n * d)), z0(static_cast<size_t>(n * concepts), 0.0),
      zscale(static_cast<size_t>(n * concepts), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < d; ++c)
      xc[static_cast<size_t>(r * d + c)] = x.val(r, c) - (centred ? static_cast<double>(center[static_cast<size_t>(c)]) : 0.0);
  // z = w . x - b (x itself, ops.h 3b), which the kernels form as w . x~ + (w . center - b).
  std::vector<double> wc(static_cast<size_t>(concepts), 0.0), wc_abs(static_cast<size_t>(concepts), 0.0);
  for (int64_t i = 0; i < concepts; ++i)
    for (int64_t c = 0; c < d && centred; ++c) {
      const double t = static_cast<double>(w[static_cast<size_t>(c * concepts + i)]) * center[static_cast<size_t>(c)];
      wc[static_cast<size_t>(i)] += t;
      wc_abs[static_cast<size_t>(i)] += std::fabs(t);
    }
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < d; ++c)
      for (int64_t i = 0; i < concepts; ++i) {
        const double t = xc[static_cast<size_t>(r * d + c)] * w[static_cast<size_t>(c * concepts + i)];
        z0[static_cast<size_t>(r * concepts + i)] += t;
        zscale[static_cast<size_t>(r * concepts + i)] += std::fabs(t);
      }
    for (int64_t i = 0; i < concepts; ++i) z0[static_cast<size_t>(r * concepts + i)] += wc[static_cast<size_t>(i)];
  }
  std::vector<double> margin;
  std::vector<float> b = pick_biases(z0, n, concepts, margin);
  // z's error in float32 (GPU and CPU alike): x~ rounded once (u), a float32 dot product over D
  // terms, w . center over D terms, the bias and the sum: (D + 4) u of the magnitudes.
  std::vector<double> zerr(static_cast<size_t>(n * concepts));
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < concepts; ++i) {
      const size_t e = static_cast<size_t>(r * concepts + i);
      zerr[e] = static_cast<double>(d + 4) * kU32 *
                (zscale[e] + wc_abs[static_cast<size_t>(i)] + std::fabs(static_cast<double>(b[static_cast<size_t>(i)])));
    }
  for (int64_t i = 0; i < concepts; ++i) {
    double worst = 0;
    for (int64_t r = 0; r < n; ++r) worst = std::max(worst, zerr[static_cast<size_t>(r * concepts + i)]);
    CHECK(margin[static_cast<size_t>(i)] > 4 * worst, "test data: concept %ld has a z within %.3g of 0 (errors to %.3g)",
          (long)i, margin[static_cast<size_t>(i)], worst);
  }

  // float64 reference of the outputs and the error scales of sum_x, sum_xz ([M, M z]^T x~).
  std::vector<double> mz(static_cast<size_t>(n * i2), 0.0);
  std::vector<int64_t> count_ref(static_cast<size_t>(concepts), 0);
  std::vector<double> sz_ref(static_cast<size_t>(concepts), 0.0), szz_ref(static_cast<size_t>(concepts), 0.0),
      sz_tol(static_cast<size_t>(concepts), 0.0), szz_tol(static_cast<size_t>(concepts), 0.0);
  std::vector<double> zerr_x(static_cast<size_t>(concepts * d), 0.0);  // sum_P zerr |x~|
  for (int64_t r = 0; r < n; ++r)
    for (int64_t i = 0; i < concepts; ++i) {
      const size_t e = static_cast<size_t>(r * concepts + i);
      const double z = z0[e] - b[static_cast<size_t>(i)];
      if (!(z > 0)) continue;
      mz[static_cast<size_t>(r * i2 + i)] = 1.0;
      mz[static_cast<size_t>(r * i2 + concepts + i)] = z;
      count_ref[static_cast<size_t>(i)] += 1;
      sz_ref[static_cast<size_t>(i)] += z;
      szz_ref[static_cast<size_t>(i)] += z * z;
      // z off by zerr; float64 sums over n terms.
      sz_tol[static_cast<size_t>(i)] += zerr[e] + static_cast<double>(n + 2) * kU64 * std::fabs(z);
      szz_tol[static_cast<size_t>(i)] += (2 * std::fabs(z) + zerr[e]) * zerr[e] + static_cast<double>(n + 2) * kU64 * z * z;
      for (int64_t c = 0; c < d; ++c)
        zerr_x[static_cast<size_t>(i * d + c)] += zerr[e] * std::fabs(xc[static_cast<size_t>(r * d + c)]);
    }
  const ProductScales ps = product_scales(mz, i2, xc, d, n);

  std::vector<int64_t> count(static_cast<size_t>(concepts), -7), count_cpu(static_cast<size_t>(concepts), -7);
  std::vector<double> sum_x(static_cast<size_t>(concepts * d), kNaN), sum_xz(static_cast<size_t>(concepts * d), kNaN),
      sum_z(static_cast<size_t>(concepts), kNaN), sum_zz(static_cast<size_t>(concepts), kNaN);
  std::vector<double> sum_x_cpu = sum_x, sum_xz_cpu = sum_xz, sum_z_cpu = sum_z, sum_zz_cpu = sum_zz;
  std::vector<float> workspace(static_cast<size_t>(step_rows * i2), kNaNf);
  SignalMomentsArgs a;
  a.x = x.view(Device::CUDA);
  a.w = view(w, {d, concepts}, Device::CUDA);
  a.b = vec_view(b, Device::CUDA);
  if (centred) a.center = vec_view(center, Device::CUDA);
  a.count = vec_view(count, Device::CUDA);
  a.sum_x = view(sum_x, {concepts, d}, Device::CUDA);
  a.sum_z = vec_view(sum_z, Device::CUDA);
  a.sum_zz = vec_view(sum_zz, Device::CUDA);
  a.sum_xz = view(sum_xz, {concepts, d}, Device::CUDA);
  a.workspace = view(workspace, {step_rows, i2}, Device::CUDA);
  a.check_finite = false;
  a.precision = prec;
  const Ran r0 = counters();
  signal_moments_cuda(a, nullptr);
  expect_path(since(r0), want, "signal_moments_cuda");

  SignalMomentsArgs c = a;
  for (TensorView* v : {&c.x, &c.w, &c.b, &c.center}) v->device = Device::CPU;
  c.count = vec_view(count_cpu, Device::CPU);
  c.sum_x = view(sum_x_cpu, {concepts, d}, Device::CPU);
  c.sum_z = vec_view(sum_z_cpu, Device::CPU);
  c.sum_zz = vec_view(sum_zz_cpu, Device::CPU);
  c.sum_xz = view(sum_xz_cpu, {concepts, d}, Device::CPU);
  c.workspace = TensorView();
  c.precision = AssignPrecision::Float32;
  signal_moments_cpu(c, nullptr);

  const bool tc = want == Path::Mma;
  Cmp zr("signal sum_z: GPU vs float64"), zc("signal sum_z: GPU vs CPU"), zzr("signal sum_zz: GPU vs float64"),
      zzc("signal sum_zz: GPU vs CPU");
  for (int64_t i = 0; i < concepts; ++i) {
    const size_t e = static_cast<size_t>(i);
    CHECK(count[e] == count_ref[e] && count_cpu[e] == count_ref[e], "count[%ld]: GPU %ld, CPU %ld, float64 %ld", (long)i,
          (long)count[e], (long)count_cpu[e], (long)count_ref[e]);
    zr(sum_z[e], sz_ref[e], sz_tol[e], i);
    zc(sum_z[e], sum_z_cpu[e], 2 * sz_tol[e], i);
    zzr(sum_zz[e], szz_ref[e], szz_tol[e], i);
    zzc(sum_zz[e], sum_zz_cpu[e], 2 * szz_tol[e], i);
  }
  Cmp xr(std::string("signal sum_x: GPU vs float64 (") + path_name(want) + ")"), xcpu("signal sum_x: GPU vs CPU");
  Cmp xzr(std::string("signal sum_xz: GPU vs float64 (") + path_name(want) + ")"), xzc("signal sum_xz: GPU vs CPU");
  for (int64_t i = 0; i < concepts; ++i)
    for (int64_t col = 0; col < d; ++col) {
      const size_t pm = static_cast<size_t>(i * d + col), pz = static_cast<size_t>((concepts + i) * d + col);
      const size_t out = static_cast<size_t>(i * d + col);
      // Kernel B: SIMT float32 over 256-row chunks, TF32 over a block's rows (<= R); the CPU
      // float32 over 504-row superblocks. sum_xz also carries z's own error.
      const int64_t run = std::min(n, step_rows);
      const double tol_x = tc ? tf32_bound(ps.s[pm], ps.q[pm], run) : simt_bound(ps.s[pm], 256);
      const double tol_xz = zerr_x[out] + (tc ? tf32_bound(ps.s[pz], ps.q[pz], run) : simt_bound(ps.s[pz], 256));
      xr(sum_x[out], ps.exact[pm], tol_x, i, col);
      xcpu(sum_x[out], sum_x_cpu[out], tol_x + simt_bound(ps.s[pm], 504), i, col);
      xzr(sum_xz[out], ps.exact[pz], tol_xz, i, col);
      xzc(sum_xz[out], sum_xz_cpu[out], tol_xz + zerr_x[out] + simt_bound(ps.s[pz], 504), i, col);
    }
}

// ================================================================ 3c. signal_masks

void masks_case(uint32_t seed, int64_t rows, int64_t concepts, bool half, bool shifted) {
  std::printf("  signal_masks R=%ld I=%ld out %s%s\n", (long)rows, (long)concepts, half ? "float16" : "float32",
              shifted ? " shift+alpha" : "");
  std::mt19937 g(seed);
  std::vector<float> z = randn(g, static_cast<size_t>(rows * concepts));
  std::vector<float> scale(static_cast<size_t>(concepts)), shift, alpha;
  for (int64_t i = 0; i < concepts; ++i) scale[static_cast<size_t>(i)] = std::ldexp(1.0f, static_cast<int>(i % 31) - 20);
  if (shifted) {
    shift = randn(g, static_cast<size_t>(concepts), 0.5);
    alpha = randn(g, static_cast<size_t>(concepts), 1.0, 1.0);
  }
  // Values the rounding must get right: exact zeros, -0, NaN, Inf, tiny ones, and (unshifted)
  // float16 ties at scale 1 and the edge of float16's range.
  auto put = [&](int64_t r, int64_t i, float v) {
    if (r < rows && i < concepts) z[static_cast<size_t>(r * concepts + i)] = v;
  };
  put(0, 0, 0.0f);
  put(0, 1, -0.0f);
  put(1, 0, kNaNf);
  put(1, 1, 1e-30f);
  put(2, 2, kInff);
  put(2, 3, -kInff);
  if (!shifted && concepts > 20) {
    // scale[20] = 1: ties at 1 + 2^-11 (to 1), 1 + 3 2^-11 (to 1 + 2^-9), the largest half, the
    // first value that rounds to Inf, and a subnormal tie.
    const float specials[] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 65504.0f, 65519.99f, 65520.0f, 0x1p-25f,
                              3 * 0x1p-25f, 0x1p-24f * 1.5f};
    for (int64_t s = 0; s < 8; ++s) put(3 + s, 20, specials[s]);
  }
  const int64_t width = 2 * concepts;
  std::vector<int64_t> count(static_cast<size_t>(concepts)), count_cpu;
  std::vector<double> sum_z(static_cast<size_t>(concepts)), sum_zz(static_cast<size_t>(concepts)), sum_z_cpu, sum_zz_cpu;
  for (int64_t i = 0; i < concepts; ++i) {  // in/out: the op adds to these
    count[static_cast<size_t>(i)] = i % 4;
    sum_z[static_cast<size_t>(i)] = 0.25 * static_cast<double>(i % 3);
    sum_zz[static_cast<size_t>(i)] = 1.5;
  }
  count_cpu = count, sum_z_cpu = sum_z, sum_zz_cpu = sum_zz;
  const std::vector<int64_t> count0 = count;
  const std::vector<double> sz0 = sum_z, szz0 = sum_zz;
  std::vector<float> out(half ? 0 : static_cast<size_t>(rows * width), kNaNf), out_cpu = out;
  std::vector<__half> out16(half ? static_cast<size_t>(rows * width) : 0, from_double<__half>(kNaN)), out16_cpu = out16;

  SignalMasksArgs a;
  a.z = view(z, {rows, concepts}, Device::CUDA);
  a.out = half ? view(out16, {rows, width}, Device::CUDA) : view(out, {rows, width}, Device::CUDA);
  a.count = vec_view(count, Device::CUDA);
  a.sum_z = vec_view(sum_z, Device::CUDA);
  a.sum_zz = vec_view(sum_zz, Device::CUDA);
  if (half) a.scale = vec_view(scale, Device::CUDA);
  if (shifted) {
    a.shift = vec_view(shift, Device::CUDA);
    a.alpha = vec_view(alpha, Device::CUDA);
  }
  const Ran r0 = counters();
  signal_masks_cuda(a, nullptr);
  expect_path(since(r0), Path::Simt, "signal_masks_cuda");
  SignalMasksArgs c = a;
  for (TensorView* v : {&c.z, &c.scale, &c.shift, &c.alpha}) v->device = Device::CPU;
  c.out = half ? view(out16_cpu, {rows, width}, Device::CPU) : view(out_cpu, {rows, width}, Device::CPU);
  c.count = vec_view(count_cpu, Device::CPU);
  c.sum_z = vec_view(sum_z_cpu, Device::CPU);
  c.sum_zz = vec_view(sum_zz_cpu, Device::CPU);
  signal_masks_cpu(c, nullptr);

  // The float32 z the op works with (z alpha + shift, two roundings), and float64 references.
  long bad = 0;
  std::vector<double> sabs(static_cast<size_t>(concepts), 0.0), sqabs(static_cast<size_t>(concepts), 0.0),
      sz(static_cast<size_t>(concepts), 0.0), szz(static_cast<size_t>(concepts), 0.0);
  std::vector<int64_t> cnt(static_cast<size_t>(concepts), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < concepts; ++i) {
      const size_t e = static_cast<size_t>(r * concepts + i);
      const float v = shifted ? z[e] * alpha[static_cast<size_t>(i)] + shift[static_cast<size_t>(i)] : z[e];
      const bool pos = v > 0.0f;
      if (pos) {
        cnt[static_cast<size_t>(i)] += 1;
        sz[static_cast<size_t>(i)] += v;
        szz[static_cast<size_t>(i)] += static_cast<double>(v) * v;
        sabs[static_cast<size_t>(i)] += std::fabs(static_cast<double>(v));
        sqabs[static_cast<size_t>(i)] += static_cast<double>(v) * v;
      }
      const size_t m = static_cast<size_t>(r * width + i), q = static_cast<size_t>(r * width + concepts + i);
      if (half) {
        const uint16_t want_m = pos ? 0x3c00u : 0u;
        const uint16_t want_q = pos ? bits16(__float2half_rn(v * scale[static_cast<size_t>(i)])) : 0u;
        const bool ok = bits16(out16[m]) == bits16(out16_cpu[m]) && bits16(out16[m]) == want_m &&
                        half_same(bits16(out16[q]), bits16(out16_cpu[q])) && half_same(bits16(out16[q]), want_q);
        if (!ok && ++bad <= 5)
          CHECK(ok, "row %ld concept %ld (v %.9g scale %g): GPU %04x %04x, CPU %04x %04x, want %04x %04x", (long)r, (long)i,
                v, scale[static_cast<size_t>(i)], bits16(out16[m]), bits16(out16[q]), bits16(out16_cpu[m]),
                bits16(out16_cpu[q]), want_m, want_q);
      } else {
        const float want_m = pos ? 1.0f : 0.0f, want_q = pos ? v : 0.0f;
        const bool ok = same_bits(out[m], out_cpu[m]) && same_bits(out[m], want_m) && same_bits(out[q], out_cpu[q]) &&
                        same_bits(out[q], want_q);
        if (!ok && ++bad <= 5)
          CHECK(ok, "row %ld concept %ld (v %.9g): GPU %.9g %.9g, CPU %.9g %.9g", (long)r, (long)i, v, out[m], out[q],
                out_cpu[m], out_cpu[q]);
      }
    }
  CHECK(bad == 0, "%ld outputs differ from the CPU's bits", bad);
  Cmp zr("signal_masks sum_z: GPU vs float64"), zc("signal_masks sum_z: GPU vs CPU");
  Cmp zzr("signal_masks sum_zz: GPU vs float64"), zzc("signal_masks sum_zz: GPU vs CPU");
  for (int64_t i = 0; i < concepts; ++i) {
    const size_t e = static_cast<size_t>(i);
    CHECK(count[e] == count0[e] + cnt[e] && count_cpu[e] == count[e], "count[%ld]: GPU %ld, CPU %ld, want %ld", (long)i,
          (long)count[e], (long)count_cpu[e], (long)(count0[e] + cnt[e]));
    // float64 sums of the float32 values (exact products for zz): rows 2^-53 of the magnitudes.
    const double tz = static_cast<double>(rows + 4) * kU64 * (sabs[e] + std::fabs(sz0[e]));
    const double tzz = static_cast<double>(rows + 4) * kU64 * (sqabs[e] + std::fabs(szz0[e]));
    zr(sum_z[e], sz0[e] + sz[e], tz, i);
    zc(sum_z[e], sum_z_cpu[e], 2 * tz, i);
    zzr(sum_zz[e], szz0[e] + szz[e], tzz, i);
    zzc(sum_zz[e], sum_zz_cpu[e], 2 * tzz, i);
  }
}

// ================================================================ 3d. argmax_rows

struct ArgmaxOpts {
  bool center = false, row_scale = false, rescore = false;
};

template <class T>
void argmax_case(uint32_t seed, int64_t rows, int64_t k, int64_t d, int64_t ld, ArgmaxOpts o) {
  std::printf("  argmax_rows %s R=%ld k=%ld D=%ld ld=%ld%s%s%s\n", dtype_tag<T>(), (long)rows, (long)k, (long)d, (long)ld,
              o.center ? " center" : "", o.row_scale ? " row_scale" : "", o.rescore ? " centroids" : "");
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> uni(-1.0, 1.0);
  Rows<T> x = make_rows<T>(g, rows, d, ld, 0, 1.0, 0.2);
  std::vector<float> center;
  if (o.center) {
    center = randn(g, static_cast<size_t>(d), 0.3);
    for (auto& c : center) c = static_cast<float>(as_double(from_double<T>(c)));  // representable in T
  }
  std::vector<float> cents = randn(g, static_cast<size_t>(k * d));
  if (k > 2)  // a duplicate centroid: exact ties of the re-scored dots (the lower index wins)
    std::copy(cents.begin() + d, cents.begin() + 2 * d, cents.begin() + (k - 1) * d);
  std::vector<float> cnorm(static_cast<size_t>(k)), col_scale(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    double s = 0;
    for (int64_t c = 0; c < d; ++c) s += static_cast<double>(cents[static_cast<size_t>(j * d + c)]) * cents[static_cast<size_t>(j * d + c)];
    cnorm[static_cast<size_t>(j)] = static_cast<float>(std::sqrt(s));
    col_scale[static_cast<size_t>(j)] = static_cast<float>((j == 3 ? -1.0 : 1.0) / std::sqrt(s));
  }
  // Special rows: 0 zero (x = center), 1 all scores NaN, 2 a NaN in x, 3 an exact tie of scores.
  auto xrow_set = [&](int64_t r, auto f) {
    if (r < rows)
      for (int64_t c = 0; c < d; ++c) x.at(r, c) = from_double<T>(f(c));
  };
  xrow_set(0, [&](int64_t c) { return o.center ? static_cast<double>(center[static_cast<size_t>(c)]) : 0.0; });
  if (rows > 2) x.at(2, d / 2) = from_double<T>(kNaN);
  // The dots as a TF32 product would give them: x~ . c_j, each off by up to 2^-11 of itself.
  std::vector<float> scores(static_cast<size_t>(rows * k));
  std::vector<double> xt(static_cast<size_t>(d));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < d; ++c) xt[static_cast<size_t>(c)] = x.val(r, c) - (o.center ? center[static_cast<size_t>(c)] : 0.0);
    for (int64_t j = 0; j < k; ++j) {
      double dot = 0;
      for (int64_t c = 0; c < d; ++c) dot += xt[static_cast<size_t>(c)] * cents[static_cast<size_t>(j * d + c)];
      scores[static_cast<size_t>(r * k + j)] = static_cast<float>(dot * (1 + 0x1p-11 * uni(g)));
    }
  }
  if (rows > 1)
    for (int64_t j = 0; j < k; ++j) scores[static_cast<size_t>(k + j)] = kNaNf;
  if (rows > 3 && k > 5) {
    scores[static_cast<size_t>(3 * k + 5)] = 1e3f;
    scores[static_cast<size_t>(3 * k + 2)] = 1e3f;
    col_scale[2] = col_scale[5] = 1.0f;
  }
  std::vector<float> row_scale;
  if (o.row_scale) {
    row_scale = randn(g, static_cast<size_t>(rows), 0.5, 1.0);
    for (int64_t r = 0; r < rows; ++r) {
      float& v = row_scale[static_cast<size_t>(r)];
      v = (r % 7 == 5) ? 0.0f : std::fabs(v);
    }
  }

  std::vector<int64_t> labels(static_cast<size_t>(rows), -7), labels_cpu = labels;
  std::vector<float> best(static_cast<size_t>(rows), -7.0f), rscale = best, best_cpu = best, rscale_cpu = best;
  ArgmaxRowsArgs a;
  a.scores = view(scores, {rows, k}, Device::CUDA);
  a.col_scale = vec_view(col_scale, Device::CUDA);
  a.x = x.view(Device::CUDA);
  if (o.center) a.center = vec_view(center, Device::CUDA);
  if (o.row_scale) a.row_scale = vec_view(row_scale, Device::CUDA);
  a.labels = vec_view(labels, Device::CUDA);
  a.best = vec_view(best, Device::CUDA);
  a.rscale = vec_view(rscale, Device::CUDA);
  if (o.rescore) {
    a.centroids = view(cents, {k, d}, Device::CUDA);
    a.cnorm = vec_view(cnorm, Device::CUDA);
  }
  const Ran r0 = counters();
  argmax_rows_cuda(a, nullptr);
  expect_path(since(r0), Path::Simt, "argmax_rows_cuda");
  ArgmaxRowsArgs c = a;
  for (TensorView* v : {&c.scores, &c.col_scale, &c.x, &c.center, &c.row_scale, &c.centroids, &c.cnorm})
    v->device = Device::CPU;
  c.labels = vec_view(labels_cpu, Device::CPU);
  c.best = vec_view(best_cpu, Device::CPU);
  c.rscale = vec_view(rscale_cpu, Device::CPU);
  argmax_rows_cpu(c, nullptr);

  // The contract, in float64: r_n, the first maximum of s_j dots, the re-score of near ties.
  Cmp rs_ref("argmax rscale: GPU vs float64"), rs_cpu("argmax rscale: GPU vs CPU");
  Cmp b_ref("argmax best: GPU vs float64"), b_cpu("argmax best: GPU vs CPU");
  long rescored = 0;
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    bool nan_row = false;
    for (int64_t c2 = 0; c2 < d; ++c2) {
      const double v = x.val(r, c2) - (o.center ? center[static_cast<size_t>(c2)] : 0.0);
      ss += v * v;
      nan_row = nan_row || std::isnan(v);
    }
    // r_n: given, or 1/||x~|| from float32 squares summed in float32 (a lane's D/32 terms, a
    // 5-level tree; the CPU: D in a row), a square root and a division: (D + 8) u.
    const double rs_want = o.row_scale ? row_scale[static_cast<size_t>(r)] : (nan_row || ss == 0 ? 0.0 : 1 / std::sqrt(ss));
    const double rs_tol = o.row_scale ? 0.0 : static_cast<double>(d + 8) * kU32 * rs_want;
    rs_ref(rscale[static_cast<size_t>(r)], rs_want, rs_tol, r);
    rs_cpu(rscale[static_cast<size_t>(r)], rscale_cpu[static_cast<size_t>(r)], 2 * rs_tol, r);
    int64_t bi = -1, si = -1;
    float bv = -kInff, sv = -kInff;
    for (int64_t j = 0; j < k; ++j) {
      const float v = scores[static_cast<size_t>(r * k + j)] * col_scale[static_cast<size_t>(j)];
      if (v > bv) {
        sv = bv, si = bi, bv = v, bi = j;
      } else if (v > sv) {
        sv = v, si = j;
      }
    }
    double bval = bv;
    bool re = false;
    if (o.rescore && rs_want > 0 && bi >= 0 && si >= 0) {
      const double tol = 0x1p-9 * std::sqrt(ss) *  // the centred rows' product (ops.h 3d)
                         (std::fabs(col_scale[static_cast<size_t>(bi)]) * cnorm[static_cast<size_t>(bi)] +
                          std::fabs(col_scale[static_cast<size_t>(si)]) * cnorm[static_cast<size_t>(si)]);
      if (static_cast<double>(bv) - sv <= tol) {
        re = true;
        ++rescored;
        double db = 0, ds = 0;
        for (int64_t c2 = 0; c2 < d; ++c2) {
          const double v = static_cast<float>(x.val(r, c2) - (o.center ? center[static_cast<size_t>(c2)] : 0.0));
          db += v * cents[static_cast<size_t>(bi * d + c2)];
          ds += v * cents[static_cast<size_t>(si * d + c2)];
        }
        const double vb = col_scale[static_cast<size_t>(bi)] * db, vs = col_scale[static_cast<size_t>(si)] * ds;
        if (vs > vb || (vs == vb && si < bi)) {
          bval = vs, bi = si;
        } else {
          bval = vb;
        }
      }
    }
    const bool scored = rs_want > 0 && bi >= 0;
    const int64_t l_want = scored ? bi : 0;
    const double b_want = scored ? rs_want * bval : (rs_want > 0 ? kNaN : 0.0);
    CHECK(labels[static_cast<size_t>(r)] == l_want && labels_cpu[static_cast<size_t>(r)] == l_want,
          "row %ld: label GPU %ld, CPU %ld, want %ld%s", (long)r, (long)labels[static_cast<size_t>(r)],
          (long)labels_cpu[static_cast<size_t>(r)], (long)l_want, re ? " (re-scored)" : "");
    // best = r_n times a float32 score (or a float64 re-score rounded to float32): r_n's error,
    // the rounding of the score and of the product.
    const double b_tol = (rs_tol > 0 ? rs_tol / rs_want : 0.0) * std::fabs(b_want) + 4 * kU32 * std::fabs(b_want);
    b_ref(best[static_cast<size_t>(r)], b_want, b_tol, r);
    b_cpu(best[static_cast<size_t>(r)], best_cpu[static_cast<size_t>(r)], 2 * b_tol, r);
  }
  if (rows > 1) CHECK(std::isnan(best[1]) && labels[1] == 0 && rscale[1] > 0, "row of NaN scores: label %ld best %g", (long)labels[1], best[1]);
  if (!o.row_scale) CHECK(best[0] == 0 && labels[0] == 0 && rscale[0] == 0, "zero row: label %ld best %g rscale %g", (long)labels[0], best[0], rscale[0]);
  if (o.rescore) std::printf("  %ld rows re-scored\n", rescored);
}

// ================================================================ 3d. cluster_sums

// `empty`: how many of the last clusters get no rows (with 0, the last label is given to the
// last row, so that the counting touches label k - 1).
template <class T>
void cluster_case(uint32_t seed, int64_t n, int64_t d, int64_t k, int64_t ld, bool centred, int64_t empty = 2) {
  std::printf("  cluster_sums %s N=%ld D=%ld k=%ld ld=%ld%s\n", dtype_tag<T>(), (long)n, (long)d, (long)k, (long)ld,
              centred ? " center" : "");
  std::mt19937 g(seed);
  Rows<T> x = make_rows<T>(g, n, d, ld, 0, 1.0, 0.5);
  std::vector<float> center = centred ? randn(g, static_cast<size_t>(d), 0.3) : std::vector<float>();
  std::vector<int64_t> labels(static_cast<size_t>(n));
  std::vector<float> rscale(static_cast<size_t>(n));
  const int64_t used = std::max<int64_t>(1, k - empty);  // the last `empty` clusters stay empty
  std::uniform_int_distribution<int64_t> pick(0, used - 1);
  std::uniform_real_distribution<float> scale(0.1f, 2.0f);
  for (int64_t r = 0; r < n; ++r) {
    labels[static_cast<size_t>(r)] = r < n / 3 ? 0 : pick(g);  // a long run of one label too
    rscale[static_cast<size_t>(r)] = r % 11 == 4 ? 0.0f : scale(g);
  }
  if (empty == 0 && n > 1) labels[static_cast<size_t>(n - 1)] = k - 1;
  if (n > 7) x.at(7, 0) = from_double<T>(kNaN), rscale[7] = 0.0f;  // rscale 0: counts, adds nothing (not its NaN)
  std::vector<double> sums(static_cast<size_t>(k * d), kNaN), sums_cpu = sums;
  std::vector<int64_t> counts(static_cast<size_t>(k), -7), counts_cpu = counts;
  ClusterSumsArgs a;
  a.x = x.view(Device::CUDA);
  a.labels = vec_view(labels, Device::CUDA);
  a.rscale = vec_view(rscale, Device::CUDA);
  if (centred) a.center = vec_view(center, Device::CUDA);
  a.sums = view(sums, {k, d}, Device::CUDA);
  a.counts = vec_view(counts, Device::CUDA);
  const Ran r0 = counters();
  cluster_sums_cuda(a, nullptr);
  expect_path(since(r0), Path::Simt, "cluster_sums_cuda");
  ClusterSumsArgs c = a;
  for (TensorView* v : {&c.x, &c.labels, &c.rscale, &c.center}) v->device = Device::CPU;
  c.sums = view(sums_cpu, {k, d}, Device::CPU);
  c.counts = vec_view(counts_cpu, Device::CPU);
  cluster_sums_cpu(c, nullptr);

  // float64 reference of sum r_n (x_n - center) with x - center rounded once to float32 as the
  // kernels do; the sums are float64 throughout: n 2^-53 of the magnitudes.
  std::vector<double> ref(static_cast<size_t>(k * d), 0.0), mag(static_cast<size_t>(k * d), 0.0);
  std::vector<int64_t> cnt(static_cast<size_t>(k), 0);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t j = labels[static_cast<size_t>(r)];
    cnt[static_cast<size_t>(j)] += 1;
    if (rscale[static_cast<size_t>(r)] == 0) continue;
    for (int64_t col = 0; col < d; ++col) {
      const double ctr = centred ? center[static_cast<size_t>(col)] : 0.0;
      const double v = std::is_same<T, double>::value ? static_cast<float>(x.val(r, col) - ctr)
                                                      : static_cast<double>(static_cast<float>(x.val(r, col)) - static_cast<float>(ctr));
      const double t = static_cast<double>(rscale[static_cast<size_t>(r)]) * v;
      ref[static_cast<size_t>(j * d + col)] += t;
      mag[static_cast<size_t>(j * d + col)] += std::fabs(t);
    }
  }
  for (int64_t j = 0; j < k; ++j)
    CHECK(counts[static_cast<size_t>(j)] == cnt[static_cast<size_t>(j)] && counts_cpu[static_cast<size_t>(j)] == cnt[static_cast<size_t>(j)],
          "counts[%ld]: GPU %ld, CPU %ld, want %ld", (long)j, (long)counts[static_cast<size_t>(j)],
          (long)counts_cpu[static_cast<size_t>(j)], (long)cnt[static_cast<size_t>(j)]);
  Cmp vr("cluster_sums: GPU vs float64"), vc("cluster_sums: GPU vs CPU");
  for (int64_t j = 0; j < k; ++j)
    for (int64_t col = 0; col < d; ++col) {
      const size_t e = static_cast<size_t>(j * d + col);
      const double tol = static_cast<double>(n + 4) * kU64 * mag[e];
      vr(sums[e], ref[e], tol, j, col);
      // float64 x: the GPU centres in float64 before its one rounding, the CPU rounds x to
      // float32 first: up to one float32 rounding (u) more per term.
      vc(sums[e], sums_cpu[e], 2 * tol + (std::is_same<T, double>::value ? 2 * kU32 * mag[e] : 0.0), j, col);
    }
}

// ================================================================ 3e. centre_rows

struct CentreOpts {
  bool colsum = false, half = false, colmax = false, specials = false;
};

template <class T>
void centre_case(uint32_t seed, int64_t rows, int64_t d, int64_t ld, int64_t off, CentreOpts o) {
  std::printf("  centre_rows %s R=%ld D=%ld ld=%ld off=%ld out %s%s%s%s\n", dtype_tag<T>(), (long)rows, (long)d, (long)ld,
              (long)off, o.half ? "float16" : "float32", o.colsum ? " colsum" : "", o.colmax ? " colmax" : "",
              o.specials ? " specials" : "");
  std::mt19937 g(seed);
  Rows<T> x = make_rows<T>(g, rows, d, ld, off, 2.0, 1.0, std::is_same<T, float>::value);
  std::vector<float> shift = randn(g, static_cast<size_t>(d), 0.5, 1.0);
  std::vector<float> scale(static_cast<size_t>(d));
  for (int64_t c = 0; c < d; ++c) {  // powers of two, from float16 subnormals (2^-28) to overflow (2^16)
    const int e = static_cast<int>((c * 7) % 45) - 28;
    scale[static_cast<size_t>(c)] = std::ldexp(1.0f, e);
  }
  if (o.specials) {
    // NaN and Inf in x; float16 ties at scale 1 and shift 0 (1 + 2^-11 -> 1, 1 + 3 2^-11 ->
    // 1 + 2^-9), the largest half, the first value that rounds to Inf, a subnormal tie.
    if (rows > 3) {
      x.at(1, 0) = from_double<T>(kNaN);
      x.at(2, d - 1) = from_double<T>(std::numeric_limits<double>::infinity());
      x.at(3, d / 2) = from_double<T>(kNaN);
    }
    if (std::is_same<T, float>::value && d > 2) {
      shift[1] = 0.0f, scale[1] = 1.0f;
      const float specials[] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f, 65504.0f, 65519.99f, 65520.0f, 0x1p-25f, 3 * 0x1p-25f,
                                -(1.0f + 0x1p-11f)};
      for (int64_t s = 0; s < 8 && 4 + s < rows; ++s) x.at(4 + s, 1) = from_double<T>(specials[s]);
    }
  }
  std::vector<float> out(o.half ? 0 : static_cast<size_t>(rows * d), kNaNf), out_cpu = out;
  std::vector<__half> out16(o.half ? static_cast<size_t>(rows * d) : 0, from_double<__half>(kNaN)), out16_cpu = out16;
  std::vector<double> colsum(static_cast<size_t>(d));
  std::vector<float> colmax(static_cast<size_t>(d));
  for (int64_t c = 0; c < d; ++c) {  // in/out: added to, maxed with
    colsum[static_cast<size_t>(c)] = 0.5 * static_cast<double>(c % 5);
    colmax[static_cast<size_t>(c)] = c % 3 == 0 ? 1e30f : (c % 3 == 1 ? 0.0f : 0.25f);
  }
  std::vector<double> colsum_cpu = colsum, colsum0 = colsum;
  std::vector<float> colmax_cpu = colmax, colmax0 = colmax;
  CentreRowsArgs a;
  a.x = x.view(Device::CUDA);
  a.shift = vec_view(shift, Device::CUDA);
  a.out = o.half ? view(out16, {rows, d}, Device::CUDA) : view(out, {rows, d}, Device::CUDA);
  if (o.colsum) a.colsum = vec_view(colsum, Device::CUDA);
  if (o.half) a.scale = vec_view(scale, Device::CUDA);
  if (o.colmax) a.colmax = vec_view(colmax, Device::CUDA);
  const Ran r0 = counters();
  centre_rows_cuda(a, nullptr);
  expect_path(since(r0), Path::Simt, "centre_rows_cuda");
  CentreRowsArgs c = a;
  for (TensorView* v : {&c.x, &c.shift, &c.scale}) v->device = Device::CPU;
  c.out = o.half ? view(out16_cpu, {rows, d}, Device::CPU) : view(out_cpu, {rows, d}, Device::CPU);
  if (o.colsum) c.colsum = vec_view(colsum_cpu, Device::CPU);
  if (o.colmax) c.colmax = vec_view(colmax_cpu, Device::CPU);
  centre_rows_cpu(c, nullptr);

  // The contract: x - shift rounded once to float32 (float64 x centred in float64 first, as the
  // kernels' minus_center does; other dtypes convert exactly), times scale (exact) and rounded to
  // float16 at nearest even.
  const bool f64 = std::is_same<T, double>::value;
  long bad = 0, bad_cpu = 0;
  std::vector<double> ref_sum(static_cast<size_t>(d), 0.0), mag(static_cast<size_t>(d), 0.0);
  std::vector<float> ref_max = colmax0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t col = 0; col < d; ++col) {
      const size_t e = static_cast<size_t>(r * d + col);
      const double xv = x.val(r, col), sv = shift[static_cast<size_t>(col)];
      const float v = f64 ? static_cast<float>(xv - sv) : static_cast<float>(xv) - static_cast<float>(sv);
      ref_sum[static_cast<size_t>(col)] += v;
      mag[static_cast<size_t>(col)] += std::fabs(static_cast<double>(v));
      const float kv = v * scale[static_cast<size_t>(col)];
      if (o.half) ref_max[static_cast<size_t>(col)] = std::fmax(ref_max[static_cast<size_t>(col)], std::fabs(kv));
      bool ok, ok_cpu;
      uint16_t want16 = 0;
      if (o.half) {
        want16 = bits16(__float2half_rn(kv));
        ok = half_same(bits16(out16[e]), want16);
        ok_cpu = half_same(bits16(out16[e]), bits16(out16_cpu[e]));
      } else {
        ok = float_same(out[e], v);
        ok_cpu = float_same(out[e], out_cpu[e]);
      }
      if (!ok && ++bad <= 5)
        CHECK(ok, "out[%ld][%ld] (x %.9g shift %.9g scale %g): GPU %.9g / %04x, want %.9g / %04x", (long)r, (long)col, xv, sv,
              scale[static_cast<size_t>(col)], o.half ? 0.0 : out[e], o.half ? bits16(out16[e]) : 0, static_cast<double>(v),
              want16);
      // float64 x: the CPU rounds x to float32 before subtracting (two roundings, ops.h's
      // "arithmetic is float32"); the GPU's single rounding is compared with the reference above.
      if (!ok_cpu && !f64 && ++bad_cpu <= 5)
        CHECK(ok_cpu, "out[%ld][%ld]: GPU %.9g / %04x, CPU %.9g / %04x", (long)r, (long)col, o.half ? 0.0 : out[e],
              o.half ? bits16(out16[e]) : 0, o.half ? 0.0 : out_cpu[e], o.half ? bits16(out16_cpu[e]) : 0);
      if (!ok_cpu && f64) ++bad_cpu;
    }
  CHECK(bad == 0, "%ld outputs differ from the contract's rounding", bad);
  if (f64) std::printf("  float64 x: %ld of %ld outputs differ from the CPU's (which rounds x to float32 first)\n", bad_cpu, (long)(rows * d));
  else CHECK(bad_cpu == 0, "%ld outputs differ from the CPU's bits", bad_cpu);
  if (o.colsum) {
    Cmp sr("centre_rows colsum: GPU vs float64"), sc("centre_rows colsum: GPU vs CPU");
    for (int64_t col = 0; col < d; ++col) {
      const size_t e = static_cast<size_t>(col);
      // float64 sums of float32 values: rows 2^-53 of their magnitudes (+ a float32 rounding
      // per term against the CPU for float64 x).
      const double tol = static_cast<double>(rows + 4) * kU64 * (mag[e] + std::fabs(colsum0[e]));
      sr(colsum[e], colsum0[e] + ref_sum[e], tol, col);
      sc(colsum[e], colsum_cpu[e], 2 * tol + (f64 ? 2 * kU32 * mag[e] : 0.0), col);
    }
  }
  if (o.colmax) {
    for (int64_t col = 0; col < d; ++col) {
      const size_t e = static_cast<size_t>(col);
      CHECK(same_bits(colmax[e], ref_max[e]), "colmax[%ld]: GPU %.9g, want %.9g (before %.9g)", (long)col, colmax[e],
            ref_max[e], colmax0[e]);
      if (!f64) CHECK(same_bits(colmax[e], colmax_cpu[e]), "colmax[%ld]: GPU %.9g, CPU %.9g", (long)col, colmax[e], colmax_cpu[e]);
    }
  }
}

// ================================================================ 3e'. half_rows

void half_rows_case(uint32_t seed, int64_t d, int64_t ld) {
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  // Row scales from tiny to huge, then the special rows of the contract.
  const double scales[] = {1.0, 1e-30, 1e-3, 1e3, 1e30, 3e38 / std::sqrt(static_cast<double>(d)) / 4, 1e-36, 7.0, 0.01, 1e-20};
  const int64_t plain = 10, special = 13, rows = plain + special;
  std::printf("  half_rows R=%ld D=%ld ld=%ld\n", (long)rows, (long)d, (long)ld);
  Rows<float> x;
  x.n = rows, x.d = d, x.ld = ld, x.off = 0;
  x.buf.assign(static_cast<size_t>((rows - 1) * ld + d), kNaNf);
  for (int64_t r = 0; r < plain; ++r)
    for (int64_t c = 0; c < d; ++c) x.at(r, c) = static_cast<float>(scales[r] * nd(g));
  auto fill = [&](int64_t r, float v) {
    for (int64_t c = 0; c < d; ++c) x.at(r, c) = v;
  };
  int64_t r = plain;
  fill(r++, 0.0f);                        // zero row
  fill(r++, 1e-39f);                      // subnormal values (1/||x|| finite or not, by D)
  fill(r, 0.0f), x.at(r++, 1 % d) = 1e-39f; // 1/||x|| = 1e39, beyond float32: a zero row
  fill(r, 0.0f), x.at(r++, 0) = 2.5e-39f; // norm 2.5e-39: 1/||x|| = 4e38 -> zero row
  fill(r, 0.0f), x.at(r++, d - 1) = 4e-38f; // 1/||x|| = 2.5e37: kept
  fill(r, 0.0f), x.at(r++, 0) = kNaNf;    // NaN and zeros: zero row
  fill(r, 1.5f), x.at(r++, d / 2) = kNaNf; // NaN beside values: scaled, NaN kept, rscale 0
  fill(r, 3.0f), x.at(r++, 0) = kInff;    // Inf: scale 2^8, 3 * 256 = 768 stays, Inf stays
  fill(r, 300.0f), x.at(r++, 0) = -kInff; // Inf beside values >= 256: 300 * 2^8 = 76800 -> Inf
  // Values whose scaled form is a float16 tie or subnormal: max 200 (scale 1).
  for (int64_t c = 0; c < d; ++c) x.at(r, c) = static_cast<float>(nd(g));
  x.at(r, 0) = 200.0f;
  if (d > 5) {
    x.at(r, 1) = 1.0f + 0x1p-11f, x.at(r, 2) = 1.0f + 3 * 0x1p-11f, x.at(r, 3) = 0x1p-25f, x.at(r, 4) = 3 * 0x1p-25f;
    x.at(r, 5) = -1e-6f;
  }
  ++r;
  for (int64_t c = 0; c < d; ++c) x.at(r, c) = static_cast<float>(1e-6 * nd(g));  // scaled by 2^7: float16 subnormals
  x.at(r++, 0) = 1.0f;
  fill(r++, -3.0f);
  for (int64_t c = 0; c < d; ++c) x.at(r, c) = c % 2 ? 65504.0f * 1e10f : -1e-20f;
  ++r;

  std::vector<__half> out(static_cast<size_t>(rows * d), from_double<__half>(kNaN)), out_cpu = out;
  std::vector<float> rs(static_cast<size_t>(rows), -7.0f), rs_cpu = rs;
  HalfRowsArgs a;
  a.x = x.view(Device::CUDA);
  a.out = view(out, {rows, d}, Device::CUDA);
  a.rscale = vec_view(rs, Device::CUDA);
  const Ran r0 = counters();
  half_rows_cuda(a, nullptr);
  expect_path(since(r0), Path::Simt, "half_rows_cuda");
  HalfRowsArgs c;
  c.x = x.view(Device::CPU);
  c.out = view(out_cpu, {rows, d}, Device::CPU);
  c.rscale = vec_view(rs_cpu, Device::CPU);
  half_rows_cpu(c, nullptr);

  Cmp rr("half_rows rscale: GPU vs float64"), rc("half_rows rscale: GPU vs CPU");
  long bad = 0;
  for (int64_t i = 0; i < rows; ++i) {
    // The contract in float64: max |x| passing NaN over, e bringing it into [2^7, 2^8), the
    // scaled values rounded to float16 at nearest even, 1/||x|| (0 for a zero row, one whose
    // 1/||x|| is not a finite float32, and one with NaN or Inf).
    float big = 0;
    bool nonfinite = false;
    double ss = 0;
    for (int64_t col = 0; col < d; ++col) {
      big = std::fmax(big, std::fabs(x.at(i, col)));
      nonfinite = nonfinite || !std::isfinite(x.at(i, col));
      ss += static_cast<double>(x.at(i, col)) * x.at(i, col);
    }
    int e = 0;
    std::frexp(big, &e);
    const float k = std::ldexp(1.0f, std::clamp(8 - e, -126, 127));
    const double inv = ss > 0 && std::isfinite(ss) ? 1 / std::sqrt(ss) : 0.0;
    const bool zero = !(big > 0) || (!nonfinite && !(inv <= std::numeric_limits<float>::max()));
    const double rs_want = zero || nonfinite ? 0.0 : inv;
    // float32 squares of the scaled row, fmaf chains of D/32 per lane and a 5-level tree (the
    // CPU: one chain of D), a square root and a division in float64: (D + 4) u.
    const double tol = static_cast<double>(d + 4) * kU32 * rs_want;
    rr(rs[static_cast<size_t>(i)], rs_want, tol, i);
    rc(rs[static_cast<size_t>(i)], rs_cpu[static_cast<size_t>(i)], 2 * tol, i);
    for (int64_t col = 0; col < d; ++col) {
      const size_t at = static_cast<size_t>(i * d + col);
      const uint16_t want = zero ? 0 : bits16(__float2half_rn(x.at(i, col) * k));
      const uint16_t got = bits16(out[at]), cpu = bits16(out_cpu[at]);
      const bool ok = half_same(got, want) && half_same(got, cpu);
      if (!ok && ++bad <= 8)
        CHECK(ok, "row %ld col %ld (x %.9g, scale 2^%d): GPU %04x, CPU %04x, want %04x", (long)i, (long)col, x.at(i, col),
              std::ilogb(k), got, cpu, want);
    }
  }
  CHECK(bad == 0, "%ld float16 values differ", bad);
}

// ================================================================ 3f. centred_gram

void gram_case(uint32_t seed, int64_t n, int64_t d, int64_t ld, double offset) {
  std::printf("  centred_gram N=%ld D=%ld ld=%ld offset=%g\n", (long)n, (long)d, (long)ld, offset);
  std::mt19937 g(seed);
  Rows<float> x = make_rows<float>(g, n, d, ld, 0, 1.0, offset);
  std::vector<float> shift = randn(g, static_cast<size_t>(d), 0.2, offset);
  std::vector<double> m2(static_cast<size_t>(d * d)), colsum(static_cast<size_t>(d));
  for (size_t e = 0; e < m2.size(); ++e) m2[e] = 1000.0 + static_cast<double>(e % 97);  // in/out: added to
  for (size_t e = 0; e < colsum.size(); ++e) colsum[e] = -3.0 + static_cast<double>(e % 5);
  const std::vector<double> m2_0 = m2, colsum0 = colsum;
  std::vector<double> m2_cpu = m2, colsum_cpu = colsum;
  CentredGramArgs a;
  a.x = x.view(Device::CUDA);
  a.shift = vec_view(shift, Device::CUDA);
  a.m2 = view(m2, {d, d}, Device::CUDA);
  a.colsum = vec_view(colsum, Device::CUDA);
  const Ran r0 = counters();
  centred_gram_cuda(a, nullptr);
  expect_path(since(r0), Path::Wgmma, "centred_gram_cuda");
  CentredGramArgs c = a;
  c.x.device = c.shift.device = Device::CPU;
  c.m2 = view(m2_cpu, {d, d}, Device::CPU);
  c.colsum = vec_view(colsum_cpu, Device::CPU);
  centred_gram_cpu(c, nullptr);

  // The centred float32 values (x - shift, one rounding) and the scales of their products.
  std::vector<double> xc(static_cast<size_t>(n * d));
  std::vector<double> ref_sum(static_cast<size_t>(d), 0.0), mag(static_cast<size_t>(d), 0.0);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t col = 0; col < d; ++col) {
      const float v = x.at(r, col) - shift[static_cast<size_t>(col)];
      xc[static_cast<size_t>(r * d + col)] = v;
      ref_sum[static_cast<size_t>(col)] += v;
      mag[static_cast<size_t>(col)] += std::fabs(static_cast<double>(v));
    }
  const ProductScales ps = product_scales(xc, d, xc, d, n);
  // The rows of one block: the kernel splits the 32-row slices evenly over multiprocessors /
  // tiles blocks (at least 8 slices each); n bounds them.
  Cmp mr("centred_gram m2: GPU vs float64"), mc("centred_gram m2: GPU vs CPU");
  long lower_touched = 0;
  for (int64_t p = 0; p < d; ++p)
    for (int64_t q = 0; q < d; ++q) {
      const size_t e = static_cast<size_t>(p * d + q);
      if (q < p) {
        if (!same_bits(m2[e], m2_0[e]) && ++lower_touched <= 5)
          CHECK(false, "m2[%ld][%ld] below the diagonal changed: %.17g (was %.17g)", (long)p, (long)q, m2[e], m2_0[e]);
        continue;
      }
      // TF32 products of the centred values, float32 over a block's rows (<= n), float64 atomics;
      // the initial value adds one float64 rounding.
      const double tol = tf32_bound(ps.s[e], ps.q[e], n) + 2 * kU64 * std::fabs(m2_0[e] + ps.exact[e]);
      mr(m2[e], m2_0[e] + ps.exact[e], tol, p, q);
      mc(m2[e], m2_cpu[e], tol + static_cast<double>(n + 4) * kU64 * ps.s[e], p, q);
    }
  CHECK(lower_touched == 0, "%ld entries below the diagonal changed", lower_touched);
  Cmp sr("centred_gram colsum: GPU vs float64"), sc("centred_gram colsum: GPU vs CPU");
  for (int64_t col = 0; col < d; ++col) {
    const size_t e = static_cast<size_t>(col);
    // float32 slots of a lane's rows (n / 32 terms at most, per block), 32 lanes in float64.
    const double tol = static_cast<double>(n / 32 + 36) * kU32 * mag[e] + 4 * kU64 * std::fabs(colsum0[e] + ref_sum[e]);
    sr(colsum[e], colsum0[e] + ref_sum[e], tol, col);
    sc(colsum[e], colsum_cpu[e], tol + static_cast<double>(n + 4) * kU64 * mag[e], col);
  }
}

}  // namespace

// ================================================================ tests

EMU_TEST(ops_normalize_centroids) {
  normalize_case(11, 18, 5, false);
  normalize_case(12, 9, 1, false);
  normalize_case(13, 9, 300, true);  // more columns than threads; out aliases previous
}

EMU_TEST(ops_moments_simt_f32) {
  const auto F = AssignPrecision::Float32;
  moments_case<float>(21, 1, 1, 1, 0, 1.0, 0.0, F, Path::Simt);
  moments_case<float>(22, 1, 5, 5, 0, 1.0, 3.0, F, Path::Simt);
  moments_case<float>(23, 7, 64, 64, 0, 1.0, 0.5, F, Path::Simt);
  moments_case<float>(24, 300, 65, 70, 3, 2.0, 0.0, F, Path::Simt);  // strided rows at an offset
  moments_case<float>(25, 700, 130, 130, 0, 1.0, 1e3, F, Path::Simt);  // a mean far from the spread
  moments_case<float>(26, 513, 5, 9, 0, 1e-3, -1e4, F, Path::Simt);
}

EMU_TEST(ops_moments_simt_other_dtypes) {
  const auto F = AssignPrecision::Float32, TC = AssignPrecision::TensorCore;
  moments_case<double>(31, 257, 65, 67, 1, 1.0, 2.0, F, Path::Simt);
  // float64 x beyond float32: the GPU centres in float64 (the CPU, which loads float32, is not
  // compared here: its x - mean rounds x first).
  moments_case<double>(32, 300, 5, 5, 0, 1.0, 1e6, F, Path::Simt, false, false);
  moments_case<__half>(33, 300, 65, 65, 0, 1.0, 2.0, F, Path::Simt);
  moments_case<__nv_bfloat16>(34, 64, 130, 131, 0, 1.0, -1.0, F, Path::Simt);
  moments_case<__half>(35, 100, 64, 64, 0, 1.0, 0.0, TC, Path::Simt);  // TensorCore is float32 only
  {
    Knob k("EDPAIRS_MOMENTS", "tf32");
    moments_case<__nv_bfloat16>(36, 100, 64, 64, 0, 1.0, 0.0, AssignPrecision::Float32, Path::Simt);
  }
}

EMU_TEST(ops_moments_tf32) {
  const auto TC = AssignPrecision::TensorCore;
  // (Each 32-row slice of a 128 x 128 tile costs the emulator about half a second: few slices.)
  moments_case<float>(41, 33, 64, 64, 0, 1.0, 0.0, TC, Path::Mma);
  moments_case<float>(42, 130, 68, 68, 0, 1.0, 0.5, TC, Path::Mma);   // two row splits
  moments_case<float>(43, 32, 130, 132, 4, 1.0, 1e3, TC, Path::Mma);  // 3 tiles, strided, far mean
  moments_case<float>(44, 64, 65, 68, 0, 1.0, 0.0, TC, Path::Mma);    // D % 4 != 0 in aligned rows
  {
    Knob k("EDPAIRS_MOMENTS", "tf32");
    moments_case<float>(45, 50, 5, 8, 0, 1.0, 0.0, AssignPrecision::Float32, Path::Mma);
  }
  // Rows the tensor-core kernel cannot copy 16 bytes at a time fall back to the exact kernel.
  moments_case<float>(46, 100, 1, 1, 0, 1.0, 0.0, TC, Path::Simt);
  moments_case<float>(47, 100, 65, 65, 0, 1.0, 0.0, TC, Path::Simt);
  moments_case<float>(48, 100, 64, 64, 1, 1.0, 0.0, TC, Path::Simt);
}

EMU_TEST(ops_signal_moments_simt) {
  const auto F = AssignPrecision::Float32;
  signal_case<float>(51, 250, 40, 1, 100, 40, true, F, Path::Simt);
  signal_case<float>(52, 250, 65, 3, 250, 70, false, F, Path::Simt);
  signal_case<float>(53, 130, 5, 70, 64, 5, true, F, Path::Simt);
  signal_case<float>(54, 200, 64, 130, 512, 64, true, F, Path::Simt);
  signal_case<float>(55, 3, 8, 3, 1, 8, true, F, Path::Simt);  // a workspace of one row
  signal_case<float>(56, 1, 1, 1, 4, 1, false, F, Path::Simt);
}

EMU_TEST(ops_signal_moments_other_dtypes) {
  const auto F = AssignPrecision::Float32, TC = AssignPrecision::TensorCore;
  signal_case<double>(61, 150, 33, 3, 64, 35, true, F, Path::Simt);
  signal_case<__half>(62, 150, 33, 4, 64, 33, true, TC, Path::Simt);  // TensorCore is float32 only
  signal_case<__nv_bfloat16>(63, 150, 33, 3, 150, 40, false, F, Path::Simt);
}

EMU_TEST(ops_signal_moments_tf32) {
  const auto TC = AssignPrecision::TensorCore;
  // (Each 32-row slice of a 128 x 128 tile costs the emulator about half a second: few slices.)
  signal_case<float>(71, 64, 64, 70, 32, 64, true, TC, Path::Mma);    // 2 steps, 2 tiles
  signal_case<float>(72, 32, 68, 130, 256, 72, false, TC, Path::Mma); // 3 tiles
  signal_case<float>(73, 40, 8, 2, 16, 8, true, TC, Path::Mma);       // 3 steps
  {
    Knob k("EDPAIRS_SIGNAL_MOMENTS", "tf32");
    signal_case<float>(74, 50, 36, 4, 64, 36, true, AssignPrecision::Float32, Path::Mma);
  }
  // 2I % 4 != 0 or rows that are not 16-byte aligned: the exact kernel.
  signal_case<float>(75, 100, 64, 1, 100, 64, true, TC, Path::Simt);
  signal_case<float>(76, 100, 64, 3, 100, 64, true, TC, Path::Simt);
  signal_case<float>(77, 100, 65, 70, 100, 65, true, TC, Path::Simt);
}

EMU_TEST(ops_signal_masks) {
  masks_case(81, 200, 300, false, false);
  masks_case(82, 130, 40, false, true);
  masks_case(83, 200, 300, true, false);
  masks_case(84, 70, 33, true, true);
  masks_case(85, 1, 1, false, false);
  masks_case(86, 1, 1, true, true);
}

EMU_TEST(ops_argmax_rows) {
  argmax_case<float>(91, 48, 40, 64, 70, {});
  argmax_case<float>(92, 48, 40, 64, 64, {true, false, false});
  argmax_case<float>(93, 48, 7, 100, 101, {false, true, false});
  argmax_case<float>(94, 160, 40, 64, 67, {true, false, true});
  argmax_case<float>(95, 64, 40, 33, 33, {false, false, true});
  argmax_case<float>(96, 64, 40, 64, 64, {true, true, true});
  argmax_case<__nv_bfloat16>(97, 40, 12, 48, 50, {true, false, true});
  argmax_case<__half>(98, 40, 12, 48, 48, {false, false, false});
  argmax_case<double>(99, 40, 12, 48, 49, {true, false, true});
  argmax_case<float>(100, 9, 1, 1, 1, {});  // k = 1, D = 1
  argmax_case<float>(101, 9, 1, 5, 5, {true, false, true});
}

EMU_TEST(ops_cluster_sums) {
  cluster_case<float>(111, 300, 70, 9, 75, true);
  cluster_case<float>(112, 600, 16, 4, 16, false);
  cluster_case<float>(113, 50, 520, 5, 523, true);  // more columns than one pass of the block
  cluster_case<__half>(114, 200, 40, 6, 40, true);
  cluster_case<__nv_bfloat16>(115, 200, 40, 6, 44, false);
  cluster_case<double>(116, 200, 40, 6, 41, true);
  cluster_case<float>(117, 1, 1, 3, 1, true);
  // Counting in shared memory up to k = 12288 (kBlockLabels), per row in global memory above;
  // rows past one block's 4096 (the counts and the perm ranges of several blocks).
  cluster_case<float>(118, 9000, 3, 12288, 5, false, 0);
  cluster_case<float>(119, 9000, 3, 12289, 3, true, 0);
  cluster_case<float>(120, 20000, 2, 3, 2, false);
  {
    Knob counting("EDPAIRS_ASSIGN_COUNTING", "global");  // the per-row atomics, kept as a fallback
    std::printf("  EDPAIRS_ASSIGN_COUNTING=global\n");
    cluster_case<float>(124, 9000, 3, 300, 5, true, 0);
  }
}

EMU_TEST(ops_cluster_sums_seg_rows) {
  // EDPAIRS_ASSIGN_SEG_ROWS: the segmented sums in blocks of 64 and 128 sorted positions (a
  // label's run across several blocks, a ragged last block); a value it does not take is
  // refused before anything is written.
  for (const char* rows : {"64", "128"}) {
    Knob seg("EDPAIRS_ASSIGN_SEG_ROWS", rows);
    std::printf("  EDPAIRS_ASSIGN_SEG_ROWS=%s\n", rows);
    cluster_case<float>(121, 1000, 70, 9, 75, true);
    cluster_case<__half>(122, 333, 40, 300, 40, false);
  }
  for (const auto& bad : {std::make_pair("EDPAIRS_ASSIGN_SEG_ROWS", "100"),
                          std::make_pair("EDPAIRS_ASSIGN_COUNTING", "x")}) {
    Knob seg(bad.first, bad.second);
    std::vector<float> x(64, 1.0f), rscale(16, 1.0f);
    std::vector<int64_t> labels(16, 0), counts(2, -7);
    std::vector<double> sums(8, 5.0);
    ClusterSumsArgs a;
    a.x = view(x, {16, 4}, Device::CUDA);
    a.labels = vec_view(labels, Device::CUDA);
    a.rscale = vec_view(rscale, Device::CUDA);
    a.sums = view(sums, {2, 4}, Device::CUDA);
    a.counts = vec_view(counts, Device::CUDA);
    bool threw = false;
    try {
      cluster_sums_cuda(a, nullptr);
    } catch (const std::invalid_argument& e) {
      const std::string what = e.what();
      threw = what == "EDPAIRS_ASSIGN_SEG_ROWS must be 64, 128 or 256, got '100'" ||
              what == "EDPAIRS_ASSIGN_COUNTING must be 'auto' or 'global', got 'x'";
      std::printf("  refused: %s\n", e.what());
    }
    CHECK(threw, "%s=%s was not refused with its message", bad.first, bad.second);
    CHECK(std::all_of(sums.begin(), sums.end(), [](double v) { return v == 5.0; }) && counts[0] == -7,
          "outputs written");
  }
}

EMU_TEST(ops_centre_rows_f32_out) {
  centre_case<float>(121, 300, 64, 64, 0, {});                       // vector path
  centre_case<float>(122, 300, 64, 68, 0, {true, false, false, true});
  centre_case<float>(123, 300, 65, 70, 3, {true, false, false, true});  // scalar path, strided
  centre_case<float>(124, 130, 64, 64, 1, {true, false, false, false}); // rows not 16-byte aligned
  centre_case<float>(125, 10, 520, 520, 0, {true, false, false, false}); // two column blocks
  centre_case<double>(126, 200, 64, 66, 0, {true, false, false, true});
  centre_case<__half>(127, 200, 64, 64, 0, {true, false, false, false});
  centre_case<__nv_bfloat16>(128, 200, 67, 67, 1, {true, false, false, false});
  centre_case<float>(129, 1, 1, 1, 0, {true, false, false, false});
}

EMU_TEST(ops_centre_rows_f16_out) {
  centre_case<float>(131, 300, 64, 64, 0, {false, true, false, false});
  centre_case<float>(132, 300, 64, 64, 0, {true, true, true, true});
  centre_case<float>(133, 200, 67, 70, 2, {true, true, true, true});  // scalar path
  centre_case<double>(134, 150, 64, 64, 0, {true, true, true, true});
  centre_case<__half>(135, 150, 64, 66, 0, {true, true, true, true});
  centre_case<__nv_bfloat16>(136, 150, 33, 33, 0, {true, true, true, false});
  centre_case<float>(137, 10, 520, 520, 0, {true, true, true, false});
}

EMU_TEST(ops_half_rows) {
  half_rows_case(141, 100, 100);
  half_rows_case(142, 33, 37);
  half_rows_case(143, 8, 8);
  half_rows_case(144, 600, 600);
}

EMU_TEST(ops_centred_gram_wgmma) {
  gram_case(151, 1, 4, 4, 0.0);
  gram_case(152, 100, 64, 64, 0.5);
  gram_case(153, 1000, 68, 68, 0.0);
  gram_case(154, 100, 200, 204, 100.0);
  gram_case(155, 1000, 4, 8, 0.0);
  gram_case(156, 300, 200, 200, 0.0);
}

EMU_TEST(ops_centred_gram_needs_hopper) {
  // Not compute capability 9.0: refused, nothing written.
  Knob cc("EMU_CC_MAJOR", "8");
  std::vector<float> x(64, 1.0f), shift(4, 0.0f);
  std::vector<double> m2(16, 5.0), colsum(4, 7.0);
  CentredGramArgs a;
  a.x = view(x, {16, 4}, Device::CUDA);
  a.shift = vec_view(shift, Device::CUDA);
  a.m2 = view(m2, {4, 4}, Device::CUDA);
  a.colsum = vec_view(colsum, Device::CUDA);
  bool threw = false;
  try {
    centred_gram_cuda(a, nullptr);
  } catch (const std::exception& e) {
    threw = true;
    std::printf("  refused: %s\n", e.what());
  }
  CHECK(threw, "centred_gram_cuda ran on compute capability 8.0");
  CHECK(std::all_of(m2.begin(), m2.end(), [](double v) { return v == 5.0; }) &&
            std::all_of(colsum.begin(), colsum.end(), [](double v) { return v == 7.0; }),
        "outputs written");
}
