// Entry point of the tensor-core assignment (assign_tc_cuda.cu), called by assign_cuda.
#pragma once

#include <cuda_runtime.h>

#include "edpairs/ops.h"

namespace edpairs {
namespace cuda_detail {

// Same contract as assign_cuda (ops.h §1) with AssignPrecision::TensorCore, for float32,
// float16 and bfloat16 x with N >= 1. Expects sums and counts (when present) zeroed on `stream`.
void assign_tensor_core(const AssignArgs& args, cudaStream_t stream);
// The same with AssignPrecision::TensorCoreHalf (ops.h): float32 x labelled from float16 rows
// made in shared memory (assign_wgmma_resident_cuda.cu); refuses what that kernel cannot take.
void assign_tensor_core_half(const AssignArgs& args, cudaStream_t stream);

}  // namespace cuda_detail
}  // namespace edpairs
