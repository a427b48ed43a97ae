// edpairs::assign_cuda (ops.h section 1) on the emulator, against a float64 reference and, for
// AssignPrecision::Float32, against assign_cpu: every labelling kernel (SIMT float32, mma.sync,
// the fused small-k kernels, wgmma tiles of 64 / 128 / 256 centroids, the float16-row resident
// kernel), every cluster-sums pass (EDPAIRS_ASSIGN_SUMS), the other knobs, ragged / strided /
// unaligned rows, zero rows, exact ties, scales and centres, non-finite scores, refusals.
//
// Each case states the path it must take; ::emu::stats() deltas must equal that path's counts of
// mma.sync / wgmma / cp.async calls and launches, worked out from the kernels' tiling (see
// expected_stats), so a case that silently took another path fails.
//
// Error model of the checks (as tests/test_cuda.py's check_tc_assignment): with
// A_nj = sum_e (|x_ne| + |center_e|) |c_je| (tensor cores: the centring is subtracted after
// the product; float32 with a centre: the CPU rounds float64 x before centring) or
// sum_e |x~_ne| |c_je| (float32 without a centre), a score r_n s_j x~_n.c_j is off by at most
//   tensor cores: 2 u r_n |s_j| A_nj + 2e-5 r_n (||x~_n|| + ||x_n||) |s_j| ||c_j||
//                 (u = 2^-10 TF32 and float16 rows, 2^-11 float16 x, 2^-9 bfloat16 x: one
//                 operand's rounding per product, with a factor 2 of slack, plus float32
//                 accumulation and norm noise);
//   float32:      (4 D + 16) 2^-24 r_n |s_j| A_nj (float32 fmaf sums over D and the float32
//                 norms of row and centroid, factor 2 of slack).
// A label must score within the two bounds of the reference's best; the reported score within
// its own bound of the float64 score of that label; counts equal the label histogram; sums the
// float64 sums of r_n x~_n over the returned labels within 2 (D / 2 + 4 + rows of the cluster)
// 2^-24 (float32 norms, centring, float32 runs of the owned-column / fused passes) of the sum of
// |r_n x~_n|, plus 2^-23 sum r_n (|x~_n| + 2 |center|) with a centre (the centring's rounding).
// The label is never a later copy of a duplicated centroid (an exact tie in every precision: the
// lowest index wins; every case's data hold such rows, centroid k - 1 a copy of centroid 0).
// Rows with a NaN count as zero rows (label 0, score 0), as on the CPU.
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <new>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../../../csrc/cuda/assign_wgmma.cuh"
#include "harness.h"

using namespace edpairs;
using namespace emu_test;

