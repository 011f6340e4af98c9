// Depth-fused residual stack on the CPU, written once over a SIMD traits type V (simd_scalar.h,
// simd_avx2.h, simd_avx512.h, simd_neon.h). No torch headers: the torch glue is residual_stack.cpp,
// and tests/native/stack_kernel_check.cpp runs this core on its own (also for Arm, under qemu). The
// pieces every depth-fused kernel shares (GEMM, tiles, teams, sign bits, the weight-gradient packing,
// checkpointed backward) are here; mlp_stack_kernel.h builds the stack of MLP blocks from them.
//
// Math, per layer l (block "post"; "pre" moves phi onto the input, see below):
//   h = x W_l^T + b_l;  u = phi(h);  v = MS(u);  x <- x + s v          (MS: minus the row mean)
// Backward, walking l from L-1 down, g = dLoss/dx:
//   du = MS(s g);  dh = phi'(h) du;  g <- g + dh W_l;  then dW_l = dh^T x_l, db_l = sum_rows dh.
// Block "pre": h = phi(x) W_l^T + b_l, v = MS(h); backward dh = MS(s g), g <- g + phi'(x) (dh W_l),
// dW_l = dh^T phi(x_l).
//
// Layout. Rows of x are independent, so the batch is cut into tiles of R rows (a multiple of 16).
// A tile keeps its slice of the residual stream in a local feature-major buffer X[k][r] (stride
// Rp = R rounded up to W lanes) and walks all L layers. Feature-major means every GEMM reads W in
// its stored (out, in) layout as broadcast scalars and vectorises over rows, the mean over the
// width is a sum of vectors, and relu/abs masks come out as W bits per vector, packed into 16-bit
// words the same way for every W (W divides 16, and a tile starts on a word):
//   saved  (L, n, B)             x_l, feature-major, the state kept for backward
//   mask   (L, planes, n, ceil(B/16)) uint16  bit r%16 of word r/16: the sign bits of h
//                                    (activations.h, positive_sign_bit and negative_sign_bit)
// With depth checkpoints every k layers, saved is (ceil(L/k), n, B), there is no mask, and the backward
// recomputes one segment of k layers at a time into k-layer saved / mask scratch (checkpointed_backward,
// at the end).
// The backward walks the layers in step (TileWalks::walk_back): at layer l each tile forms its rows of dh_l
// and at once adds them into dW_l and db_l, the threads' tiles in the batch's row order (GradientChain), so
// dh of the whole stack never exists (docs/design.md §3.3). (A team that splits a tile's features hands dh_l
// to its last thread, which adds it a few layers behind, RolePipeline.)
// Threads: with enough rows each thread owns whole tiles; with fewer rows than threads x 16 the
// threads share each tile, splitting its features (see Team). Every output element of a row depends
// only on that row, summed in a fixed order (every GEMM sums over its K in order, whatever its
// register tile), and every dW / db element sums the rows of the batch in row order, so results are
// bitwise independent of the tiling, of the split and of the number of threads.
//
// Each ISA's translation unit compiles this header with its own target flags. An inline function or
// template instance compiled in two such units is one symbol, and the linker may keep the copy with
// the other ISA's instructions (an illegal instruction on a CPU without them). So the kernel code is
// in an unnamed namespace (a private copy per unit), buffers are plain arrays rather than
// std::vector<T> (whose code would be shared), and what is outside is loop-free arithmetic.
#pragma once

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "../activations.h"

namespace dmup {

// Offsets into the flat buffers below, int64 throughout: an (L, n, B) state passes 2^31 elements at
// 8 GiB of float32, a (B, n) row block at B*n = 2^31. tests/test_scale.py checks them there.
// (L, n, B) state (saved, grad_h): the first of the B rows of one feature of one layer.
inline int64_t state_offset(int64_t layer, int64_t feature, int64_t width, int64_t batch) {
  return (layer * width + feature) * batch;
}
// (L, planes, n, ceil(B/16)) mask: the first word of one feature's bits in one plane of one layer.
inline int64_t mask_offset(int64_t layer, int64_t plane, int64_t feature, int64_t planes, int64_t width,
                           int64_t batch) {
  return ((layer * planes + plane) * width + feature) * mask_words(batch);
}
// (L, n, n) weight and grad_weight: the first element of one output row of one layer.
inline int64_t weight_offset(int64_t layer, int64_t row, int64_t width) { return (layer * width + row) * width; }

// Asks the caches for `elements` contiguous elements from p, one request per 64-byte line.
template <class T>
inline void prefetch(const T* p, int64_t elements) {
  for (int64_t i = 0; i < elements; i += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(p + i, 0, 3);
}

// The same for columns [c0, c1) of the `rows` rows of `stride` elements of a matrix at p.
template <class T>
inline void prefetch_columns(const T* p, int64_t rows, int64_t stride, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; ++r) prefetch(p + r * stride + c0, c1 - c0);
}

// One segment's scratch for a checkpointed backward (checkpointed_backward, at the end), sized for
// `every` layers of the whole batch.
template <class T>
struct SegmentScratch {
  T* states;       // (every, n, B)
  uint16_t* mask;  // (every, planes, features with sign bits, ceil(B/16))
};

template <class T>
struct StackProblem {
  int64_t batch, width, depth;
  const T* weight;  // (L, n, n), nn.Linear layout per layer
  const T* bias;    // (L, n) or nullptr
  T scale;
  Activation activation;
  Block block;
  bool mean_subtract;
  int64_t tile_rows;  // R: multiple of 16

  // The problem of layers [first, first + count) alone.
  StackProblem layers(int64_t first, int64_t count) const {
    StackProblem part = *this;
    part.depth = count;
    part.weight = weight + weight_offset(first, 0, width);
    part.bias = bias ? bias + first * width : nullptr;
    return part;
  }
};

// The input of a walk over the layers is x as rows, or a saved feature-major state (a checkpoint);
// its output is rows, or nothing (a recomputation only keeps what it saves).
template <class T>
struct StackForwardBuffers {
  const T* x;           // (B, n), or nullptr: start from x_features
  const T* x_features;  // (n, B), used when x is nullptr
  T* out;               // (B, n), or nullptr: the last state is not needed
  T* saved;             // (ceil(L / save_every), n, B): x_l for l = 0, k, 2k, ... (k = save_every); or nullptr
  int64_t save_every;   // 1: every layer's input; k > 1: the checkpoints of docs/design.md §4.4
  uint16_t* mask;       // (L, planes, n, ceil(B/16)), or nullptr: no sign bits saved
  // The saved states are read only by a backward that starts after the whole forward (the op's forward, not
  // a recomputation): stored past the caches, which they would otherwise fill (docs/design.md §7.9).
  bool saved_bypasses_caches;

  // Where layer l saves its input for the rows from b0: into its state, or nowhere (nullptr) when it saves none.
  T* layer_state(int64_t layer, int64_t width, int64_t batch, int64_t b0) const {
    return saved && layer % save_every == 0 ? saved + state_offset(layer / save_every, 0, width, batch) + b0 : nullptr;
  }
};

// The reverse walk reads dLoss/dx_L as rows (grad_out) or from grad_carry, and writes dLoss/dx_0 as rows
// (grad_x) or back into grad_carry: a checkpointed backward carries the gradient between segments there.
template <class T>
struct StackBackwardBuffers {
  const T* grad_out;     // (B, n), or nullptr: read grad_carry
  const T* saved;        // (L, n, B)
  const uint16_t* mask;  // as in the forward
  T* grad_x;             // (B, n), or nullptr: write grad_carry
  T* grad_carry;         // (n, B), used where grad_out or grad_x is nullptr
  T* grad_weight;        // (L, n, n)
  T* grad_bias;          // (L, n), or nullptr when the stack has no bias

