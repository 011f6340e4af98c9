// The depth-fused CPU kernels of each instruction set, and the choice among them. Each ISA's translation
// unit (residual_stack_<isa>.cpp) instantiates the kernel templates (stack_kernel.h, mlp_stack_kernel.h)
// with its own target flags and returns their factories; the torch glue asks for those of the instruction
// set in use (cpu_isa.h). No torch headers.
#pragma once

#include "mlp_stack_kernel.h"

namespace dmup {

// The kernel factories of one instruction set for one dtype.
template <class T>
struct CpuKernels {
  StackKernels<T> (*stack)(Activation activation, Block block);
  MlpStackKernels<T> (*mlp_stack)(Activation activation);
};

// The factories of every kernel for instruction set V (called in V's translation unit only).
template <class V>
CpuKernels<typename V::T> cpu_kernels_of() {
  return {&make_stack_kernels<V>, &make_mlp_stack_kernels<V>};
}

#if defined(__x86_64__)
CpuKernels<float> cpu_kernels_avx512();
CpuKernels<float> cpu_kernels_avx2();
#elif defined(__aarch64__)
CpuKernels<float> cpu_kernels_neon();
#endif
template <class T>
CpuKernels<T> cpu_kernels_portable();

// The kernels float32 runs for a batch of `batch` rows on the instruction set in use (cpu_isa.h); float64 always
// runs the portable ones. On AVX-512, a batch of at most 8 rows runs the 8-lane AVX2 kernels:
// the kernels vectorise over rows, so its 16-lane vectors would be half empty (docs/design.md §7.3).
template <class T>
CpuKernels<T> active_cpu_kernels(int64_t batch);

}  // namespace dmup
