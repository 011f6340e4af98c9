// What the torch glue of the CUDA stacks (residual_stack_ops.cpp, residual_mlp_stack_ops.cpp) shares: the
// pointers of one layer of a stack's per-layer tensors, as the kernels of launchers.h take them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace dmup {

// Layer `layer` of an (L, features) bias, or nullptr for an undefined one (no bias).
template <class T>
const T* layer_bias(const at::Tensor& bias, int64_t layer) {
  return bias.defined() ? bias.const_data_ptr<T>() + layer * bias.stride(0) : nullptr;
}

// The sign-bit planes of layer `layer` of an (L, planes, features, words) mask, or nullptr when it has none
// (no planes, or nothing saved).
inline uint16_t* layer_mask(const at::Tensor& mask, int64_t layer) {
  if (mask.size(0) == 0 || mask.size(1) == 0) return nullptr;
  return reinterpret_cast<uint16_t*>(mask.mutable_data_ptr<int16_t>()) + layer * mask.stride(0);
}

}  // namespace dmup
