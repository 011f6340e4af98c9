// CPU implementation of dmup::residual_stack and its backward: torch glue around stack_kernel.h.
//
// Forward: one parallel pass over row tiles (each tile walks all L layers). Backward: one parallel
// pass over row tiles in reverse layer order (grad_x and every dh_l), then one over (layer, output
// block) tasks for every dW_l and db_l; with checkpoints, the same two passes per segment, each tile
// recomputing the segment before walking it back (stack_kernel.h, checkpointed_backward). float32 runs the kernel of
// the instruction set in use (cpu_isa.h); float64 always runs the portable one. Every GEMM is the kernel's own, whose
// sums run in a fixed order: a BLAS may block its sums by the shape and alignment it is given, which would tie the
// result to the thread count (the tile size) and to the process (the buffers' addresses).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <unistd.h>

#include <cstdlib>
#include <deque>
#include <limits>
#include <mutex>
#include <utility>

#include "../op_args.h"
#include "cpu_isa.h"
#include "stack_kernel.h"

namespace dmup {

#if defined(__x86_64__)
StackKernels<float> stack_kernels_avx512(Activation activation, Block block);
StackKernels<float> stack_kernels_avx2(Activation activation, Block block);
#elif defined(__aarch64__)
StackKernels<float> stack_kernels_neon(Activation activation, Block block);
#endif
template <class T>
StackKernels<T> stack_kernels_portable(Activation activation, Block block);

namespace {

template <class T>
StackKernels<T> select_kernels(Activation activation, Block block) {
  if constexpr (std::is_same_v<T, float>) {
    switch (active_cpu_isa()) {
#if defined(__x86_64__)
      case CpuIsa::Avx512: return stack_kernels_avx512(activation, block);
      case CpuIsa::Avx2: return stack_kernels_avx2(activation, block);
#elif defined(__aarch64__)
      case CpuIsa::Neon: return stack_kernels_neon(activation, block);
#endif
      default: break;
    }
  }
  return stack_kernels_portable<T>(activation, block);
}

// A transparent huge page: buffers of this size or more (the saved state, dh_l and dW of a stack)
// come from LargeBufferPool.
constexpr size_t kHugePageBytes = 2 << 20;

// Large buffers, recycled. Training allocates the same few large buffers every step, and fresh
// memory costs a page fault on first touch: about 1 us per 4 KiB page here, 12 ms per 16 MB, a tenth
// of a training step at (n, B, L) = (128, 256, 256). So freed buffers are kept, by size, and handed
// out again, as torch's CUDA caching allocator does; new ones are aligned to and marked for
// transparent huge pages (madvise), which cut a fresh 16 MB buffer to 1.4 ms. The pool keeps at
// most kMaxCachedFraction of physical memory in freed buffers, releasing the oldest first.
class LargeBufferPool {
 public:
  static LargeBufferPool& instance() {
    static LargeBufferPool* pool = new LargeBufferPool();  // never destroyed: tensors may outlive exit
    return *pool;
  }

  // A buffer of `bytes` (rounded up to whole huge pages).
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->first == bytes) {
          void* data = it->second;
          cached_bytes_ -= bytes;
          free_.erase(it);
          return data;
        }
      }
    }
    void* data = std::aligned_alloc(kHugePageBytes, bytes);
    TORCH_CHECK(data != nullptr, "residual_stack: out of memory allocating ", bytes, " bytes");
    madvise(data, bytes, MADV_HUGEPAGE);  // a hint: without huge pages it is plain memory
    return data;
  }

  void give(void* data, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.emplace_back(bytes, data);
    cached_bytes_ += bytes;
    while (cached_bytes_ > limit_) {
      cached_bytes_ -= free_.front().first;
      std::free(free_.front().second);
      free_.pop_front();
    }
  }

 private:
  static constexpr double kMaxCachedFraction = 0.25;
  LargeBufferPool()
      : limit_(static_cast<size_t>(kMaxCachedFraction * static_cast<double>(sysconf(_SC_PHYS_PAGES)) *
                                   static_cast<double>(sysconf(_SC_PAGE_SIZE)))) {}

  std::mutex mutex_;
  std::deque<std::pair<size_t, void*>> free_;  // oldest first
  size_t cached_bytes_ = 0;
  const size_t limit_;
};

// at::empty, except that buffers of a huge page or more come from LargeBufferPool. Where torch is
// asked to fill uninitialised memory (deterministic mode), these are filled with NaN as well.
at::Tensor empty_large(at::IntArrayRef sizes, at::TensorOptions options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kHugePageBytes) return at::empty(sizes, options);
  const size_t rounded = (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  void* data = LargeBufferPool::instance().take(rounded);
  at::Tensor result =
      at::from_blob(data, sizes, [rounded](void* p) { LargeBufferPool::instance().give(p, rounded); }, options);
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
    result.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return result;
}

// The per-core L2 size, as the C library reads it from the CPU (CPUID on x86).
int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : kDefaultL2Bytes;
  }();
  return bytes;
}

