// Depth-fused stack of MLP blocks on the CPU, built from the pieces of stack_kernel.h (its GEMM, tiles,
// teams, sign bits, weight-gradient packing and checkpointed backward) over the same SIMD traits type V.
// No torch headers: the torch glue is residual_mlp_stack.cpp.
//
// Math, per layer l (docs/design.md §2.5), hidden width m:
//   h1 = x W1_l^T + b1_l;  a = phi(h1);  h2 = a W2_l^T + b2_l;  x <- x + s MS(h2)
// Backward, walking l from L-1 down, g = dLoss/dx:
//   dh2 = MS(s g);  dh1 = phi'(h1) (dh2 W2_l);  g <- g + dh1 W1_l;
//   then dW2_l = dh2^T a, dW1_l = dh1^T x_l, db2_l = sum_rows dh2, db1_l = sum_rows dh1.
//
// Layout, as the stack's: a tile of R rows keeps the stream feature-major and walks every layer; the
// hidden layer of the tile is an (m x R) plane. Saved per layer: x_l (L, n, B) and, for relu and abs,
// the sign bits of h1 (L, planes, m, ceil(B/16)), the stack's packing and rule; never h1 or a. The rows
// pass writes dh2 (L, n, B) and dh1 (L, m, B); the weight pass rebuilds a from x_l (docs/design.md §3.8:
// the same GEMM in the same order, so a is bitwise the forward's).
#pragma once

#include "stack_kernel.h"

namespace dmup {

template <class T>
struct MlpStackProblem {
  int64_t batch, width, hidden_width, depth;
  const T* weight1;  // (L, m, n), nn.Linear layout per layer
  const T* weight2;  // (L, n, m)
  const T* bias1;    // (L, m) or nullptr
  const T* bias2;    // (L, n) or nullptr
  T scale;
  Activation activation;
  bool mean_subtract;
  int64_t tile_rows;  // R: multiple of 16

  // The first element of layer l of weight1 or weight2.
  int64_t weight_offset(int64_t layer) const { return layer * hidden_width * width; }

  // The problem of layers [first, first + count) alone.
  MlpStackProblem layers(int64_t first, int64_t count) const {
    MlpStackProblem part = *this;
    part.depth = count;
    part.weight1 = weight1 + weight_offset(first);
    part.weight2 = weight2 + weight_offset(first);
    part.bias1 = bias1 ? bias1 + first * hidden_width : nullptr;
    part.bias2 = bias2 ? bias2 + first * width : nullptr;
    return part;
  }
};

// The reverse walk reads dLoss/dx_L as rows (grad_out) or from grad_carry and writes dLoss/dx_0 as rows
// (grad_x) or into grad_carry, as the stack's (StackBackwardBuffers).
template <class T>
struct MlpStackBackwardBuffers {
  const T* grad_out;     // (B, n), or nullptr: read grad_carry
  const T* saved;        // (L, n, B): x_l
  const uint16_t* mask;  // (L, planes, m, ceil(B/16)): the sign bits of h1
  T* grad_x;             // (B, n), or nullptr: write grad_carry
  T* grad_carry;         // (n, B), used where grad_out or grad_x is nullptr
  T* grad_h;             // (L, n, B): dh2, scratch shared by the two backward phases
  T* grad_hidden;        // (L, m, B): dh1, likewise
  T* grad_weight1;       // (L, m, n)
  T* grad_weight2;       // (L, n, m)
  T* grad_bias1;         // (L, m), or nullptr without biases
  T* grad_bias2;         // (L, n), or nullptr without biases

