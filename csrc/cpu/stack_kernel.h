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
//   grad_h (L, n, B)             dh_l, written by the backward walk, read by the weight gradient
// With depth checkpoints every k layers, saved is (ceil(L/k), n, B), there is no mask, and the backward
// recomputes one segment of k layers at a time into k-layer saved / mask / grad_h scratch
// (checkpointed_backward, at the end).
// Threads: with enough rows each thread owns whole tiles; with fewer rows than threads x 16 the
// threads share each tile, splitting its features (see Team). Every output element of a row depends
// only on that row, summed in a fixed order (every GEMM sums over its K in order, whatever its
// register tile), and every dW / db element sums the rows in fixed chunks, so results are bitwise
// independent of the tiling, of the split and of the number of threads.
//
// Each ISA's translation unit compiles this header with its own target flags. An inline function or
// template instance compiled in two such units is one symbol, and the linker may keep the copy with
// the other ISA's instructions (an illegal instruction on a CPU without them). So the kernel code is
// in an unnamed namespace (a private copy per unit), buffers are plain arrays rather than
// std::vector<T> (whose code would be shared), and what is outside is loop-free arithmetic.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <memory>

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

// One segment's scratch for a checkpointed backward (checkpointed_backward, at the end), sized for
// `every` layers of the whole batch.
template <class T>
struct SegmentScratch {
  T* states;       // (every, n, B)
  uint16_t* mask;  // (every, planes, features with sign bits, ceil(B/16))
  T* grad_h;       // (every, n, B)
  T* grad_hidden;  // (every, m, B) for the MLP stack (mlp_stack_kernel.h), else nullptr
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
  T* grad_h;             // (L, n, B) scratch shared by the two backward phases
  T* grad_weight;        // (L, n, n)
  T* grad_bias;          // (L, n), or nullptr when the stack has no bias

  // The buffers of the backward of layers [first, ...) of a checkpointed stack, whose states, sign bits
  // and dh are the segment's scratch: grad_out is read by the last segment only, grad_x written by the
  // first only, the gradient carried between segments in grad_carry.
  StackBackwardBuffers segment(const StackProblem<T>& p, int64_t first, const SegmentScratch<T>& scratch,
                               bool last_segment, bool first_segment) const {
    return {last_segment ? grad_out : nullptr,
            scratch.states,
            scratch.mask,
            first_segment ? grad_x : nullptr,
            grad_carry,
            scratch.grad_h,
            grad_weight + weight_offset(first, 0, p.width),
            grad_bias ? grad_bias + first * p.width : nullptr};
  }
};

// Work split of the weight gradient (docs/design.md §7.6): one task per layer, which packs the layer's
// input once; only shallow stacks also split the output rows, in blocks of 64, to give every thread
// work. Either way each dW element is computed by the same code in the same order.
// From this depth on, one task per layer gives every thread of a team several tasks.
constexpr int64_t kWeightGradLayerTasksDepth = 8;
// Output rows per task below that depth: a multiple of every lane count, small enough to share out.
constexpr int64_t kWeightGradBlockRows = 64;
inline int64_t weight_grad_block_rows(int64_t depth, int64_t width) {
  return depth >= kWeightGradLayerTasksDepth ? width : kWeightGradBlockRows;
}
inline int64_t weight_grad_tasks(int64_t depth, int64_t width) {
  const int64_t rows = weight_grad_block_rows(depth, width);
  return depth * ((width + rows - 1) / rows);
}

// The per-core L2 size assumed where the machine reports none: AMD Zen 3's 512 KiB (Zen 4 has
// 1 MiB, Intel server cores 1-2 MiB). residual_stack.cpp asks the machine (sysconf).
constexpr int64_t kDefaultL2Bytes = 512 * 1024;

