// Torch-facing helpers shared by the op implementations: turning schema arguments into kernel
// enums, with errors that name the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "activations.h"

namespace dmup {

inline Activation parse_activation(c10::string_view name) {
  if (name == "identity") return Activation::Identity;
  if (name == "relu") return Activation::Relu;
  if (name == "abs") return Activation::Abs;
  if (name == "gelu") return Activation::Gelu;
  if (name == "silu") return Activation::Silu;
  TORCH_CHECK_VALUE(false, "activation must be one of 'relu', 'abs', 'gelu', 'silu', 'identity'; got '",
                    name, "'");
}

inline Block parse_block(c10::string_view name) {
  if (name == "post") return Block::Post;
  if (name == "pre") return Block::Pre;
  TORCH_CHECK_VALUE(false, "block must be 'post' or 'pre'; got '", name, "'");
}

// a and b have the same shape, dtype and device, and at least one dimension (scaled_residual's pair).
inline void check_pair(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), b_name, " must have the shape of ", a_name, " ", a.sizes(),
                    "; got ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == b.scalar_type(), b_name, " must have the dtype of ", a_name, " (",
                    a.scalar_type(), "); got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), b_name, " must be on the device of ", a_name, " (", a.device(),
                    "); got ", b.device());
  TORCH_CHECK_VALUE(a.dim() >= 1, a_name, " must have at least 1 dimension");
}

}  // namespace dmup
