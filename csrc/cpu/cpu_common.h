// Helpers shared by the CPU op implementations.
#pragma once

#include <cmath>
#include <cstdint>
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

// float -> IEEE binary16 bits, rounded to nearest even; +-Inf from 65520 on, NaN stays NaN.
inline uint16_t half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const auto sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 (Inf included): beyond the largest half
  if (x >= 0x38800000u) {                       // a normal half (>= 2^-14): rebias, round 23 -> 10 bits
    const uint32_t m = x - (112u << 23);
    return sign | static_cast<uint16_t>((m + 0xfffu + ((m >> 13) & 1u)) >> 13);
  }
  float a;  // a subnormal half or zero: units of 2^-24, exact to scale, rounded to nearest even
  std::memcpy(&a, &x, sizeof a);
  return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));
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
