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
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../op_args.h"
#include "check_launch.h"
#include "launchers.h"

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

template <class T>
const T* layer_bias(const at::Tensor& bias, int64_t layer) {
  return bias.defined() ? bias.const_data_ptr<T>() + layer * bias.stride(0) : nullptr;
}

// The sign-bit planes of one layer, or nullptr when the form saves none (or nothing is saved).
uint16_t* layer_mask(const at::Tensor& mask, int64_t layer) {
  if (mask.size(0) == 0 || mask.size(1) == 0) return nullptr;
  return reinterpret_cast<uint16_t*>(mask.mutable_data_ptr<int16_t>()) + layer * mask.stride(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_cuda(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                                   const std::optional<at::Tensor>& bias_in,
                                                                   double scale, c10::string_view activation,
                                                                   c10::string_view block, bool mean_subtract,
                                                                   bool save_for_backward) {
  check_stack_inputs(x_in, weight_in, bias_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const StackForm form(activation, block);
  const int64_t batch = x.size(0), width = x.size(1), depth = weight.size(0);
  at::Tensor out, saved, mask;
  std::tie(out, saved, mask) = empty_stack_outputs(x, depth, form.planes, save_for_backward);
  // x_l is saved[l] when saving, else `last` updated in place; x_L is always `last`.
  const at::Tensor last = at::empty({width, batch}, x.options());
  (save_for_backward ? saved.select(0, 0) : last).copy_(x.t());
  at::Tensor h = at::empty({width, batch}, x.options());
  const at::Tensor phi_x = form.input_phi ? at::empty({width, batch}, x.options()) : at::Tensor();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_cuda", [&] {
    for (int64_t l = 0; l < depth; ++l) {
      const at::Tensor x_l = save_for_backward ? saved.select(0, l) : last;
      const at::Tensor x_next = save_for_backward && l + 1 < depth ? saved.select(0, l + 1) : last;
      if (form.input_phi) {
        check_launch(cuda::launch_activation(x_l.const_data_ptr<scalar_t>(), phi_x.mutable_data_ptr<scalar_t>(),
                                             x_l.numel(), form.activation, stream),
                     "dmup::residual_stack");
      }
      at::mm_out(h, weight.select(0, l), form.input_phi ? phi_x : x_l);
      check_launch(cuda::launch_stack_layer_forward(x_l.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                                                    layer_bias<scalar_t>(bias, l), x_next.mutable_data_ptr<scalar_t>(),
                                                    layer_mask(mask, l), width, batch, scale, form.branch,
                                                    mean_subtract, stream),
                   "dmup::residual_stack");
    }
  });
  out.copy_(last.t());
  return {out, saved, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& saved, const at::Tensor& mask, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, double scale, c10::string_view activation, c10::string_view block,
    bool mean_subtract) {
  check_stack_inputs(grad_out_in, weight_in, bias_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const StackForm form(activation, block);
  const int64_t batch = grad_out.size(0), width = grad_out.size(1), depth = weight.size(0);
  check_stack_state(saved, mask, grad_out, depth, form.planes);
  const auto options = grad_out.options();
  // g = dLoss/dx_l, feature-major, updated in place from layer L-1 down to 0.
  at::Tensor grad = at::empty({width, batch}, options);
  grad.copy_(grad_out.t());
  const at::Tensor grad_h = at::empty({depth, width, batch}, options);  // dh_l of every layer
  at::Tensor h = form.recompute_h ? at::empty({width, batch}, options) : at::Tensor();
  at::Tensor grad_phi = form.input_phi ? at::empty({width, batch}, options) : at::Tensor();  // dLoss/dphi(x_l)
  // dW_l = dh_l in_l^T with in_l = x_l, or phi(x_l) for "pre": one batched GEMM over all layers.
  at::Tensor inputs = saved;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "residual_stack_backward_cuda", [&] {
    for (int64_t l = depth - 1; l >= 0; --l) {
      const at::Tensor w_l = weight.select(0, l), x_l = saved.select(0, l), dh = grad_h.select(0, l);
      if (form.recompute_h) at::mm_out(h, w_l, x_l);
      check_launch(cuda::launch_stack_layer_backward(
                       grad.const_data_ptr<scalar_t>(), form.recompute_h ? h.const_data_ptr<scalar_t>() : nullptr,
                       layer_bias<scalar_t>(bias, l), layer_mask(mask, l), dh.mutable_data_ptr<scalar_t>(), width,
                       batch, scale, form.branch, mean_subtract, stream),
                   "dmup::residual_stack_backward");
      if (form.input_phi) {  // g += phi'(x_l) * (W_l^T dh)
        at::mm_out(grad_phi, w_l.t(), dh);
        check_launch(cuda::launch_activation_backward_add(
                         x_l.const_data_ptr<scalar_t>(), grad_phi.const_data_ptr<scalar_t>(),
                         grad.mutable_data_ptr<scalar_t>(), grad.numel(), form.activation, stream),
                     "dmup::residual_stack_backward");
      } else {  // g += W_l^T dh
        grad.addmm_(w_l.t(), dh);
      }
    }
    if (form.input_phi) {
      inputs = at::empty_like(saved);
      check_launch(cuda::launch_activation(saved.const_data_ptr<scalar_t>(), inputs.mutable_data_ptr<scalar_t>(),
                                           saved.numel(), form.activation, stream),
                   "dmup::residual_stack_backward");
    }
  });
  at::Tensor grad_x = at::empty({batch, width}, options);
  grad_x.copy_(grad.t());
  at::Tensor grad_weight = at::bmm(grad_h, inputs.transpose(1, 2));
  at::Tensor grad_bias = bias.defined() ? grad_h.sum(2) : at::empty({0, width}, options);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CUDA, m) {
  m.impl("residual_stack", &residual_stack_cuda);
  m.impl("residual_stack_backward", &residual_stack_backward_cuda);
}

}  // namespace dmup
