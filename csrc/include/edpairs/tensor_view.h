// Framework-free views of arrays: pointer, dtype, device, shape and strides (in elements).
// The bindings fill them from DLPack; the kernels read them. Nothing here owns memory.
#pragma once

#include <cstdint>
#include <string>

namespace edpairs {

enum class DType : uint8_t { Float32, Float64, Float16, BFloat16, Int64, Int32, UInt8, Bool, Other };
enum class Device : uint8_t { CPU, CUDA };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Int64: return "int64";
    case DType::Int32: return "int32";
    case DType::UInt8: return "uint8";
    case DType::Bool: return "bool";
    default: return "unsupported";
  }
}

inline bool is_floating(DType t) {
  return t == DType::Float32 || t == DType::Float64 || t == DType::Float16 || t == DType::BFloat16;
}

// Bytes per element (0 for an unsupported dtype).
inline int element_size(DType t) {
  switch (t) {
    case DType::Float64:
    case DType::Int64: return 8;
    case DType::Float32:
    case DType::Int32: return 4;
    case DType::Float16:
    case DType::BFloat16: return 2;
    case DType::UInt8:
    case DType::Bool: return 1;
    default: return 0;
  }
}

constexpr int kMaxDims = 4;

struct TensorView {
  bool present = false;  // false for an optional argument that was not given
  void* data = nullptr;
  DType dtype = DType::Other;
  Device device = Device::CPU;
  int device_id = 0;
  int ndim = 0;
  int64_t shape[kMaxDims] = {0, 0, 0, 0};
  int64_t strides[kMaxDims] = {0, 0, 0, 0};  // in elements, not bytes

  int64_t size(int i) const { return shape[i]; }
  int64_t stride(int i) const { return strides[i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  // Row-major contiguous (dimensions of extent 1 may have any stride).
  bool is_contiguous() const {
    if (numel() == 0) return true;  // producers report arbitrary strides for empty arrays
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  template <class T>
  T* ptr() const { return static_cast<T*>(data); }

  std::string shape_str() const {
    std::string s = "(";
    for (int i = 0; i < ndim; ++i) {
      s += std::to_string(shape[i]);
      if (ndim == 1 || i + 1 < ndim) s += ",";
      if (i + 1 < ndim) s += " ";
    }
    return s + ")";
  }
};

}  // namespace edpairs
