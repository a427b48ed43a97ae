// Helpers shared by the CPU op implementations.
#pragma once

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "edpairs/errors.h"
#include "edpairs/tensor_view.h"
#include "gemm_cpu.h"
#include "parallel.h"

namespace edpairs::cpu {

inline const float* optional_f32(const TensorView& v) { return v.present ? v.ptr<const float>() : nullptr; }

// Throws the "contains NaN or Inf" error for argument `name` when `flag` says so.
inline void require_finite(float flag, const char* name) {
  if (!finite_check(flag))
    fail(std::string(name) + " contains NaN or Inf (or values beyond the float32 range); "
         "clean the input or pass check_finite=False to skip this check");
}

inline void require_finite_vector(const TensorView& v, const char* name) {
  if (!v.present) return;
  const float* p = v.ptr<const float>();
  require_finite(nonfinite_flag(p, v.numel()), name);
}

// Per-thread flags combined after a parallel pass.
struct FiniteFlags {
  explicit FiniteFlags(int threads) : flags(static_cast<size_t>(threads), 0.f) {}
  void add(int thread, float flag) { flags[static_cast<size_t>(thread)] += flag; }
  float combined() const {
    float f = 0.f;
    for (float v : flags) f += v;
    return f;
  }
  std::vector<float> flags;
};

}  // namespace edpairs::cpu