// Row-tile size: the batch shared evenly by the threads, in multiples of 16 rows, capped so the
// tile's local buffers (`row_bytes` per row: stack_tile_features, mlp_stack_tile_features) take at most
// half of the L2, leaving the other half to the streamed weights and the saved state. When one thread's
// share is above the cap, the tiles are made as even as possible, a whole number per thread, so no
// thread waits on another's extra tile.
inline int64_t stack_tile_rows(int64_t batch, int64_t row_bytes, int64_t threads, int64_t l2_bytes = kDefaultL2Bytes) {
  threads = std::max<int64_t>(threads, 1);
  const int64_t per_thread = std::max<int64_t>(1, (batch + threads - 1) / threads);
  const int64_t cap = std::max<int64_t>(16, l2_bytes / 2 / row_bytes / 16 * 16);
  const int64_t tiles_per_thread = (per_thread + cap - 1) / cap;
  const int64_t rows = (per_thread + tiles_per_thread - 1) / tiles_per_thread;
  return std::max<int64_t>(16, (rows + 15) / 16 * 16);
}

// Features of the local planes of a row tile of the stack: the stream, the branch, dh, and the GEMM input
// of the pre block (or the recomputation input of smooth activations), n each.
inline int64_t stack_tile_features(int64_t width) { return 4 * width; }

// Entry points of a depth-fused kernel of one instruction set for one dtype, for the problem type Problem
// and backward buffers Backward; filled by make_stack_kernels<V>() (and make_mlp_stack_kernels<V>()).
// Each runs its own OpenMP team of `threads` threads.
template <class T, class Problem, class Backward>
struct Kernels {
  void (*forward)(const Problem&, const StackForwardBuffers<T>&, int threads);
  void (*backward_rows)(const Problem&, const Backward&, int threads);
  void (*backward_weights)(const Problem&, const Backward&, int threads);
  // Per row tile: the forward walk `recompute` (which saves the states and sign bits the backward
  // reads), then backward_rows' reverse walk, while the tile is in cache.
  void (*recompute_backward_rows)(const Problem&, const StackForwardBuffers<T>& recompute, const Backward&,
                                  int threads);
};

template <class T>
using StackKernels = Kernels<T, StackProblem<T>, StackBackwardBuffers<T>>;

namespace stack_impl {
namespace {

// C[i][j] (+)= sum_p A(i, p) * Bm[p][j] for i < MI, j < NJ*W, with A(i, p) = a[i*asi + p*asp] broadcast
// and Bm rows read as full vectors (the caller pads them). Only the first `last` lanes of the last
// vector of each C row are read or written.
template <class V, int MI, int NJ>
inline void gemm_tile(int64_t K, const typename V::T* a, int64_t asi, int64_t asp, const typename V::T* b, int64_t bs,
                      typename V::T* c, int64_t cs, bool accumulate, int last) {
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
}

template <class V, int MI, int NJ>
inline void gemm_rows(int64_t M, int64_t K, const typename V::T* a, int64_t asi, int64_t asp, const typename V::T* b,
                      int64_t bs, typename V::T* c, int64_t cs, bool accumulate, int last) {
  int64_t i = 0;
  for (; i + MI <= M; i += MI) gemm_tile<V, MI, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last);
  // The remaining rows in tiles of 4, 2, 1: a one-row tile is load-bound, so use it least.
  for (; i + 4 <= M; i += 4) gemm_tile<V, 4, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last);
  for (; i + 2 <= M; i += 2) gemm_tile<V, 2, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last);
  for (; i < M; ++i) gemm_tile<V, 1, NJ>(K, a + i * asi, asi, asp, b, bs, c + i * cs, cs, accumulate, last);
}

// One panel of nj <= NJ vectors of C columns, in the register tile the traits give for nj.
template <class V, int NJ>
inline void gemm_panel(int nj, int64_t M, int64_t K, const typename V::T* a, int64_t asi, int64_t asp,
                       const typename V::T* b, int64_t bs, typename V::T* c, int64_t cs, bool accumulate, int last) {
  if constexpr (NJ > 1) {
    if (nj < NJ) return gemm_panel<V, NJ - 1>(nj, M, K, a, asi, asp, b, bs, c, cs, accumulate, last);
  }
  gemm_rows<V, V::kTileRows[NJ - 1], NJ>(M, K, a, asi, asp, b, bs, c, cs, accumulate, last);
}

