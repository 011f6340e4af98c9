// CUDA kernels of dmup::residual_mlp_stack, L MLP blocks x <- x + s * MS(phi(W1_l x + b1_l) W2_l + b2_l):
// the hidden layer's epilogue between the GEMMs that the torch glue (residual_mlp_stack_ops.cpp) runs with
// cuBLAS. The output's epilogue (bias, MS, scale, residual add) and the backward's are residual_stack.cu's
// layer kernels. Planes are feature-major, as the stack's (layer_kernels.cuh).
#include <cuda_runtime.h>

#include <cstdint>

#include "../activations.h"
#include "launchers.h"
#include "layer_kernels.cuh"

namespace dmup {
namespace cuda {
namespace {

template <class T, Activation A>
__global__ void __launch_bounds__(kLayerThreads)
    mlp_hidden_forward_kernel(const T* __restrict__ h, const T* __restrict__ bias, T* __restrict__ hidden,
                              uint16_t* __restrict__ mask, int64_t m, int64_t batch) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  for (int64_t j = threadIdx.y; j < m; j += kSlices) {
    const T a = activate_and_vote<T, A>(h, bias, mask, m, batch, j, b);
    if (b < batch) hidden[j * batch + b] = a;
  }
}

}  // namespace

template <class T>
cudaError_t launch_mlp_hidden_forward(const T* h, const T* bias, T* hidden, uint16_t* mask, int64_t m, int64_t batch,
                                      Activation activation, cudaStream_t stream) {
  if (m == 0 || batch == 0) return cudaSuccess;
  dispatch_activation(activation, [&](auto tag) {
    mlp_hidden_forward_kernel<T, decltype(tag)::value>
        <<<layer_grid(batch), kLayerBlock, 0, stream>>>(h, bias, hidden, mask, m, batch);
  });
  return cudaGetLastError();
}

template cudaError_t launch_mlp_hidden_forward<float>(const float*, const float*, float*, uint16_t*, int64_t, int64_t,
                                                      Activation, cudaStream_t);
template cudaError_t launch_mlp_hidden_forward<double>(const double*, const double*, double*, uint16_t*, int64_t,
                                                       int64_t, Activation, cudaStream_t);

}  // namespace cuda
}  // namespace dmup
