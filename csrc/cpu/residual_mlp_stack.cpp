// CPU implementation of dmup::residual_mlp_stack and its backward: torch glue around mlp_stack_kernel.h,
// run as residual_stack.cpp runs the stack (one forward pass over row tiles; one reverse pass, the tiles in
// step, per segment with checkpoints; the kernel of the instruction set in use, float64 portable).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../op_args.h"
#include "stack_glue.h"

namespace dmup {
namespace {

template <class T>
MlpStackProblem<T> make_problem(const at::Tensor& x, const at::Tensor& weight1, const at::Tensor& weight2,
                                const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2,
                                double scale, c10::string_view activation, bool mean_subtract) {
  const int64_t batch = x.size(0), width = x.size(1), hidden_width = weight1.size(1);
  const int64_t row_bytes = mlp_stack_tile_features(width, hidden_width) * sizeof(T);
  return MlpStackProblem<T>{batch,
                            width,
                            hidden_width,
                            weight1.size(0),
                            weight1.const_data_ptr<T>(),
                            weight2.const_data_ptr<T>(),
                            bias1 ? bias1->const_data_ptr<T>() : nullptr,
                            bias2 ? bias2->const_data_ptr<T>() : nullptr,
                            static_cast<T>(scale),
                            parse_activation(activation),
                            mean_subtract,
                            stack_tile_rows(batch, row_bytes, at::get_num_threads(), l2_bytes())};
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& tensor) {
  return tensor ? std::optional<at::Tensor>(tensor->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_mlp_stack_cpu(
    const at::Tensor& x_in, const at::Tensor& weight1_in, const at::Tensor& weight2_in,
    const std::optional<at::Tensor>& bias1_in, const std::optional<at::Tensor>& bias2_in, double scale,
    c10::string_view activation, bool mean_subtract, bool save_for_backward, int64_t checkpoint_every) {
  check_mlp_stack_inputs(x_in, "x", weight1_in, weight2_in, bias1_in, bias2_in, scale, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous(), weight1 = weight1_in.contiguous(), weight2 = weight2_in.contiguous();
  const std::optional<at::Tensor> bias1 = contiguous(bias1_in), bias2 = contiguous(bias2_in);
  const int planes = mask_planes(parse_activation(activation), Block::Post);
  at::Tensor out, saved, mask;
  std::tie(out, saved, mask) = empty_stack_outputs(x, weight1.size(0), planes, weight1.size(1), save_for_backward,
                                                   checkpoint_every, &empty_large);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_mlp_stack_cpu", [&] {
    const auto problem = make_problem<scalar_t>(x, weight1, weight2, bias1, bias2, scale, activation, mean_subtract);
    const auto kernels = active_cpu_kernels<scalar_t>(problem.batch).mlp_stack(problem.activation);
    kernels.forward(problem, forward_buffers<scalar_t>(x, out, saved, mask, save_for_backward, checkpoint_every),
                    at::get_num_threads());
  });
  return {out, saved, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_mlp_stack_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& saved, const at::Tensor& mask, const at::Tensor& weight1_in,
    const at::Tensor& weight2_in, const std::optional<at::Tensor>& bias1_in, const std::optional<at::Tensor>& bias2_in,
    double scale, c10::string_view activation, bool mean_subtract, int64_t checkpoint_every) {
  check_mlp_stack_inputs(grad_out_in, "grad_out", weight1_in, weight2_in, bias1_in, bias2_in, scale,
                         c10::DeviceType::CPU);
  const at::Tensor grad_out = grad_out_in.contiguous(), weight1 = weight1_in.contiguous();
  const at::Tensor weight2 = weight2_in.contiguous();
  const std::optional<at::Tensor> bias1 = contiguous(bias1_in), bias2 = contiguous(bias2_in);
  const int64_t batch = grad_out.size(0), width = grad_out.size(1), depth = weight1.size(0);
  const int64_t hidden_width = weight1.size(1);
  const int planes = mask_planes(parse_activation(activation), Block::Post);
  check_stack_state(saved, mask, grad_out, depth, planes, hidden_width, checkpoint_every, "residual_mlp_stack");
  const auto options = grad_out.options();
  at::Tensor grad_x = at::empty({batch, width}, options);
  at::Tensor grad_weight1 = empty_large({depth, hidden_width, width}, options);
  at::Tensor grad_weight2 = empty_large({depth, width, hidden_width}, options);
  at::Tensor grad_bias1 = at::empty({bias1 ? depth : 0, hidden_width}, options);
  at::Tensor grad_bias2 = at::empty({bias2 ? depth : 0, width}, options);
  if (batch == 0) {  // no rows: the sums over rows are empty
    for (at::Tensor* sum : {&grad_weight1, &grad_weight2, &grad_bias1, &grad_bias2}) sum->zero_();
    return {grad_x, grad_weight1, grad_weight2, grad_bias1, grad_bias2};
  }
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "residual_mlp_stack_backward_cpu", [&] {
    const auto problem =
        make_problem<scalar_t>(grad_out, weight1, weight2, bias1, bias2, scale, activation, mean_subtract);
    const MlpStackBackwardBuffers<scalar_t> whole{grad_out.const_data_ptr<scalar_t>(),
                                                  nullptr,
                                                  nullptr,
                                                  grad_x.mutable_data_ptr<scalar_t>(),
                                                  nullptr,
                                                  grad_weight1.mutable_data_ptr<scalar_t>(),
                                                  grad_weight2.mutable_data_ptr<scalar_t>(),
                                                  bias1 ? grad_bias1.mutable_data_ptr<scalar_t>() : nullptr,
                                                  bias2 ? grad_bias2.mutable_data_ptr<scalar_t>() : nullptr};
    run_backward(active_cpu_kernels<scalar_t>(problem.batch).mlp_stack(problem.activation), problem, whole, saved, mask,
                 checkpoint_every, planes, hidden_width);
  });
  return {grad_x, grad_weight1, grad_weight2, grad_bias1, grad_bias2};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CPU, m) {
  m.impl("residual_mlp_stack", &residual_mlp_stack_cpu);
  m.impl("residual_mlp_stack_backward", &residual_mlp_stack_backward_cpu);
}

}  // namespace dmup