// C (M x N, row stride cs) (+)= A (M x K, strides asi/asp) * Bm (K x N, row stride bs >= N rounded
// up to W). C is cut into panels of V::kTileVectors vectors, each computed in register tiles of
// V::kTileRows[NJ - 1] rows x NJ vectors (the traits type says why that tile fits its registers).
template <class V>
void gemm(int64_t M, int64_t N, int64_t K, const typename V::T* a, int64_t asi, int64_t asp, const typename V::T* b,
          int64_t bs, typename V::T* c, int64_t cs, bool accumulate) {
  // K in blocks, so that the panel of Bm a register tile streams (kBlockK x 4 vectors, 16 KiB for
  // float32) stays in L1 across the tiles of a chunk. C is reloaded between blocks at full
  // precision, so the sum over K runs in the same order as without blocking.
  constexpr int64_t kBlockK = 64;
  if (K > kBlockK) {
    for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
      gemm<V>(M, N, std::min(kBlockK, K - k0), a + k0 * asp, asi, asp, b + k0 * bs, bs, c, cs, accumulate || k0 > 0);
    }
    return;
  }
  const int64_t vectors = (N + V::W - 1) / V::W;
  for (int64_t j0 = 0; j0 < vectors; j0 += V::kTileVectors) {
    const int nj = static_cast<int>(std::min<int64_t>(V::kTileVectors, vectors - j0));
    const int last = static_cast<int>(std::min<int64_t>(V::W, N - (j0 + nj - 1) * V::W));
    gemm_panel<V, V::kTileVectors>(nj, M, K, a, asi, asp, b + j0 * V::W, bs, c + j0 * V::W, cs, accumulate, last);
  }
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

// How the threads of one OpenMP team share the work. With at least as many row tiles as threads,
// each thread owns whole tiles ("row split", no synchronisation). With fewer (small batches), all
// threads work on one tile at a time, each on a slice of the features [begin, end), and meet at a
// barrier wherever a step reads what other threads wrote ("feature split").
struct Team {
  int thread, threads;
  bool split;
  int64_t begin(int64_t n) const { return split ? n * thread / threads : 0; }
  int64_t end(int64_t n) const { return split ? n * (thread + 1) / threads : n; }
  // The tiles of this thread: all of them in turn when split, else every threads-th from its own.
  int64_t first_tile() const { return split ? 0 : thread; }
  int64_t tile_step() const { return split ? 1 : threads; }
  void sync() const {
    if (split) {
#pragma omp barrier
    }
  }
};

// Lanes of the vector at column r that hold real rows of a tile with `rows` rows.
template <class V>
inline int lanes_at(int64_t r, int64_t rows) {
  return static_cast<int>(std::min<int64_t>(rows - r, V::W));
}

// The local planes of one row tile, `features` rows of `padded` (the tile's rows rounded up to whole
// vectors) in one zeroed allocation; a kernel's Planes type names its planes inside it.
template <class V>
struct TilePlanes {
  using T = typename V::T;
  int64_t padded;
  std::unique_ptr<T[]> data;
  TilePlanes(int64_t tile_rows, int64_t features)
      : padded((tile_rows + V::W - 1) / V::W * V::W), data(new T[features * padded]()) {}
  // The plane that starts at feature `first`.
  T* at(int64_t first) const { return data.get() + first * padded; }
};

template <class Problem>
int64_t tile_count(const Problem& p) {
  return (p.batch + p.tile_rows - 1) / p.tile_rows;
}

