// Error checking, device selection and small host queries shared by the CUDA sources.
// Every runtime call and every kernel launch goes through EDPAIRS_CUDA_CHECK, which turns a
// failure into edpairs::CudaError carrying file:line and CUDA's own message.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <string>

#include "edpairs/errors.h"

namespace edpairs {
namespace cuda_detail {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file,
                                          int line) {
  // Clear the (non-sticky) error so that the next launch check of an unrelated call does not
  // report it a second time.
  (void)cudaGetLastError();
  throw CudaError(std::string(file) + ":" + std::to_string(line) + ": " + expr + " failed: " +
                  cudaGetErrorString(err) + " (" + cudaGetErrorName(err) + ")");
}

}  // namespace cuda_detail
}  // namespace edpairs

#define EDPAIRS_CUDA_CHECK(expr)                                                    \
  do {                                                                              \
    const cudaError_t edpairs_cuda_err_ = (expr);                                   \
    if (edpairs_cuda_err_ != cudaSuccess) {                                         \
      ::edpairs::cuda_detail::throw_cuda_error(edpairs_cuda_err_, #expr, __FILE__, \
                                               __LINE__);                           \
    }                                                                               \
  } while (0)

namespace edpairs {
namespace cuda_detail {

// Makes `device` current for the lifetime of the guard and restores the caller's device after,
// so that an op on cuda:1 leaves a caller working on cuda:0 where it was.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    EDPAIRS_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) {
      EDPAIRS_CUDA_CHECK(cudaSetDevice(device));
      changed_ = true;
    }
  }
  ~DeviceGuard() {
    // A destructor must not throw; a failure here would already have failed the op itself.
    if (changed_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

// Number of SMs of the current device (sizes grids so that enough blocks run at once).
inline int multiprocessor_count() {
  int device = 0;
  int sms = 0;
  EDPAIRS_CUDA_CHECK(cudaGetDevice(&device));
  EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms > 0 ? sms : 1;
}

// "major.minor" compute capability of the current device (where the sm_90a kernels may run:
// "9.0" only).
inline std::string compute_capability() {
  int device = 0, major = 0, minor = 0;
  EDPAIRS_CUDA_CHECK(cudaGetDevice(&device));
  EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  EDPAIRS_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return std::to_string(major) + "." + std::to_string(minor);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// cudaFuncAttributeMaxDynamicSharedMemorySize is one value per kernel for the whole process.
// A kernel whose shared memory follows the call's shape sets it before each launch, and
// another host thread's smaller setting landing between the two would fail the launch
// (invalid argument): such settings and launches hold this lock (launch_with_smem).
inline std::mutex& smem_attribute_mutex() {
  static std::mutex m;
  return m;
}

// Sets `kernel`'s dynamic shared memory to `smem` bytes and launches it with them, under
// smem_attribute_mutex().
template <typename... Params, typename... Args>
void launch_with_smem(void (*kernel)(Params...), const dim3 grid, const dim3 block, const int64_t smem,
                      const cudaStream_t stream, Args&&... args) {
  const std::lock_guard<std::mutex> lock(smem_attribute_mutex());
  EDPAIRS_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, block, static_cast<size_t>(smem), stream>>>(static_cast<Args&&>(args)...);
  EDPAIRS_CUDA_CHECK(cudaGetLastError());
}

// Largest D, k, I (and 2I) the kernels accept: they index columns with int and step past the
// end by at most one tile, which must not overflow.
constexpr int64_t kMaxExtent = int64_t{1} << 30;

}  // namespace cuda_detail
}  // namespace edpairs
