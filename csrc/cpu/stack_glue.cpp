// The shared pieces of the CPU stacks' torch glue (stack_glue.h): the kernels of the active instruction
// set, the pool of large buffers and the L2 size.
#include "stack_glue.h"

#include <ATen/Context.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <deque>
#include <limits>
#include <mutex>
#include <type_traits>
#include <utility>

#include "cpu_isa.h"

namespace dmup {

// Rows that fill at most half of an AVX-512 vector. Every CPU with AVX-512 F also has AVX2 and FMA.
constexpr int64_t kHalfVectorRows = 8;

template <class T>
CpuKernels<T> active_cpu_kernels(int64_t batch) {
  if constexpr (std::is_same_v<T, float>) {
    switch (active_cpu_isa()) {
#if defined(__x86_64__)
      case CpuIsa::Avx512: return batch <= kHalfVectorRows ? cpu_kernels_avx2() : cpu_kernels_avx512();
      case CpuIsa::Avx2: return cpu_kernels_avx2();
#elif defined(__aarch64__)
      case CpuIsa::Neon: return cpu_kernels_neon();
#endif
      default: break;
    }
  }
  return cpu_kernels_portable<T>();
}

template CpuKernels<float> active_cpu_kernels<float>(int64_t batch);
template CpuKernels<double> active_cpu_kernels<double>(int64_t batch);

namespace {

// A transparent huge page: buffers of this size or more (the saved state, the weight gradients and a
// checkpointed backward's segment states) come from LargeBufferPool.
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
    TORCH_CHECK(data != nullptr, "dmup: out of memory allocating ", bytes, " bytes");
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

}  // namespace

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

int64_t l2_bytes() {
  static const int64_t bytes = [] {
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? static_cast<int64_t>(reported) : kDefaultL2Bytes;
  }();
  return bytes;
}

}  // namespace dmup