  // The buffers of the backward of layers [first, ...) of a checkpointed stack, whose states and sign bits
  // are the segment's scratch: grad_out is read by the last segment only, grad_x written by the first
  // only, the gradient carried between segments in grad_carry.
  StackBackwardBuffers segment(const StackProblem<T>& p, int64_t first, const SegmentScratch<T>& scratch,
                               bool last_segment, bool first_segment) const {
    return {last_segment ? grad_out : nullptr,
            scratch.states,
            scratch.mask,
            first_segment ? grad_x : nullptr,
            grad_carry,
            grad_weight + weight_offset(first, 0, p.width),
            grad_bias ? grad_bias + first * p.width : nullptr};
  }
};

// The per-core L2 size assumed where the machine reports none: AMD Zen 3's 512 KiB (Zen 4 has
// 1 MiB, Intel server cores 1-2 MiB). l2_bytes() in stack_glue.cpp asks the machine (sysconf).
constexpr int64_t kDefaultL2Bytes = 512 * 1024;

// Row-tile size: the batch shared evenly by the threads, in multiples of 16 rows, capped so the
// tile's local buffers (`row_bytes` per row: stack_tile_features, mlp_stack_tile_features) take at most
// the L2: every tile streams every layer's weights, so fewer, larger tiles stream them fewer times
// (docs/design.md §7.5). When one thread's share is above the cap, the tiles are made as even as
// possible, a whole number per thread, so no thread waits on another's extra tile.
inline int64_t stack_tile_rows(int64_t batch, int64_t row_bytes, int64_t threads, int64_t l2_bytes = kDefaultL2Bytes) {
  threads = std::max<int64_t>(threads, 1);
  const int64_t per_thread = std::max<int64_t>(1, (batch + threads - 1) / threads);
  const int64_t cap = std::max<int64_t>(16, l2_bytes / row_bytes / 16 * 16);
  const int64_t tiles_per_thread = (per_thread + cap - 1) / cap;
  const int64_t rows = (per_thread + tiles_per_thread - 1) / tiles_per_thread;
  return std::max<int64_t>(16, (rows + 15) / 16 * 16);
}

// Features of the local planes of a row tile of the stack: the stream, the branch, dh, and the GEMM input
// of the pre block (or the recomputation input of smooth activations), n each. (The reverse walk keeps
// the gradient of each of its tiles in a plane of n more.)
inline int64_t stack_tile_features(int64_t width) { return 4 * width; }

// Entry points of a depth-fused kernel of one instruction set for one dtype, for the problem type Problem
// and backward buffers Backward; filled by make_stack_kernels<V>() (and make_mlp_stack_kernels<V>()).
// Each runs its own OpenMP team of `threads` threads.
template <class T, class Problem, class Backward>
struct Kernels {
  void (*forward)(const Problem&, const StackForwardBuffers<T>&, int threads);
  // The reverse walk: grad_x and the gradients of every parameter.
  void (*backward)(const Problem&, const Backward&, int threads);
  // The forward walk `recompute` (which saves the states and sign bits the backward reads), then backward.
  void (*recompute_backward)(const Problem&, const StackForwardBuffers<T>& recompute, const Backward&, int threads);
};

template <class T>
using StackKernels = Kernels<T, StackProblem<T>, StackBackwardBuffers<T>>;

namespace stack_impl {
namespace {

// Lines of a strided block that a later step reads from memory (a tile's rows of a saved state, written past the
// caches), asked for a few at a time by the GEMMs that run in between, after each register tile, spread evenly over
// `fmas_before_use` vector FMAs (the reverse walk passes those of its last step). Asked for all at once, or at a
// fixed pace that runs ahead of that work, they stall the core on its miss buffers (docs/design.md §7.9).
// Default-constructed, it asks for nothing.
template <class T>
class LineRequests {
 public:
  LineRequests() = default;
  // `rows` rows of `row_elements` elements from `first`, `stride` elements apart.
  LineRequests(const T* first, int64_t stride, int64_t rows, int64_t row_elements, int64_t fmas_before_use)
      : row_(reinterpret_cast<uintptr_t>(first)),
        stride_(static_cast<uintptr_t>(stride) * sizeof(T)),
        row_bytes_(static_cast<uintptr_t>(row_elements) * sizeof(T)),
        rows_left_(row_elements > 0 ? rows : 0),
        fmas_per_line_(std::max<int64_t>(fmas_before_use / std::max<int64_t>(rows * ((row_bytes_ + 63) / 64), 1), 1)) {
    start_row();
  }

  // After a register tile of `vector_fmas` vector FMAs.
  void ask_after(int64_t vector_fmas) {
    fmas_seen_ += vector_fmas;
    for (credit_ += vector_fmas; credit_ >= fmas_per_line_ && rows_left_ > 0; credit_ -= fmas_per_line_) {
      __builtin_prefetch(reinterpret_cast<const void*>(line_), 0, 3);
      if (line_ < last_) {
        line_ += 64;
      } else {
        row_ += stride_;
        --rows_left_;
        start_row();
      }
    }
  }

  // The vector FMAs of the register tiles after which it was asked: the work between two steps of a walk.
  int64_t fmas_seen() const { return fmas_seen_; }

 private:
  void start_row() {
    line_ = row_ & ~uintptr_t(63);
    last_ = (row_ + row_bytes_ - 1) & ~uintptr_t(63);
  }

  uintptr_t row_ = 0, stride_ = 0, row_bytes_ = 0;
  int64_t rows_left_ = 0, fmas_per_line_ = 1, credit_ = 0, fmas_seen_ = 0;
  uintptr_t line_ = 0, last_ = 0;  // the next line to ask for, and the row's last
};

// Asks for nothing: for the GEMMs with nothing to ask for in between.
struct NoLineRequests {
  void ask_after(int64_t) {}
};

// C[i][j] (+)= sum_p A(i, p) * Bm[p][j] for i < MI, j < NJ*W, with A(i, p) = a[i*asi + p*asp] broadcast
// and Bm rows read as full vectors (the caller pads them). Only the first `last` lanes of the last
// vector of each C row are read or written. Then `ahead` asks for the lines due after this tile (LineRequests).
template <class V, int MI, int NJ, class Ahead>
inline void gemm_tile(int64_t K, const typename V::T* a, int64_t asi, int64_t asp, const typename V::T* b, int64_t bs,
                      typename V::T* c, int64_t cs, bool accumulate, int last, Ahead& ahead) {
  using Vec = typename V::Vec;
  Vec acc[MI][NJ];
#pragma GCC unroll 16
  for (int i = 0; i < MI; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      const int lanes = j == NJ - 1 ? last : V::W;
      acc[i][j] = accumulate ? V::load_n(c + i * cs + j * V::W, lanes) : V::zero();
    }
  }
  for (int64_t p = 0; p < K; ++p) {
    Vec bv[NJ];
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) bv[j] = V::load(b + p * bs + j * V::W);
#pragma GCC unroll 16
    for (int i = 0; i < MI; ++i) {
      const Vec ai = V::broadcast(a[i * asi + p * asp]);
#pragma GCC unroll 4
      for (int j = 0; j < NJ; ++j) acc[i][j] = V::fma(ai, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MI; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NJ; ++j) {
      if (j == NJ - 1 && last != V::W) {
        V::store_n(c + i * cs + j * V::W, acc[i][j], last);
      } else {
        V::store(c + i * cs + j * V::W, acc[i][j]);
      }
    }
  }
  ahead.ask_after(MI * NJ * K);
}

template <class V, int MI, int NJ, class Ahead>
inline void gemm_rows(int64_t M, int64_t K, const typename V::T* a, int64_t asi, int64_t asp, const typename V::T* b,
                      int64_t bs, typename V::T* c, int64_t cs, bool accumulate, int last, Ahead& ahead) {
  int64_t i = 0;
  for (; i + MI <= M; i += MI) {
    gemm_tile<V, MI, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last, ahead);
  }
  // The remaining rows in tiles of 4, 2, 1: a one-row tile is load-bound, so use it least.
  for (; i + 4 <= M; i += 4)
    gemm_tile<V, 4, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last, ahead);
  for (; i + 2 <= M; i += 2)
    gemm_tile<V, 2, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last, ahead);
  for (; i < M; ++i) gemm_tile<V, 1, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last, ahead);
}

