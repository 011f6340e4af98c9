// The stack kernel instantiated for float32 on AVX2 + FMA. Only this file is compiled for AVX2, so
// the extension loads on any x86-64 CPU; cpu_isa.cpp picks it after a CPUID check.
#if defined(__x86_64__)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

#include "simd_avx2.h"
#include "stack_kernel.h"

namespace dmup {

StackKernels<float> stack_kernels_avx2(Activation activation, Block block) {
  return make_stack_kernels<avx2::Simd>(activation, block);
}

}  // namespace dmup

#pragma GCC pop_options
#endif