namespace {

using Clock = std::chrono::steady_clock;

// ---- inputs --------------------------------------------------------------------------------

// Exactly-sized 256-byte aligned "device" memory: under AddressSanitizer a read past its end
// shows (a std::vector's capacity may exceed its size).
template <class T>
class Buf {
 public:
  explicit Buf(size_t n) : n_(n) {
    p_ = static_cast<T*>(::operator new((n ? n : 1) * sizeof(T), std::align_val_t(256)));
  }
  ~Buf() { ::operator delete(p_, std::align_val_t(256)); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  T* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_;
  size_t n_;
};

enum class XT { F32, F16, BF16, F64 };
const char* xt_name(XT t) {
  switch (t) {
    case XT::F32: return "float32";
    case XT::F16: return "float16";
    case XT::BF16: return "bfloat16";
    default: return "float64";
  }
}
const char* prec_name(AssignPrecision p) {
  return p == AssignPrecision::Float32 ? "float32" : (p == AssignPrecision::TensorCore ? "tc" : "tc-half");
}

// Which labelling kernel must run, and which sums pass.
enum class Path { Simt, Mma, MmaFused, Wgmma, WgmmaFused, Resident };
enum class SumsPass { None, InKernel, Sorted, Columns };

constexpr const char* kKnobs[] = {"EDPAIRS_ASSIGN_KERNEL", "EDPAIRS_ASSIGN_SUMS", "EDPAIRS_ASSIGN_OVERLAP",
                                  "EDPAIRS_WGMMA_PREFETCH", "EDPAIRS_ASSIGN_BLOCKS_PER_SM", "EDPAIRS_ASSIGN_SEG_ROWS",
                                  "EDPAIRS_ASSIGN_COUNTING", "EMU_SMS", "EMU_CC_MAJOR", "EMU_SMEM_PAD"};

struct Case {
  std::string name;
  int64_t n = 0, d = 0, k = 0;
  XT xt = XT::F32;
  AssignPrecision prec = AssignPrecision::TensorCore;
  int64_t stride = 0;  // row stride in elements (0: d); the gap is NaN
  int64_t offset = 0;  // elements before row 0 (NaN): 1 makes the start unaligned
  bool sums = true;
  bool center = false, row_scale = false, col_scale = false;
  int zero_rows = 2, dup_rows = 2, dup_cents = 2, zero_cents = 0;
  double x_shift = 0.0;  // added to every element of x (so that a centre matters)
  bool nan_cents = false;  // column 3 of every centroid NaN: every score of a nonzero row NaN
  double x_scale = 1.0, c_scale = 1.0;  // magnitudes of the rows and of the centroids
  bool all_rows_zero = false, all_cents_zero = false, all_cents_same = false;  // degenerate inputs
  std::vector<std::pair<const char*, const char*>> knobs;
  // Expectations.
  Path path = Path::Mma;
  int width = 0;  // wgmma tile (64, 128, 256)
  SumsPass pass = SumsPass::Sorted;
  int chunks = 0;  // EDPAIRS_ASSIGN_OVERLAP chunks actually used (0: no overlap)
  bool unaligned = false;  // the mma kernel's element-by-element x loader
  bool vs_cpu = false;     // compare with assign_cpu (Float32 precision)
  std::string data;        // the name the data are drawn for (empty: name): equal data for two cases
};

Case make(const char* name, int64_t n, int64_t d, int64_t k) {
  Case c;
  c.name = name;
  c.n = n;
  c.d = d;
  c.k = k;
  return c;
}

// A Float32 case on the SIMT kernel with its in-kernel sums, compared with assign_cpu.
Case simt_vs_cpu(const char* name, int64_t n, int64_t d, int64_t k) {
  Case c = make(name, n, d, k);
  c.prec = AssignPrecision::Float32;
  c.path = Path::Simt;
  c.pass = SumsPass::InKernel;
  c.vs_cpu = true;
  return c;
}

uint32_t seed_of(const std::string& s) {
  uint32_t h = 2166136261u;
  for (char ch : s) h = (h ^ static_cast<unsigned char>(ch)) * 16777619u;
  return h;
}

template <class T>
struct Data {
  std::unique_ptr<Buf<T>> xbuf;
  T* x = nullptr;  // row 0
  int64_t stride = 0;
  std::vector<double> xv;  // (n, d) the values the kernel reads
  std::vector<float> c, center, row_scale, col_scale;
};

template <class T>
Data<T> make_data(const Case& cs) {
  std::mt19937 g(seed_of(cs.data.empty() ? cs.name : cs.data));
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud;
  const int64_t n = cs.n, d = cs.d, k = cs.k;
  Data<T> dt;
  dt.c.resize(static_cast<size_t>(k * d));
  for (auto& v : dt.c) v = static_cast<float>(nd(g));
  std::vector<int64_t> dups;
  for (int t = 0; t < cs.dup_cents && k > 1; ++t) {
    // The first copy: the last centroid repeats centroid 0 (an exact tie across the centroid
    // tiles, warps and lanes of every kernel); the others at random.
    const int64_t j = t == 0 ? k - 1 : 1 + static_cast<int64_t>(g() % static_cast<uint32_t>(k - 1));
    const int64_t i = t == 0 ? 0 : static_cast<int64_t>(g() % static_cast<uint32_t>(j));
    std::copy(dt.c.begin() + i * d, dt.c.begin() + (i + 1) * d, dt.c.begin() + j * d);
    dups.push_back(j);
  }
  for (int t = 0; t < cs.zero_cents; ++t) {
    const int64_t j = static_cast<int64_t>(g() % static_cast<uint32_t>(k));
    std::fill(dt.c.begin() + j * d, dt.c.begin() + (j + 1) * d, 0.f);
  }
  if (cs.center) {
    dt.center.resize(static_cast<size_t>(d));
    // Representable in T, so that a row equal to the centre is exactly a zero row.
    for (auto& v : dt.center) v = static_cast<float>(as_double(from_double<T>(cs.x_shift + 0.3 * nd(g))));
  }
  if (cs.col_scale) {
    dt.col_scale.resize(static_cast<size_t>(k));
    for (auto& v : dt.col_scale) v = static_cast<float>(0.5 + ud(g));
    // Duplicated centroids keep equal scales (exact ties).
    for (int64_t j = 1; j < k; ++j)
      for (int64_t i = 0; i < j; ++i)
        if (std::equal(dt.c.begin() + j * d, dt.c.begin() + (j + 1) * d, dt.c.begin() + i * d)) {
          dt.col_scale[static_cast<size_t>(j)] = dt.col_scale[static_cast<size_t>(i)];
          break;
        }
  }
  if (cs.row_scale) {
    dt.row_scale.resize(static_cast<size_t>(n));
    for (auto& v : dt.row_scale) v = ud(g) < 0.15 ? 0.f : static_cast<float>(0.1 + 2 * ud(g));
  }
  // Rows: about half near a centroid (3 c + noise; a quarter of those near a duplicated
  // centroid, whose copies tie exactly), the rest noise.
  std::vector<double> rows(static_cast<size_t>(n * d));
  for (int64_t i = 0; i < n; ++i) {
    const double u = ud(g);
    int64_t pick = -1;
    if (u < 0.5) pick = static_cast<int64_t>(g() % static_cast<uint32_t>(k));
    if (u < 0.15 && !dups.empty()) pick = dups[g() % dups.size()];
    for (int64_t e = 0; e < d; ++e) {
      double v = nd(g);
      if (pick >= 0) v = 3.0 * dt.c[static_cast<size_t>(pick * d + e)] + 0.5 * v;
      rows[static_cast<size_t>(i * d + e)] = v + cs.x_shift;
    }
  }
  for (int t = 0; t < cs.dup_rows && n > 1; ++t) {
    const int64_t i = g() % n, j = g() % n;
    std::copy(rows.begin() + j * d, rows.begin() + (j + 1) * d, rows.begin() + i * d);
  }
  for (int t = 0; t < cs.zero_rows && n > 0; ++t) {
    const int64_t i = g() % n;
    for (int64_t e = 0; e < d; ++e) rows[static_cast<size_t>(i * d + e)] = cs.center ? dt.center[e] : 0.0;
  }
  if (cs.nan_cents) {  // (after the rows, which stay finite but for two rows with a NaN)
    for (int64_t j = 0; j < k; ++j) dt.c[static_cast<size_t>(j * d + 3 % d)] = std::nanf("");
    for (int64_t i : {int64_t{1}, n - 2})
      if (i >= 0 && i < n) rows[static_cast<size_t>(i * d + (i % d))] = std::nan("");
  }
  if (cs.all_rows_zero) std::fill(rows.begin(), rows.end(), 0.0);
  for (int64_t j = 0; j < k && (cs.all_cents_zero || cs.all_cents_same); ++j)
    for (int64_t e = 0; e < d; ++e) dt.c[static_cast<size_t>(j * d + e)] = cs.all_cents_zero ? 0.f : dt.c[e];
  if (cs.c_scale != 1.0)
    for (auto& v : dt.c) v = static_cast<float>(v * cs.c_scale);
  if (cs.x_scale != 1.0)
    for (auto& v : rows) v *= cs.x_scale;
  dt.stride = cs.stride ? cs.stride : d;
  const size_t total = static_cast<size_t>(cs.offset + (n > 0 ? (n - 1) * dt.stride + d : 0));
  dt.xbuf = std::make_unique<Buf<T>>(total);
  for (size_t i = 0; i < total; ++i) dt.xbuf->data()[i] = from_double<T>(std::nan(""));
  dt.x = dt.xbuf->data() + cs.offset;
  dt.xv.resize(static_cast<size_t>(n * d));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t e = 0; e < d; ++e) {
      const T v = from_double<T>(rows[static_cast<size_t>(i * d + e)]);
      dt.x[i * dt.stride + e] = v;
      dt.xv[static_cast<size_t>(i * d + e)] = as_double(v);
    }
  return dt;
}

// ---- reference -----------------------------------------------------------------------------

struct Ref {
  int64_t n = 0, d = 0, k = 0;
  std::vector<double> xt;     // x~ (n, d)
  std::vector<double> ctr;    // the centre (d), zeros without one
  std::vector<double> r, s;   // row and column scales
  std::vector<double> S, B;   // scores and their error bounds (n, k)
  std::vector<int64_t> first; // the lowest index of an identical centroid (and scale)
};

double unit_of(XT xt, AssignPrecision p) {
  if (p == AssignPrecision::TensorCoreHalf) return std::ldexp(1.0, -10);
  switch (xt) {
    case XT::F16: return std::ldexp(1.0, -11);
    case XT::BF16: return std::ldexp(1.0, -9);
    default: return std::ldexp(1.0, -10);
  }
}

template <class T>
Ref reference(const Case& cs, const Data<T>& dt) {
  Ref R;
  const int64_t n = cs.n, d = cs.d, k = cs.k;
  R.n = n;
  R.d = d;
  R.k = k;
  const bool tc = cs.prec != AssignPrecision::Float32 && cs.xt != XT::F64;
  const double u = unit_of(cs.xt, cs.prec);
  R.xt.resize(static_cast<size_t>(n * d));
  R.ctr.assign(static_cast<size_t>(d), 0.0);
  if (cs.center)
    for (int64_t e = 0; e < d; ++e) R.ctr[e] = dt.center[e];
  std::vector<double> xabs(static_cast<size_t>(n * d)), xn(static_cast<size_t>(n)), xraw(static_cast<size_t>(n));
  R.r.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double sq = 0, sqraw = 0;
    for (int64_t e = 0; e < d; ++e) {
      const double xv = dt.xv[static_cast<size_t>(i * d + e)];
      const double ctr = cs.center ? dt.center[e] : 0.0;
      const double v = xv - ctr;
      R.xt[static_cast<size_t>(i * d + e)] = v;
      // Float32: the centring rounds x~ (and the CPU rounds float64 x to float32 first).
      xabs[static_cast<size_t>(i * d + e)] = tc || cs.center ? std::fabs(xv) + std::fabs(ctr) : std::fabs(v);
      sq += v * v;
      sqraw += xv * xv;
    }
    xn[i] = std::sqrt(sq);
    xraw[i] = std::sqrt(sqraw);
    R.r[i] = cs.row_scale ? dt.row_scale[i] : (sq > 0 ? 1.0 / xn[i] : 0.0);
  }
  std::vector<double> cn(static_cast<size_t>(k));
  R.s.resize(static_cast<size_t>(k));
  R.first.resize(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    double sq = 0;
    for (int64_t e = 0; e < d; ++e) sq += double(dt.c[j * d + e]) * dt.c[j * d + e];
    cn[j] = std::sqrt(sq);
    R.s[j] = cs.col_scale ? dt.col_scale[j] : (sq > 0 ? 1.0 / cn[j] : 0.0);
    R.first[j] = j;
    for (int64_t i = 0; i < j; ++i)
      if (std::equal(dt.c.begin() + j * d, dt.c.begin() + (j + 1) * d, dt.c.begin() + i * d) &&
          (!cs.col_scale || dt.col_scale[i] == dt.col_scale[j])) {
        R.first[j] = i;
        break;
      }
  }
  R.S.resize(static_cast<size_t>(n * k));
  R.B.resize(static_cast<size_t>(n * k));
  const double f32 = (4.0 * static_cast<double>(d) + 16.0) * std::ldexp(1.0, -24);
  for (int64_t i = 0; i < n; ++i) {
    const double* xr = &R.xt[static_cast<size_t>(i * d)];
    const double* ar = &xabs[static_cast<size_t>(i * d)];
    for (int64_t j = 0; j < k; ++j) {
      const float* cr = &dt.c[static_cast<size_t>(j * d)];
      double dot = 0, a = 0;
      for (int64_t e = 0; e < d; ++e) {
        dot += xr[e] * cr[e];
        a += ar[e] * std::fabs(double(cr[e]));
      }
      const double scale = R.r[i] * std::fabs(R.s[j]);
      R.S[static_cast<size_t>(i * k + j)] = R.r[i] * R.s[j] * dot;
      R.B[static_cast<size_t>(i * k + j)] =
          tc ? 2.0 * u * scale * a + 2e-5 * scale * (xn[i] + xraw[i]) * cn[j] + 1e-30 : f32 * scale * a + 1e-30;
    }
  }
  return R;
}