// One panel of nj <= NJ vectors of C columns, in the register tile the traits give for nj.
template <class V, int NJ, class Ahead>
inline void gemm_panel(int nj, int64_t M, int64_t K, const typename V::T* a, int64_t asi, int64_t asp,
                       const typename V::T* b, int64_t bs, typename V::T* c, int64_t cs, bool accumulate, int last,
                       Ahead& ahead) {
  if constexpr (NJ > 1) {
    if (nj < NJ) return gemm_panel<V, NJ - 1>(nj, M, K, a, asi, asp, b, bs, c, cs, accumulate, last, ahead);
  }
  gemm_rows<V, V::kTileRows[NJ - 1], NJ>(M, K, a, asi, asp, b, bs, c, cs, accumulate, last, ahead);
}

// C (M x N, row stride cs) (+)= A (M x K, strides asi/asp) * Bm (K x N, row stride bs >= N rounded
// up to W). C is cut into panels of V::kTileVectors vectors, each computed in register tiles of
// V::kTileRows[NJ - 1] rows x NJ vectors (the traits type says why that tile fits its registers). After each
// register tile, ahead.ask_after(its vector FMAs) (LineRequests: some of its lines).
template <class V, class Ahead>
void gemm(int64_t M, int64_t N, int64_t K, const typename V::T* a, int64_t asi, int64_t asp, const typename V::T* b,
          int64_t bs, typename V::T* c, int64_t cs, bool accumulate, Ahead& ahead) {
  // K in blocks, so that the panel of Bm a register tile streams (kBlockK x 4 vectors, 16 KiB for
  // float32) stays in L1 across the tiles of a chunk. C is reloaded between blocks at full
  // precision, so the sum over K runs in the same order as without blocking.
  constexpr int64_t kBlockK = 64;
  if (K > kBlockK) {
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      gemm<V>(M, N, std::min(kBlockK, K - k0), a + k0 * asp, asi, asp, b + k0 * bs, bs, c, cs, accumulate || k0 > 0,
              ahead);
    }
    return;
  }
  const int64_t vectors = (N + V::W - 1) / V::W;
  for (int64_t j0 = 0; j0 < vectors; j0 += V::kTileVectors) {
    const int nj = static_cast<int>(std::min<int64_t>(V::kTileVectors, vectors - j0));
    const int last = static_cast<int>(std::min<int64_t>(V::W, N - (j0 + nj - 1) * V::W));
    gemm_panel<V, V::kTileVectors>(nj, M, K, a, asi, asp, b + j0 * V::W, bs, c + j0 * V::W, cs, accumulate, last,
                                   ahead);
  }
}

// The same, asking for nothing in between.
template <class V>
void gemm(int64_t M, int64_t N, int64_t K, const typename V::T* a, int64_t asi, int64_t asp, const typename V::T* b,
          int64_t bs, typename V::T* c, int64_t cs, bool accumulate) {
  NoLineRequests none;
  gemm<V>(M, N, K, a, asi, asp, b, bs, c, cs, accumulate, none);
}

// dst[k * stride + r] = src[k * src_stride + r] for r < count, 0 for count <= r < live (k < rows).
template <class V>
inline void load_rows(typename V::T* dst, int64_t stride, int64_t live, const typename V::T* src, int64_t src_stride,
                      int64_t rows, int64_t count) {
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t r = 0; r < live; r += V::W) {
      const int lanes = static_cast<int>(std::min<int64_t>(count - r, V::W));
      V::store(dst + k * stride + r, V::load_n(src + k * src_stride + r, lanes));
    }
  }
}

// dst[k * dst_stride + r] = src[k * stride + r] for r < count (k < rows): a tile's features back into a
// feature-major (n, B) state.
template <class V>
inline void store_rows(typename V::T* dst, int64_t dst_stride, const typename V::T* src, int64_t stride, int64_t rows,
                       int64_t count) {
  for (int64_t k = 0; k < rows; ++k) {
    for (int64_t r = 0; r < count; r += V::W) {
      V::store_n(dst + k * dst_stride + r, V::load(src + k * stride + r),
                 static_cast<int>(std::min<int64_t>(count - r, V::W)));
    }
  }
}

// Row-major (rows of `width`) <-> feature-major tile, for features [k0, k1): the stack's entry and exit.
template <class T>
inline void transpose_in(T* dst, int64_t stride, const T* src, int64_t width, int64_t k0, int64_t k1, int64_t live,
                         int64_t count) {
  for (int64_t k = k0; k < k1; ++k) {
    for (int64_t r = 0; r < live; ++r) dst[k * stride + r] = r < count ? src[r * width + k] : T(0);
  }
}

template <class T>
inline void transpose_out(T* dst, int64_t width, const T* src, int64_t stride, int64_t k0, int64_t k1, int64_t count) {
  for (int64_t r = 0; r < count; ++r) {
    for (int64_t k = k0; k < k1; ++k) dst[r * width + k] = src[k * stride + r];
  }
}

// One bit per row in the 16-bit words of a mask plane: the W lanes of `m` for rows [row, row + W),
// row a multiple of W. The first vector of a word overwrites it and the others add their bits, so
// the result does not depend on what the word held.
template <class V>
inline void store_bits(uint16_t* words, int64_t row, typename V::Mask m) {
  static_assert(16 % V::W == 0, "a vector's bits must not straddle two words");
  const int shift = static_cast<int>(row % 16);
  const uint32_t bits = V::bits(m) << shift;
  uint16_t& word = words[row / 16];
  word = static_cast<uint16_t>(shift == 0 ? bits : word | bits);
}

template <class V>
inline typename V::Mask load_bits(const uint16_t* words, int64_t row) {
  return V::mask((words[row / 16] >> (row % 16)) & ((1u << V::W) - 1u));
}

// Tells the core that this thread is spinning (x86 PAUSE, Arm YIELD): a hardware thread sharing the core runs
// on meanwhile, and the loop's exit does not flush the pipeline on a mispredicted memory order.
inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polls done() until it holds, pausing between polls, and after kSpinsBeforeYield polls (a few microseconds)
// yields the core between them: the thread it waits for may not be running (more threads than cores; a
// longer spin made such a team several times slower, docs/design.md §7.6).
template <class F>
void spin_until(F&& done) {
  constexpr int kSpinsBeforeYield = 64;
  for (int spins = 0; !done();) {
    if (spins < kSpinsBeforeYield) {
      ++spins;  // counted up to the limit only: a wait may outlast any count
      spin_pause();
    } else {
      std::this_thread::yield();
    }
  }
}

