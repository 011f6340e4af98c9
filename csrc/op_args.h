// Torch-facing helpers shared by the op implementations: turning schema arguments into kernel
// enums, with errors that name the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "activations.h"

namespace dmup {

inline Activation parse_activation(c10::string_view name) {
  if (name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::Relu;
  if (name == "abs") return Activation::Abs;
  if (name == "gelu") return Activation::Gelu;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK_VALUE(false, "activation must be one of 'relu', 'abs', 'gelu', 'silu', 'identity'; got '", name, "'");
}

inline Block parse_block(c10::string_view name) {
  if (name == "post") return Block::Post;
  if (name == "pre") return Block::Pre;
  TORCH_CHECK_VALUE(false, "block must be 'post' or 'pre'; got '", name, "'");
}

// The branch multiplier s of every op: a finite number (a NaN or an infinity would only fill the outputs with NaN).
inline void check_scale(double scale) { TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite; got ", scale); }

// The inputs of scaled_residual (and of its backward, a = branch_out, b = grad_out): a and b of the same shape,
// floating dtype and device, with at least one dimension, and a finite scale.
inline void check_epilogue_inputs(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                                  double scale) {
  const at::ScalarType dtype = a.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, a_name,
                   " must be float32, float64, float16 or bfloat16; got ", dtype);
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the shape of ", a_name, " ", a.sizes(), "; got ",
                    b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name, " (",
                    a.scalar_type(), "); got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), b_name, " must be on the device of ", a_name, " (", a.device(), "); got ",
                    b.device());
  TORCH_CHECK_VALUE(a.dim() >= 1, a_name, " must have at least 1 dimension");
  check_scale(scale);
}

// The rows of a stack, x (B, n) (named x_name: x, or grad_out in a backward): float32 or float64 on a device of
// type `device`.
inline void check_stack_rows(const at::Tensor& x, const char* x_name, c10::DeviceType device) {
  TORCH_CHECK_VALUE(x.dim() == 2, x_name, " must be 2-D (batch, width); got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, x_name,
                   " must be float32 or float64 for the ", device, " stack kernel; got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.device().type() == device, x_name, " must be a ", device, " tensor; got one on ", x.device());
}

// A tensor that goes with the rows x (named x_name): of `shape`, with the dtype and device of x.
inline void check_stack_param(const at::Tensor& param, const char* name, at::IntArrayRef shape, const char* shape_names,
                              const at::Tensor& x, const char* x_name) {
  TORCH_CHECK_VALUE(param.sizes() == shape, name, " must have shape ", shape_names, " = ", shape, "; got ",
                    param.sizes());
  TORCH_CHECK_TYPE(param.scalar_type() == x.scalar_type(), name, " must have the dtype of ", x_name, " (",
                   x.scalar_type(), "); got ", param.scalar_type());
  TORCH_CHECK_VALUE(param.device() == x.device(), name, " must be on the device of ", x_name, " (", x.device(),
                    "); got ", param.device());
}

// The inputs of residual_stack (x_name: x, or grad_out in the backward): x (B, n) and weight (L, n, n) with
// L >= 1 of one float dtype on one device of type `device`, bias (L, n) or none, and a finite scale.
inline void check_stack_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, double scale, c10::DeviceType device) {
  check_stack_rows(x, x_name, device);
  const int64_t width = x.size(1), depth = weight.dim() == 3 ? weight.size(0) : 0;
  TORCH_CHECK_VALUE(depth >= 1, "weight must have shape (depth, width, width) with depth >= 1; got ", weight.sizes());
  check_stack_param(weight, "weight", {depth, width, width}, "(depth, width, width)", x, x_name);
  if (bias) check_stack_param(*bias, "bias", {depth, width}, "(depth, width)", x, x_name);
  check_scale(scale);
}

// The inputs of residual_mlp_stack (x_name: x, or grad_out in the backward): x (B, n), weight1 (L, m, n) and
// weight2 (L, n, m) with L, m >= 1, bias1 (L, m) and bias2 (L, n) or none, all of one float dtype on one device
// of type `device`, and a finite scale.
inline void check_mlp_stack_inputs(const at::Tensor& x, const char* x_name, const at::Tensor& weight1,
                                   const at::Tensor& weight2, const std::optional<at::Tensor>& bias1,
                                   const std::optional<at::Tensor>& bias2, double scale, c10::DeviceType device) {
  check_stack_rows(x, x_name, device);
  TORCH_CHECK_VALUE(weight1.dim() == 3 && weight1.size(0) >= 1 && weight1.size(1) >= 1,
                    "weight1 must have shape (depth, hidden_width, width) with depth, hidden_width >= 1; got ",
                    weight1.sizes());
  const int64_t depth = weight1.size(0), hidden_width = weight1.size(1), width = x.size(1);
  check_stack_param(weight1, "weight1", {depth, hidden_width, width}, "(depth, hidden_width, width)", x, x_name);
  check_stack_param(weight2, "weight2", {depth, width, hidden_width}, "(depth, width, hidden_width)", x, x_name);
  if (bias1) check_stack_param(*bias1, "bias1", {depth, hidden_width}, "(depth, hidden_width)", x, x_name);
  if (bias2) check_stack_param(*bias2, "bias2", {depth, width}, "(depth, width)", x, x_name);
  check_scale(scale);
}

// The checkpoint spacing of the stacks: 0 saves every layer's input and sign bits; k >= 1 saves only x_0, x_k,
// x_2k, ... (docs/design.md §4.4).
inline void check_checkpoint_every(int64_t checkpoint_every) {
  TORCH_CHECK_VALUE(checkpoint_every >= 0, "checkpoint_every must be 0 (save every layer) or a layer count >= 1; got ",
                    checkpoint_every);
}

// The layers of a stack's saved state: every layer's input, or the checkpoints.
inline int64_t saved_layers(int64_t depth, int64_t checkpoint_every) {
  return checkpoint_every == 0 ? depth : checkpoint_count(depth, checkpoint_every);
}

// A stack's outputs for x (B, n) and L = depth layers, unfilled: out (B, n), saved (saved_layers, n, B)
// allocated by `empty` (a device may have a better allocation for large state), and mask (L, planes,
// signed_features, ceil(B/16)) int16 (the CPU kernels write every word; the CUDA kernels only set bits, so
// their callers zero it); signed_features is n for residual_stack, m (the hidden width) for
// residual_mlp_stack. Without save_for_backward (inference) saved and mask have 0 layers; with checkpoints
// mask has 0 layers.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_stack_outputs(
    const at::Tensor& x, int64_t depth, int planes, int64_t signed_features, bool save_for_backward,
    int64_t checkpoint_every,
    at::Tensor (*empty)(at::IntArrayRef, at::TensorOptions) = [](at::IntArrayRef sizes, at::TensorOptions options) {
      return at::empty(sizes, options);
    }) {
  check_checkpoint_every(checkpoint_every);
  const int64_t batch = x.size(0), width = x.size(1);
  const int64_t kept = save_for_backward ? saved_layers(depth, checkpoint_every) : 0;
  const int64_t masked = save_for_backward && checkpoint_every == 0 ? depth : 0;
  return {at::empty({batch, width}, x.options()), empty({kept, width, batch}, x.options()),
          at::empty({masked, planes, signed_features, mask_words(batch)}, x.options().dtype(at::kShort))};
}

