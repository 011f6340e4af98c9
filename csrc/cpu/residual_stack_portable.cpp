// The depth-fused kernels instantiated with width-1 "vectors": the float64 path on every CPU, and the
// float32 path on x86 CPUs without AVX2 + FMA (or when pinned with DMUP_CPU_ISA=portable).
//
// GCC 12's loop vectorizer turns the scalar register tile of stack_impl::gemm_tile into code that
// reads one row of A past its end (a segfault when A ends at a page boundary; seen at -O3 with
// -march=native), so loop vectorization is off for this file. These loops run on scalars by
// design; the vectorised paths are residual_stack_{avx2,avx512,neon}.cpp.
#pragma GCC optimize("no-tree-loop-vectorize")

#include "cpu_kernels.h"
#include "simd_scalar.h"

namespace dmup {

template <class T>
CpuKernels<T> cpu_kernels_portable() {
  return cpu_kernels_of<ScalarSimd<T>>();
}

template CpuKernels<float> cpu_kernels_portable<float>();
template CpuKernels<double> cpu_kernels_portable<double>();

}  // namespace dmup
