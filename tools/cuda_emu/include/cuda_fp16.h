// CPU emulation of cuda_fp16.h (tools/cuda_emu): __half as the compiler's _Float16, whose
// conversions from float round to nearest even as __float2half_rn does.
#pragma once

#include <cstring>

struct __half {
  _Float16 v;
};
struct alignas(4) __half2 {
  __half x, y;
};
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
