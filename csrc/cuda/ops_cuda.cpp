// CUDA kernels of the dmup ops, registered under the CUDA dispatch key. Built only when torch has
// CUDA (setup.py); the kernels themselves are in residual_kernels.cu, behind launchers.h.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../op_args.h"
#include "launchers.h"

namespace dmup {
namespace {

void check_launch(cudaError_t error, const char* op) {
  TORCH_CHECK(error == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(error));
}

// scaled_residual's forward and backward are the same row-wise launch over a pair of tensors.
template <class Launch>
at::Tensor launch_rows(const at::Tensor& a, const at::Tensor& b, const char* op, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty_like(ac);
  const int64_t n = ac.size(-1);
  const int64_t rows = n == 0 ? 0 : ac.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(ac.scalar_type(), "dmup_cuda_rows", [&] {
    check_launch(launch(ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                        rows, n, c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
  return out;
}

at::Tensor scaled_residual_cuda(const at::Tensor& x, const at::Tensor& branch_out, double scale,
                                c10::string_view activation, bool mean_subtract) {
  check_pair(x, "x", branch_out, "branch_out");
  const Activation act = parse_activation(activation);
  return launch_rows(x, branch_out, "dmup::scaled_residual",
                     [&](const auto* xp, const auto* bp, auto* out, int64_t rows, int64_t n, cudaStream_t stream) {
                       return cuda::launch_scaled_residual(xp, bp, decltype(xp){nullptr}, out, rows, n, scale, act,
                                                           mean_subtract, stream);
                     });
}

at::Tensor scaled_residual_backward_cuda(const at::Tensor& grad_out, const at::Tensor& branch_out, double scale,
                                         c10::string_view activation, bool mean_subtract) {
  check_pair(branch_out, "branch_out", grad_out, "grad_out");
  const Activation act = parse_activation(activation);
  return launch_rows(grad_out, branch_out, "dmup::scaled_residual_backward",
                     [&](const auto* gp, const auto* bp, auto* out, int64_t rows, int64_t n, cudaStream_t stream) {
                       return cuda::launch_scaled_residual_backward(gp, bp, decltype(gp){nullptr}, out, rows, n, scale,
                                                                    act, mean_subtract, stream);
                     });
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CUDA, m) {
  m.impl("scaled_residual", &scaled_residual_cuda);
  m.impl("scaled_residual_backward", &scaled_residual_backward_cuda);
}

}  // namespace dmup
