// What the torch glue of the depth-fused CPU ops (residual_stack.cpp, residual_mlp_stack.cpp) shares: the
// kernels of the instruction set in use (cpu_kernels.h), pooled large buffers, the L2 size tiles are sized
// by, and the run of a backward from the state its forward saved, with or without checkpoints.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "cpu_kernels.h"

namespace dmup {

// at::empty, except that buffers of a huge page (2 MiB) or more come from a pool of recycled buffers
// (docs/design.md §7.2). Where torch is asked to fill uninitialised memory (deterministic mode), these are
// filled with NaN as well.
at::Tensor empty_large(at::IntArrayRef sizes, at::TensorOptions options);

// The per-core L2 size, as the C library reads it from the CPU (CPUID on x86), kDefaultL2Bytes where it
// reports none.
int64_t l2_bytes();

// The forward's buffers from the op's tensors: x rows in, out, and the state saved when save_for_backward:
// every layer's input and its sign bits, or the checkpoints every `checkpoint_every` layers.
template <class T>
StackForwardBuffers<T> forward_buffers(const at::Tensor& x, at::Tensor& out, at::Tensor& saved, at::Tensor& mask,
                                       bool save_for_backward, int64_t checkpoint_every) {
  return {x.const_data_ptr<T>(),
          nullptr,
          out.mutable_data_ptr<T>(),
          save_for_backward ? saved.mutable_data_ptr<T>() : nullptr,
          std::max<int64_t>(checkpoint_every, 1),
          save_for_backward && checkpoint_every == 0 ? reinterpret_cast<uint16_t*>(mask.mutable_data_ptr<int16_t>())
                                                     : nullptr,
          /*saved_bypasses_caches=*/true};  // only the op's backward reads them, after the whole forward
}

// The backward of a depth-fused kernel from the state its forward saved: one reverse walk over every layer
// (checkpoint_every = 0), or segment by segment from the last (checkpointed_backward), each recomputed into
// a scratch of states and sign bits (`planes` planes of `signed_features` features). `whole` holds grad_out,
// grad_x and the parameters' gradients.
template <class T, class Problem, class Backward>
void run_backward(const Kernels<T, Problem, Backward>& kernels, const Problem& p, Backward whole,
                  const at::Tensor& saved, const at::Tensor& mask, int64_t checkpoint_every, int planes,
                  int64_t signed_features) {
  const int threads = at::get_num_threads();
  if (checkpoint_every == 0) {
    whole.saved = saved.const_data_ptr<T>();
    whole.mask = reinterpret_cast<const uint16_t*>(mask.const_data_ptr<int16_t>());
    kernels.backward(p, whole, threads);
    return;
  }
  const int64_t span = std::min(checkpoint_every, p.depth);
  const auto options = saved.options();
  at::Tensor states = empty_large({span, p.width, p.batch}, options);
  at::Tensor signs = at::empty({span, planes, signed_features, mask_words(p.batch)}, options.dtype(at::kShort));
  at::Tensor grad_carry = at::empty({p.width, p.batch}, options);
  whole.grad_carry = grad_carry.mutable_data_ptr<T>();
  const SegmentScratch<T> scratch{states.mutable_data_ptr<T>(),
                                  reinterpret_cast<uint16_t*>(signs.mutable_data_ptr<int16_t>())};
  checkpointed_backward(kernels, p, saved.const_data_ptr<T>(), checkpoint_every, whole, scratch, threads);
}

}  // namespace dmup
