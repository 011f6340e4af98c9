// The stack kernel instantiated for float32 on AArch64 Advanced SIMD (NEON, part of the baseline).
#if defined(__aarch64__)
#include "simd_neon.h"
#include "stack_kernel.h"

namespace dmup {

StackKernels<float> stack_kernels_neon(Activation activation, Block block) {
  return make_stack_kernels<neon::Simd>(activation, block);
}

}  // namespace dmup
#endif
