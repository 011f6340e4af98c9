// Torch-facing helpers shared by the op implementations: turning schema arguments into kernel
// enums, with errors that name the argument.
#pragma once

#include <torch/library.h>

#include "activations.h"
#include "cpu/stack_kernel.h"

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

}  // namespace dmup
