// CUDA implementation of dmup::residual_stack and its backward, registered under the CUDA dispatch
// key. Built only when torch has CUDA (setup.py). The stack is a loop over the layers on the host,
// on the current CUDA stream: per layer one cuBLAS GEMM (through ATen) and one fused kernel of
// residual_stack.cu (bias, phi, sign bits, mean subtraction, scale, residual add), in its
// feature-major layout, which is also the layout of the state the CPU op saves: the stream of layer
// l is an (n, B) plane, saved[l] itself when saving.
#include <ATen/Dispatch.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_args.h"
#include "check_launch.h"
#include "launchers.h"
#include "layer_views.h"

namespace dmup {
namespace {

// What the block form and the activation make of each layer.
struct StackForm {
  Activation activation;
  int planes;         // sign-bit planes saved per layer
  Activation branch;  // phi after the GEMM: the activation for "post", identity for "pre"
  bool input_phi;     // "pre" with a non-identity phi: the GEMM reads phi(x_l)
  bool recompute_h;   // "post" with gelu or silu: the backward recomputes h = W_l x_l

  StackForm(c10::string_view activation_name, c10::string_view block_name)
      : activation(parse_activation(activation_name)) {
    const Block block = parse_block(block_name);
    planes = mask_planes(activation, block);
    branch = block == Block::Post ? activation : Activation::Identity;
    input_phi = block == Block::Pre && activation != Activation::Identity;
    recompute_h = branch != Activation::Identity && planes == 0;
  }
};

// The settings every layer of one stack shares.
struct StackRun {
  StackForm form;
  at::Tensor weight, bias;  // contiguous; an undefined bias: none
  double scale;
  bool mean_subtract;
  cudaStream_t stream;