// ---- outputs -------------------------------------------------------------------------------

constexpr float kScorePoison = -12345.0f;

struct Out {
  std::vector<int64_t> labels, counts;
  std::vector<float> scores;
  std::vector<double> sums;
  explicit Out(const Case& cs)
      : labels(static_cast<size_t>(cs.n), -7),
        counts(static_cast<size_t>(cs.k), -7),
        scores(static_cast<size_t>(cs.n), kScorePoison),
        sums(static_cast<size_t>(cs.k * cs.d), std::nan("")) {}
};

template <class T>
AssignArgs args_for(const Case& cs, Data<T>& dt, Out& o, Device dev) {
  AssignArgs a;
  TensorView& x = a.x;
  x.present = true;
  x.data = dt.x;
  x.dtype = dtype_of<T>();
  x.device = dev;
  x.ndim = 2;
  x.shape[0] = cs.n;
  x.shape[1] = cs.d;
  x.strides[0] = dt.stride;
  x.strides[1] = 1;
  a.centroids = view(dt.c, {cs.k, cs.d}, dev);
  if (cs.center) a.center = view(dt.center, {cs.d}, dev);
  if (cs.row_scale) a.row_scale = view(dt.row_scale, {cs.n}, dev);
  if (cs.col_scale) a.col_scale = view(dt.col_scale, {cs.k}, dev);
  a.labels = view(o.labels, {cs.n}, dev);
  a.scores = view(o.scores, {cs.n}, dev);
  if (cs.sums) {
    a.sums = view(o.sums, {cs.k, cs.d}, dev);
    a.counts = view(o.counts, {cs.k}, dev);
  }
  a.check_finite = false;
  a.precision = cs.prec;
  return a;
}

// Sets every knob this file uses: the case's values, the others unset.
class Knobs {
 public:
  explicit Knobs(const std::vector<std::pair<const char*, const char*>>& set) {
    for (const char* name : kKnobs) {
      const char* value = nullptr;
      for (const auto& kv : set)
        if (std::strcmp(kv.first, name) == 0) value = kv.second;
      guards_.push_back(std::make_unique<Knob>(name, value));
    }
  }

 private:
  std::vector<std::unique_ptr<Knob>> guards_;
};

struct Stats {
  long mma = 0, wgmma = 0, cp = 0, launches = 0;
};
Stats snapshot() {
  const auto& s = ::emu::stats();
  return Stats{s.mma_sync.load(), s.wgmma.load(), s.cp_async.load(), s.launches.load()};
}
Stats operator-(const Stats& a, const Stats& b) {
  return Stats{a.mma - b.mma, a.wgmma - b.wgmma, a.cp - b.cp, a.launches - b.launches};
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The emulated instructions and launches of the case's path (from the kernels' tiling).
Stats expected_stats(const Case& cs) {
  const int64_t elem = cs.xt == XT::F32 ? 4 : (cs.xt == XT::F64 ? 8 : 2);
  const int64_t slice = 128 / elem;              // elements of a 128-byte slice
  const int64_t ks = cdiv(cs.d, slice);          // slices per row
  const int64_t tiles = cdiv(cs.n, 128);         // 128-row tiles / blocks
  Stats e;
  long label_launches = 2;  // prepare_centroids + the labelling kernel
  switch (cs.path) {
    case Path::Simt:
      label_launches = 1;
      break;
    case Path::Mma:  // 4 warps, each 4 x 8 m16n8 tiles x 4 k-steps per slice; 8 (+8) chunks a thread
      e.mma = tiles * cdiv(cs.k, 128) * ks * 128 * 128;
      e.cp = tiles * cdiv(cs.k, 128) * ks * 128 * (cs.unaligned ? 8 : 16);
      break;
    case Path::MmaFused:  // 8 warps x 8 tiles x 4 k-steps; phase 1: 4 + 2 chunks, phase 2: 4
      e.mma = tiles * ks * 256 * 32;
      e.cp = tiles * ks * 256 * 10;
      break;
    case Path::Wgmma:  // two warpgroups, 4 wgmma a slice; 4 x chunks + width / 32 centroid chunks
      e.wgmma = tiles * cdiv(cs.k, cs.width) * ks * 256 * 4;
      e.cp = tiles * cdiv(cs.k, cs.width) * ks * 256 * (4 + cs.width / 32);
      break;
    case Path::WgmmaFused:  // the labellers of the 64-wide kernel
      e.wgmma = tiles * ks * 256 * 4;
      e.cp = tiles * ks * 256 * 6;
      break;
    case Path::Resident: {  // float16 slices of 64 columns, tiles of 128 centroids
      const int64_t it = tiles * cdiv(cs.k, 128) * cdiv(cs.d, 64);
      e.wgmma = it * 256 * 4;
      e.cp = it * 256 * 4;
      break;
    }
  }
  const bool fused = cs.path == Path::MmaFused || cs.path == Path::WgmmaFused;
  long sums_launches = 0;
  if (!cs.sums) {
    sums_launches = 0;
  } else if (fused) {
    sums_launches = 1;  // reduce_fused_partials
  } else if (cs.pass == SumsPass::Sorted) {
    sums_launches = 4;  // histogram, scan, scatter, segmented sums
  } else if (cs.pass == SumsPass::Columns) {
    sums_launches = 2;  // column sums, reduce
  }
  if (cs.chunks > 1) {  // per chunk: label + the sorted pass + add_counts
    e.launches = 1 + cs.chunks * (1 + 4 + 1);
  } else {
    e.launches = label_launches + sums_launches;
  }
  return e;
}

const char* path_name(Path p) {
  switch (p) {
    case Path::Simt: return "simt";
    case Path::Mma: return "mma";
    case Path::MmaFused: return "mma-fused";
    case Path::Wgmma: return "wgmma";
    case Path::WgmmaFused: return "wgmma-fused";
    default: return "resident";
  }
}

// ---- checks --------------------------------------------------------------------------------

