// Entry point of the centred Gram kernel on wgmma (gram_wgmma_cuda.cu, sm_90a library), used by
// centred_gram_cuda (ops.h 3f) on compute capability 9.0 devices.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace edpairs {
namespace cuda_detail {

struct WgmmaGramParams {
  const float* x;       // (n, d), row stride ld floats, 16-byte aligned rows, d % 4 == 0
  int64_t ld;
  int64_t n;
  int d;
  const float* shift;   // (d,)
  double* m2;           // (d, d): entries d1 <= d2 accumulated (+=)
  double* colsum;       // (d,) accumulated (+=)
};

void launch_centred_gram_wgmma(const WgmmaGramParams& p, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace edpairs
