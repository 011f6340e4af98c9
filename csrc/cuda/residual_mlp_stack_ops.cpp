// CUDA implementation of dmup::residual_mlp_stack and its backward, registered under the CUDA dispatch
// key; built as residual_stack_ops.cpp is, and run the same way: a host loop over the layers on the
// current CUDA stream, the stream feature-major (n, B) (the layout of the CPU op's saved state). Per layer
// two cuBLAS GEMMs (through ATen), h1 = W1_l x_l and h2 = W2_l a, the hidden epilogue a = phi(h1 + b1_l)
// with its sign bits (residual_mlp_stack.cu), and the stack's layer epilogue x + s MS(h2 + b2_l)
// (residual_stack.cu). The backward recomputes h1 and a per layer (for dW2, and for phi' of gelu and silu)
// and forms each layer's weight gradients with one GEMM each.
#include <ATen/Dispatch.h>
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

constexpr const char* kForwardOp = "dmup::residual_mlp_stack";
constexpr const char* kBackwardOp = "dmup::residual_mlp_stack_backward";

// The settings and parameters every layer of one MLP stack shares.
struct MlpRun {
  Activation activation;
  at::Tensor weight1, weight2, bias1, bias2;  // contiguous; undefined biases: none
  double scale;
  bool mean_subtract;
  cudaStream_t stream;

  // The run of the op's arguments, on the current CUDA stream.
  MlpRun(c10::string_view activation_name, const at::Tensor& weight1_in, const at::Tensor& weight2_in,
         const std::optional<at::Tensor>& bias1_in, const std::optional<at::Tensor>& bias2_in, double scale_in,
         bool mean_subtract_in)
      : activation(parse_activation(activation_name)),
        weight1(weight1_in.contiguous()),
        weight2(weight2_in.contiguous()),
        bias1(bias1_in ? bias1_in->contiguous() : at::Tensor()),
        bias2(bias2_in ? bias2_in->contiguous() : at::Tensor()),
        scale(scale_in),
        mean_subtract(mean_subtract_in),
        stream(c10::cuda::getCurrentCUDAStream().stream()) {}

  int64_t hidden_width() const { return weight1.size(1); }
};

// h1 = W1_l x_l into h and a = phi(h1 + b1_l) into hidden (both (m, B)), with the sign bits into mask when
// it is not nullptr.
template <class T>
void hidden_layer(const MlpRun& run, int64_t layer, const at::Tensor& x_l, at::Tensor& h, const at::Tensor& hidden,
                  uint16_t* mask, const char* op) {
  at::mm_out(h, run.weight1.select(0, layer), x_l);
  check_launch(cuda::launch_mlp_hidden_forward(h.const_data_ptr<T>(), layer_bias<T>(run.bias1, layer),
                                               hidden.mutable_data_ptr<T>(), mask, h.size(0), h.size(1), run.activation,
                                               run.stream),
               op);
}

// The forward walk over layers [first, first + count) from x_first = `input` (n, B), with the states,
// checkpoints and sign bits of residual_stack_ops.cpp's forward_layers (the sign bits of h1, m features).
template <class T>
void forward_layers(const MlpRun& run, int64_t first, int64_t count, const at::Tensor& input, const at::Tensor& states,
                    const at::Tensor& checkpoints, int64_t every, const at::Tensor& mask, const at::Tensor& last) {
  const int64_t width = input.size(0), batch = input.size(1);
  at::Tensor h1 = at::empty({run.hidden_width(), batch}, input.options()), hidden = at::empty_like(h1);
  at::Tensor h2 = at::empty({width, batch}, input.options());
  (states.defined() ? states.select(0, 0) : last).copy_(input);
  for (int64_t i = 0; i < count; ++i) {
    const int64_t l = first + i;
    const at::Tensor x_l = states.defined() ? states.select(0, i) : last;
    const at::Tensor x_next = states.defined() && i + 1 < count ? states.select(0, i + 1) : last;
    if (checkpoints.defined() && i % every == 0) checkpoints.select(0, i / every).copy_(x_l);
    hidden_layer<T>(run, l, x_l, h1, hidden, layer_mask(mask, i), kForwardOp);
    at::mm_out(h2, run.weight2.select(0, l), hidden);
    check_launch(
        cuda::launch_stack_layer_forward(x_l.const_data_ptr<T>(), h2.const_data_ptr<T>(), layer_bias<T>(run.bias2, l),
                                         x_next.mutable_data_ptr<T>(), nullptr, width, batch, run.scale,
                                         Activation::Identity, run.mean_subtract, run.stream),
        kForwardOp);
  }
}