// The barrier of a feature-split team, met once per layer in the stack's forward (twice in the MLP stack's, and in
// the backward by a chain team of two threads or more, RolePipeline): a polled counter, a fraction of the cost of
// OpenMP's barrier between two cores, and much faster with more threads than cores (docs/design.md §7.6).
class TeamBarrier {
 public:
  void wait(int threads) {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {  // the last to arrive opens it
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    spin_until([&] { return generation_.load(std::memory_order_acquire) != generation; });
  }

 private:
  alignas(64) std::atomic<int> arrived_{0};  // own cache lines: the waiting threads poll generation_
  alignas(64) std::atomic<int64_t> generation_{0};
};

// How the threads of one OpenMP team share the work. With at least as many row tiles as threads,
// each thread owns whole tiles ("row split", no barriers; the reverse walk only chains the threads'
// weight-gradient sums, GradientChain). With fewer (small batches), all
// threads work on one tile at a time, each on a slice of the features [begin, end), and meet at a
// barrier wherever a step reads what other threads wrote ("feature split").
struct Team {
  int thread, threads;
  bool split;
  TeamBarrier* barrier;  // shared by the team, met wherever a split step reads other threads' features
  int64_t begin(int64_t n) const { return split ? n * thread / threads : 0; }
  int64_t end(int64_t n) const { return split ? n * (thread + 1) / threads : n; }
  // The tiles [first_tile, end_tile) of `count` this thread walks: all of them in turn when split, else a
  // contiguous share, so that the threads' tiles follow the rows of the batch in order (the reverse walk
  // adds them into the weight gradients in that order, TileWalks::walk_back).
  int64_t first_tile(int64_t count) const { return split ? 0 : count * thread / threads; }
  int64_t end_tile(int64_t count) const { return split ? count : count * (thread + 1) / threads; }
  void sync() const {
    if (split) barrier->wait(threads);
  }
};

// count rounded up to whole vectors: the columns a tile's planes compute and their stride, the row stride of a
// row-major operand of the weight gradients.
template <class V>
inline int64_t whole_vectors(int64_t count) {
  return (count + V::W - 1) / V::W * V::W;
}

// Lanes of the vector at column r that hold real rows of a tile with `rows` rows.
template <class V>
inline int lanes_at(int64_t r, int64_t rows) {
  return static_cast<int>(std::min<int64_t>(rows - r, V::W));
}

// The local planes of one row tile, `features` rows of `padded` (the tile's rows rounded up to whole
// vectors) in one zeroed allocation; a kernel's Planes type names its planes inside it.
template <class V>
struct TilePlanes {
  using Simd = V;
  using T = typename V::T;
  int64_t padded;
  std::unique_ptr<T[]> data;
  TilePlanes(int64_t tile_rows, int64_t features)
      : padded(whole_vectors<V>(tile_rows)), data(new T[features * padded]()) {}
  // The plane that starts at feature `first`.
  T* at(int64_t first) const { return data.get() + first * padded; }
};

template <class Problem>
int64_t tile_count(const Problem& p) {
  return (p.batch + p.tile_rows - 1) / p.tile_rows;
}

// The rows of row tile `tile` (the last may be short).
template <class Problem>
int64_t rows_in_tile(const Problem& p, int64_t tile) {
  return std::min(p.tile_rows, p.batch - tile * p.tile_rows);
}

// Whether a team of `threads` splits the features of each tile: it has fewer tiles than threads.
template <class Problem>
bool splits_features(const Problem& p, int threads) {
  return tile_count(p) < threads;
}

// Runs body(team, planes, row, streams) on an OpenMP team of `threads`: the planes (Planes(p)) shared when
// the team splits the features of each tile (fewer tiles than threads), else private; row, a row of the
// tile's width, always private; streams, `stream_features` planes per tile of this thread (the i-th of its
// tiles in the team's order owns those from i * stream_features), shared or private as the planes.
template <class Planes, class Problem, class F>
void with_planes(const Problem& p, int threads, int64_t stream_features, F&& body) {
  using T = typename Planes::T;
  const int64_t tiles = tile_count(p);
  const bool split = splits_features(p, threads);
  std::unique_ptr<Planes> shared(split ? new Planes(p) : nullptr);
  TeamBarrier barrier;
  std::unique_ptr<TilePlanes<typename Planes::Simd>> shared_streams(
      split ? new TilePlanes<typename Planes::Simd>(p.tile_rows, tiles * stream_features) : nullptr);
#pragma omp parallel num_threads(threads)
  {
    const Team team{omp_get_thread_num(), omp_get_num_threads(), split && omp_get_num_threads() > 1, &barrier};
    std::unique_ptr<Planes> own(shared ? nullptr : new Planes(p));
    Planes& planes = shared ? *shared : *own;
    const int64_t own_tiles = team.end_tile(tiles) - team.first_tile(tiles);
    std::unique_ptr<TilePlanes<typename Planes::Simd>> own_streams(
        shared ? nullptr : new TilePlanes<typename Planes::Simd>(p.tile_rows, own_tiles * stream_features));
    std::unique_ptr<T[]> row(new T[planes.padded]());
    body(team, planes, row.get(), shared ? *shared_streams : *own_streams);
  }
}

// The row tiles of this thread: body(i, b0, rows) for the i-th of them, in the team's order.
template <class Problem, class F>
void for_each_tile(const Problem& p, const Team& team, F&& body) {
  const int64_t first = team.first_tile(tile_count(p)), end = team.end_tile(tile_count(p));
  for (int64_t tile = first; tile < end; ++tile) body(tile - first, tile * p.tile_rows, rows_in_tile(p, tile));
}

// The order in which the threads of a team that owns whole tiles add their rows into a layer's weight
// gradients (TileWalks::walk_back): thread t adds its rows to a layer after thread t - 1 has added its
// own, so every sum over the batch runs in row order. Thread 0 may run at most kLayerSlots layers ahead
// of the last thread, which finishes each layer's sums: the partial sums of layer step s live in slot
// s % kLayerSlots until then. (A feature-split team divides the walk by role instead, RolePipeline.)
class GradientChain {
 public:
  static constexpr int64_t kLayerSlots = 4;

  explicit GradientChain(int threads) : done_(new Counter[std::max(threads, 1)]) {}

  // Before this thread adds its rows to the step-th layer of the walk.
  void wait(const Team& team, int64_t step) const {
    const int predecessor = team.thread > 0 ? team.thread - 1 : team.threads - 1;
    const int64_t target = team.thread > 0 ? step + 1 : step + 1 - kLayerSlots;
    spin_until([&] { return done_[predecessor].layers.load(std::memory_order_acquire) >= target; });
  }

  // After this thread has added its rows to the step-th layer.
  void pass(const Team& team, int64_t step) const {
    done_[team.thread].layers.store(step + 1, std::memory_order_release);
  }

 private:
  struct alignas(64) Counter {  // one cache line each: the threads poll each other's
    std::atomic<int64_t> layers{0};
  };
  std::unique_ptr<Counter[]> done_;
};

// How a feature-split team (fewer row tiles than threads) shares the reverse walk: by role, not by feature
// alone. All threads but the last form the chain team, which takes the tiles back layer by layer (splitting
// their features among themselves, and with two threads one thread alone, at no barrier); the last thread
// adds each layer's weight gradients, whole, from the planes the chain team filled. Each (layer, tile) item
// has its planes in a ring of kSlots, so the weight thread may lag up to kSlots - 1 items behind: neither role
// waits for the other unless the ring is full or empty. The items run in walk_back's order and every sum in
// the same order, so the results are bitwise those of any other split (docs/design.md §7.6).
template <class Planes>
class RolePipeline {
 public:
  static constexpr int64_t kSlots = 4;

  // Planes for the ring only where the team may split.
  template <class Problem>
  RolePipeline(const Problem& p, int threads) : filled_(new Counter[std::max(threads - 1, 1)]) {
    if (splits_features(p, threads)) {
      for (auto& slot : ring_) slot.reset(new Planes(p));
    }
  }

