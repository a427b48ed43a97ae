// The owned-column cluster sums of csrc/cuda/assign_sums.cuh run on the host: the device
// helpers compiled as plain C++ (the CUDA qualifiers defined away below), the kernel's block
// partition (column_partition) and its threads walked one after another. Within a block the
// threads own disjoint columns (and count the rows they stage with integer atomics), so running
// them in sequence computes the same float32 sums and counts as the kernel does in parallel. Checks the sums against float64 and the
// counts exactly; tests/test_host_kernels.py builds and runs it.
//
//   column_sums N D K DTYPE(f32|f16|bf16) CENTER(0|1) STRIDE_PAD RESIDENT SEED
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline
#define __global__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// What the helpers' headers name of the device runtime (col_stage's counts; add_block_sums, not run here).
inline float __double2float_rn(double v) { return static_cast<float>(v); }
template <class A, class B>
A atomicAdd(A* a, B b) {
  const A old = *a;
  *a += b;
  return old;
}
inline void __syncthreads() {}

#include "assign_sums.cuh"

using namespace edpairs::cuda_detail;

namespace {

uint64_t state = 1;
double uniform() {  // in [0, 1)
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<double>(state >> 11) / 9007199254740992.0;
}

template <class T>
T from_float(float v);
template <>
float from_float<float>(float v) { return v; }
template <>
__half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <class T>
int run(int64_t n, int d, int k, bool with_center, int pad, int64_t resident) {
  const int64_t stride = d + pad;
  std::vector<T> x(static_cast<size_t>(n * stride));
  for (auto& v : x) v = from_float<T>(static_cast<float>(2 * uniform() - 1));
  std::vector<int64_t> labels(static_cast<size_t>(n));
  std::vector<float> rscale(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    labels[i] = static_cast<int64_t>(uniform() * k);
    rscale[i] = uniform() < 0.1 ? 0.f : static_cast<float>(uniform());
  }
  std::vector<float> center(static_cast<size_t>(d));
  for (auto& c : center) c = static_cast<float>(uniform() - 0.5);
  const float* ctr = with_center ? center.data() : nullptr;

  // The kernel: blocks of consecutive rows, staged kColStageRows at a time (by every thread,
  // which also count them); warp w owns slices w, w + warps, ..; lane l the columns l * E .. of
  // its slice.
  const ColPartition part = column_partition(n, resident);
  const int slices = col_slices<T>(d);
  const int warps = slices < kColMaxWarps ? slices : kColMaxWarps;
  std::vector<double> sums(static_cast<size_t>(k) * d, 0.0);
  std::vector<long long> counts(static_cast<size_t>(k), 0);
  std::vector<float> block_sums(static_cast<size_t>(k) * d);
  std::vector<unsigned> block_counts(static_cast<size_t>(k));
  std::vector<ColRow> table(static_cast<size_t>(kColStageRows));
  if (part.rows_per_block > kColMaxRows || part.blocks * part.rows_per_block < n ||
      (part.blocks - 1) * part.rows_per_block >= n) {
    std::printf("bad partition: %lld blocks of %lld rows for %lld\n", static_cast<long long>(part.blocks),
                static_cast<long long>(part.rows_per_block), static_cast<long long>(n));
    return 1;
  }
  for (int64_t b = 0; b < part.blocks; ++b) {
    std::fill(block_sums.begin(), block_sums.end(), 0.f);
    std::fill(block_counts.begin(), block_counts.end(), 0u);
    const int64_t begin = b * part.rows_per_block;
    const int64_t end = begin + part.rows_per_block < n ? begin + part.rows_per_block : n;
    for (int64_t run = begin; run < end; run += kColStageRows) {
      const int64_t run_end = run + kColStageRows < end ? run + kColStageRows : end;
      for (int tid = 0; tid < 32 * warps; ++tid) {
        col_stage(labels.data(), rscale.data(), run, run_end, d, table.data(), block_counts.data(), tid, 32 * warps);
      }
      for (int w = 0; w < warps; ++w) {
        for (int lane = 0; lane < 32; ++lane) {
          add_owned_columns<T>(x.data(), stride, run, static_cast<int>(run_end - run), d, ctr,
                               TableRows{table.data()}, block_sums.data(), w, warps, lane);
        }
      }
    }
    for (size_t i = 0; i < sums.size(); ++i) sums[i] += block_sums[i];  // reduce_fused_partials
    for (int j = 0; j < k; ++j) counts[j] += block_counts[j];
  }

  // float64 reference of sum r x~ per (label, column), with x~ rounded once to float32 as the
  // kernels do, and the sum of magnitudes for the bound of float32 runs of rows_per_block.
  std::vector<double> ref(sums.size(), 0.0), mag(sums.size(), 0.0);
  std::vector<long long> ref_counts(static_cast<size_t>(k), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = labels[i];
    ref_counts[l] += 1;
    if (!(rscale[i] > 0.f)) continue;
    for (int c = 0; c < d; ++c) {
      const float v = to_float(x[i * stride + c]) - (ctr != nullptr ? ctr[c] : 0.f);
      const double t = static_cast<double>(rscale[i]) * v;
      ref[l * d + c] += t;
      mag[l * d + c] += std::fabs(t);
    }
  }
  double worst = 0.0;
  for (size_t i = 0; i < sums.size(); ++i) {
    const double bound = static_cast<double>(part.rows_per_block) * std::ldexp(1.0, -24) * mag[i] + 1e-30;
    const double ratio = std::fabs(sums[i] - ref[i]) / bound;
    if (ratio > worst) worst = ratio;
  }
  long long total = 0;
  for (int j = 0; j < k; ++j) {
    total += counts[j];
    if (counts[j] != ref_counts[j]) {
      std::printf("counts[%d] = %lld, expected %lld\n", j, counts[j], ref_counts[j]);
      return 1;
    }
  }
  std::printf("%s blocks %lld x %lld rows, %d warps; counts %lld of %lld; worst error / float32 bound %.3g\n",
              worst <= 1.0 ? "ok" : "FAIL", static_cast<long long>(part.blocks),
              static_cast<long long>(part.rows_per_block), warps, total, static_cast<long long>(n), worst);
  return worst <= 1.0 && total == n ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s N D K f32|f16|bf16 CENTER STRIDE_PAD RESIDENT SEED\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]);
  const int d = std::atoi(argv[2]);
  const int k = std::atoi(argv[3]);
  const std::string dtype = argv[4];
  const bool with_center = std::atoi(argv[5]) != 0;
  const int pad = std::atoi(argv[6]);
  const int64_t resident = std::atoll(argv[7]);
  state = static_cast<uint64_t>(std::atoll(argv[8])) * 2654435761ull + 1;
  if (n < 1 || d < 1 || k < 1 || pad < 0 || resident < 1) {
    std::fprintf(stderr, "N, D, K and RESIDENT must be positive and STRIDE_PAD not negative\n");
    return 2;
  }
  if (dtype == "f32") return run<float>(n, d, k, with_center, pad, resident);
  if (dtype == "f16") return run<__half>(n, d, k, with_center, pad, resident);
  if (dtype == "bf16") return run<__nv_bfloat16>(n, d, k, with_center, pad, resident);
  std::fprintf(stderr, "DTYPE must be f32, f16 or bf16, got %s\n", argv[4]);
  return 2;
}
