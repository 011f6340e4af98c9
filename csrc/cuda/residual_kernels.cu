// CUDA kernels of the residual epilogue (SPEC 2.2-2.3), shared by scaled_residual and by every
// block of the CUDA stack driver (after its GEMM):
//   forward   out = x + s * MS(phi(h)),            h = branch + bias
//   backward  grad_branch = phi'(h) * MS(s * g)
// One thread block per row: the row mean is a block reduction (warp shuffles, then one value per
// warp through shared memory), then a second pass over the row, which is still in L1/L2. Sums run
// in float for half types (acc_t); offsets are int64 so rows * n may exceed 2^31.
#include <cuda_runtime.h>

#include <cstdint>

#include "../activations.h"
#include "launchers.h"

namespace dmup {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum of v over the block, returned to every thread.
template <class T>
__device__ T block_sum(T v) {
  __shared__ T partial[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];  // same order in every thread
  __syncthreads();  // partial is reused by the next call
  return total;
}

template <class T>
__device__ T branch_at(const T* branch, const T* bias, int64_t j) {
  return bias ? branch[j] + bias[j] : branch[j];
}

template <class T, Activation A>
__global__ void __launch_bounds__(kThreads)
    scaled_residual_kernel(const T* __restrict__ x, const T* __restrict__ branch, const T* __restrict__ bias,
                           T* __restrict__ out, int64_t n, T scale, bool mean_subtract) {
  using Phi = Act<A>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  T mean = T(0);
  if (mean_subtract) {
    T sum = T(0);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += Phi::value(branch_at(branch + row, bias, j));
    mean = block_sum(sum) / static_cast<T>(n);
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    out[row + j] = x[row + j] + scale * (Phi::value(branch_at(branch + row, bias, j)) - mean);
  }
}

template <class T, Activation A>
__global__ void __launch_bounds__(kThreads)
    scaled_residual_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ branch,
                                    const T* __restrict__ bias, T* __restrict__ grad_branch, int64_t n, T scale,
                                    bool mean_subtract) {
  using Phi = Act<A>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  T mean = T(0);
  if (mean_subtract) {
    T sum = T(0);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += scale * grad_out[row + j];
    mean = block_sum(sum) / static_cast<T>(n);
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    grad_branch[row + j] = Phi::backward(branch_at(branch + row, bias, j), scale * grad_out[row + j] - mean);
  }
}

// One block per row on grid.x, which holds up to 2^31 - 1 blocks.
constexpr int64_t kMaxRows = 2147483647;
dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>(rows)); }

}  // namespace

template <class T>
cudaError_t launch_scaled_residual(const T* x, const T* branch, const T* bias, T* out, int64_t rows, int64_t n,
                                   double scale, Activation activation, bool mean_subtract, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (rows > kMaxRows) return cudaErrorInvalidValue;
  dispatch_activation(activation, [&](auto tag) {
    scaled_residual_kernel<T, decltype(tag)::value><<<row_grid(rows), kThreads, 0, stream>>>(
        x, branch, bias, out, n, static_cast<T>(scale), mean_subtract);
  });
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_scaled_residual_backward(const T* grad_out, const T* branch, const T* bias, T* grad_branch,
                                            int64_t rows, int64_t n, double scale, Activation activation,
                                            bool mean_subtract, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (rows > kMaxRows) return cudaErrorInvalidValue;
  dispatch_activation(activation, [&](auto tag) {
    scaled_residual_backward_kernel<T, decltype(tag)::value><<<row_grid(rows), kThreads, 0, stream>>>(
        grad_out, branch, bias, grad_branch, n, static_cast<T>(scale), mean_subtract);
  });
  return cudaGetLastError();
}

#define DMUP_INSTANTIATE(T)                                                                                       \
  template cudaError_t launch_scaled_residual<T>(const T*, const T*, const T*, T*, int64_t, int64_t, double,       \
                                                 Activation, bool, cudaStream_t);                                 \
  template cudaError_t launch_scaled_residual_backward<T>(const T*, const T*, const T*, T*, int64_t, int64_t,      \
                                                          double, Activation, bool, cudaStream_t);
DMUP_INSTANTIATE(float)
DMUP_INSTANTIATE(double)
#undef DMUP_INSTANTIATE

}  // namespace cuda
}  // namespace dmup