  // The chain team of `team`: every thread but the last, splitting the features when there are several.
  Team chain(const Team& team) { return {team.thread, team.threads - 1, team.threads > 2, &barrier_}; }
  bool weights_role(const Team& team) const { return team.thread == team.threads - 1; }
  Planes& slot(int64_t item) const { return *ring_[item % kSlots]; }

  // A chain thread, before it fills the planes of `item`: the weight thread is done with item - kSlots.
  void wait_for_slot(int64_t item) const {
    spin_until([&] { return emptied_.items.load(std::memory_order_acquire) >= item + 1 - kSlots; });
  }
  void filled(const Team& chain, int64_t item) const {
    filled_[chain.thread].items.store(item + 1, std::memory_order_release);
  }
  // The weight thread, before it reads the planes of `item`: every chain thread has filled its features.
  void wait_filled(const Team& chain, int64_t item) const {
    for (int t = 0; t < chain.threads; ++t) {
      spin_until([&] { return filled_[t].items.load(std::memory_order_acquire) >= item + 1; });
    }
  }
  void emptied(int64_t item) { emptied_.items.store(item + 1, std::memory_order_release); }

 private:
  struct alignas(64) Counter {  // one cache line each: the other role polls it
    std::atomic<int64_t> items{0};
  };
  std::unique_ptr<Planes> ring_[kSlots];
  std::unique_ptr<Counter[]> filled_;  // per chain thread
  Counter emptied_;
  TeamBarrier barrier_;  // the chain team's
};

// The chained sum over the batch of features [o0, o1) of a tile's plane `values` (stride Rp), tile by tile in
// row order: partial sums per lane in `sums` (W per feature) from the batch's first tile, summed across the
// lanes into out[o] at its last. The same additions in the same order as summing the whole batch at once
// (in vectors of W rows, then across the lanes), since tiles start on whole vectors.
template <class V>
void add_row_sums(const typename V::T* values, int64_t Rp, int64_t o0, int64_t o1, int64_t rows, int64_t b0,
                  int64_t batch, typename V::T* sums, typename V::T* out) {
  for (int64_t o = o0; o < o1; ++o) {
    typename V::Vec sum = b0 == 0 ? V::zero() : V::load(sums + o * V::W);
    for (int64_t r = 0; r < rows; r += V::W) sum += V::load_n(values + o * Rp + r, lanes_at<V>(r, rows));
    if (b0 + rows == batch) {
      out[o] = V::sum(sum);
    } else {
      V::store(sums + o * V::W, sum);
    }
  }
}

// A walk's ends, for features [o0, o1) of a tile's plane (stride Rp) of the rows [b0, b0 + rows): the plane from
// (B, width) rows, or where `rows_in` is nullptr from the feature-major (width, B) `features_in`; and back into
// rows, or where `rows_out` is nullptr into `features_out` (nowhere when both are nullptr). The forward walk
// enters from x (or a checkpoint) and leaves into out; the reverse walk enters from grad_out (or the gradient a
// later segment carried) and leaves into grad_x (or the carry).
template <class V>
void load_tile(const typename V::T* rows_in, const typename V::T* features_in, int64_t width, int64_t batch,
               typename V::T* plane, int64_t Rp, int64_t o0, int64_t o1, int64_t b0, int64_t rows) {
  const int64_t live = whole_vectors<V>(rows);
  if (rows_in) {
    transpose_in(plane, Rp, rows_in + b0 * width, width, o0, o1, live, rows);
  } else {
    load_rows<V>(plane + o0 * Rp, Rp, live, features_in + o0 * batch + b0, batch, o1 - o0, rows);
  }
}

template <class V>
void store_tile(typename V::T* rows_out, typename V::T* features_out, int64_t width, int64_t batch,
                const typename V::T* plane, int64_t Rp, int64_t o0, int64_t o1, int64_t b0, int64_t rows) {
  if (rows_out) {
    transpose_out(rows_out + b0 * width, width, plane, Rp, o0, o1, rows);
  } else if (features_out) {
    store_rows<V>(features_out + o0 * batch + b0, batch, plane + o0 * Rp, Rp, o1 - o0, rows);
  }
}

// The walks of a depth-fused kernel K for Problem and Backward (buffers). K provides Planes, with the plane
// `stream` that carries a tile's x through the forward walk; forward_layers, the forward walk of one tile over
// all layers; and, for the reverse walk, backward_layer (one layer of one tile, given its gradient plane g) and
// add_weight_gradients (that tile's rows of the layer's parameter gradients, added while they are in its
// planes, with private scratch of K::packed_elements(p) and K::summed_features(p) partial sums per lane in a
// slot the team shares). Both pass `ahead` (LineRequests or NoLineRequests) to each of their GEMMs.
template <class K, class T, class Problem, class Backward>
struct TileWalks {
  static void forward(const Problem& p, const StackForwardBuffers<T>& buf, int threads) {
    with_planes<typename K::Planes>(p, threads, 0, [&](const Team& team, typename K::Planes& s, T* row, auto&) {
      walk_tiles_forward(p, buf, team, s, row);
    });
  }

  static void backward(const Problem& p, const Backward& buf, int threads) { walk_back(p, nullptr, buf, threads); }

  static void recompute_backward(const Problem& p, const StackForwardBuffers<T>& recompute, const Backward& buf,
                                 int threads) {
    walk_back(p, &recompute, buf, threads);
  }

  // The entry points, for the Kernels table.
  static Kernels<T, Problem, Backward> kernels() { return {&forward, &backward, &recompute_backward}; }

 private:
  // The forward walk of this thread's tiles, each over all layers. Every thread of a feature-split team carries
  // the whole x of the tile in planes of its own, so that it reads no other thread's x (docs/design.md §7.6).
  // (Planes is K::Planes, a template parameter because K is incomplete where this is declared.)
  template <class Planes>
  static void walk_tiles_forward(const Problem& p, const StackForwardBuffers<T>& buf, const Team& team, Planes& s,
                                 T* row) {
    using V = typename Planes::Simd;
    std::unique_ptr<Planes> private_planes(team.split ? new Planes(p) : nullptr);
    Planes& own = team.split ? *private_planes : s;
    const int64_t o0 = team.begin(p.width), o1 = team.end(p.width);
    for_each_tile(p, team, [&](int64_t, int64_t b0, int64_t rows) {
      load_tile<V>(buf.x, buf.x_features, p.width, p.batch, own.stream, s.padded, 0, p.width, b0, rows);
      K::forward_layers(p, buf, team, s, own, row, b0, rows);
      store_tile<V>(buf.out, nullptr, p.width, p.batch, own.stream, s.padded, o0, o1, b0, rows);
      team.sync();  // the next tile reuses the shared planes; a walk back reads every feature
    });
    if (buf.saved_bypasses_caches) V::stream_fence();  // the streamed states, for whoever reads them
  }

