// CPU implementation of dmup::residual_stack and its backward: torch glue around stack_kernel.h.
//
// Forward: one parallel pass over row tiles (each tile walks all L layers). Backward: one parallel
// pass in reverse layer order, the tiles in step, each tile adding its rows into dW_l and db_l as soon as
// it has formed dh_l, the threads in row order; with checkpoints, that pass per segment, after every tile has
// recomputed the segment (stack_kernel.h, checkpointed_backward). float32 runs the kernel of
// the instruction set in use (cpu_kernels.h); float64 always runs the portable one. Every GEMM is the kernel's own,
// whose sums run in a fixed order: a BLAS may block its sums by the shape and alignment it is given, which would tie
// the result to the thread count (the tile size) and to the process (the buffers' addresses).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../op_args.h"
#include "stack_glue.h"

namespace dmup {
namespace {

template <class T>
StackProblem<T> make_problem(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             double scale, c10::string_view activation, c10::string_view block, bool mean_subtract) {
  const int64_t batch = x.size(0), width = x.size(1);
  return StackProblem<T>{
      batch,
      width,
      weight.size(0),
      weight.const_data_ptr<T>(),
      bias ? bias->const_data_ptr<T>() : nullptr,
      static_cast<T>(scale),
      parse_activation(activation),
      parse_block(block),
      mean_subtract,
      stack_tile_rows(batch, stack_tile_features(width) * sizeof(T), at::get_num_threads(), l2_bytes())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                                  const std::optional<at::Tensor>& bias_in,
                                                                  double scale, c10::string_view activation,
                                                                  c10::string_view block, bool mean_subtract,
                                                                  bool save_for_backward, int64_t checkpoint_every) {
  check_stack_inputs(x_in, "x", weight_in, bias_in, scale, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int planes = mask_planes(parse_activation(activation), parse_block(block));
  at::Tensor out, saved, mask;
  std::tie(out, saved, mask) =
      empty_stack_outputs(x, weight.size(0), planes, x.size(1), save_for_backward, checkpoint_every, &empty_large);
  if (x.numel() == 0) return {out, saved, mask};  // no rows or no features: nothing to compute, and no row tile
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_cpu", [&] {
    const auto problem = make_problem<scalar_t>(x, weight, bias, scale, activation, block, mean_subtract);
    const auto kernels = active_cpu_kernels<scalar_t>(problem.batch).stack(problem.activation, problem.block);
    kernels.forward(problem, forward_buffers<scalar_t>(x, out, saved, mask, save_for_backward, checkpoint_every),
                    at::get_num_threads());
  });
  return {out, saved, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& saved, const at::Tensor& mask, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, double scale, c10::string_view activation, c10::string_view block,
    bool mean_subtract, int64_t checkpoint_every) {
  check_stack_inputs(grad_out_in, "grad_out", weight_in, bias_in, scale, c10::DeviceType::CPU);
  const at::Tensor grad_out = grad_out_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int64_t batch = grad_out.size(0), width = grad_out.size(1), depth = weight.size(0);
  const int planes = mask_planes(parse_activation(activation), parse_block(block));
  check_stack_state(saved, mask, grad_out, depth, planes, width, checkpoint_every, "residual_stack");
  const auto options = grad_out.options();
  at::Tensor grad_x = at::empty({batch, width}, options);
  at::Tensor grad_weight = empty_large({depth, width, width}, options);
  at::Tensor grad_bias = at::empty({bias ? depth : 0, width}, options);
  if (grad_out.numel() == 0) {  // no rows (the sums over rows are empty) or no features
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "residual_stack_backward_cpu", [&] {
    const auto problem = make_problem<scalar_t>(grad_out, weight, bias, scale, activation, block, mean_subtract);
    const StackBackwardBuffers<scalar_t> whole{grad_out.const_data_ptr<scalar_t>(),
                                               nullptr,
                                               nullptr,
                                               grad_x.mutable_data_ptr<scalar_t>(),
                                               nullptr,
                                               grad_weight.mutable_data_ptr<scalar_t>(),
                                               bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr};
    run_backward(active_cpu_kernels<scalar_t>(problem.batch).stack(problem.activation, problem.block), problem, whole,
                 saved, mask, checkpoint_every, planes, width);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CPU, m) {
  m.impl("residual_stack", &residual_stack_cpu);
  m.impl("residual_stack_backward", &residual_stack_backward_cpu);
}

}  // namespace dmup