// The state the forward op `op` (residual_stack, residual_mlp_stack) returned for its backward: saved
// (saved_layers, n, B) of grad_out's dtype and mask (L or 0 layers, planes, signed_features, ceil(B/16))
// int16, both contiguous and on grad_out's device.
inline void check_stack_state(const at::Tensor& saved, const at::Tensor& mask, const at::Tensor& grad_out,
                              int64_t depth, int planes, int64_t signed_features, int64_t checkpoint_every,
                              const char* op) {
  check_checkpoint_every(checkpoint_every);
  const int64_t batch = grad_out.size(0), width = grad_out.size(1);
  const int64_t kept = saved_layers(depth, checkpoint_every), masked = checkpoint_every == 0 ? depth : 0;
  check_stack_param(saved, "saved (the state returned by the forward)", {kept, width, batch},
                    "(saved layers, width, batch)", grad_out, "grad_out");
  TORCH_CHECK_VALUE(saved.is_contiguous(), "saved must be contiguous, as ", op, " returned it");
  const std::vector<int64_t> mask_shape{masked, planes, signed_features, mask_words(batch)};
  TORCH_CHECK_VALUE(mask.sizes() == at::IntArrayRef(mask_shape), "mask (the sign bits returned by ", op,
                    ") must have shape (layers, planes, features, ceil(batch / 16)) = ", at::IntArrayRef(mask_shape),
                    "; got ", mask.sizes());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kShort, "mask must be int16, as ", op, " returned it; got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.device() == grad_out.device(), "mask must be on the device of grad_out (", grad_out.device(),
                    "); got ", mask.device());
  TORCH_CHECK_VALUE(mask.is_contiguous(), "mask must be contiguous, as ", op, " returned it");
}

}  // namespace dmup