  // The reverse walk, the layers in step: at each layer every tile is taken back and adds its rows into the
  // layer's parameter gradients at once, in the batch's row order (GradientChain), so no dh of the whole
  // batch is ever stored. Each gradient element sums the rows in the same order whatever the tiling, so the
  // result does not depend on the number of threads. With `recompute`, every tile first walks it forward
  // (checkpoints). A feature-split team divides the walk by role (walk_back_in_roles).
  static void walk_back(const Problem& p, const StackForwardBuffers<T>* recompute, const Backward& buf, int threads) {
    using Planes = typename K::Planes;
    using V = typename Planes::Simd;
    const GradientChain chain(threads);
    RolePipeline<Planes> roles(p, threads);
    const int64_t summed = K::summed_features(p) * V::W;
    std::unique_ptr<T[]> sums(new T[GradientChain::kLayerSlots * summed]);
    with_planes<Planes>(p, threads, p.width, [&](const Team& team, Planes& s, T* row, TilePlanes<V>& grads) {
      std::unique_ptr<T[]> packed(new T[K::packed_elements(p)]);
      if (recompute) walk_tiles_forward(p, *recompute, team, s, row);
      if (team.split) return walk_back_in_roles(p, buf, team, roles, row, grads, packed.get(), sums.get());
      const int64_t last = team.end_tile(tile_count(p)) - team.first_tile(tile_count(p)) - 1;
      // Each of this thread's tiles with its gradient plane.
      const auto each_tile = [&](auto&& body) {
        for_each_tile(p, team, [&](int64_t i, int64_t b0, int64_t rows) { body(i, grads.at(i * p.width), b0, rows); });
      };
      const int64_t o0 = team.begin(p.width), o1 = team.end(p.width);
      each_tile([&](int64_t, T* g, int64_t b0, int64_t rows) {
        load_tile<V>(buf.grad_out, buf.grad_carry, p.width, p.batch, g, s.padded, o0, o1, b0, rows);
      });
      const int64_t first_row = team.first_tile(tile_count(p)) * p.tile_rows;
      const int64_t end_row = std::min(team.end_tile(tile_count(p)) * p.tile_rows, p.batch);
      int64_t step_fmas = 0;
      for (int64_t l = p.depth - 1; l >= 0; --l) {
        const int64_t step = p.depth - 1 - l;
        T* slot = sums.get() + step % GradientChain::kLayerSlots * summed;
        // What the next step reads from memory: this thread's rows of every feature of layer l - 1's saved state,
        // asked for over this step's GEMMs. (A recomputation left the states in the caches: asked for again, they
        // would only crowd out the L1.)
        LineRequests<T> ahead;
        if (l > 0 && !recompute) {
          ahead = LineRequests<T>(buf.saved + state_offset(l - 1, 0, p.width, p.batch) + first_row, p.batch, p.width,
                                  end_row - first_row, step_fmas);
        }
        each_tile([&](int64_t i, T* g, int64_t b0, int64_t rows) {
          K::backward_layer(p, buf, team, s, g, row, l, b0, rows, ahead);
          if (i == 0) chain.wait(team, step);
          K::add_weight_gradients(p, buf, s, l, b0, rows, packed.get(), slot, ahead);
          if (i == last) chain.pass(team, step);
        });
        step_fmas = ahead.fmas_seen();
      }
      each_tile([&](int64_t, T* g, int64_t b0, int64_t rows) {
        store_tile<V>(buf.grad_x, buf.grad_carry, p.width, p.batch, g, s.padded, o0, o1, b0, rows);
      });
    });
  }

  // The reverse walk of a feature-split team, by role (RolePipeline): item i * tiles + t is tile t at layer step i,
  // walk_back's order. The chain team takes each item back into its slot of the ring, the gradient of each tile in
  // its plane of `grads`; the weight thread adds each item's rows into the layer's gradients, the partial sums of
  // the biases in `sums`.
  template <class Planes>
  static void walk_back_in_roles(const Problem& p, const Backward& buf, const Team& team, RolePipeline<Planes>& roles,
                                 T* row, TilePlanes<typename Planes::Simd>& grads, T* packed, T* sums) {
    using V = typename Planes::Simd;
    const int64_t tiles = tile_count(p), items = p.depth * tiles;
    const Team chain = roles.chain(team);
    // A small batch: its weight GEMMs' register tiles are short (K = the tile's rows), and pacing requests after
    // each cost more than the requests gained (docs/design.md §7.9).
    NoLineRequests none;
    if (roles.weights_role(team)) {
      for (int64_t item = 0; item < items; ++item) {
        roles.wait_filled(chain, item);
        const int64_t tile = item % tiles;
        K::add_weight_gradients(p, buf, roles.slot(item), p.depth - 1 - item / tiles, tile * p.tile_rows,
                                rows_in_tile(p, tile), packed, sums, none);
        roles.emptied(item);
      }
      return;
    }
    const int64_t o0 = chain.begin(p.width), o1 = chain.end(p.width);
    for_each_tile(p, chain, [&](int64_t tile, int64_t b0, int64_t rows) {  // every tile, in the chain team
      load_tile<V>(buf.grad_out, buf.grad_carry, p.width, p.batch, grads.at(tile * p.width), grads.padded, o0, o1, b0,
                   rows);
    });
    for (int64_t item = 0; item < items; ++item) {
      roles.wait_for_slot(item);
      const int64_t tile = item % tiles;
      K::backward_layer(p, buf, chain, roles.slot(item), grads.at(tile * p.width), row, p.depth - 1 - item / tiles,
                        tile * p.tile_rows, rows_in_tile(p, tile), none);
      roles.filled(chain, item);
    }
    for_each_tile(p, chain, [&](int64_t tile, int64_t b0, int64_t rows) {
      store_tile<V>(buf.grad_x, buf.grad_carry, p.width, p.batch, grads.at(tile * p.width), grads.padded, o0, o1, b0,
                    rows);
    });
  }
};

// row[r] = mean over all `width` features of (factor * buf[o][r]) for r < live, or 0 without mean
// subtraction. Every thread of a team computes it whole, in the same order.
template <class V>
void row_mean(bool mean_subtract, int64_t width, const typename V::T* buf, int64_t stride, int64_t live,
              typename V::T factor, typename V::T* row) {
  using T = typename V::T;
  const typename V::Vec scale = V::broadcast(factor / T(width));
  for (int64_t r = 0; r < live; r += V::W) {
    typename V::Vec sum = V::zero();  // in a register: a sum through memory waits on each store
    if (mean_subtract) {
      for (int64_t o = 0; o < width; ++o) sum += V::load(buf + o * stride + r);
    }
    V::store(row + r, mean_subtract ? sum * scale : V::zero());
  }
}

// A proxy with the sign of h, rebuilt from the saved bits of `planes` planes (1, -1 or 0; relu's NaN reads
// as 1): enough for relu's and abs's backward.
template <class V, int kPlanes>
typename V::Vec sign_proxy(const uint16_t* plane_pos, const uint16_t* plane_neg, int64_t row) {
  using Vec = typename V::Vec;
  const Vec pos = select(load_bits<V>(plane_pos, row), Vec(1), Vec(0));
  if constexpr (kPlanes == 2) return select(load_bits<V>(plane_neg, row), Vec(-1), pos);
  return pos;
}

// dst[o][r] = f(src[o][r]) for features [o0, o1).
template <class V, class F>
void map_rows(typename V::T* dst, const typename V::T* src, int64_t stride, int64_t o0, int64_t o1, int64_t live,
              F&& f) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t r = 0; r < live; r += V::W) V::store(dst + o * stride + r, f(V::load(src + o * stride + r)));
  }
}