// Labels, scores, counts and sums of `o` against the reference.
void check_outputs(const Case& cs, const Ref& R, const Out& o, const char* who) {
  const int64_t n = R.n, d = R.d, k = R.k;
  int bad_label = 0, bad_score = 0, bad_tie = 0, bad_dead = 0, ties = 0, dead = 0, live = 0;
  double worst_score = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = o.labels[i];
    if (l < 0 || l >= k) {
      if (++bad_label <= 5) CHECK(false, "%s row %ld: label %ld outside [0, %ld)", who, (long)i, (long)l, (long)k);
      continue;
    }
    if (R.r[i] == 0) {
      ++dead;
      if (l != 0 || o.scores[i] != 0.f) {
        if (++bad_dead <= 5)
          CHECK(false, "%s row %ld (r = 0): label %ld score %g, want label 0 score 0", who, (long)i, (long)l,
                o.scores[i]);
      }
      continue;
    }
    if (cs.nan_cents) {  // ops.h: label 0, score NaN
      if ((l != 0 || !std::isnan(o.scores[i])) && ++bad_score <= 5)
        CHECK(false, "%s row %ld: every score NaN, got label %ld score %g (want label 0, NaN)", who, (long)i, (long)l,
              o.scores[i]);
      continue;
    }
    ++live;
    const double* S = &R.S[static_cast<size_t>(i * k)];
    const double* B = &R.B[static_cast<size_t>(i * k)];
    int64_t best = 0;
    for (int64_t j = 1; j < k; ++j)
      if (S[j] > S[best]) best = j;
    if (S[l] < S[best] - B[best] - B[l]) {
      if (++bad_label <= 5)
        CHECK(false, "%s row %ld: label %ld scores %.9f, best %ld %.9f (gap %.3g, bounds %.3g)", who, (long)i, (long)l,
              S[l], (long)best, S[best], S[best] - S[l], B[best] + B[l]);
    }
    for (int64_t j = 0; j < k; ++j)  // rows whose best is held by two copies of a centroid
      if (R.first[j] != j && R.first[j] == R.first[best] && S[j] == S[best]) {
        ++ties;
        break;
      }
    if (R.first[l] != l) {
      if (++bad_tie <= 5)
        CHECK(false, "%s row %ld: label %ld is a copy of centroid %ld (exact tie: the lower index wins)", who, (long)i,
              (long)l, (long)R.first[l]);
    }
    worst_score = std::max(worst_score, std::fabs(double(o.scores[i]) - S[l]) / B[l]);
    if (!(std::fabs(double(o.scores[i]) - S[l]) <= B[l])) {
      if (++bad_score <= 5)
        CHECK(false, "%s row %ld: score %.9g, float64 score of label %ld %.9g (bound %.3g)", who, (long)i,
              o.scores[i], (long)l, S[l], B[l]);
    }
  }
  CHECK(bad_label + bad_score + bad_tie + bad_dead == 0, "%s: %d labels, %d scores, %d ties, %d zero rows wrong", who,
        bad_label, bad_score, bad_tie, bad_dead);
  // The tie and zero-row checks are not vacuous: the data hold such rows.
  if (cs.dup_cents > 0 && k > 1 && live >= 64)
    CHECK(ties > 0, "%s: no row whose best centroid has an exact copy (the data should hold some)", who);
  if ((cs.zero_rows > 0 || cs.row_scale) && n >= 8) CHECK(dead > 0, "%s: no zero row in the data", who);
  if (cs.all_rows_zero) CHECK(dead == n, "%s: %d of %ld rows are zero rows", who, dead, (long)n);
  if (!cs.sums) {
    std::printf("    %s: worst error / bound: scores %.2f\n", who, worst_score);
    return;
  }
  std::vector<int64_t> hist(static_cast<size_t>(k), 0);
  // mag: sum of |r x~|; magc: sum of r (|x| + |center|), the scale of the centring's rounding.
  std::vector<double> want(static_cast<size_t>(k * d), 0.0), mag(static_cast<size_t>(k * d), 0.0),
      magc(static_cast<size_t>(k * d), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = o.labels[i];
    if (l < 0 || l >= k) continue;
    ++hist[l];
    if (R.r[i] == 0) continue;
    for (int64_t e = 0; e < d; ++e) {
      const double v = R.r[i] * R.xt[static_cast<size_t>(i * d + e)];
      want[static_cast<size_t>(l * d + e)] += v;
      mag[static_cast<size_t>(l * d + e)] += std::fabs(v);
      if (cs.center)
        magc[static_cast<size_t>(l * d + e)] += R.r[i] * (std::fabs(R.xt[i * d + e]) + 2 * std::fabs(R.ctr[e]));
    }
  }
  int bad_count = 0, bad_sum = 0;
  double worst_sum = 0;
  for (int64_t j = 0; j < k; ++j) {
    if (o.counts[j] != hist[j] && ++bad_count <= 5)
      CHECK(false, "%s cluster %ld: count %ld, the labels say %ld", who, (long)j, (long)o.counts[j], (long)hist[j]);
    const double rel = 2.0 * (static_cast<double>(d) / 2 + 4 + static_cast<double>(std::min<int64_t>(hist[j], 4096))) *
                       std::ldexp(1.0, -24);
    for (int64_t e = 0; e < d; ++e) {
      const size_t q = static_cast<size_t>(j * d + e);
      const double err = std::fabs(o.sums[q] - want[q]);
      const double tol = rel * mag[q] + 2 * std::ldexp(magc[q], -24) + 1e-12;
      worst_sum = std::max(worst_sum, err / tol);
      if (!(err <= tol) && ++bad_sum <= 5)
        CHECK(false, "%s sums[%ld][%ld] = %.12g, labels say %.12g (tol %.3g)", who, (long)j, (long)e, o.sums[q],
              want[q], tol);
    }
  }
  CHECK(bad_count + bad_sum == 0, "%s: %d counts, %d sums wrong", who, bad_count, bad_sum);
  std::printf("    %s: worst error / bound: scores %.2f, sums %.2f\n", who, worst_score, worst_sum);
}

// Float32 precision: the CUDA labels equal assign_cpu's except where the two labels' float64
// scores lie within both float32 bounds of each other (a documented near tie).
template <class T>
void compare_with_cpu(const Case& cs, Data<T>& dt, const Ref& R, const Out& gpu) {
  Out cpu(cs);
  AssignArgs a = args_for(cs, dt, cpu, Device::CPU);
  assign_cpu(a, nullptr);
  check_outputs(cs, R, cpu, "cpu");
  int differ = 0, bad = 0;
  for (int64_t i = 0; i < cs.n; ++i) {
    const int64_t lg = gpu.labels[i], lc = cpu.labels[i];
    if (lg == lc && std::isnan(gpu.scores[i]) && std::isnan(cpu.scores[i])) continue;
    if (R.r[i] == 0 || std::isnan(R.r[i])) {  // (both checked by check_outputs: label 0, score 0)
      if ((lg != lc || gpu.scores[i] != cpu.scores[i]) && ++bad <= 5)
        CHECK(false, "row %ld (r = 0): cuda label %ld score %g, cpu %ld %g", (long)i, (long)lg, gpu.scores[i], (long)lc,
              cpu.scores[i]);
      continue;
    }
    if (lg == lc) {
      const double tol = 2 * R.B[static_cast<size_t>(i * cs.k + std::max<int64_t>(0, std::min(lg, cs.k - 1)))];
      if (!(std::fabs(double(gpu.scores[i]) - cpu.scores[i]) <= tol) && ++bad <= 5)
        CHECK(false, "row %ld: cuda score %.9g, cpu %.9g (label %ld)", (long)i, gpu.scores[i], cpu.scores[i], (long)lg);
      continue;
    }
    ++differ;
    if (lg < 0 || lg >= cs.k || lc < 0 || lc >= cs.k) continue;  // (reported by check_outputs)
    const size_t a0 = static_cast<size_t>(i * cs.k + lg), b0 = static_cast<size_t>(i * cs.k + lc);
    if (!(std::fabs(R.S[a0] - R.S[b0]) <= R.B[a0] + R.B[b0]) && ++bad <= 5)
      CHECK(false, "row %ld: cuda label %ld (%.9f), cpu %ld (%.9f): not a near tie", (long)i, (long)lg, R.S[a0],
            (long)lc, R.S[b0]);
  }
  if (differ) std::printf("    %d of %ld labels differ from the cpu's (near ties)\n", differ, (long)cs.n);
  CHECK(differ * 50 <= cs.n, "%d of %ld labels differ from assign_cpu's", differ, (long)cs.n);
}

template <class T>
Out run_typed(const Case& cs) {
  Data<T> dt = make_data<T>(cs);
  Out o(cs);
  const Ref R = reference(cs, dt);
  Stats got;
  const auto t0 = Clock::now();
  {
    Knobs knobs(cs.knobs);
    AssignArgs a = args_for(cs, dt, o, Device::CUDA);
    const Stats before = snapshot();
    assign_cuda(a, nullptr);
    got = snapshot() - before;
  }
  const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
  const Stats want = expected_stats(cs);
  std::printf("  %-28s %5ldx%-4ldx%-4ld %-8s %-7s %-11s mma %ld wgmma %ld cp %ld launches %ld, %.2f s\n",
              cs.name.c_str(), (long)cs.n, (long)cs.d, (long)cs.k, xt_name(cs.xt), prec_name(cs.prec),
              path_name(cs.path), got.mma, got.wgmma, got.cp, got.launches, secs);
  std::fflush(stdout);
  CHECK(got.mma == want.mma && got.wgmma == want.wgmma && got.cp == want.cp && got.launches == want.launches,
        "%s: path %s (width %d) expects mma %ld wgmma %ld cp.async %ld launches %ld", cs.name.c_str(),
        path_name(cs.path), cs.width, want.mma, want.wgmma, want.cp, want.launches);
  check_outputs(cs, R, o, cs.name.c_str());
  if (cs.vs_cpu) compare_with_cpu(cs, dt, R, o);
  return o;
}

Out run(const Case& cs) {
  switch (cs.xt) {
    case XT::F32: return run_typed<float>(cs);
    case XT::F16: return run_typed<__half>(cs);
    case XT::BF16: return run_typed<__nv_bfloat16>(cs);
    default: return run_typed<double>(cs);
  }
}


