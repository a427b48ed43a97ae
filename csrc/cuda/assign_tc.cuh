// Entry point of the tensor-core assignment (assign_tc_cuda.cu), called by assign_cuda.
#pragma once

#include <cuda_runtime.h>

#include "edpairs/ops.h"

namespace edpairs {
namespace cuda_detail {

// Same contract as assign_cuda (ops.h §1) with AssignPrecision::TensorCore, for float32,
// float16 and bfloat16 x with N >= 1. Expects sums and counts (when present) zeroed on `stream`.
void assign_tensor_core(const AssignArgs& args, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace edpairs
