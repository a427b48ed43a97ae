// Runtime information about the CUDA side of edpairs. Both functions are called on machines
// without a driver or a GPU, so they report failure by their result and never throw.
#include <cuda_runtime.h>

#include <string>

#include "edpairs/ops.h"

namespace edpairs {

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // leave no pending error behind (e.g. cudaErrorNoDevice)
    return 0;
  }
  return count;
}

std::string cuda_runtime_version() {
  int version = 0;  // 1000 * major + 10 * minor, e.g. 13000 for 13.0
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) {
    (void)cudaGetLastError();
    return "";
  }
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

}  // namespace edpairs