// Two runs of the same data: labels, scores and counts bit for bit, sums within `rtol` of the
// largest |sum| (the order of float64 atomics may differ).
void expect_same(const Out& a, const Out& b, double rtol, const char* what) {
  int bad = 0;
  for (size_t i = 0; i < a.labels.size(); ++i) {
    if ((a.labels[i] != b.labels[i] || std::memcmp(&a.scores[i], &b.scores[i], 4) != 0) && ++bad <= 5)
      CHECK(false, "%s row %zu: label %ld / %ld, score %.9g / %.9g", what, i, (long)a.labels[i], (long)b.labels[i],
            a.scores[i], b.scores[i]);
  }
  CHECK(a.counts == b.counts, "%s: counts differ", what);
  double big = 0, err = 0;
  for (size_t q = 0; q < a.sums.size(); ++q) {
    big = std::max(big, std::fabs(b.sums[q]));
    err = std::max(err, std::fabs(a.sums[q] - b.sums[q]));
  }
  CHECK(err <= rtol * big || (rtol == 0 && std::memcmp(a.sums.data(), b.sums.data(), a.sums.size() * 8) == 0),
        "%s: sums differ by %.3g (largest %.3g)", what, err, big);
}

}  // namespace

// ---- tests ---------------------------------------------------------------------------------

// AssignPrecision::Float32 (the SIMT kernel, 64 rows x 64 centroids a block) against the
// float64 reference and assign_cpu: every input dtype, two centroid tiles with a ragged one,
// D not a multiple of the 16-column slice, strided rows with an unaligned start, all scales.
EMU_TEST(assign_float32_vs_cpu) {
  {
    Case c = simt_vs_cpu("f32_k65_d45", 129, 45, 65);
    c.zero_cents = 1;
    run(c);
  }
  {
    Case c = simt_vs_cpu("f32_f16_k40_d8", 127, 8, 40);
    c.xt = XT::F16;
    run(c);
  }
  {
    Case c = simt_vs_cpu("f32_bf16_k1_d64", 127, 64, 1);
    c.xt = XT::BF16;
    run(c);
  }
  {
    Case c = simt_vs_cpu("f32_strided_scales", 129, 45, 129);
    c.stride = 50;
    c.offset = 1;
    c.center = c.row_scale = c.col_scale = true;
    c.x_shift = 0.5;
    run(c);
  }
  {
    Case c = simt_vs_cpu("f32_n700_k200", 700, 64, 200);  // many rows: the near-tie statistics
    c.dup_cents = 4;
    run(c);
  }
  {
    Case c = make("f32_f16_center_nosums", 64, 100, 64);
    c.xt = XT::F16;
    c.prec = AssignPrecision::Float32;
    c.center = true;
    c.x_shift = 0.5;
    c.sums = false;
    c.path = Path::Simt;
    c.pass = SumsPass::None;
    c.vs_cpu = true;
    run(c);
  }
}

// One row, one column, one centroid; one column against three centroids (cosines of +-1:
// near ties everywhere, within the bounds).
EMU_TEST(assign_float32_tiny) {
  for (int64_t k : {1, 3}) {
    Case c = simt_vs_cpu(k == 1 ? "tiny_n1_d1_k1" : "tiny_n1_d1_k3", 1, 1, k);
    c.zero_rows = c.dup_rows = 0;
    run(c);
  }
  Case c = make("tiny_n5_d1_k3_tc", 5, 1, 3);  // the mma kernel on one column (one padded slice)
  c.zero_rows = 1;
  c.unaligned = true;  // rows of 4 bytes
  run(c);
}

// float64 x: TensorCore takes the Float32 path (ops.h), bit for bit.
EMU_TEST(assign_float64_input) {
  Case c = simt_vs_cpu("f64_k64_d100", 128, 100, 64);
  c.xt = XT::F64;
  c.center = true;
  const Out exact = run(c);
  c.prec = AssignPrecision::TensorCore;
  c.name = "f64_k64_d100_tc";
  c.data = "f64_k64_d100";
  c.vs_cpu = false;
  const Out tc = run(c);
  expect_same(exact, tc, 0.0, "float64 x, TensorCore vs Float32");
}

// The mma.sync kernel (assign_tc_kernel): k below the wgmma threshold, and k = 129 forced onto
// it (two centroid tiles, the second ragged); unaligned rows (the element-by-element loader) and
// 16-byte aligned ones (cp.async with zero fill past D); EDPAIRS_ASSIGN_SUMS=fused where the
// fused kernel does not apply (k > 64, unaligned rows) and "auto" spelled out.
EMU_TEST(assign_mma_kernel) {
  {
    Case c = make("mma_k65_d45_unaligned", 129, 45, 65);
    c.zero_cents = 1;
    c.unaligned = true;  // 180-byte rows
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "fused"}};  // k > 64, unaligned: the sorted pass
    run(c);
  }
  {
    Case c = make("mma_k128_bf16_d136", 128, 136, 128);
    c.xt = XT::BF16;  // 272-byte rows: aligned, 3 slices of 64 (the last ragged)
    c.sums = false;
    c.pass = SumsPass::None;
    run(c);
  }
  {
    Case c = make("mma_k129_f16_d100_forced", 127, 100, 129);
    c.xt = XT::F16;  // 200-byte rows: unaligned
    c.unaligned = true;
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "mma"}};
    run(c);
  }
  {
    // Rows starting one element off 16 bytes: "wgmma" and "fused" both need aligned rows, so
    // the mma kernel (element loader) labels and the sorted pass sums.
    Case c = make("mma_k40_bf16_offset_start", 129, 64, 40);
    c.xt = XT::BF16;
    c.stride = 65;
    c.offset = 1;
    c.unaligned = true;
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}, {"EDPAIRS_ASSIGN_SUMS", "fused"}};
    run(c);
  }
  {
    Case c = make("mma_k1_d8", 129, 8, 1);
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "auto"}, {"EDPAIRS_ASSIGN_KERNEL", "auto"}};
    run(c);
  }
}

// Every EDPAIRS_ASSIGN_SUMS mode at small k (k <= 64, the mma labeller by default): "sorted"
// (the default's segmented pass), "columns" (owned columns), "block" (atomics in the mma
// kernel), "fused" (the fused mma kernel; with EDPAIRS_ASSIGN_KERNEL=wgmma the fused wgmma
// kernel), all on one set of rows with a ragged last tile: same labels whichever pass sums.
EMU_TEST(assign_sums_small_k) {
  Case c = make("", 200, 64, 40);
  c.data = "sums_small_k";
  c.dup_cents = 3;
  const struct {
    const char* name;
    const char* mode;
    const char* kernel;
    Path path;
    SumsPass pass;
  } modes[] = {
      {"small_k_sorted", "sorted", nullptr, Path::Mma, SumsPass::Sorted},
      {"small_k_columns", "columns", nullptr, Path::Mma, SumsPass::Columns},
      {"small_k_block", "block", nullptr, Path::Mma, SumsPass::InKernel},
      {"small_k_fused", "fused", nullptr, Path::MmaFused, SumsPass::InKernel},
      {"small_k_fused_wgmma", "fused", "wgmma", Path::WgmmaFused, SumsPass::InKernel},
  };
  std::vector<Out> outs;
  for (const auto& m : modes) {
    c.name = m.name;
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", m.mode}};
    if (m.kernel) c.knobs.push_back({"EDPAIRS_ASSIGN_KERNEL", m.kernel});
    c.path = m.path;
    c.width = 64;
    c.pass = m.pass;
    outs.push_back(run(c));
  }
  // The mma-labelled runs share their labels and scores bit for bit (the sums pass never
  // changes the labeller, "block" included: it keeps the mma kernel).
  // The fused kernel sums the row norms in another order (its scores may differ in the last
  // bits), its products are the same mma steps in the same order: the same labels.
  for (size_t i = 1; i < 4; ++i) {
    CHECK(outs[i].labels == outs[0].labels, "%s: labels differ from the sorted pass's", modes[i].name);
    CHECK(i == 3 || std::memcmp(outs[i].scores.data(), outs[0].scores.data(), 4 * outs[0].scores.size()) == 0,
          "%s: scores differ from the sorted pass's", modes[i].name);
    CHECK(outs[i].counts == outs[0].counts, "%s: counts differ from the sorted pass's", modes[i].name);
  }
}

