// The depth-fused kernels (the stack's and the MLP stack's, cpu_kernels.h) instantiated for float32 on
// AVX-512. Only this file is compiled for AVX-512, so the extension loads on any x86-64 CPU; cpu_isa.cpp
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
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,fma")

#include "cpu_kernels.h"
#include "simd_avx512.h"

namespace dmup {

CpuKernels<float> cpu_kernels_avx512() { return cpu_kernels_of<avx512::Simd>(); }

}  // namespace dmup

#pragma GCC pop_options
#endif
