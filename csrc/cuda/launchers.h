// Host launchers of the CUDA kernels, one section per op: plain pointers and a stream, no torch
// headers, so nvcc builds each op's kernels (<op>.cu) on its own and the op's torch glue
// (<op>_ops.cpp) only calls these. Each returns the launch's error (cudaGetLastError), cudaSuccess
// when there is nothing to do.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../activations.h"

namespace dmup {
namespace cuda {

// scaled_residual.cu: one kernel per direction over rows of width n, T: float, double, __half,
// __nv_bfloat16.

// out[r] = x[r] + scale * MS(phi(branch[r])) for `rows` rows; MS subtracts the row mean when
// mean_subtract.
template <class T>
cudaError_t launch_scaled_residual(const T* x, const T* branch, T* out, int64_t rows, int64_t n, double scale,
                                   Activation activation, bool mean_subtract, cudaStream_t stream);

// grad_branch[r] = phi'(branch[r]) * MS(scale * grad_out[r]) (MS is its own adjoint).
template <class T>
cudaError_t launch_scaled_residual_backward(const T* grad_out, const T* branch, T* grad_branch, int64_t rows, int64_t n,
                                            double scale, Activation activation, bool mean_subtract,
                                            cudaStream_t stream);

// residual_stack.cu: the per-layer kernels of the stack, T: float, double. Planes are feature-major:
// element (j, b) of an (n, batch) plane is feature j of batch row b, at j * batch + b. `activation`
// is phi on the branch after the GEMM (identity for a "pre" block); bias is the layer's n values or
// nullptr.

// x_next = x + scale * MS(phi(h + bias)) per column, from the layer's GEMM h = W_l x (x_next may be
// x). With mask (relu and abs only), also the layer's sign bits of h + bias (activations.h layout).
template <class T>
cudaError_t launch_stack_layer_forward(const T* x, const T* h, const T* bias, T* x_next, uint16_t* mask, int64_t n,
                                       int64_t batch, double scale, Activation activation, bool mean_subtract,
                                       cudaStream_t stream);

// grad_h = phi'(h + bias) * MS(scale * grad) per column, phi' from the layer's sign bits for relu
// and abs (mask), from h = W_l x_l recomputed by the caller for gelu and silu, 1 for identity.
template <class T>
cudaError_t launch_stack_layer_backward(const T* grad, const T* h, const T* bias, const uint16_t* mask, T* grad_h,
                                        int64_t n, int64_t batch, double scale, Activation activation,
                                        bool mean_subtract, cudaStream_t stream);

// out[i] = phi(in[i]) for `count` elements: the input of a "pre" block's GEMM.
template <class T>
cudaError_t launch_activation(const T* in, T* out, int64_t count, Activation activation, cudaStream_t stream);

// grad[i] += phi'(in[i]) * grad_phi[i]: the chain rule through phi(x_l) of a "pre" block.
template <class T>
cudaError_t launch_activation_backward_add(const T* in, const T* grad_phi, T* grad, int64_t count,
                                           Activation activation, cudaStream_t stream);

// residual_mlp_stack.cu, T: float, double; planes as residual_stack.cu's. The output epilogue and the
// backward of a layer are launch_stack_layer_forward (identity, no mask) and launch_stack_layer_backward.

// hidden = phi(h + bias) per column, from the layer's GEMM h = W1_l x (m features), bias the layer's m
// values or nullptr; with mask (relu and abs only), also the layer's sign bits of h + bias.
template <class T>
cudaError_t launch_mlp_hidden_forward(const T* h, const T* bias, T* hidden, uint16_t* mask, int64_t m, int64_t batch,
                                      Activation activation, cudaStream_t stream);

}  // namespace cuda
}  // namespace dmup
