// CUDA kernels of dmup::residual_stack, L residual blocks x <- x + s * MS(phi(W_l x + b_l)) ("post";
// "pre" applies phi to x before the GEMM): the work of each layer between the GEMMs that the torch
// glue (residual_stack_ops.cpp) runs with cuBLAS.
//
// Planes are feature-major, as on the CPU (stack_kernel.h): element (j, b) of an (n, batch) plane
// is feature j of batch row b. So each layer's GEMM h = W_l x_l reads W_l in its stored layout,
// x_l is saved without a copy (the stream of layer l is saved[l]), and the 16-bit words of sign bits
// (consecutive rows of one feature) come straight out of a warp vote.
//
// Layer kernels: one thread per batch row (column b) and slice of the features, in the blocks of
// layer_kernels.cuh. The mean over the width adds the slices' partial sums through shared memory in a
// fixed order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../activations.h"
#include "launchers.h"
#include "layer_kernels.cuh"

namespace dmup {
namespace cuda {
namespace {

// Sum of v over the slices of this thread's column, returned to every thread of the column. Called
// once per kernel: the shared buffer is not reused.
template <class T>
__device__ T slice_sum(T v) {
  __shared__ T partial[kSlices][kColumns];
  partial[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  T total = T(0);
  for (int s = 0; s < kSlices; ++s) total += partial[s][threadIdx.x];
  return total;
}

// The sign of h rebuilt from the saved bits (1, 0, or -1 from plane 1): all that relu's and abs's
// backward read of h.
template <class T, int Planes>
__device__ T sign_proxy(const uint16_t* mask, int64_t n, int64_t words, int64_t j, int64_t b) {
  const auto bit = [&](int64_t plane) { return (mask[(plane * n + j) * words + b / 16] >> (b % 16)) & 1; };
  if constexpr (Planes == 2) {
    if (bit(1)) return T(-1);
  }
  return bit(0) ? T(1) : T(0);
}

template <class T, Activation A>
__global__ void __launch_bounds__(kLayerThreads)
    stack_layer_forward_kernel(const T* x, const T* __restrict__ h, const T* __restrict__ bias, T* x_next,
                               uint16_t* __restrict__ mask, int64_t n, int64_t batch, T scale, bool mean_subtract) {
  using Phi = Act<A>;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const bool live = b < batch;
  T mean = T(0);
  if (mean_subtract) {
    T sum = T(0);
    if (live) {
      for (int64_t j = threadIdx.y; j < n; j += kSlices) sum += Phi::value(branch_at(h, bias, j, batch, b));
    }
    mean = slice_sum(sum) / static_cast<T>(n);
  }
  for (int64_t j = threadIdx.y; j < n; j += kSlices) {
    const T v = activate_and_vote<T, A>(h, bias, mask, n, batch, j, b);
    if (live) x_next[j * batch + b] = x[j * batch + b] + scale * (v - mean);
  }
}

template <class T, Activation A>
__global__ void __launch_bounds__(kLayerThreads)
    stack_layer_backward_kernel(const T* __restrict__ grad, const T* __restrict__ h, const T* __restrict__ bias,
                                const uint16_t* __restrict__ mask, T* __restrict__ grad_h, int64_t n, int64_t batch,
                                T scale, bool mean_subtract) {
  using Phi = Act<A>;
  constexpr int kPlanes = mask_planes(A, Block::Post);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const bool live = b < batch;
  T mean = T(0);
  if (mean_subtract) {
    T sum = T(0);
    if (live) {
      for (int64_t j = threadIdx.y; j < n; j += kSlices) sum += scale * grad[j * batch + b];
    }
    mean = slice_sum(sum) / static_cast<T>(n);
  }
  if (!live) return;
  const int64_t words = mask_words(batch);
  for (int64_t j = threadIdx.y; j < n; j += kSlices) {
    const T du = scale * grad[j * batch + b] - mean;
    T dh = du;
    if constexpr (kPlanes > 0) {
      dh = Phi::backward(sign_proxy<T, kPlanes>(mask, n, words, j, b), du);
    } else if constexpr (A != Activation::Identity) {
      dh = Phi::backward(branch_at(h, bias, j, batch, b), du);
    }
    grad_h[j * batch + b] = dh;
  }
}

template <class T, Activation A>
__global__ void activation_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t count) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
    out[i] = Act<A>::value(in[i]);
  }
}

template <class T, Activation A>
__global__ void activation_backward_add_kernel(const T* __restrict__ in, const T* __restrict__ grad_phi,
                                               T* __restrict__ grad, int64_t count) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
    grad[i] += Act<A>::backward(in[i], grad_phi[i]);
  }
}

