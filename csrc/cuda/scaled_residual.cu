// CUDA kernels of dmup::scaled_residual, the epilogue of one residual block on rows of width n (the
// glue is scaled_residual_ops.cpp):
//   forward   out = x + s * MS(phi(b))
//   backward  grad_branch = phi'(b) * MS(s * g)
// (MS subtracts the row mean when mean_subtract, and is its own adjoint.)
// One thread block per row: the row mean is a block reduction (warp shuffles, then one value per
// warp through shared memory), then a second pass over the row, which is still in L1/L2. Half types
// are computed in float (Acc) and rounded once on store, as on the CPU; offsets are int64 so rows * n
// may exceed 2^31.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../activations.h"
#include "launchers.h"

namespace dmup {
namespace cuda {
namespace {

// The type the math runs in: float for the half types, else the storage type. Explicit
// conversions, since torch's nvcc flags turn off the implicit ones of __half and __nv_bfloat16.
template <class T>
struct Acc {
  using type = T;
  static __device__ T load(T v) { return v; }
  static __device__ T store(T v) { return v; }
};
template <>
struct Acc<__half> {
  using type = float;
  static __device__ float load(__half v) { return __half2float(v); }
  static __device__ __half store(float v) { return __float2half(v); }
};
template <>
struct Acc<__nv_bfloat16> {
  using type = float;
  static __device__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 store(float v) { return __float2bfloat16(v); }
};

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
  __syncthreads();                                              // partial is reused by the next call
  return total;
}

template <class T, Activation A>
__global__ void __launch_bounds__(kThreads)
    scaled_residual_kernel(const T* __restrict__ x, const T* __restrict__ branch, T* __restrict__ out, int64_t n,
                           typename Acc<T>::type scale, bool mean_subtract) {
  using Phi = Act<A>;
  using C = typename Acc<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  C mean = C(0);
  if (mean_subtract) {
    C sum = C(0);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += Phi::value(Acc<T>::load(branch[row + j]));
    mean = block_sum(sum) / static_cast<C>(n);
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const C u = Phi::value(Acc<T>::load(branch[row + j]));
    out[row + j] = Acc<T>::store(Acc<T>::load(x[row + j]) + scale * (u - mean));
  }
}

template <class T, Activation A>
__global__ void __launch_bounds__(kThreads)
    scaled_residual_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ branch,
                                    T* __restrict__ grad_branch, int64_t n, typename Acc<T>::type scale,
                                    bool mean_subtract) {
  using Phi = Act<A>;
  using C = typename Acc<T>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * n;
  C mean = C(0);
  if (mean_subtract) {
    C sum = C(0);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) sum += scale * Acc<T>::load(grad_out[row + j]);
    mean = block_sum(sum) / static_cast<C>(n);
  }
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const C du = scale * Acc<T>::load(grad_out[row + j]) - mean;
    grad_branch[row + j] = Acc<T>::store(Phi::backward(Acc<T>::load(branch[row + j]), du));
  }
}

// One block per row on grid.x, which holds up to 2^31 - 1 blocks.
constexpr int64_t kMaxRows = 2147483647;
dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>(rows)); }

}  // namespace

template <class T>
cudaError_t launch_scaled_residual(const T* x, const T* branch, T* out, int64_t rows, int64_t n, double scale,
                                   Activation activation, bool mean_subtract, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (rows > kMaxRows) return cudaErrorInvalidValue;
  dispatch_activation(activation, [&](auto tag) {
    scaled_residual_kernel<T, decltype(tag)::value><<<row_grid(rows), kThreads, 0, stream>>>(
        x, branch, out, n, static_cast<typename Acc<T>::type>(scale), mean_subtract);
  });
  return cudaGetLastError();
}

template <class T>
cudaError_t launch_scaled_residual_backward(const T* grad_out, const T* branch, T* grad_branch, int64_t rows, int64_t n,
                                            double scale, Activation activation, bool mean_subtract,
                                            cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (rows > kMaxRows) return cudaErrorInvalidValue;
  dispatch_activation(activation, [&](auto tag) {
    scaled_residual_backward_kernel<T, decltype(tag)::value><<<row_grid(rows), kThreads, 0, stream>>>(
        grad_out, branch, grad_branch, n, static_cast<typename Acc<T>::type>(scale), mean_subtract);
  });
  return cudaGetLastError();
}

#define DMUP_INSTANTIATE(T)                                                                                          \
  template cudaError_t launch_scaled_residual<T>(const T*, const T*, T*, int64_t, int64_t, double, Activation, bool, \
                                                 cudaStream_t);                                                      \
  template cudaError_t launch_scaled_residual_backward<T>(const T*, const T*, T*, int64_t, int64_t, double,          \
                                                          Activation, bool, cudaStream_t);
DMUP_INSTANTIATE(float)
DMUP_INSTANTIATE(double)
DMUP_INSTANTIATE(__half)
DMUP_INSTANTIATE(__nv_bfloat16)
#undef DMUP_INSTANTIATE

}  // namespace cuda
}  // namespace dmup