// The sums modes where the default labeller is wgmma (k >= 129): "columns" (k x D float32 sums
// fit in shared memory) after the wgmma labels; "block" puts the labelling on the mma kernel
// (its sums live there), also under EDPAIRS_ASSIGN_KERNEL=wgmma.
EMU_TEST(assign_sums_large_k) {
  {
    Case c = make("large_k_columns", 129, 64, 129);
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "columns"}};
    c.path = Path::Wgmma;
    c.width = 256;
    c.pass = SumsPass::Columns;
    run(c);
  }
  {
    Case c = make("large_k_block_on_mma", 64, 32, 200);
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "block"}, {"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.path = Path::Mma;
    c.pass = SumsPass::InKernel;
    run(c);
  }
}

// The wgmma labelling kernel's tiles: 64 centroids (k <= 64, EDPAIRS_ASSIGN_KERNEL=wgmma), 128
// (65 <= k <= 128, forced), 256 (k >= 129 by default; k = 300: two tiles, the second ragged),
// for each 16-bit dtype too, with aligned strided rows (a gap of NaN past D, a ragged last
// chunk the copies zero-fill).
EMU_TEST(assign_wgmma_widths) {
  {
    Case c = make("wgmma64_k40_f16", 129, 64, 40);
    c.xt = XT::F16;
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.path = Path::Wgmma;
    c.width = 64;
    run(c);
  }
  {
    Case c = make("wgmma64_k64_bf16_strided", 128, 45, 64);
    c.xt = XT::BF16;
    c.stride = 56;  // 112-byte rows
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.path = Path::Wgmma;
    c.width = 64;
    c.sums = false;
    c.pass = SumsPass::None;
    run(c);
  }
  {
    Case c = make("wgmma128_k65", 129, 64, 65);
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.zero_cents = 1;
    c.path = Path::Wgmma;
    c.width = 128;
    run(c);
  }
  {
    Case c = make("wgmma128_k128_f16_d136", 127, 136, 128);
    c.xt = XT::F16;
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.path = Path::Wgmma;
    c.width = 128;
    run(c);
  }
  {
    Case c = make("wgmma256_k129_strided", 129, 45, 129);
    c.stride = 48;  // 192-byte rows: aligned, the last chunk of each row partly past D
    c.path = Path::Wgmma;
    c.width = 256;
    run(c);
  }
  {
    Case c = make("wgmma256_k200_bf16", 300, 100, 200);
    c.xt = XT::BF16;
    c.stride = 104;
    c.path = Path::Wgmma;
    c.width = 256;
    run(c);
  }
}

// Centre, row scales and column scales on the tensor-core kernels (mma and wgmma, k = 300:
// two 256-wide tiles): the centring subtracted after the product, zero row scales (label 0,
// score 0), rows equal to the centre (zero rows).
EMU_TEST(assign_scales_and_center) {
  {
    Case c = make("scales_mma_k65", 129, 64, 65);
    c.center = c.row_scale = c.col_scale = true;
    c.x_shift = 0.5;
    run(c);
  }
  {
    Case c = make("center_mma_f16_k64", 128, 72, 64);
    c.xt = XT::F16;
    c.stride = 80;
    c.center = true;
    c.x_shift = 0.5;
    c.pass = SumsPass::Columns;
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "columns"}};
    run(c);
  }
  {
    Case c = make("scales_wgmma_k300", 100, 64, 300);
    c.center = c.row_scale = c.col_scale = true;
    c.x_shift = 0.5;
    c.path = Path::Wgmma;
    c.width = 256;
    run(c);
  }
}

// EDPAIRS_ASSIGN_OVERLAP=3: the sorted sums of each chunk of rows on the side stream while the
// next is labelled (rows per chunk a multiple of 128: 256, 256, 8), on the mma kernel with row
// scales (each chunk's labels, scores and row scales offset) and on the 64-wide wgmma kernel.
EMU_TEST(assign_overlap_chunks) {
  {
    Case c = make("overlap3_mma_rowscale", 520, 32, 65);
    c.stride = 36;
    c.row_scale = true;
    c.knobs = {{"EDPAIRS_ASSIGN_OVERLAP", "3"}};
    c.chunks = 3;
    run(c);
  }
  {
    Case c = make("overlap3_wgmma64", 520, 64, 40);
    c.xt = XT::BF16;
    c.knobs = {{"EDPAIRS_ASSIGN_OVERLAP", "3"}, {"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.path = Path::Wgmma;
    c.width = 64;
    c.chunks = 3;
    run(c);
  }
}

// EDPAIRS_WGMMA_PREFETCH 0 and 16 (the L2 hints of the wgmma kernels; no-ops here, but their
// address arithmetic runs beside the ring): the results of the default depth, bit for bit.
EMU_TEST(assign_prefetch_depths) {
  Case c = make("", 300, 64, 40);
  c.data = "prefetch";
  c.path = Path::Wgmma;
  c.width = 64;
  c.sums = false;
  c.pass = SumsPass::None;
  std::vector<Out> outs;
  for (const char* depth : {"4", "0", "16"}) {
    c.name = std::string("prefetch_wgmma64_") + depth;
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}, {"EDPAIRS_WGMMA_PREFETCH", depth}};
    outs.push_back(run(c));
  }
  expect_same(outs[1], outs[0], 0.0, "prefetch 0 vs 4");
  expect_same(outs[2], outs[0], 0.0, "prefetch 16 vs 4");
  c.name = "prefetch_fused_wgmma_16";
  c.sums = true;
  c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}, {"EDPAIRS_ASSIGN_SUMS", "fused"}, {"EDPAIRS_WGMMA_PREFETCH", "16"}};
  c.path = Path::WgmmaFused;
  c.pass = SumsPass::InKernel;
  const Out fused = run(c);
  CHECK(fused.labels == outs[0].labels, "fused wgmma labels differ from the 64-wide kernel's");
}

// The persistent kernels (one block per multiprocessor, EMU_SMS of them) over 6 row tiles: one
// block walking all of them (EMU_SMS=1; the fused wgmma kernel's two hand-over buffers reused)
// and more multiprocessors than tiles (EMU_SMS=7).
EMU_TEST(assign_persistent_grids) {
  Case c = make("", 700, 32, 40);
  c.data = "persistent";
  c.stride = 40;  // aligned rows with a gap of NaN, read again by the summing warps
  c.pass = SumsPass::InKernel;
  std::vector<Out> outs;
  for (const char* sms : {"1", "7"}) {
    c.name = std::string("persistent_fused_mma_sms") + sms;
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "fused"}, {"EMU_SMS", sms}};
    c.path = Path::MmaFused;
    outs.push_back(run(c));
    c.name = std::string("persistent_fused_wgmma_sms") + sms;
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "fused"}, {"EDPAIRS_ASSIGN_KERNEL", "wgmma"}, {"EMU_SMS", sms}};
    c.path = Path::WgmmaFused;
    outs.push_back(run(c));
  }
  // Labels and counts do not depend on the grid; the fused wgmma kernel's sums (owned columns,
  // float64 partials added in block order) differ only by where the float32 runs start.
  expect_same(outs[2], outs[0], 1e-5, "fused mma, 7 vs 1 multiprocessors");
  expect_same(outs[3], outs[1], 1e-5, "fused wgmma, 7 vs 1 multiprocessors");
}

// AssignPrecision::TensorCoreHalf (float16 rows made in shared memory, the resident wgmma
// kernel): D from 8 to 512 (d padded to 64), k of one and two centroid tiles, col_scale, both
// sums passes it takes, one row, and the persistent loop on one multiprocessor.
EMU_TEST(assign_half_rows) {
  {
    Case c = make("half_n1_d8_k1", 1, 8, 1);
    c.prec = AssignPrecision::TensorCoreHalf;
    c.zero_rows = c.dup_rows = 0;
    c.path = Path::Resident;
    c.width = 128;
    run(c);
  }
  {
    Case c = make("half_k129_d136_colscale", 128, 136, 129);
    c.prec = AssignPrecision::TensorCoreHalf;
    c.col_scale = true;
    c.zero_cents = 1;
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "columns"}};
    c.path = Path::Resident;
    c.pass = SumsPass::Columns;
    run(c);
  }
  {
    Case c = make("half_k65_d512_strided", 100, 512, 65);
    c.prec = AssignPrecision::TensorCoreHalf;
    c.path = Path::Resident;
    c.stride = 516;
    c.sums = false;
    c.pass = SumsPass::None;
    run(c);
  }
  {
    Case c = make("half_k40_d64_sms1", 300, 64, 40);
    c.prec = AssignPrecision::TensorCoreHalf;
    c.knobs = {{"EMU_SMS", "1"}, {"EDPAIRS_WGMMA_PREFETCH", "0"}};
    c.path = Path::Resident;
    run(c);
  }
}

