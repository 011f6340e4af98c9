// The depth-fused kernels (the stack's and the MLP stack's, cpu_kernels.h) instantiated for float32 on
// AArch64 Advanced SIMD (NEON, part of the baseline).
#if defined(__aarch64__)
#include "cpu_kernels.h"
#include "simd_neon.h"

namespace dmup {

CpuKernels<float> cpu_kernels_neon() { return cpu_kernels_of<neon::Simd>(); }

}  // namespace dmup
#endif
