// The depth-fused kernels (the stack's and the MLP stack's, cpu_kernels.h) instantiated for float32 on
// AVX2 + FMA. Only this file is compiled for AVX2, so the extension loads on any x86-64 CPU; cpu_isa.cpp
// picks it after a CPUID check.
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

#include "cpu_kernels.h"
#include "simd_avx2.h"

namespace dmup {

CpuKernels<float> cpu_kernels_avx2() { return cpu_kernels_of<avx2::Simd>(); }

}  // namespace dmup

#pragma GCC pop_options
#endif
