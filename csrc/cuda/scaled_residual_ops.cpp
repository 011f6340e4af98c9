// CUDA implementation of dmup::scaled_residual and its backward: torch glue around the row kernels
// of scaled_residual.cu, registered under the CUDA dispatch key. Built only when torch has CUDA
// (setup.py). Everything runs on the current CUDA stream.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_args.h"
#include "check_launch.h"
#include "launchers.h"

namespace dmup {
namespace {

// The CUDA type of a torch scalar type of the same layout (c10::Half is __half, c10::BFloat16 is
// __nv_bfloat16).
template <class T>
struct DeviceScalar {
  using type = T;
};
template <>
struct DeviceScalar<c10::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// scaled_residual's forward and backward are the same row-wise launch over a pair of tensors.
template <class Launch>
at::Tensor launch_rows(const at::Tensor& a, const at::Tensor& b, const char* op, Launch&& launch) {
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty_like(ac);
  const int64_t n = ac.size(-1);
  const int64_t rows = n == 0 ? 0 : ac.numel() / n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ac.scalar_type(), "dmup_cuda_rows", [&] {
    using T = typename DeviceScalar<scalar_t>::type;
    check_launch(launch(reinterpret_cast<const T*>(ac.const_data_ptr<scalar_t>()),
                        reinterpret_cast<const T*>(bc.const_data_ptr<scalar_t>()),
                        reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()), rows, n,
                        c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  });
  return out;
}

at::Tensor scaled_residual_cuda(const at::Tensor& x, const at::Tensor& branch_out, double scale,
                                c10::string_view activation, bool mean_subtract) {
  check_epilogue_inputs(x, "x", branch_out, "branch_out", scale);
  const Activation act = parse_activation(activation);
  return launch_rows(x, branch_out, "dmup::scaled_residual",
                     [&](const auto* xp, const auto* bp, auto* out, int64_t rows, int64_t n, cudaStream_t stream) {
                       return cuda::launch_scaled_residual(xp, bp, out, rows, n, scale, act, mean_subtract, stream);
                     });
}

at::Tensor scaled_residual_backward_cuda(const at::Tensor& grad_out, const at::Tensor& branch_out, double scale,
                                         c10::string_view activation, bool mean_subtract) {
  check_epilogue_inputs(branch_out, "branch_out", grad_out, "grad_out", scale);
  const Activation act = parse_activation(activation);
  return launch_rows(grad_out, branch_out, "dmup::scaled_residual_backward",
                     [&](const auto* gp, const auto* bp, auto* out, int64_t rows, int64_t n, cudaStream_t stream) {
                       return cuda::launch_scaled_residual_backward(gp, bp, out, rows, n, scale, act, mean_subtract,
                                                                    stream);
                     });
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CUDA, m) {
  m.impl("scaled_residual", &scaled_residual_cuda);
  m.impl("scaled_residual_backward", &scaled_residual_backward_cuda);
}

}  // namespace dmup