// Runs body(team, planes, row) on an OpenMP team of `threads`: the planes (Planes(p)) shared when the
// team splits the features of each tile (fewer tiles than threads), else private; row, a row of the
// tile's width, always private.
template <class Planes, class Problem, class F>
void with_planes(const Problem& p, int threads, F&& body) {
  using T = typename Planes::T;
  const bool split = tile_count(p) < threads;
  std::unique_ptr<Planes> shared(split ? new Planes(p) : nullptr);
#pragma omp parallel num_threads(threads)
  {
    const Team team{omp_get_thread_num(), omp_get_num_threads(), split && omp_get_num_threads() > 1};
    std::unique_ptr<Planes> own(shared ? nullptr : new Planes(p));
    Planes& planes = shared ? *shared : *own;
    std::unique_ptr<T[]> row(new T[planes.padded]());
    body(team, planes, row.get());
  }
}

// The row tiles of this thread: body(b0, rows) for each, in the team's order.
template <class Problem, class F>
void for_each_tile(const Problem& p, const Team& team, F&& body) {
  for (int64_t tile = team.first_tile(); tile < tile_count(p); tile += team.tile_step()) {
    const int64_t b0 = tile * p.tile_rows;
    body(b0, std::min(p.tile_rows, p.batch - b0));
    team.sync();  // the next tile reuses the shared planes
  }
}

// The rows passes of a depth-fused kernel K for Problem and Backward (buffers), K providing Planes,
// forward_tile and backward_tile: every tile walks all layers, forward or in reverse, or (checkpoints)
// recomputes its segment and walks it back.
template <class K, class T, class Problem, class Backward>
struct TileWalks {
  static void forward(const Problem& p, const StackForwardBuffers<T>& buf, int threads) {
    with_planes<typename K::Planes>(p, threads, [&](const Team& team, typename K::Planes& s, T* row) {
      for_each_tile(p, team, [&](int64_t b0, int64_t rows) { K::forward_tile(p, buf, team, s, row, b0, rows); });
    });
  }

  static void backward_rows(const Problem& p, const Backward& buf, int threads) {
    with_planes<typename K::Planes>(p, threads, [&](const Team& team, typename K::Planes& s, T* row) {
      for_each_tile(p, team, [&](int64_t b0, int64_t rows) { K::backward_tile(p, buf, team, s, row, b0, rows); });
    });
  }

  static void recompute_backward_rows(const Problem& p, const StackForwardBuffers<T>& recompute, const Backward& buf,
                                      int threads) {
    with_planes<typename K::Planes>(p, threads, [&](const Team& team, typename K::Planes& s, T* row) {
      for_each_tile(p, team, [&](int64_t b0, int64_t rows) {
        K::forward_tile(p, recompute, team, s, row, b0, rows);
        team.sync();  // the reverse walk reuses the planes
        K::backward_tile(p, buf, team, s, row, b0, rows);
      });
    });
  }

  // The entry points, for the Kernels table.
  static Kernels<T, Problem, Backward> kernels() {
    return {&forward, &backward_rows, &K::backward_weights, &recompute_backward_rows};
  }
};

// row[r] = mean over all `width` features of (factor * buf[o][r]) for r < live, or 0 without mean
// subtraction. Every thread of a team computes it whole, in the same order.
template <class V>
void row_mean(bool mean_subtract, int64_t width, const typename V::T* buf, int64_t stride, int64_t live,
              typename V::T factor, typename V::T* row) {
  using T = typename V::T;
  for (int64_t r = 0; r < live; r += V::W) V::store(row + r, V::zero());
  if (!mean_subtract) return;
  for (int64_t o = 0; o < width; ++o) {
    for (int64_t r = 0; r < live; r += V::W) V::store(row + r, V::load(row + r) + V::load(buf + o * stride + r));
  }
  const typename V::Vec scale = V::broadcast(factor / T(width));
  for (int64_t r = 0; r < live; r += V::W) V::store(row + r, V::load(row + r) * scale);
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

// The residual update of one layer for features [o0, o1) of a tile of `rows` rows: saves x_l into `saved`
// (this layer's (n, B) state from the tile's first row, or nullptr), then x <- x + scale * (v - mean) with
// the row mean of the branch v over all `width` features (0 without mean subtraction).
template <class V>
void residual_update(const Team& team, bool mean_subtract, int64_t width, typename V::T scale, typename V::T* stream,
                     const typename V::T* branch, int64_t stride, int64_t o0, int64_t o1, int64_t live, int64_t rows,
                     typename V::T* row, typename V::T* saved, int64_t batch) {
  team.sync();  // the row mean reads every feature of the branch
  row_mean<V>(mean_subtract, width, branch, stride, live, typename V::T(1), row);
  const typename V::Vec s = V::broadcast(scale);
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t r = 0; r < live; r += V::W) {
      const int64_t i = o * stride + r;
      const typename V::Vec x = V::load(stream + i);
      if (saved) V::store_n(saved + o * batch + r, x, lanes_at<V>(r, rows));
      V::store(stream + i, V::fma(s, V::load(branch + i) - V::load(row + r), x));
    }
  }
}

