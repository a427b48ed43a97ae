// The TMA labelling kernel (assign_wgmma_tma_cuda.cu: tensor maps, clusters, mbarriers) is not
// emulated; EDPAIRS_ASSIGN_KERNEL=wgmma-tma fails loudly under the emulator.
#include <stdexcept>

#include "../../csrc/cuda/assign_wgmma.cuh"

namespace edpairs {
namespace cuda_detail {
void launch_assign_wgmma_tma(const WgmmaAssignParams&, cudaStream_t) {
  throw std::runtime_error("cuda_emu: the TMA kernel (wgmma-tma) is not emulated");
}
}  // namespace cuda_detail
}  // namespace edpairs
