// The emulator's test harness: each TEST runs edpairs' CUDA ops (emulated, tools/cuda_emu) and
// compares them with the CPU ops or float64 references. `emu_tests [substring ...]` runs the
// tests whose names contain one of the substrings (all without arguments; "=name" names one
// test exactly); the exit status is the number of failed tests (at most 100).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "edpairs/ops.h"

namespace emu_test {

struct Test {
  const char* name;
  void (*fn)();
};
inline std::vector<Test>& registry() {
  static std::vector<Test> r;
  return r;
}
struct Register {
  Register(const char* name, void (*fn)()) { registry().push_back({name, fn}); }
};
inline int& failures() {  // checks failed in the current test
  static int n = 0;
  return n;
}

#define EMU_TEST(name)                                              \
  static void emu_test_##name();                                    \
  static ::emu_test::Register emu_register_##name(#name, emu_test_##name); \
  static void emu_test_##name()

// A failed check prints where and what, and the test goes on (its other checks still run).
#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      if (++::emu_test::failures() <= 20) {                                \
        std::printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);      \
        std::printf(__VA_ARGS__);                                          \
        std::printf("\n");                                                 \
      }                                                                    \
    }                                                                      \
  } while (0)

// Sets an environment knob for the life of the guard (the CUDA ops read them per call).
class Knob {
 public:
  Knob(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value) setenv(name, value, 1); else unsetenv(name);
  }
  ~Knob() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1); else unsetenv(name_.c_str());
  }
 private:
  std::string name_, old_;
  bool had_ = false;
};

template <class T> edpairs::DType dtype_of();
template <> inline edpairs::DType dtype_of<float>() { return edpairs::DType::Float32; }
template <> inline edpairs::DType dtype_of<double>() { return edpairs::DType::Float64; }
template <> inline edpairs::DType dtype_of<__half>() { return edpairs::DType::Float16; }
template <> inline edpairs::DType dtype_of<__nv_bfloat16>() { return edpairs::DType::BFloat16; }
template <> inline edpairs::DType dtype_of<int64_t>() { return edpairs::DType::Int64; }

inline double as_double(float v) { return v; }
inline double as_double(double v) { return v; }
inline double as_double(__half v) { return __half2float(v); }
inline double as_double(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> T from_double(double v);
template <> inline float from_double<float>(double v) { return static_cast<float>(v); }
template <> inline double from_double<double>(double v) { return v; }
template <> inline __half from_double<__half>(double v) { return __float2half_rn(static_cast<float>(v)); }
template <> inline __nv_bfloat16 from_double<__nv_bfloat16>(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }

// A view of v with `shape` (row-major, or `strides` in elements) on `device`.
template <class T>
edpairs::TensorView view(std::vector<T>& v, std::vector<int64_t> shape, edpairs::Device device,
                         std::vector<int64_t> strides = {}) {
  edpairs::TensorView t;
  t.present = true;
  t.data = v.data();
  t.dtype = dtype_of<T>();
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int64_t s = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.strides[i] = strides.empty() ? s : strides[i];
    s *= shape[i];
  }
  return t;
}

}  // namespace emu_test