template <class T>
StackProblem<T> make_problem(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             double scale, c10::string_view activation, c10::string_view block, bool mean_subtract) {
  const int64_t batch = x.size(0), width = x.size(1);
  return StackProblem<T>{batch,
                         width,
                         weight.size(0),
                         weight.const_data_ptr<T>(),
                         bias ? bias->const_data_ptr<T>() : nullptr,
                         static_cast<T>(scale),
                         parse_activation(activation),
                         parse_block(block),
                         mean_subtract,
                         stack_tile_rows(batch, width, at::get_num_threads(), sizeof(T), l2_bytes())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_cpu(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                                  const std::optional<at::Tensor>& bias_in,
                                                                  double scale, c10::string_view activation,
                                                                  c10::string_view block, bool mean_subtract,
                                                                  bool save_for_backward, int64_t checkpoint_every) {
  check_stack_inputs(x_in, weight_in, bias_in, c10::DeviceType::CPU);
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int planes = mask_planes(parse_activation(activation), parse_block(block));
  at::Tensor out, saved, mask;
  std::tie(out, saved, mask) =
      empty_stack_outputs(x, weight.size(0), planes, save_for_backward, checkpoint_every, &empty_large);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "residual_stack_cpu", [&] {
    const auto problem = make_problem<scalar_t>(x, weight, bias, scale, activation, block, mean_subtract);
    const auto kernels = select_kernels<scalar_t>(problem.activation, problem.block);
    const StackForwardBuffers<scalar_t> buffers{x.const_data_ptr<scalar_t>(),
                                                nullptr,
                                                out.mutable_data_ptr<scalar_t>(),
                                                save_for_backward ? saved.mutable_data_ptr<scalar_t>() : nullptr,
                                                std::max<int64_t>(checkpoint_every, 1),
                                                save_for_backward && checkpoint_every == 0
                                                    ? reinterpret_cast<uint16_t*>(mask.mutable_data_ptr<int16_t>())
                                                    : nullptr};
    kernels.forward(problem, buffers, at::get_num_threads());
  });
  return {out, saved, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_stack_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& saved, const at::Tensor& mask, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, double scale, c10::string_view activation, c10::string_view block,
    bool mean_subtract, int64_t checkpoint_every) {
  check_stack_inputs(grad_out_in, weight_in, bias_in, c10::DeviceType::CPU);
  const at::Tensor grad_out = grad_out_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  const int64_t batch = grad_out.size(0), width = grad_out.size(1), depth = weight.size(0);
  const int planes = mask_planes(parse_activation(activation), parse_block(block));
  check_stack_state(saved, mask, grad_out, depth, planes, checkpoint_every);
  const auto options = grad_out.options();
  at::Tensor grad_x = at::empty({batch, width}, options);
  at::Tensor grad_weight = empty_large({depth, width, width}, options);
  at::Tensor grad_bias = at::empty({bias ? depth : 0, width}, options);
  if (batch == 0) {  // no rows: the sums over rows are empty
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  // dh of every layer, or of one segment (with its recomputed states and sign bits) when checkpointed.
  const int64_t scratch_layers = checkpoint_every == 0 ? depth : std::min(checkpoint_every, depth);
  at::Tensor grad_h = empty_large({scratch_layers, width, batch}, options);
  AT_DISPATCH_FLOATING_TYPES(grad_out.scalar_type(), "residual_stack_backward_cpu", [&] {
    const auto problem = make_problem<scalar_t>(grad_out, weight, bias, scale, activation, block, mean_subtract);
    const auto kernels = select_kernels<scalar_t>(problem.activation, problem.block);
    const int threads = at::get_num_threads();
    scalar_t* grad_bias_data = bias ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr;
    if (checkpoint_every == 0) {
      const StackBackwardBuffers<scalar_t> buffers{grad_out.const_data_ptr<scalar_t>(),
                                                   saved.const_data_ptr<scalar_t>(),
                                                   reinterpret_cast<const uint16_t*>(mask.const_data_ptr<int16_t>()),
                                                   grad_x.mutable_data_ptr<scalar_t>(),
                                                   nullptr,
                                                   grad_h.mutable_data_ptr<scalar_t>(),
                                                   grad_weight.mutable_data_ptr<scalar_t>(),
                                                   grad_bias_data};
      kernels.backward_rows(problem, buffers, threads);
      kernels.backward_weights(problem, buffers, threads);
      return;
    }
    at::Tensor states = empty_large({scratch_layers, width, batch}, options);
    at::Tensor signs = at::empty({scratch_layers, planes, width, mask_words(batch)}, options.dtype(at::kShort));
    at::Tensor grad_carry = at::empty({width, batch}, options);
    const SegmentScratch<scalar_t> scratch{states.mutable_data_ptr<scalar_t>(),
                                           reinterpret_cast<uint16_t*>(signs.mutable_data_ptr<int16_t>()),
                                           grad_h.mutable_data_ptr<scalar_t>()};
    checkpointed_backward(kernels, problem, saved.const_data_ptr<scalar_t>(), checkpoint_every,
                          grad_out.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                          grad_carry.mutable_data_ptr<scalar_t>(), scratch, grad_weight.mutable_data_ptr<scalar_t>(),
                          grad_bias_data, threads);
  });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dmup, CPU, m) {
  m.impl("residual_stack", &residual_stack_cpu);
  m.impl("residual_stack_backward", &residual_stack_backward_cpu);
}

}  // namespace dmup