// The epilogue of a GEMM h = W in: h[o][r] <- phi(h[o][r] + bias[o]) (bias may be nullptr) for features
// [o0, o1) of a tile whose row r is row b0 + r of the batch, and the sign bits of h + bias into `mask`, this
// layer's kPlanes planes of `features` features (docs/design.md §4.2), unless mask is nullptr.
template <class V, Activation A, int kPlanes>
void bias_activation(typename V::T* h, int64_t stride, const typename V::T* bias, int64_t o0, int64_t o1, int64_t live,
                     uint16_t* mask, int64_t features, int64_t batch, int64_t b0) {
  for (int64_t o = o0; o < o1; ++o) {
    const typename V::Vec b = bias ? V::broadcast(bias[o]) : V::zero();
    typename V::T* h_row = h + o * stride;
    uint16_t* pos = kPlanes && mask ? mask + mask_offset(0, 0, o, kPlanes, features, batch) : nullptr;
    uint16_t* neg = kPlanes == 2 && mask ? mask + mask_offset(0, 1, o, kPlanes, features, batch) : nullptr;
    for (int64_t r = 0; r < live; r += V::W) {
      typename V::Vec value = V::load(h_row + r) + b;
      if constexpr (kPlanes >= 1)
        if (pos) store_bits<V>(pos, b0 + r, positive_sign_bit<A>(value));
      if constexpr (kPlanes == 2)
        if (neg) store_bits<V>(neg, b0 + r, negative_sign_bit(value));
      V::store(h_row + r, Act<A>::value(value));
    }
  }
}

// `lanes` lanes of x to a saved state at p: past the caches (V::stream) when `bypass` asks for it and the
// vector is whole and aligned.
template <class V>
inline void save_state(typename V::T* p, typename V::Vec x, int lanes, bool bypass) {
  if (bypass && lanes == V::W && reinterpret_cast<uintptr_t>(p) % (V::W * sizeof(typename V::T)) == 0) {
    V::stream(p, x);
  } else {
    V::store_n(p, x, lanes);
  }
}

// The residual update of one layer of a tile of `rows` rows, once the team's threads have each computed features
// [o0, o1) of the branch v: saves those features of x_l into `saved` (this layer's (n, B) state from the tile's
// first row, or nullptr; past the caches if `bypass`), then x <- x + scale * (v - mean) for all `width` features
// of this thread's x, with the row mean of v (0 without mean subtraction).
template <class V>
void residual_update(const Team& team, bool mean_subtract, int64_t width, typename V::T scale, typename V::T* stream,
                     const typename V::T* branch, int64_t stride, int64_t o0, int64_t o1, int64_t live, int64_t rows,
                     typename V::T* row, typename V::T* saved, int64_t batch, bool bypass) {
  if (saved) {
    for (int64_t o = o0; o < o1; ++o) {
      for (int64_t r = 0; r < live; r += V::W) {
        save_state<V>(saved + o * batch + r, V::load(stream + o * stride + r), lanes_at<V>(r, rows), bypass);
      }
    }
  }
  team.sync();  // the update reads every feature of the branch
  row_mean<V>(mean_subtract, width, branch, stride, live, typename V::T(1), row);
  const typename V::Vec s = V::broadcast(scale);
  for (int64_t o = 0; o < width; ++o) {
    for (int64_t r = 0; r < live; r += V::W) {
      const int64_t i = o * stride + r;
      V::store(stream + i, V::fma(s, V::load(branch + i) - V::load(row + r), V::load(stream + i)));
    }
  }
}

// The gradient at a block's branch output for features [o0, o1) of a tile, given g = dLoss/dx in `stream`:
// du = MS(scale * g) (the row mean of scale * g over all `width` features), then dh = chain(o, r, du), into
// the plane `grad`.
template <class V, class F>
void branch_gradient(bool mean_subtract, int64_t width, typename V::T scale, const typename V::T* stream,
                     typename V::T* grad, int64_t stride, int64_t o0, int64_t o1, int64_t live, typename V::T* row,
                     F&& chain) {
  row_mean<V>(mean_subtract, width, stream, stride, live, scale, row);
  const typename V::Vec s = V::broadcast(scale);
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t r = 0; r < live; r += V::W) {
      const int64_t i = o * stride + r;
      V::store(grad + i, chain(o, r, s * V::load(stream + i) - V::load(row + r)));
    }
  }
}

// The weight-gradient passes read their operands row-major: dst[r][f] = f(src[f * src_stride + r]) for
// r < count, f < features, and 0 for the features up to whole vectors (dst rows of dst_stride, a
// multiple of W), by transposing W x W blocks in registers.
template <class V, class F>
void pack_transposed(typename V::T* dst, int64_t dst_stride, const typename V::T* src, int64_t src_stride,
                     int64_t features, int64_t count, F&& f) {
  using Vec = typename V::Vec;
  for (int64_t k0 = 0; k0 < features; k0 += V::W) {
    for (int64_t r0 = 0; r0 < count; r0 += V::W) {
      const int valid = lanes_at<V>(r0, count);
      Vec block[V::W];
#pragma GCC unroll 16
      for (int q = 0; q < V::W; ++q)
        block[q] = k0 + q < features ? f(V::load_n(src + (k0 + q) * src_stride + r0, valid)) : V::zero();
      V::transpose(block);
#pragma GCC unroll 16
      for (int q = 0; q < V::W; ++q) {
        if (r0 + q < count) V::store(dst + (r0 + q) * dst_stride + k0, block[q]);
      }
    }
  }
}

