// Host launchers of the CUDA kernels (residual_kernels.cu): plain pointers and a stream, no torch
// headers, so nvcc builds the kernels on its own and the torch glue (ops_cuda.cpp) only calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../activations.h"

namespace dmup {
namespace cuda {

// out[r] = x[r] + scale * MS(phi(branch[r] + bias)) for `rows` rows of width n (bias: n values or
// nullptr); MS subtracts the row mean when mean_subtract. The residual epilogue of every block.
template <class T>
cudaError_t launch_scaled_residual(const T* x, const T* branch, const T* bias, T* out, int64_t rows, int64_t n,
                                   double scale, Activation activation, bool mean_subtract, cudaStream_t stream);

// grad_branch[r] = phi'(branch[r] + bias) * MS(scale * grad_out[r]) (MS is its own adjoint).
template <class T>
cudaError_t launch_scaled_residual_backward(const T* grad_out, const T* branch, const T* bias, T* grad_branch,
                                            int64_t rows, int64_t n, double scale, Activation activation,
                                            bool mean_subtract, cudaStream_t stream);

}  // namespace cuda
}  // namespace dmup