// Elementwise kernels loop over the elements with a grid of at most kMaxElementBlocks blocks.
constexpr int kElementThreads = 256;
constexpr int64_t kMaxElementBlocks = 65536;
dim3 element_grid(int64_t count) {
  return dim3(static_cast<unsigned>(std::min((count + kElementThreads - 1) / kElementThreads, kMaxElementBlocks)));
}

}  // namespace

template <class T>
cudaError_t launch_stack_layer_forward(const T* x, const T* h, const T* bias, T* x_next, uint16_t* mask, int64_t n,
                                       int64_t batch, double scale, Activation activation, bool mean_subtract,
                                       cudaStream_t stream) {
  if (n == 0 || batch == 0) return cudaSuccess;
  dispatch_activation(activation, [&](auto tag) {
    stack_layer_forward_kernel<T, decltype(tag)::value><<<layer_grid(batch), kLayerBlock, 0, stream>>>(
        x, h, bias, x_next, mask, n, batch, static_cast<T>(scale), mean_subtract);
  });
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_stack_layer_backward(const T* grad, const T* h, const T* bias, const uint16_t* mask, T* grad_h,
                                        int64_t n, int64_t batch, double scale, Activation activation,
                                        bool mean_subtract, cudaStream_t stream) {
  if (n == 0 || batch == 0) return cudaSuccess;
  dispatch_activation(activation, [&](auto tag) {
    stack_layer_backward_kernel<T, decltype(tag)::value><<<layer_grid(batch), kLayerBlock, 0, stream>>>(
        grad, h, bias, mask, grad_h, n, batch, static_cast<T>(scale), mean_subtract);
  });
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_activation(const T* in, T* out, int64_t count, Activation activation, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  dispatch_activation(activation, [&](auto tag) {
    activation_kernel<T, decltype(tag)::value><<<element_grid(count), kElementThreads, 0, stream>>>(in, out, count);
  });
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_activation_backward_add(const T* in, const T* grad_phi, T* grad, int64_t count,
                                           Activation activation, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  dispatch_activation(activation, [&](auto tag) {
    activation_backward_add_kernel<T, decltype(tag)::value>
        <<<element_grid(count), kElementThreads, 0, stream>>>(in, grad_phi, grad, count);
  });
  return cudaGetLastError();
}

#define DMUP_INSTANTIATE(T)                                                                                         \
  template cudaError_t launch_stack_layer_forward<T>(const T*, const T*, const T*, T*, uint16_t*, int64_t, int64_t, \
                                                     double, Activation, bool, cudaStream_t);                       \
  template cudaError_t launch_stack_layer_backward<T>(const T*, const T*, const T*, const uint16_t*, T*, int64_t,   \
                                                      int64_t, double, Activation, bool, cudaStream_t);             \
  template cudaError_t launch_activation<T>(const T*, T*, int64_t, Activation, cudaStream_t);                       \
  template cudaError_t launch_activation_backward_add<T>(const T*, const T*, T*, int64_t, Activation, cudaStream_t);
DMUP_INSTANTIATE(float)
DMUP_INSTANTIATE(double)
#undef DMUP_INSTANTIATE

}  // namespace cuda
}  // namespace dmup