// The reverse walk over layers [first, first + count) with their saved inputs `states` and sign bits `mask`
// (layer l at l - first): g (n, B) goes from dLoss/dx_{first+count} to dLoss/dx_first in place, and each
// layer's dW1, dW2, db1, db2 go into the gradients (a bias gradient of 0 rows: no bias).
template <class T>
void backward_layers(const MlpRun& run, int64_t first, int64_t count, const at::Tensor& states, const at::Tensor& mask,
                     const at::Tensor& grad, const at::Tensor& grad_weight1, const at::Tensor& grad_weight2,
                     const at::Tensor& grad_bias1, const at::Tensor& grad_bias2) {
  const int64_t width = grad.size(0), batch = grad.size(1), hidden_width = run.hidden_width();
  at::Tensor h1 = at::empty({hidden_width, batch}, grad.options()), hidden = at::empty_like(h1);
  at::Tensor grad_a = at::empty_like(h1), grad_hidden = at::empty_like(h1);
  at::Tensor grad_h2 = at::empty({width, batch}, grad.options());
  for (int64_t i = count - 1; i >= 0; --i) {
    const int64_t l = first + i;
    const at::Tensor x_l = states.select(0, i), w1 = run.weight1.select(0, l), w2 = run.weight2.select(0, l);
    hidden_layer<T>(run, l, x_l, h1, hidden, nullptr, kBackwardOp);
    // dh2 = MS(s g): the stack's layer backward with identity.
    check_launch(cuda::launch_stack_layer_backward<T>(grad.const_data_ptr<T>(), nullptr, nullptr, nullptr,
                                                      grad_h2.mutable_data_ptr<T>(), width, batch, run.scale,
                                                      Activation::Identity, run.mean_subtract, run.stream),
                 kBackwardOp);
    // dh1 = phi'(h1) (W2_l^T dh2): the layer backward with scale 1 and no MS is phi' times its input.
    at::mm_out(grad_a, w2.t(), grad_h2);
    check_launch(cuda::launch_stack_layer_backward(grad_a.const_data_ptr<T>(), h1.const_data_ptr<T>(),
                                                   layer_bias<T>(run.bias1, l), layer_mask(mask, i),
                                                   grad_hidden.mutable_data_ptr<T>(), hidden_width, batch, 1.0,
                                                   run.activation, false, run.stream),
                 kBackwardOp);
    grad.addmm_(w1.t(), grad_hidden);  // g += W1_l^T dh1
    at::Tensor layer_grad_weight2 = grad_weight2.select(0, l), layer_grad_weight1 = grad_weight1.select(0, l);
    at::mm_out(layer_grad_weight2, grad_h2, hidden.t());
    at::mm_out(layer_grad_weight1, grad_hidden, x_l.t());
    const auto sum_rows = [l](const at::Tensor& grad_bias, const at::Tensor& grad_h) {
      if (grad_bias.size(0) == 0) return;  // no bias
      at::Tensor layer_grad_bias = grad_bias.select(0, l);
      at::sum_out(layer_grad_bias, grad_h, at::IntArrayRef{1});
    };
    sum_rows(grad_bias1, grad_hidden);
    sum_rows(grad_bias2, grad_h2);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_mlp_stack_cuda(
    const at::Tensor& x_in, const at::Tensor& weight1_in, const at::Tensor& weight2_in,
    const std::optional<at::Tensor>& bias1_in, const std::optional<at::Tensor>& bias2_in, double scale,
    c10::string_view activation, bool mean_subtract, bool save_for_backward, int64_t checkpoint_every) {
  check_mlp_stack_inputs(x_in, "x", weight1_in, weight2_in, bias1_in, bias2_in, scale, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const MlpRun run(activation, weight1_in, weight2_in, bias1_in, bias2_in, scale, mean_subtract);
  const int64_t batch = x.size(0), width = x.size(1), depth = run.weight1.size(0);
  at::Tensor out, saved, mask;
  std::tie(out, saved, mask) = empty_stack_outputs(x, depth, mask_planes(run.activation, Block::Post),
                                                   run.hidden_width(), save_for_backward, checkpoint_every);
  mask.zero_();  // the layer kernel only sets bits
  const at::Tensor last = at::empty({width, batch}, x.options());
  const bool checkpointed = save_for_backward && checkpoint_every > 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_mlp_stack_cuda", [&] {
    forward_layers<scalar_t>(run, 0, depth, x.t(), save_for_backward && !checkpointed ? saved : at::Tensor(),
                             checkpointed ? saved : at::Tensor(), checkpoint_every, mask, last);
  });
  out.copy_(last.t());
  return {out, saved, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> residual_mlp_stack_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& saved, const at::Tensor& mask, const at::Tensor& weight1_in,
    const at::Tensor& weight2_in, const std::optional<at::Tensor>& bias1_in, const std::optional<at::Tensor>& bias2_in,
    double scale, c10::string_view activation, bool mean_subtract, int64_t checkpoint_every) {
  check_mlp_stack_inputs(grad_out_in, "grad_out", weight1_in, weight2_in, bias1_in, bias2_in, scale,
                         c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous();
  const MlpRun run(activation, weight1_in, weight2_in, bias1_in, bias2_in, scale, mean_subtract);
  const int64_t batch = grad_out.size(0), width = grad_out.size(1), depth = run.weight1.size(0);
  const int64_t hidden_width = run.hidden_width();
  const int planes = mask_planes(run.activation, Block::Post);
  check_stack_state(saved, mask, grad_out, depth, planes, hidden_width, checkpoint_every, "residual_mlp_stack");
  const auto options = grad_out.options();
  // g = dLoss/dx_l, feature-major, updated in place from layer L-1 down to 0.
  const at::Tensor grad = at::empty({width, batch}, options);
  grad.copy_(grad_out.t());
  const at::Tensor grad_weight1 = at::empty({depth, hidden_width, width}, options);
  const at::Tensor grad_weight2 = at::empty({depth, width, hidden_width}, options);
  const at::Tensor grad_bias1 = at::empty({run.bias1.defined() ? depth : 0, hidden_width}, options);
  const at::Tensor grad_bias2 = at::empty({run.bias2.defined() ? depth : 0, width}, options);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "residual_mlp_stack_backward_cuda", [&] {
    if (checkpoint_every == 0) {
      backward_layers<scalar_t>(run, 0, depth, saved, mask, grad, grad_weight1, grad_weight2, grad_bias1, grad_bias2);
      return;
    }
    // Segment by segment from the last: recompute its states and sign bits from its checkpoint, then walk it
    // back (docs/design.md §4.4).
    const int64_t span = std::min(checkpoint_every, depth);
    const at::Tensor states = at::empty({span, width, batch}, options);
    const at::Tensor signs = at::empty({span, planes, hidden_width, mask_words(batch)}, options.dtype(at::kShort));
    const at::Tensor last = at::empty({width, batch}, options);
    for_each_segment_from_last(depth, checkpoint_every, [&](int64_t segment, int64_t first, int64_t count) {
      signs.zero_();  // the hidden kernel only sets bits
      forward_layers<scalar_t>(run, first, count, saved.select(0, segment), states, at::Tensor(), 1, signs, last);
      backward_layers<scalar_t>(run, first, count, states, signs, grad, grad_weight1, grad_weight2, grad_bias1,
                                grad_bias2);
    });
  });
  at::Tensor grad_x = at::empty({batch, width}, options);
  grad_x.copy_(grad.t());
  return {grad_x, grad_weight1, grad_weight2, grad_bias1, grad_bias2};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CUDA, m) {
  m.impl("residual_mlp_stack", &residual_mlp_stack_cuda);
  m.impl("residual_mlp_stack_backward", &residual_mlp_stack_backward_cuda);
}

}  // namespace dmup