template <class V, Activation A, Block K>
struct Stack
    : TileWalks<Stack<V, A, K>, typename V::T, StackProblem<typename V::T>, StackBackwardBuffers<typename V::T>> {
  using T = typename V::T;
  using Vec = typename V::Vec;
  using Phi = Act<A>;
  static constexpr bool kPost = K == Block::Post;
  static constexpr bool kIdentity = A == Activation::Identity;
  static constexpr int kPlanes = mask_planes(A, K);

  // A tile's four (n x Rp) planes (stack_tile_features), shared by a feature-split team, private to a
  // thread otherwise. The forward uses aux as a second branch plane.
  struct Planes : TilePlanes<V> {
    T *stream, *branch, *aux, *input;
    explicit Planes(const StackProblem<T>& p) : TilePlanes<V>(p.tile_rows, stack_tile_features(p.width)) {
      stream = this->at(0);
      branch = this->at(p.width);
      aux = this->at(2 * p.width);
      input = this->at(3 * p.width);
    }
  };

  // The forward walk of one tile of `rows` rows from row b0, its x in the plane stream of `own` (the planes of
  // this thread; a feature-split team computes features [o0, o1) of each branch into the shared planes s).
  static void forward_layers(const StackProblem<T>& p, const StackForwardBuffers<T>& buf, const Team& team, Planes& s,
                             Planes& own, T* row, int64_t b0, int64_t rows) {
    const int64_t n = p.width, B = p.batch, Rp = s.padded, o0 = team.begin(n), o1 = team.end(n);
    const int64_t live = whole_vectors<V>(rows);  // columns computed; Rp is the stride
    for (int64_t l = 0; l < p.depth; ++l) {
      const T* W = p.weight + weight_offset(l, 0, n);
      const T* gemm_in = own.stream;
      if (!kPost && !kIdentity) {  // pre block: the GEMM reads phi(x)
        map_rows<V>(own.input, own.stream, Rp, 0, n, live, [](Vec x) { return Phi::value(x); });
        gemm_in = own.input;
      }
      // The hardware prefetchers bring the next layer's weights too late (docs/design.md §7.6): each thread
      // asks for its rows of them now.
      if (l + 1 < p.depth) prefetch(p.weight + weight_offset(l + 1, o0, n), (o1 - o0) * n);
      // Layers alternate between two branch planes: a thread may write this layer's while another still reads
      // the last one's.
      T* branch = l % 2 ? s.aux : s.branch;
      gemm<V>(o1 - o0, live, n, W + o0 * n, n, 1, gemm_in, Rp, branch + o0 * Rp, Rp, false);
      // Branch epilogue: bias, then phi (post) with its sign bits.
      uint16_t* mask = buf.mask ? buf.mask + mask_offset(l, 0, 0, kPlanes, n, B) : nullptr;
      bias_activation<V, kPost ? A : Activation::Identity, kPlanes>(branch, Rp, p.bias ? p.bias + l * n : nullptr, o0,
                                                                    o1, live, mask, n, B, b0);
      // Save x_l (every save_every-th layer), then x <- x + s * (v - mean).
      residual_update<V>(team, p.mean_subtract, n, p.scale, own.stream, branch, Rp, o0, o1, live, rows, row,
                         buf.layer_state(l, n, B, b0), B, buf.saved_bypasses_caches);
    }
  }

  // The reverse walk's scratch (TileWalks::walk_back): a tile's layer input, row-major; the bias gradients.
  static int64_t packed_elements(const StackProblem<T>& p) { return p.tile_rows * whole_vectors<V>(p.width); }
  static int64_t summed_features(const StackProblem<T>& p) { return p.width; }

  // Layer l of the reverse walk for one tile of `rows` rows from row b0, whose gradient g = dLoss/dx is in the
  // plane g (features [o0, o1) of it when split): dh_l into the plane aux, then g <- dLoss/dx_l.
  template <class Ahead>
  static void backward_layer(const StackProblem<T>& p, const StackBackwardBuffers<T>& buf, const Team& team, Planes& s,
                             T* g, T* row, int64_t l, int64_t b0, int64_t rows, Ahead& ahead) {
    constexpr bool kRecompute = kPost && kPlanes == 0 && !kIdentity;  // smooth phi: rebuild h
    constexpr bool kNeedInput = kRecompute || (!kPost && !kIdentity);
    const int64_t n = p.width, B = p.batch, Rp = s.padded, o0 = team.begin(n), o1 = team.end(n);
    const int64_t live = whole_vectors<V>(rows);
    const T* W = p.weight + weight_offset(l, 0, n);
    // As in the forward: the columns of the next layer's weights that g += dh W reads, asked for now.
    if (l > 0) prefetch_columns(p.weight + weight_offset(l - 1, 0, n), n, n, o0, o1);
    if constexpr (kNeedInput) {
      load_rows<V>(s.input + o0 * Rp, Rp, live, buf.saved + state_offset(l, o0, n, B) + b0, B, o1 - o0, rows);
    }
    team.sync();  // the row mean reads all of g; the recomputation all of x_l
    if constexpr (kRecompute) {
      gemm<V>(o1 - o0, live, n, W + o0 * n, n, 1, s.input, Rp, s.branch + o0 * Rp, Rp, false, ahead);
    }
    const uint16_t* mask = kPlanes ? buf.mask + mask_offset(l, 0, 0, kPlanes, n, B) : nullptr;
    branch_gradient<V>(p.mean_subtract, n, p.scale, g, s.aux, Rp, o0, o1, live, row, [&](int64_t o, int64_t r, Vec du) {
      if constexpr (kPost && kPlanes) {
        const uint16_t* pos = mask + mask_offset(0, 0, o, kPlanes, n, B);
        const uint16_t* neg = kPlanes == 2 ? mask + mask_offset(0, 1, o, kPlanes, n, B) : nullptr;
        return Phi::backward(sign_proxy<V, kPlanes>(pos, neg, b0 + r), du);
      } else if constexpr (kRecompute) {
        const Vec bias = p.bias ? V::broadcast(p.bias[l * n + o]) : V::zero();
        return Phi::backward(V::load(s.branch + o * Rp + r) + bias, du);
      } else {
        return du;
      }
    });
    team.sync();           // g += dh W reads dh of every feature, and overwrites g the row mean read
    const T* Wk = W + o0;  // rows [o0, o1) of the result are features k of the input
    if constexpr (kPost || kIdentity) {
      gemm<V>(o1 - o0, live, n, Wk, 1, n, s.aux, Rp, g + o0 * Rp, Rp, true, ahead);  // g += dh W
    } else {
      gemm<V>(o1 - o0, live, n, Wk, 1, n, s.aux, Rp, s.branch + o0 * Rp, Rp, false, ahead);  // da = dh W
      for (int64_t k = o0; k < o1; ++k) {
        for (int64_t r = 0; r < live; r += V::W) {
          const int64_t i = k * Rp + r;
          V::store(g + i, V::load(g + i) + Phi::backward(V::load(s.input + i), V::load(s.branch + i)));
        }
      }
    }
  }

  // The tile's rows added into dW_l = dh_l^T in_l (in_l = x_l, or phi(x_l) for "pre") and db_l = sum_rows dh_l,
  // from dh_l in the plane aux, by one thread.
  template <class Ahead>
  static void add_weight_gradients(const StackProblem<T>& p, const StackBackwardBuffers<T>& buf, const Planes& s,
                                   int64_t l, int64_t b0, int64_t rows, T* packed, T* sums, Ahead& ahead) {
    const int64_t n = p.width, B = p.batch, Rp = s.padded;
    pack_transposed<V>(packed, whole_vectors<V>(n), buf.saved + state_offset(l, 0, n, B) + b0, B, n, rows,
                       [](Vec x) { return !kPost && !kIdentity ? Phi::value(x) : x; });
    gemm<V>(n, n, rows, s.aux, Rp, 1, packed, whole_vectors<V>(n), buf.grad_weight + weight_offset(l, 0, n), n, b0 > 0,
            ahead);
    if (buf.grad_bias) add_row_sums<V>(s.aux, Rp, 0, n, rows, b0, B, sums, buf.grad_bias + l * n);
  }
};

template <class V, Activation A>
StackKernels<typename V::T> kernels_for(Block block) {
  return block == Block::Post ? Stack<V, A, Block::Post>::kernels() : Stack<V, A, Block::Pre>::kernels();
}

}  // namespace
}  // namespace stack_impl

// The kernels of instruction set V for one activation and block form.
template <class V>
StackKernels<typename V::T> make_stack_kernels(Activation activation, Block block) {
  StackKernels<typename V::T> result{};
  dispatch_activation(activation, [&](auto tag) { result = stack_impl::kernels_for<V, decltype(tag)::value>(block); });
  return result;
}

// The backward of a depth-fused stack whose forward saved only x_0, x_k, x_2k, ... (k = every;
// docs/design.md §4.4), for the kernels of any problem type. Segment by segment from the last: every row
// tile recomputes the segment's states and sign bits from its checkpoint, then the segment is walked back
// with its weight and bias gradients (recompute_backward). `whole` holds the buffers of the whole stack
// (grad_out, grad_x, grad_carry and the gradients of the parameters; its states and sign bits are the
// scratch's, per segment). Every state, bit and dh is the one the forward and backward of a stack that
// saves every layer compute (a row's values do not depend on the tiling, and each dW_l sums the same rows
// in the same order), so the gradients are bitwise those of saving every layer.
template <class T, class Problem, class Backward>
void checkpointed_backward(const Kernels<T, Problem, Backward>& kernels, const Problem& p, const T* checkpoints,
                           int64_t every, const Backward& whole, const SegmentScratch<T>& scratch, int threads) {
  const int64_t segments = checkpoint_count(p.depth, every);
  for_each_segment_from_last(p.depth, every, [&](int64_t segment, int64_t first, int64_t count) {
    const StackForwardBuffers<T> recompute{nullptr,
                                           checkpoints + state_offset(segment, 0, p.width, p.batch),
                                           nullptr,
                                           scratch.states,
                                           1,
                                           scratch.mask,
                                           /*saved_bypasses_caches=*/false};  // the walk back reads them at once
    const Backward backward = whole.segment(p, first, scratch, segment == segments - 1, segment == 0);
    const Problem part = p.layers(first, count);
    kernels.recompute_backward(part, recompute, backward, threads);
  });
}

}  // namespace dmup