  // The run of the op's arguments, on the current CUDA stream.
  StackRun(c10::string_view activation, c10::string_view block, const at::Tensor& weight_in,
           const std::optional<at::Tensor>& bias_in, double scale_in, bool mean_subtract_in)
      : form(activation, block),
        weight(weight_in.contiguous()),
        bias(bias_in ? bias_in->contiguous() : at::Tensor()),
        scale(scale_in),
        mean_subtract(mean_subtract_in),
        stream(c10::cuda::getCurrentCUDAStream().stream()) {}
};

// The forward walk over layers [first, first + count) from x_first = `input` (n, B). x_l is states[l -
// first] when `states` is defined (the saved inputs), else `last`, updated in place; the result
// x_{first+count} is in `last`. With `checkpoints` defined, x_l is also copied into checkpoints[(l -
// first) / every] for every every-th layer. Sign bits go to mask's layer l - first where it has one.
template <class T>
void forward_layers(const StackRun& run, int64_t first, int64_t count, const at::Tensor& input,
                    const at::Tensor& states, const at::Tensor& checkpoints, int64_t every, const at::Tensor& mask,
                    const at::Tensor& last) {
  const int64_t width = input.size(0), batch = input.size(1);
  at::Tensor h = at::empty({width, batch}, input.options());
  const at::Tensor phi_x = run.form.input_phi ? at::empty({width, batch}, input.options()) : at::Tensor();
  (states.defined() ? states.select(0, 0) : last).copy_(input);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t l = first + i;
    const at::Tensor x_l = states.defined() ? states.select(0, i) : last;
    const at::Tensor x_next = states.defined() && i + 1 < count ? states.select(0, i + 1) : last;
    if (checkpoints.defined() && i % every == 0) checkpoints.select(0, i / every).copy_(x_l);
    if (run.form.input_phi) {
      check_launch(cuda::launch_activation(x_l.const_data_ptr<T>(), phi_x.mutable_data_ptr<T>(), x_l.numel(),
                                           run.form.activation, run.stream),
                   "dmup::residual_stack");
    }
    at::mm_out(h, run.weight.select(0, l), run.form.input_phi ? phi_x : x_l);
    check_launch(
        cuda::launch_stack_layer_forward(x_l.const_data_ptr<T>(), h.const_data_ptr<T>(), layer_bias<T>(run.bias, l),
                                         x_next.mutable_data_ptr<T>(), layer_mask(mask, i), width, batch, run.scale,
                                         run.form.branch, run.mean_subtract, run.stream),
        "dmup::residual_stack");
  }
}

// The reverse walk over layers [first, first + count) with their saved inputs `states` and sign bits
// `mask` (layer l at l - first): g (n, B) goes from dLoss/dx_{first+count} to dLoss/dx_first in place,
// dh_l into grad_h[l - first]; then dW and db of those layers into grad_weight and grad_bias.
template <class T>
void backward_layers(const StackRun& run, int64_t first, int64_t count, const at::Tensor& states,
                     const at::Tensor& mask, const at::Tensor& grad, const at::Tensor& grad_h,
                     const at::Tensor& grad_weight, const at::Tensor& grad_bias) {
  const int64_t width = grad.size(0), batch = grad.size(1);
  at::Tensor h = run.form.recompute_h ? at::empty({width, batch}, grad.options()) : at::Tensor();
  at::Tensor grad_phi = run.form.input_phi ? at::empty({width, batch}, grad.options()) : at::Tensor();
  for (int64_t i = count - 1; i >= 0; --i) {
    const int64_t l = first + i;
    const at::Tensor w_l = run.weight.select(0, l), x_l = states.select(0, i), dh = grad_h.select(0, i);
    if (run.form.recompute_h) at::mm_out(h, w_l, x_l);
    check_launch(cuda::launch_stack_layer_backward(
                     grad.const_data_ptr<T>(), run.form.recompute_h ? h.const_data_ptr<T>() : nullptr,
                     layer_bias<T>(run.bias, l), layer_mask(mask, i), dh.mutable_data_ptr<T>(), width, batch, run.scale,
                     run.form.branch, run.mean_subtract, run.stream),
                 "dmup::residual_stack_backward");
    if (run.form.input_phi) {  // g += phi'(x_l) * (W_l^T dh)
      at::mm_out(grad_phi, w_l.t(), dh);
      check_launch(cuda::launch_activation_backward_add(x_l.const_data_ptr<T>(), grad_phi.const_data_ptr<T>(),
                                                        grad.mutable_data_ptr<T>(), grad.numel(), run.form.activation,
                                                        run.stream),
                   "dmup::residual_stack_backward");
    } else {  // g += W_l^T dh
      grad.addmm_(w_l.t(), dh);
    }
  }
  // dW_l = dh_l in_l^T with in_l = x_l, or phi(x_l) for "pre": one batched GEMM over the layers.
  const at::Tensor layer_states = states.narrow(0, 0, count), layer_grad_h = grad_h.narrow(0, 0, count);
  at::Tensor inputs = layer_states;
  if (run.form.input_phi) {
    inputs = at::empty_like(layer_states);
    check_launch(cuda::launch_activation(layer_states.const_data_ptr<T>(), inputs.mutable_data_ptr<T>(), inputs.numel(),
                                         run.form.activation, run.stream),
                 "dmup::residual_stack_backward");
  }
  at::Tensor layer_grad_weight = grad_weight.narrow(0, first, count);
  at::bmm_out(layer_grad_weight, layer_grad_h, inputs.transpose(1, 2));
  if (grad_bias.size(0) > 0) {
    at::Tensor layer_grad_bias = grad_bias.narrow(0, first, count);
    at::sum_out(layer_grad_bias, layer_grad_h, at::IntArrayRef{2});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                                   const std::optional<at::Tensor>& bias_in,
                                                                   double scale, c10::string_view activation,
                                                                   c10::string_view block, bool mean_subtract,
                                                                   bool save_for_backward, int64_t checkpoint_every) {
  check_stack_inputs(x_in, "x", weight_in, bias_in, scale, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const StackRun run(activation, block, weight_in, bias_in, scale, mean_subtract);
  const int64_t batch = x.size(0), width = x.size(1), depth = run.weight.size(0);
  at::Tensor out, saved, mask;
  std::tie(out, saved, mask) =
      empty_stack_outputs(x, depth, run.form.planes, width, save_for_backward, checkpoint_every);
  mask.zero_();  // the layer kernel only sets bits
  const at::Tensor last = at::empty({width, batch}, x.options());
  const bool checkpointed = save_for_backward && checkpoint_every > 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_cuda", [&] {
    forward_layers<scalar_t>(run, 0, depth, x.t(), save_for_backward && !checkpointed ? saved : at::Tensor(),
                             checkpointed ? saved : at::Tensor(), checkpoint_every, mask, last);
  });
  out.copy_(last.t());
  return {out, saved, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& saved, const at::Tensor& mask, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, double scale, c10::string_view activation, c10::string_view block,
    bool mean_subtract, int64_t checkpoint_every) {
  check_stack_inputs(grad_out_in, "grad_out", weight_in, bias_in, scale, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const StackRun run(activation, block, weight_in, bias_in, scale, mean_subtract);
  const int64_t batch = grad_out.size(0), width = grad_out.size(1), depth = run.weight.size(0);
  check_stack_state(saved, mask, grad_out, depth, run.form.planes, width, checkpoint_every, "residual_stack");
  const auto options = grad_out.options();
  // g = dLoss/dx_l, feature-major, updated in place from layer L-1 down to 0.
  const at::Tensor grad = at::empty({width, batch}, options);
  grad.copy_(grad_out.t());
  const at::Tensor grad_weight = at::empty({depth, width, width}, options);
  const at::Tensor grad_bias = at::empty({run.bias.defined() ? depth : 0, width}, options);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "residual_stack_backward_cuda", [&] {
    if (checkpoint_every == 0) {
      backward_layers<scalar_t>(run, 0, depth, saved, mask, grad, at::empty({depth, width, batch}, options),
                                grad_weight, grad_bias);
      return;
    }
    // Segment by segment from the last: recompute its states and sign bits from its checkpoint, then
    // walk it back (docs/design.md §4.4).
    const int64_t span = std::min(checkpoint_every, depth);
    const at::Tensor states = at::empty({span, width, batch}, options), grad_h = at::empty_like(states);
    const at::Tensor signs = at::empty({span, run.form.planes, width, mask_words(batch)}, options.dtype(at::kShort));
    const at::Tensor last = at::empty({width, batch}, options);
    for_each_segment_from_last(depth, checkpoint_every, [&](int64_t segment, int64_t first, int64_t count) {
      signs.zero_();  // the layer kernel only sets bits
      forward_layers<scalar_t>(run, first, count, saved.select(0, segment), states, at::Tensor(), 1, signs, last);
      backward_layers<scalar_t>(run, first, count, states, signs, grad, grad_h, grad_weight, grad_bias);
    });
  });
  at::Tensor grad_x = at::empty({batch, width}, options);
  grad_x.copy_(grad.t());
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CUDA, m) {
  m.impl("residual_stack", &residual_stack_cuda);
  m.impl("residual_stack_backward", &residual_stack_backward_cuda);
}

}  // namespace dmup
