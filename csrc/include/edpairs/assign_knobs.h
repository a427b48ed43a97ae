// The CUDA assignment's environment knobs (EDPAIRS_ASSIGN_KERNEL, _SUMS, _OVERLAP, _SEG_ROWS,
// _COUNTING, EDPAIRS_WGMMA_PREFETCH), read and checked in one place: by the CUDA library at each
// op's entry, and by the Python side (edpairs._gemm: whether the float16 copies apply, the
// sorted pass's knobs checked before labelling) through the binding assign_knobs(), which every
// build has. A bad value throws std::invalid_argument (ValueError in Python). Host code only.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <string>

#include "edpairs/errors.h"

namespace edpairs {
namespace knobs {

constexpr int kSegRows = 256;  // sorted positions per block of the segmented sum (the default)

// A value of a word-valued knob and the word that names it.
template <class T>
struct Choice {
  const char* word;
  T value;
};

// The knob `env` as one of `choices` (the first when unset or empty, and the fallback the list
// starts with); any other word throws "ENV must be 'a', 'b' or 'c', got '...'".
template <class T, std::size_t N>
inline T choice_knob(const char* env, const Choice<T> (&choices)[N]) {
  const char* v = std::getenv(env);
  if (v == nullptr || *v == '\0') return choices[0].value;
  for (const Choice<T>& c : choices) {
    if (std::string(v) == c.word) return c.value;
  }
  std::string words;
  for (std::size_t i = 0; i < N; ++i) {
    words += std::string(i == 0 ? "" : (i + 1 == N ? " or " : ", ")) + "'" + choices[i].word + "'";
  }
  fail(std::string(env) + " must be " + words + ", got '" + v + "'");
}

// The word of `value` among `choices` (the first's when none has it).
template <class T, std::size_t N>
inline const char* choice_word(const T value, const Choice<T> (&choices)[N]) {
  for (const Choice<T>& c : choices) {
    if (c.value == value) return c.word;
  }
  return choices[0].word;
}

// Sorted positions per block of the segmented sums (EDPAIRS_ASSIGN_SEG_ROWS: 64, 128 or 256,
// the default). 1M rows make 3907 blocks of 256, 3.3 waves of the 1188 that an H200 holds at
// once (9 a multiprocessor): the last wave runs a third full, with a third of the loads in
// flight. Smaller blocks shorten that tail for a few more atomics at label changes (a block
// flushes at least once). Opt-in until a GPU run times it (benchmarks/results/h100/NOTES.md,
// version 19).
inline int seg_rows() {
  const char* v = std::getenv("EDPAIRS_ASSIGN_SEG_ROWS");
  if (v == nullptr || *v == '\0') return kSegRows;
  const std::string s(v);
  if (s == "64") return 64;
  if (s == "128") return 128;
  if (s == "256") return 256;
  fail("EDPAIRS_ASSIGN_SEG_ROWS must be 64, 128 or 256, got '" + s + "'");
}

// How the sorted pass counts the labels (EDPAIRS_ASSIGN_COUNTING): "auto" (default) in shared
// memory for k <= kBlockLabels (assign_tc_cuda.cu), "global" one global atomic per row (the kernels before version
// 19, kept to isolate a failure of the shared-memory ones on a GPU).
inline bool shared_counting_knob() {
  static constexpr Choice<bool> kChoices[] = {{"auto", true}, {"global", false}};
  return choice_knob("EDPAIRS_ASSIGN_COUNTING", kChoices);
}

// The sorted pass's knobs, read once at an op's entry (a bad value refused before anything runs)
// and handed down, so that every chunk of a call runs with the same.
struct SortedKnobs {
  int seg_rows = kSegRows;
  bool shared_counting = true;
};
inline SortedKnobs sorted_knobs() { return SortedKnobs{seg_rows(), shared_counting_knob()}; }

// Which way the tensor-core path accumulates cluster sums (EDPAIRS_ASSIGN_SUMS): "auto"
// (default: "sorted"), "columns" (assign_tc_cuda.cu's owned-column pass where the k x D float32 sums fit
// in shared memory, else "sorted"), "sorted" (its segmented reduction), "block"
// (per-block atomics in the mma assignment kernel) or "fused" (the small-k fused kernels where
// they apply, else the auto choice). The knob exists so that the benchmarks measure each and a
// failure on a device can be isolated. H100, 1M x 512, k = 64, TF32 (run 5): fused 2.95 ms,
// sorted 2.92 ms. "columns" has not yet run on a GPU: it stays opt-in until a GPU run has
// passed its tests and timed it (benchmarks/results/h100/NOTES.md, version 7 predicts it
// faster than "sorted" at k = 64).
enum class SumsMode { Auto, Columns, Sorted, Block, Fused };
constexpr Choice<SumsMode> kSumsModes[] = {{"auto", SumsMode::Auto},     {"columns", SumsMode::Columns},
                                           {"sorted", SumsMode::Sorted}, {"block", SumsMode::Block},
                                           {"fused", SumsMode::Fused}};
inline SumsMode sums_mode() { return choice_knob("EDPAIRS_ASSIGN_SUMS", kSumsModes); }

// Which kernel labels the rows of the tensor-core path (EDPAIRS_ASSIGN_KERNEL): "auto"
// (default: "wgmma" for k >= kWgmmaAutoMinK where it runs, else "mma"), "mma" (assign_tc_kernel
// of assign_tc_cuda.cu, mma.sync, every architecture of the build), "wgmma" (assign_wgmma_cuda.cu, Hopper's
// warpgroup MMA: where the build has sm_90a, the device has compute capability 9.0 and x's
// rows are 16-byte aligned; the mma kernel elsewhere) or "wgmma-tma"
// (assign_wgmma_tma_cuda.cu for float32 x: TMA loads, the centroid tile multicast to clusters
// of two blocks; "wgmma" for 16-bit x). Measured on an H100 (1M x 512, TF32): k = 1024 wgmma
// 6.4 ms, wgmma-tma 9.3 ms, mma 8.7 ms, the cuBLAS route 7.8 ms; bfloat16 at k = 1024: wgmma
// 4.2 ms, mma 4.8 ms (benchmarks/results/h100/NOTES.md, run 5). At k = 64 run 5 had wgmma
// 3.3 ms (k padded to 256) against 2.9 for the mma path. The wgmma kernel now takes tiles of
// 64 or 128 centroids for k <= 128, which the shared-memory count of NOTES.md, version 7, puts
// ahead of the mma kernel; those tiles have not yet run on a GPU, so auto keeps the mma kernel
// below kWgmmaAutoMinK until a GPU run has passed their tests and timed them.
enum class LabelKernel { Auto, Mma, Wgmma, WgmmaTma };  // kWgmmaAutoMinK: ops.h
constexpr Choice<LabelKernel> kLabelKernels[] = {{"auto", LabelKernel::Auto},
                                                 {"mma", LabelKernel::Mma},
                                                 {"wgmma", LabelKernel::Wgmma},
                                                 {"wgmma-tma", LabelKernel::WgmmaTma}};
inline LabelKernel label_kernel() { return choice_knob("EDPAIRS_ASSIGN_KERNEL", kLabelKernels); }

inline const char* name(const SumsMode m) { return choice_word(m, kSumsModes); }
inline const char* name(const LabelKernel k) { return choice_word(k, kLabelKernels); }

// The integer environment knob `name` (0 .. most; `fallback` when unset or empty).
inline int int_knob(const char* name, const int fallback, const int most) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long value = std::strtol(v, &end, 10);
  if (*end != '\0' || value < 0 || value > most) {
    fail(std::string(name) + " must be an integer from 0 to " + std::to_string(most) + ", got '" + v + "'");
  }
  return static_cast<int>(value);
}

// How many iterations beyond their cp.async ring the wgmma kernels prefetch x's slices into L2
// (EDPAIRS_WGMMA_PREFETCH, 0..16, default 4): more of x in flight from DRAM than the ring's
// shared memory holds (the fused small-k kernel, one block per SM, has 32 KB of x in its ring).
// A prediction for the next GPU run (benchmarks/results/h100/NOTES.md, version 7); 0 turns it off.
// The resident float16-row kernel takes any value above 0 as "on" (it names the next row tile).
inline int wgmma_prefetch() { return int_knob("EDPAIRS_WGMMA_PREFETCH", 4, 16); }

// Rows in how many chunks the labelling and the sorted sums pass overlap (EDPAIRS_ASSIGN_OVERLAP,
// 0..64; 0 or 1, the default: no overlap): the sums of chunk c run on a second stream while
// chunk c + 1 is labelled. The labelling at large k is bound by tensor cores and L2 and leaves
// DRAM nearly idle, the sorted pass is DRAM-bound. Opt-in until a GPU run measures it.
inline int overlap_chunks() { return int_knob("EDPAIRS_ASSIGN_OVERLAP", 0, 64); }

}  // namespace knobs
}  // namespace edpairs