// Inputs TensorCoreHalf refuses (ops.h): an exception, no launch, outputs not written.
EMU_TEST(assign_half_refusals) {
  struct Bad {
    const char* name;
    int64_t d, stride, offset;
    XT xt;
    bool center, row_scale;
    const char* cc;
  } bad[] = {
      {"half_refuses_d520", 520, 0, 0, XT::F32, false, false, nullptr},
      {"half_refuses_center", 64, 0, 0, XT::F32, true, false, nullptr},
      {"half_refuses_row_scale", 64, 0, 0, XT::F32, false, true, nullptr},
      {"half_refuses_unaligned_d45", 45, 0, 0, XT::F32, false, false, nullptr},
      {"half_refuses_unaligned_start", 64, 0, 1, XT::F32, false, false, nullptr},
      {"half_refuses_float16", 64, 0, 0, XT::F16, false, false, nullptr},
      {"half_refuses_bfloat16", 64, 0, 0, XT::BF16, false, false, nullptr},
      {"half_refuses_float64", 64, 0, 0, XT::F64, false, false, nullptr},
      {"half_refuses_cc8", 64, 0, 0, XT::F32, false, false, "8"},
  };
  for (const Bad& b : bad) {
    Case c = make(b.name, 130, b.d, 7);
    c.prec = AssignPrecision::TensorCoreHalf;
    c.stride = b.stride;
    c.offset = b.offset;
    c.xt = b.xt;
    c.center = b.center;
    c.row_scale = b.row_scale;
    if (b.cc) c.knobs = {{"EMU_CC_MAJOR", b.cc}};
    std::string msg;
    long launches = -1;
    std::vector<int64_t> labels;
    auto attempt = [&](auto tag) {
      using T = decltype(tag);
      Data<T> dt = make_data<T>(c);
      Out o(c);
      Knobs knobs(c.knobs);
      AssignArgs a = args_for(c, dt, o, Device::CUDA);
      const Stats before = snapshot();
      try {
        assign_cuda(a, nullptr);
      } catch (const std::exception& e) {
        msg = e.what();
      }
      launches = (snapshot() - before).launches;
      labels = o.labels;
    };
    switch (b.xt) {
      case XT::F32: attempt(float{}); break;
      case XT::F16: attempt(__half{}); break;
      case XT::BF16: attempt(__nv_bfloat16{}); break;
      default: attempt(double{}); break;
    }
    std::printf("  %-28s %s\n", b.name, msg.empty() ? "(no exception)" : msg.substr(0, 90).c_str());
    CHECK(msg.find("tf32-half") != std::string::npos, "%s: expected a refusal naming 'tf32-half', got '%s'", b.name,
          msg.c_str());
    CHECK(launches == 0, "%s: %ld launches before the refusal", b.name, launches);
    CHECK(std::all_of(labels.begin(), labels.end(), [](int64_t l) { return l == -7; }), "%s: labels written", b.name);
  }
}

// Unchecked non-finite centroids (a NaN in every one): each nonzero row gets label 0 and score
// NaN, a zero row label 0 and score 0, on every path (ops.h); sums and counts follow the labels.
// Two rows hold a NaN themselves: their r_n is NaN, which every kernel (and assign_cpu) takes as
// a zero row's: label 0, score 0, counted in cluster 0, adding nothing.
EMU_TEST(assign_nan_scores) {
  Case c = make("", 64, 32, 5);
  c.data = "nan";
  c.nan_cents = true;
  c.zero_rows = 2;
  c.dup_cents = 0;
  {
    Case e = c;
    e.name = "nan_float32_simt";
    e.prec = AssignPrecision::Float32;
    e.path = Path::Simt;
    e.pass = SumsPass::InKernel;
    e.vs_cpu = true;
    run(e);
  }
  {
    Case e = c;
    e.name = "nan_mma";
    run(e);
  }
  {
    Case e = c;
    e.name = "nan_fused_mma";
    e.knobs = {{"EDPAIRS_ASSIGN_SUMS", "fused"}};
    e.path = Path::MmaFused;
    e.pass = SumsPass::InKernel;
    run(e);
  }
  {
    Case e = c;
    e.name = "nan_fused_wgmma_bf16";
    e.xt = XT::BF16;
    e.knobs = {{"EDPAIRS_ASSIGN_SUMS", "fused"}, {"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    e.path = Path::WgmmaFused;
    e.pass = SumsPass::InKernel;
    run(e);
  }
  {
    Case e = c;
    e.name = "nan_wgmma128";
    e.k = 65;
    e.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    e.path = Path::Wgmma;
    e.width = 128;
    run(e);
  }
  {
    Case e = c;
    e.name = "nan_half";
    e.prec = AssignPrecision::TensorCoreHalf;
    e.path = Path::Resident;
    run(e);
  }
}

// N = 0 on every precision: nothing launched, sums and counts zeroed, no refusal (ops.h refuses
// TensorCoreHalf inputs only with N >= 1).
EMU_TEST(assign_empty_rows) {
  for (AssignPrecision p : {AssignPrecision::Float32, AssignPrecision::TensorCore, AssignPrecision::TensorCoreHalf}) {
    Case c = make("empty", 0, 45, 3);
    c.prec = p;
    c.center = true;  // (TensorCoreHalf would refuse it with rows)
    Data<float> dt = make_data<float>(c);
    Out o(c);
    Knobs knobs({});
    AssignArgs a = args_for(c, dt, o, Device::CUDA);
    const Stats before = snapshot();
    std::string msg;
    try {
      assign_cuda(a, nullptr);
    } catch (const std::exception& e) {
      msg = e.what();
    }
    const long launches = (snapshot() - before).launches;
    CHECK(msg.empty(), "precision %s, N = 0: threw '%s'", prec_name(p), msg.c_str());
    CHECK(launches == 0, "precision %s, N = 0: %ld launches", prec_name(p), launches);
    CHECK(std::all_of(o.sums.begin(), o.sums.end(), [](double v) { return v == 0.0; }) &&
              std::all_of(o.counts.begin(), o.counts.end(), [](int64_t v) { return v == 0; }),
          "precision %s, N = 0: sums / counts not zeroed", prec_name(p));
  }
}

// Compute capability 8.x (EMU_CC_MAJOR=8): EDPAIRS_ASSIGN_KERNEL=wgmma falls back to the mma
// kernel (and the fused sums to the fused mma kernel).
EMU_TEST(assign_pre_hopper) {
  Case c = make("", 100, 64, 40);
  c.data = "pre_hopper";
  c.name = "cc8_wgmma_knob_takes_mma";
  c.knobs = {{"EMU_CC_MAJOR", "8"}, {"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
  run(c);
  c.name = "cc8_fused_takes_fused_mma";
  c.knobs = {{"EMU_CC_MAJOR", "8"}, {"EDPAIRS_ASSIGN_KERNEL", "wgmma"}, {"EDPAIRS_ASSIGN_SUMS", "fused"}};
  c.path = Path::MmaFused;
  c.pass = SumsPass::InKernel;
  run(c);
}

// EDPAIRS_ASSIGN_BLOCKS_PER_SM=1: the mma kernel asks for 160 KB of shared memory (one block
// per multiprocessor): the same results as the default's 108 KB.
EMU_TEST(assign_blocks_per_sm) {
  Case c = make("", 100, 64, 40);
  c.data = "blocks_per_sm";
  c.sums = false;
  c.pass = SumsPass::None;
  c.name = "blocks_per_sm_default";
  const Out a = run(c);
  c.name = "blocks_per_sm_1";
  c.knobs = {{"EDPAIRS_ASSIGN_BLOCKS_PER_SM", "1"}};
  const Out b = run(c);
  expect_same(b, a, 0.0, "one block per multiprocessor vs two");
}

// The fused small-k kernels at their largest shared-memory layout: k = 64 and D = 512 (the
// k x D float32 sums next to the ring: 226.5 KB of the 227 KB for the wgmma kernel, 211 KB for
// the mma one).
EMU_TEST(assign_fused_limits) {
  {
    Case c = make("fused_wgmma_k64_d512", 64, 512, 64);
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "fused"}, {"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.path = Path::WgmmaFused;
    c.pass = SumsPass::InKernel;
    run(c);
  }
  {
    Case c = make("fused_mma_k64_d512_f16", 64, 512, 64);
    c.xt = XT::F16;
    c.knobs = {{"EDPAIRS_ASSIGN_SUMS", "fused"}};
    c.path = Path::MmaFused;
    c.pass = SumsPass::InKernel;
    run(c);
  }
}

// EDPAIRS_ASSIGN_KERNEL=wgmma-tma with 16-bit x: the TMA kernel takes float32 x only, so
// bfloat16 rows go to the wgmma kernel (and the fused sums to the fused wgmma kernel).
EMU_TEST(assign_tma_knob_16bit) {
  Case c = make("", 129, 64, 40);
  c.data = "tma_knob";
  c.xt = XT::BF16;
  c.name = "tma_knob_bf16_wgmma64";
  c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma-tma"}};
  c.path = Path::Wgmma;
  c.width = 64;
  run(c);
  c.name = "tma_knob_bf16_fused";
  c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma-tma"}, {"EDPAIRS_ASSIGN_SUMS", "fused"}};
  c.path = Path::WgmmaFused;
  c.pass = SumsPass::InKernel;
  run(c);
}

// Bad knob values are refused with an error naming the knob (not ignored).
EMU_TEST(assign_knob_validation) {
  const std::pair<const char*, const char*> bad[] = {
      {"EDPAIRS_ASSIGN_KERNEL", "hgmma"},
      {"EDPAIRS_ASSIGN_SUMS", "segmented"},
      {"EDPAIRS_ASSIGN_OVERLAP", "65"},
      {"EDPAIRS_WGMMA_PREFETCH", "17"},
      {"EDPAIRS_ASSIGN_SEG_ROWS", "512"},
      {"EDPAIRS_ASSIGN_COUNTING", "atomic"},
  };
  for (const auto& kv : bad) {
    for (AssignPrecision p : {AssignPrecision::TensorCore, AssignPrecision::TensorCoreHalf}) {
      // The prefetch depth is read by the wgmma kernels only (and the resident kernel's launch).
      Case c = make("knobs", 64, 32, 5);
      c.prec = p;
      const bool kernel_knob = std::strcmp(kv.first, "EDPAIRS_ASSIGN_KERNEL") == 0;
      // (TensorCoreHalf reads neither the labeller knob nor, here, the sums knob: no refusal)
      if (p == AssignPrecision::TensorCoreHalf && (kernel_knob || std::strcmp(kv.first, "EDPAIRS_ASSIGN_SUMS") == 0))
        continue;
      c.knobs = {kv, {"EDPAIRS_ASSIGN_KERNEL", kernel_knob ? kv.second : "wgmma"}};
      Data<float> dt = make_data<float>(c);
      Out o(c);
      Knobs knobs(c.knobs);
      AssignArgs a = args_for(c, dt, o, Device::CUDA);
      std::string msg;
      try {
        assign_cuda(a, nullptr);
      } catch (const std::exception& e) {
        msg = e.what();
      }
      CHECK(msg.find(kv.first) != std::string::npos, "%s=%s (precision %s): expected a refusal naming it, got '%s'",
            kv.first, kv.second, prec_name(p), msg.c_str());
    }
  }
}

// Rows of norm ~1e15 against centroids of ~1e-15 and the reverse (the scales of a cosine must
// not over- or underflow in float32 squares, TF32 or the float16 rows' powers of two).
// Centroids with norms around 1e-21 and 1e-24: their squares underflow float32, which the
// Float32 kernel summed in until this test (every row labelled 0 at 1e-24, scales off by 1e-4
// at 1e-21); float64 squares, as on the CPU and the tensor-core path.
EMU_TEST(assign_tiny_centroids) {
  for (const double scale : {1e-21, 1e-24}) {
    Case c = simt_vs_cpu("tiny_cents_simt", 128, 8, 20);
    c.c_scale = scale;
    run(c);
  }
  Case c = make("tiny_cents_mma", 128, 8, 20);
  c.c_scale = 1e-24;
  c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "mma"}};
  c.path = Path::Mma;
  run(c);
}

EMU_TEST(assign_magnitudes) {
  {
    Case c = simt_vs_cpu("huge_rows_simt", 128, 8, 20);
    c.x_scale = 1e15;
    c.c_scale = 1e-15;
    run(c);
  }
  {
    Case c = make("tiny_rows_wgmma64", 128, 8, 20);
    c.x_scale = 1e-15;
    c.c_scale = 1e15;
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}};
    c.path = Path::Wgmma;
    c.width = 64;
    run(c);
  }
  {
    Case c = make("huge_rows_half", 128, 8, 20);
    c.x_scale = 1e15;
    c.c_scale = 1e-15;
    c.prec = AssignPrecision::TensorCoreHalf;
    c.path = Path::Resident;
    run(c);
  }
}

