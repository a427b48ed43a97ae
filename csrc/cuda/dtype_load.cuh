// Conversion of the input dtypes of x (float32, float64, float16, bfloat16) to the float32 the
// kernels compute in, and the host-side dispatch that instantiates a kernel per input dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "edpairs/errors.h"
#include "edpairs/tensor_view.h"

namespace edpairs {
namespace cuda_detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return __double2float_rn(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Exact for every input dtype (float64 inputs keep their precision in float64 sums).
__device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) {
  return static_cast<double>(__half2float(v));
}
__device__ __forceinline__ double to_double(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

// x - center rounded once to float32. Float64 inputs are centred in float64 first, so that an
// offset that is large compared with the spread does not cost them their precision.
template <class T>
__device__ __forceinline__ float minus_center(T v, float center) {
  return to_float(v) - center;
}
__device__ __forceinline__ float minus_center(double v, float center) {
  return __double2float_rn(v - static_cast<double>(center));
}

// x - mean with a float64 mean: centred in float64 (exact conversion of every input dtype),
// then rounded once to float32.
template <class T>
__device__ __forceinline__ float minus_mean(T v, double mean) {
  return __double2float_rn(to_double(v) - mean);
}

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the element type of `x`.
template <class F>
void dispatch_input_dtype(const TensorView& x, F&& f) {
  switch (x.dtype) {
    case DType::Float32: f(TypeTag<float>{}); return;
    case DType::Float64: f(TypeTag<double>{}); return;
    case DType::Float16: f(TypeTag<__half>{}); return;
    case DType::BFloat16: f(TypeTag<__nv_bfloat16>{}); return;
    default:
      fail(std::string("x must be float32, float64, float16 or bfloat16, got ") +
           dtype_name(x.dtype));
  }
}

}  // namespace cuda_detail
}  // namespace edpairs