  // As StackBackwardBuffers::segment.
  MlpStackBackwardBuffers segment(const MlpStackProblem<T>& p, int64_t first, const SegmentScratch<T>& scratch,
                                  bool last_segment, bool first_segment) const {
    return {last_segment ? grad_out : nullptr,
            scratch.states,
            scratch.mask,
            first_segment ? grad_x : nullptr,
            grad_carry,
            scratch.grad_h,
            scratch.grad_hidden,
            grad_weight1 + p.weight_offset(first),
            grad_weight2 + p.weight_offset(first),
            grad_bias1 ? grad_bias1 + first * p.hidden_width : nullptr,
            grad_bias2 ? grad_bias2 + first * p.width : nullptr};
  }
};

template <class T>
using MlpStackKernels = Kernels<T, MlpStackProblem<T>, MlpStackBackwardBuffers<T>>;

// Features of the local planes of a row tile of the MLP stack: the stream, h2 (dh2 in the backward) and
// x_l (read back to recompute h1), n each; h1 (a in the forward) and dh1, m each.
inline int64_t mlp_stack_tile_features(int64_t width, int64_t hidden_width) { return 3 * width + 2 * hidden_width; }

namespace stack_impl {
namespace {

template <class V, Activation A>
struct MlpStack
    : TileWalks<MlpStack<V, A>, typename V::T, MlpStackProblem<typename V::T>, MlpStackBackwardBuffers<typename V::T>> {
  using T = typename V::T;
  using Vec = typename V::Vec;
  using Phi = Act<A>;
  static constexpr int kPlanes = mask_planes(A, Block::Post);                    // h1 is a "post" pre-activation
  static constexpr bool kRecompute = kPlanes == 0 && A != Activation::Identity;  // smooth phi: rebuild h1

  // A tile's planes (mlp_stack_tile_features), shared by a feature-split team, private to a thread otherwise.
  struct Planes : TilePlanes<V> {
    T *stream, *branch, *input, *hidden, *hidden_grad;
    explicit Planes(const MlpStackProblem<T>& p)
        : TilePlanes<V>(p.tile_rows, mlp_stack_tile_features(p.width, p.hidden_width)) {
      stream = this->at(0);
      branch = this->at(p.width);
      input = this->at(2 * p.width);
      hidden = this->at(3 * p.width);
      hidden_grad = this->at(3 * p.width + p.hidden_width);
    }
  };

  // The forward walk of one tile of `rows` rows from row b0 (features [o0, o1) of the stream and [j0, j1)
  // of the hidden layer when split).
  static void forward_tile(const MlpStackProblem<T>& p, const StackForwardBuffers<T>& buf, const Team& team, Planes& s,
                           T* row, int64_t b0, int64_t rows) {
    const int64_t n = p.width, m = p.hidden_width, B = p.batch, Rp = s.padded;
    const int64_t o0 = team.begin(n), o1 = team.end(n), j0 = team.begin(m), j1 = team.end(m);
    const int64_t live = (rows + V::W - 1) / V::W * V::W;  // columns computed; Rp is the stride
    if (buf.x) {
      transpose_in(s.stream, Rp, buf.x + b0 * n, n, o0, o1, live, rows);
    } else {
      load_rows<V>(s.stream + o0 * Rp, Rp, live, buf.x_features + o0 * B + b0, B, o1 - o0, rows);
    }
    for (int64_t l = 0; l < p.depth; ++l) {
      team.sync();  // h1 = W1 x reads every feature of x
      gemm<V>(j1 - j0, live, n, p.weight1 + p.weight_offset(l) + j0 * n, n, 1, s.stream, Rp, s.hidden + j0 * Rp, Rp,
              false);
      uint16_t* mask = buf.mask ? buf.mask + mask_offset(l, 0, 0, kPlanes, m, B) : nullptr;
      bias_activation<V, A, kPlanes>(s.hidden, Rp, p.bias1 ? p.bias1 + l * m : nullptr, j0, j1, live, mask, m, B, b0);
      team.sync();  // h2 = W2 a reads every hidden feature
      gemm<V>(o1 - o0, live, m, p.weight2 + p.weight_offset(l) + o0 * m, m, 1, s.hidden, Rp, s.branch + o0 * Rp, Rp,
              false);
      bias_activation<V, Activation::Identity, 0>(s.branch, Rp, p.bias2 ? p.bias2 + l * n : nullptr, o0, o1, live,
                                                  nullptr, n, B, b0);
      const bool save = buf.saved && l % buf.save_every == 0;
      residual_update<V>(team, p.mean_subtract, n, p.scale, s.stream, s.branch, Rp, o0, o1, live, rows, row,
                         save ? buf.saved + state_offset(l / buf.save_every, 0, n, B) + b0 : nullptr, B);
    }
    if (buf.out) transpose_out(buf.out + b0 * n, n, s.stream, Rp, o0, o1, rows);
  }

  // The reverse walk of one tile, layers L-1 down to 0; writes its rows of grad_x (or grad_carry), of every
  // dh2_l and of every dh1_l.
  static void backward_tile(const MlpStackProblem<T>& p, const MlpStackBackwardBuffers<T>& buf, const Team& team,
                            Planes& s, T* row, int64_t b0, int64_t rows) {
    const int64_t n = p.width, m = p.hidden_width, B = p.batch, Rp = s.padded;
    const int64_t o0 = team.begin(n), o1 = team.end(n), j0 = team.begin(m), j1 = team.end(m);
    const int64_t live = (rows + V::W - 1) / V::W * V::W;
    // The stream planes now hold g = dLoss/dx.
    if (buf.grad_out) {
      transpose_in(s.stream, Rp, buf.grad_out + b0 * n, n, o0, o1, live, rows);
    } else {
      load_rows<V>(s.stream + o0 * Rp, Rp, live, buf.grad_carry + o0 * B + b0, B, o1 - o0, rows);
    }
    for (int64_t l = p.depth - 1; l >= 0; --l) {
      const T* W1 = p.weight1 + p.weight_offset(l);
      const T* W2 = p.weight2 + p.weight_offset(l);
      if constexpr (kRecompute) {
        load_rows<V>(s.input + o0 * Rp, Rp, live, buf.saved + state_offset(l, o0, n, B) + b0, B, o1 - o0, rows);
      }
      team.sync();  // the row mean reads all of g; the recomputation all of x_l
      if constexpr (kRecompute) {
        gemm<V>(j1 - j0, live, n, W1 + j0 * n, n, 1, s.input, Rp, s.hidden + j0 * Rp, Rp, false);
      }
      branch_gradient<V>(p.mean_subtract, n, p.scale, s.stream, s.branch, Rp, o0, o1, live, rows, row,
                         buf.grad_h + state_offset(l, 0, n, B) + b0, B, [](int64_t, int64_t, Vec du) { return du; });
      team.sync();  // da = dh2 W2 reads dh2 of every feature
      gemm<V>(j1 - j0, live, n, W2 + j0, 1, m, s.branch, Rp, s.hidden_grad + j0 * Rp, Rp, false);
      // dh1 = phi'(h1) da, from the sign bits (relu, abs) or the recomputed h1 (gelu, silu).
      const uint16_t* mask = kPlanes ? buf.mask + mask_offset(l, 0, 0, kPlanes, m, B) : nullptr;
      T* grad_hidden = buf.grad_hidden + state_offset(l, 0, m, B) + b0;
      for (int64_t j = j0; j < j1; ++j) {
        const Vec bias = p.bias1 ? V::broadcast(p.bias1[l * m + j]) : V::zero();
        const uint16_t* pos = kPlanes ? mask + mask_offset(0, 0, j, kPlanes, m, B) : nullptr;
        const uint16_t* neg = kPlanes == 2 ? mask + mask_offset(0, 1, j, kPlanes, m, B) : nullptr;
        for (int64_t r = 0; r < live; r += V::W) {
          const int64_t i = j * Rp + r;
          Vec dh = V::load(s.hidden_grad + i);
          if constexpr (kPlanes) dh = Phi::backward(sign_proxy<V, kPlanes>(pos, neg, b0 + r), dh);
          if constexpr (kRecompute) dh = Phi::backward(V::load(s.hidden + i) + bias, dh);
          V::store(s.hidden_grad + i, dh);
          V::store_n(grad_hidden + j * B + r, dh, lanes_at<V>(r, rows));
        }
      }
      team.sync();  // g += dh1 W1 reads dh1 of every hidden feature, and overwrites g the row mean read
      gemm<V>(o1 - o0, live, m, W1 + o0, 1, n, s.hidden_grad, Rp, s.stream + o0 * Rp, Rp, true);
    }
    if (buf.grad_x) {
      transpose_out(buf.grad_x + b0 * n, n, s.stream, Rp, o0, o1, rows);
    } else {
      store_rows<V>(buf.grad_carry + o0 * B + b0, B, s.stream + o0 * Rp, Rp, o1 - o0, rows);
    }
  }

  // Phase 2, one task per layer: dW2_l = dh2^T a, dW1_l = dh1^T x_l, db2_l and db1_l, each summing the rows
  // chunk by chunk in a fixed order. a = phi(x_l W1_l^T + b1_l) is rebuilt per chunk from the saved x_l
  // (docs/design.md §3.8): the GEMM sums over the n features in the forward's order, so it is bitwise the
  // forward's a.
  static void backward_weights(const MlpStackProblem<T>& p, const MlpStackBackwardBuffers<T>& buf, int threads) {
    const int64_t n = p.width, m = p.hidden_width, B = p.batch;
    const int64_t n_padded = (n + V::W - 1) / V::W * V::W, m_padded = (m + V::W - 1) / V::W * V::W;
    const auto same = [](Vec x) { return x; };
#pragma omp parallel num_threads(threads)
    {
      std::unique_ptr<T[]> inputs(new T[kWeightGradChunk * n_padded]());  // x_l, row-major
      std::unique_ptr<T[]> hidden(new T[kWeightGradChunk * m_padded]());  // h1, then a, row-major
      std::unique_ptr<T[]> weight1_t(new T[n * m_padded]());              // W1_l^T
#pragma omp for schedule(static)
      for (int64_t l = 0; l < p.depth; ++l) {
        const T* dh2 = buf.grad_h + state_offset(l, 0, n, B);
        const T* dh1 = buf.grad_hidden + state_offset(l, 0, m, B);
        const T* bias1 = p.bias1 ? p.bias1 + l * m : nullptr;
        pack_transposed<V>(weight1_t.get(), m_padded, p.weight1 + p.weight_offset(l), n, m, n, same);
        for (int64_t c0 = 0; c0 < B; c0 += kWeightGradChunk) {
          const int64_t count = std::min(kWeightGradChunk, B - c0);
          pack_transposed<V>(inputs.get(), n_padded, buf.saved + state_offset(l, 0, n, B) + c0, B, n, count, same);
          gemm<V>(count, m, n, inputs.get(), n_padded, 1, weight1_t.get(), m_padded, hidden.get(), m_padded, false);
          for (int64_t r = 0; r < count; ++r) {
            for (int64_t j = 0; j < m; j += V::W) {
              T* h = hidden.get() + r * m_padded + j;
              const Vec b = bias1 ? V::load_n(bias1 + j, lanes_at<V>(j, m)) : V::zero();
              V::store(h, Phi::value(V::load(h) + b));
            }
          }
          gemm<V>(n, m, count, dh2 + c0, B, 1, hidden.get(), m_padded, buf.grad_weight2 + p.weight_offset(l), m,
                  c0 > 0);
          gemm<V>(m, n, count, dh1 + c0, B, 1, inputs.get(), n_padded, buf.grad_weight1 + p.weight_offset(l), n,
                  c0 > 0);
        }
        if (buf.grad_bias1) {
          for (int64_t j = 0; j < m; ++j) buf.grad_bias1[l * m + j] = sum_rows<V>(dh1 + j * B, B);
        }
        if (buf.grad_bias2) {
          for (int64_t o = 0; o < n; ++o) buf.grad_bias2[l * n + o] = sum_rows<V>(dh2 + o * B, B);
        }
      }
    }
  }
};

}  // namespace
}  // namespace stack_impl

// The kernels of instruction set V for one activation.
template <class V>
MlpStackKernels<typename V::T> make_mlp_stack_kernels(Activation activation) {
  MlpStackKernels<typename V::T> result{};
  dispatch_activation(activation, [&](auto tag) { result = stack_impl::MlpStack<V, decltype(tag)::value>::kernels(); });
  return result;
}

}  // namespace dmup