// Degenerate inputs: every row zero (label 0, score 0, all counted in cluster 0, sums 0), every
// centroid identical (an exact tie: label 0), every centroid zero (scores 0: label 0).
EMU_TEST(assign_degenerate) {
  for (int v = 0; v < 3; ++v) {
    const char* names[] = {"all_rows_zero", "all_cents_same", "all_cents_zero"};
    Case c = simt_vs_cpu(names[v], 129, 32, 7);
    c.all_rows_zero = v == 0;
    c.all_cents_same = v == 1;
    c.all_cents_zero = v == 2;
    run(c);
    c.name += "_fused_wgmma";
    c.prec = AssignPrecision::TensorCore;
    c.knobs = {{"EDPAIRS_ASSIGN_KERNEL", "wgmma"}, {"EDPAIRS_ASSIGN_SUMS", "fused"}};
    c.path = Path::WgmmaFused;
    c.vs_cpu = false;
    run(c);
  }
}

// The wgmma launchers refuse operands their kernels' 16-byte copies cannot take (rows of x or
// the centroids off 16-byte boundaries, no features or centroids) with an error that names
// them, before any launch: on a GPU such a launch would end the process's CUDA context.
EMU_TEST(assign_wgmma_launchers_check_operands) {
  alignas(16) static float x[64 * 8] = {};
  alignas(16) static float cw[256 * 64] = {};
  static int64_t labels[64];
  static float scores[64], col[256];
  cuda_detail::WgmmaAssignParams good{};
  good.x = x;
  good.x_stride = 8;
  good.n = 64;
  good.d = 8;
  good.k = 3;
  good.d_pad = 32;
  good.k_tiles = 1;
  good.cw = cw;
  good.col_s = good.col_o = col;
  good.labels = labels;
  good.scores = scores;
  struct Bad {
    const char* what;
    cuda_detail::WgmmaAssignParams p;
  };
  std::vector<Bad> bad;
  bad.push_back({"x off 16 bytes", good});
  bad.back().p.x = x + 1;
  bad.push_back({"row stride of 20 bytes", good});
  bad.back().p.x_stride = 5;
  bad.push_back({"centroids off 16 bytes", good});
  bad.back().p.cw = cw + 2;
  bad.push_back({"no features", good});
  bad.back().p.d = 0;
  bad.push_back({"no centroids", good});
  bad.back().p.k = 0;
  const long before = ::emu::stats().launches.load();
  for (const Bad& b : bad) {
    const std::pair<const char*, std::function<void()>> launchers[] = {
        {"launch_assign_wgmma", [&] { cuda_detail::launch_assign_wgmma(b.p, DType::Float32, nullptr); }},
        {"launch_assign_wgmma_resident", [&] { cuda_detail::launch_assign_wgmma_resident(b.p, nullptr); }},
        {"launch_assign_wgmma_sums", [&] {
           cuda_detail::launch_assign_wgmma_sums(b.p, DType::Float32, 1, nullptr, nullptr, nullptr);
         }},
    };
    for (const auto& [name, launch] : launchers) {
      std::string message;
      try {
        launch();
      } catch (const std::invalid_argument& e) {
        message = e.what();
      }
      CHECK(message.find("must be 16-byte aligned") != std::string::npos, "%s with %s: %s", name, b.what,
            message.empty() ? "no error" : message.c_str());
    }
  }
  CHECK(::emu::stats().launches.load() == before, "a launcher launched with bad operands");
}