// The gradient at a block's branch output for features [o0, o1) of a tile of `rows` rows, given g =
// dLoss/dx in `stream`: du = MS(scale * g) (the row mean of scale * g over all `width` features), then dh
// = chain(o, r, du), into the plane `grad` and this layer's (n, B) rows of `grad_h` from the tile's first
// row.
template <class V, class F>
void branch_gradient(bool mean_subtract, int64_t width, typename V::T scale, const typename V::T* stream,
                     typename V::T* grad, int64_t stride, int64_t o0, int64_t o1, int64_t live, int64_t rows,
                     typename V::T* row, typename V::T* grad_h, int64_t batch, F&& chain) {
  row_mean<V>(mean_subtract, width, stream, stride, live, scale, row);
  const typename V::Vec s = V::broadcast(scale);
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t r = 0; r < live; r += V::W) {
      const int64_t i = o * stride + r;
      const typename V::Vec dh = chain(o, r, s * V::load(stream + i) - V::load(row + r));
      V::store(grad + i, dh);
      V::store_n(grad_h + o * batch + r, dh, lanes_at<V>(r, rows));
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

// sum over r < count of values[r], in vectors of W rows then across the lanes: the bias gradient's sum
// over the batch, in one fixed order.
template <class V>
typename V::T sum_rows(const typename V::T* values, int64_t count) {
  typename V::Vec sum = V::zero();
  for (int64_t r = 0; r < count; r += V::W) sum += V::load_n(values + r, lanes_at<V>(r, count));
  return V::sum(sum);
}

// Rows of the packed operands of a weight-gradient pass, and so the rows summed per GEMM call: each dW
// element accumulates the batch in chunks of this many rows, in order.
constexpr int64_t kWeightGradChunk = 256;

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
  // thread otherwise.
  struct Planes : TilePlanes<V> {
    T *stream, *branch, *aux, *input;
    explicit Planes(const StackProblem<T>& p) : TilePlanes<V>(p.tile_rows, stack_tile_features(p.width)) {
      stream = this->at(0);
      branch = this->at(p.width);
      aux = this->at(2 * p.width);
      input = this->at(3 * p.width);
    }
  };

  // The forward walk of one tile of `rows` rows from row b0 (features [o0, o1) of it when split).
  static void forward_tile(const StackProblem<T>& p, const StackForwardBuffers<T>& buf, const Team& team, Planes& s,
                           T* row, int64_t b0, int64_t rows) {
    const int64_t n = p.width, B = p.batch, Rp = s.padded, o0 = team.begin(n), o1 = team.end(n);
    const int64_t live = (rows + V::W - 1) / V::W * V::W;  // columns computed; Rp is the stride
    if (buf.x) {
      transpose_in(s.stream, Rp, buf.x + b0 * n, n, o0, o1, live, rows);
    } else {
      load_rows<V>(s.stream + o0 * Rp, Rp, live, buf.x_features + o0 * B + b0, B, o1 - o0, rows);
    }
    for (int64_t l = 0; l < p.depth; ++l) {
      const T* W = p.weight + weight_offset(l, 0, n);
      const T* gemm_in = s.stream;
      if (!kPost && !kIdentity) {  // pre block: the GEMM reads phi(x)
        map_rows<V>(s.input, s.stream, Rp, o0, o1, live, [](Vec x) { return Phi::value(x); });
        gemm_in = s.input;
      }
      team.sync();  // the GEMM reads every feature of its input
      gemm<V>(o1 - o0, live, n, W + o0 * n, n, 1, gemm_in, Rp, s.branch + o0 * Rp, Rp, false);
      // Branch epilogue: bias, then phi (post) with its sign bits.
      uint16_t* mask = buf.mask ? buf.mask + mask_offset(l, 0, 0, kPlanes, n, B) : nullptr;
      bias_activation<V, kPost ? A : Activation::Identity, kPlanes>(s.branch, Rp, p.bias ? p.bias + l * n : nullptr, o0,
                                                                    o1, live, mask, n, B, b0);
      // Save x_l (every save_every-th layer), then x <- x + s * (v - mean).
      const bool save = buf.saved && l % buf.save_every == 0;
      residual_update<V>(team, p.mean_subtract, n, p.scale, s.stream, s.branch, Rp, o0, o1, live, rows, row,
                         save ? buf.saved + state_offset(l / buf.save_every, 0, n, B) + b0 : nullptr, B);
    }
    if (buf.out) transpose_out(buf.out + b0 * n, n, s.stream, Rp, o0, o1, rows);
  }

  // The reverse walk of one tile, layers L-1 down to 0; writes its rows of grad_x (or grad_carry) and
  // of every dh_l.
  static void backward_tile(const StackProblem<T>& p, const StackBackwardBuffers<T>& buf, const Team& team, Planes& s,
                            T* row, int64_t b0, int64_t rows) {
    constexpr bool kRecompute = kPost && kPlanes == 0 && !kIdentity;  // smooth phi: rebuild h
    constexpr bool kNeedInput = kRecompute || (!kPost && !kIdentity);
    const int64_t n = p.width, B = p.batch, Rp = s.padded, o0 = team.begin(n), o1 = team.end(n);
    const int64_t live = (rows + V::W - 1) / V::W * V::W;
    // The stream planes now hold g = dLoss/dx.
    if (buf.grad_out) {
      transpose_in(s.stream, Rp, buf.grad_out + b0 * n, n, o0, o1, live, rows);
    } else {
      load_rows<V>(s.stream + o0 * Rp, Rp, live, buf.grad_carry + o0 * B + b0, B, o1 - o0, rows);
    }
    for (int64_t l = p.depth - 1; l >= 0; --l) {
      const T* W = p.weight + weight_offset(l, 0, n);
      if constexpr (kNeedInput) {
        load_rows<V>(s.input + o0 * Rp, Rp, live, buf.saved + state_offset(l, o0, n, B) + b0, B, o1 - o0, rows);
      }
      team.sync();  // the row mean reads all of g; the recomputation all of x_l
      if constexpr (kRecompute) gemm<V>(o1 - o0, live, n, W + o0 * n, n, 1, s.input, Rp, s.branch + o0 * Rp, Rp, false);
      const uint16_t* mask = kPlanes ? buf.mask + mask_offset(l, 0, 0, kPlanes, n, B) : nullptr;
      branch_gradient<V>(p.mean_subtract, n, p.scale, s.stream, s.aux, Rp, o0, o1, live, rows, row,
                         buf.grad_h + state_offset(l, 0, n, B) + b0, B, [&](int64_t o, int64_t r, Vec du) {
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
        gemm<V>(o1 - o0, live, n, Wk, 1, n, s.aux, Rp, s.stream + o0 * Rp, Rp, true);  // g += dh W
      } else {
        gemm<V>(o1 - o0, live, n, Wk, 1, n, s.aux, Rp, s.branch + o0 * Rp, Rp, false);  // da = dh W
        for (int64_t k = o0; k < o1; ++k) {
          for (int64_t r = 0; r < live; r += V::W) {
            const int64_t i = k * Rp + r;
            V::store(s.stream + i, V::load(s.stream + i) + Phi::backward(V::load(s.input + i), V::load(s.branch + i)));
          }
        }
      }
    }
    if (buf.grad_x) {
      transpose_out(buf.grad_x + b0 * n, n, s.stream, Rp, o0, o1, rows);
    } else {
      store_rows<V>(buf.grad_carry + o0 * B + b0, B, s.stream + o0 * Rp, Rp, o1 - o0, rows);
    }
  }

  // Phase 2: dW_l = dh_l^T in_l (in_l = x_l, or phi(x_l) for "pre") and db_l = sum_rows dh_l, one
  // task per (layer, block of output rows); the sum over rows runs in a fixed order.
  static void backward_weights(const StackProblem<T>& p, const StackBackwardBuffers<T>& buf, int threads) {
    const int64_t n = p.width, B = p.batch;
    const int64_t n_padded = (n + V::W - 1) / V::W * V::W;
    const int64_t block_rows = weight_grad_block_rows(p.depth, n);
    const int64_t blocks = (n + block_rows - 1) / block_rows;
    const int64_t tasks = weight_grad_tasks(p.depth, n);
#pragma omp parallel num_threads(threads)
    {
      std::unique_ptr<T[]> packed(new T[kWeightGradChunk * n_padded]());
#pragma omp for schedule(static)
      for (int64_t task = 0; task < tasks; ++task) {
        const int64_t l = task / blocks, o0 = (task % blocks) * block_rows;
        const int64_t rows_out = std::min(block_rows, n - o0);
        const T* dh = buf.grad_h + state_offset(l, 0, n, B);
        for (int64_t c0 = 0; c0 < B; c0 += kWeightGradChunk) {
          const int64_t count = std::min(kWeightGradChunk, B - c0);
          pack_transposed<V>(packed.get(), n_padded, buf.saved + state_offset(l, 0, n, B) + c0, B, n, count,
                             [](Vec x) { return !kPost && !kIdentity ? Phi::value(x) : x; });
          gemm<V>(rows_out, n, count, dh + o0 * B + c0, B, 1, packed.get(), n_padded,
                  buf.grad_weight + weight_offset(l, o0, n), n, c0 > 0);
        }
        if (buf.grad_bias) {
          for (int64_t o = o0; o < o0 + rows_out; ++o) buf.grad_bias[l * n + o] = sum_rows<V>(dh + o * B, B);
        }
      }
    }
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
// docs/design.md §4.4), for the kernels of any problem type. Segment by segment from the last: per row
// tile, recompute the segment's states and sign bits from its checkpoint and walk it in reverse
// (recompute_backward_rows), then the segment's weight and bias gradients (backward_weights). `whole`
// holds the buffers of the whole stack (grad_out, grad_x, grad_carry and the gradients of the parameters;
// its states, sign bits and dh are the scratch's, per segment). Every state, bit and dh is the one the
// forward and backward of a stack that saves every layer compute (a row's values do not depend on the
// tiling, and each dW_l sums the same rows in the same order), so the gradients are bitwise those of
// saving every layer.
template <class T, class Problem, class Backward>
void checkpointed_backward(const Kernels<T, Problem, Backward>& kernels, const Problem& p, const T* checkpoints,
                           int64_t every, const Backward& whole, const SegmentScratch<T>& scratch, int threads) {
  const int64_t segments = checkpoint_count(p.depth, every);
  for_each_segment_from_last(p.depth, every, [&](int64_t segment, int64_t first, int64_t count) {
    const StackForwardBuffers<T> recompute{
        nullptr, checkpoints + state_offset(segment, 0, p.width, p.batch), nullptr, scratch.states, 1, scratch.mask};
    const Backward backward = whole.segment(p, first, scratch, segment == segments - 1, segment == 0);
    const Problem part = p.layers(first, count);
    kernels.recompute_backward_rows(part, recompute, backward, threads);
    kernels.backward_weights(part, backward, threads);
  });
}

}  // namespace dmup
