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
// the sign bits of h1 (L, planes, m, ceil(B/16)), the stack's packing and rule; never h1 or a. The reverse
// walk rebuilds h1 from x_l with the forward's GEMM call (docs/design.md §3.8: so h1 and a are bitwise the
// forward's) and walks the layers in step as the stack's, each tile adding its rows into the layer's
// weight gradients at once (stack_kernel.h).
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
            grad_weight1 + p.weight_offset(first),
            grad_weight2 + p.weight_offset(first),
            grad_bias1 ? grad_bias1 + first * p.hidden_width : nullptr,
            grad_bias2 ? grad_bias2 + first * p.width : nullptr};
  }
};

template <class T>
using MlpStackKernels = Kernels<T, MlpStackProblem<T>, MlpStackBackwardBuffers<T>>;

// Features of the local planes of a row tile of the MLP stack: the stream, h2 (dh2 in the backward) and
// x_l (read back to rebuild h1), n each; h1 (a in the forward) and dh1, m each.
inline int64_t mlp_stack_tile_features(int64_t width, int64_t hidden_width) { return 3 * width + 2 * hidden_width; }

namespace stack_impl {
namespace {

template <class V, Activation A>
struct MlpStack
    : TileWalks<MlpStack<V, A>, typename V::T, MlpStackProblem<typename V::T>, MlpStackBackwardBuffers<typename V::T>> {
  using T = typename V::T;
  using Vec = typename V::Vec;
  using Phi = Act<A>;
  static constexpr int kPlanes = mask_planes(A, Block::Post);  // h1 is a "post" pre-activation

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

  // The forward walk of one tile of `rows` rows from row b0, its x in the plane stream of `own` (the planes of
  // this thread; a feature-split team computes features [j0, j1) of each hidden layer and [o0, o1) of each
  // branch into the shared planes s).
  static void forward_layers(const MlpStackProblem<T>& p, const StackForwardBuffers<T>& buf, const Team& team,
                             Planes& s, Planes& own, T* row, int64_t b0, int64_t rows) {
    const int64_t n = p.width, m = p.hidden_width, B = p.batch, Rp = s.padded;
    const int64_t o0 = team.begin(n), o1 = team.end(n), j0 = team.begin(m), j1 = team.end(m);
    const int64_t live = whole_vectors<V>(rows);  // columns computed; Rp is the stride
    for (int64_t l = 0; l < p.depth; ++l) {
      if (l + 1 < p.depth) {  // as the stack's forward: the next layer's weights, in time
        prefetch(p.weight1 + p.weight_offset(l + 1) + j0 * n, (j1 - j0) * n);
        prefetch(p.weight2 + p.weight_offset(l + 1) + o0 * m, (o1 - o0) * m);
      }
      // Every thread has all of x; every thread has read the last layer's hidden plane (it met the last barrier).
      gemm<V>(j1 - j0, live, n, p.weight1 + p.weight_offset(l) + j0 * n, n, 1, own.stream, Rp, s.hidden + j0 * Rp, Rp,
              false);
      uint16_t* mask = buf.mask ? buf.mask + mask_offset(l, 0, 0, kPlanes, m, B) : nullptr;
      bias_activation<V, A, kPlanes>(s.hidden, Rp, p.bias1 ? p.bias1 + l * m : nullptr, j0, j1, live, mask, m, B, b0);
      team.sync();  // h2 = W2 a reads every hidden feature
      gemm<V>(o1 - o0, live, m, p.weight2 + p.weight_offset(l) + o0 * m, m, 1, s.hidden, Rp, s.branch + o0 * Rp, Rp,
              false);
      bias_activation<V, Activation::Identity, 0>(s.branch, Rp, p.bias2 ? p.bias2 + l * n : nullptr, o0, o1, live,
                                                  nullptr, n, B, b0);
      residual_update<V>(team, p.mean_subtract, n, p.scale, own.stream, s.branch, Rp, o0, o1, live, rows, row,
                         buf.layer_state(l, n, B, b0), B, buf.saved_bypasses_caches);
    }
  }

  // The reverse walk's scratch (TileWalks::walk_back): a tile's x_l and a_l, row-major; the bias gradients.
  static int64_t packed_elements(const MlpStackProblem<T>& p) {
    return p.tile_rows * (whole_vectors<V>(p.width) + whole_vectors<V>(p.hidden_width));
  }
  static int64_t summed_features(const MlpStackProblem<T>& p) { return p.width + p.hidden_width; }

  // Layer l of the reverse walk for one tile of `rows` rows from row b0, whose gradient g = dLoss/dx is in the
  // plane g (features [o0, o1) of the stream and [j0, j1) of the hidden layer when split): dh2_l, dh1_l and a_l
  // into the planes branch, hidden_grad and hidden, then g <- dLoss/dx_l.
  template <class Ahead>
  static void backward_layer(const MlpStackProblem<T>& p, const MlpStackBackwardBuffers<T>& buf, const Team& team,
                             Planes& s, T* g, T* row, int64_t l, int64_t b0, int64_t rows, Ahead& ahead) {
    const int64_t n = p.width, m = p.hidden_width, B = p.batch, Rp = s.padded;
    const int64_t o0 = team.begin(n), o1 = team.end(n), j0 = team.begin(m), j1 = team.end(m);
    const int64_t live = whole_vectors<V>(rows);
    const T* W1 = p.weight1 + p.weight_offset(l);
    const T* W2 = p.weight2 + p.weight_offset(l);
    if (l > 0) {  // as the stack's: the next layer's rows of W1 and columns of W2 this thread reads, asked for now
      prefetch(p.weight1 + p.weight_offset(l - 1) + j0 * n, (j1 - j0) * n);
      prefetch_columns(p.weight2 + p.weight_offset(l - 1), n, m, j0, j1);
    }
    load_rows<V>(s.input + o0 * Rp, Rp, live, buf.saved + state_offset(l, o0, n, B) + b0, B, o1 - o0, rows);
    team.sync();  // the row mean reads all of g; h1 = W1 x_l all of x_l
    gemm<V>(j1 - j0, live, n, W1 + j0 * n, n, 1, s.input, Rp, s.hidden + j0 * Rp, Rp, false, ahead);
    branch_gradient<V>(p.mean_subtract, n, p.scale, g, s.branch, Rp, o0, o1, live, row,
                       [](int64_t, int64_t, Vec du) { return du; });
    team.sync();  // da = dh2 W2 reads dh2 of every feature
    gemm<V>(j1 - j0, live, n, W2 + j0, 1, m, s.branch, Rp, s.hidden_grad + j0 * Rp, Rp, false, ahead);
    // dh1 = phi'(h1) da, from the sign bits (relu, abs) or h1 (gelu, silu); a = phi(h1 + b1) replaces h1.
    const uint16_t* mask = kPlanes ? buf.mask + mask_offset(l, 0, 0, kPlanes, m, B) : nullptr;
    for (int64_t j = j0; j < j1; ++j) {
      const Vec bias = p.bias1 ? V::broadcast(p.bias1[l * m + j]) : V::zero();
      const uint16_t* pos = kPlanes ? mask + mask_offset(0, 0, j, kPlanes, m, B) : nullptr;
      const uint16_t* neg = kPlanes == 2 ? mask + mask_offset(0, 1, j, kPlanes, m, B) : nullptr;
      for (int64_t r = 0; r < live; r += V::W) {
        const int64_t i = j * Rp + r;
        const Vec h = V::load(s.hidden + i) + bias;
        const Vec da = V::load(s.hidden_grad + i);
        Vec dh;
        if constexpr (kPlanes) {
          dh = Phi::backward(sign_proxy<V, kPlanes>(pos, neg, b0 + r), da);
        } else {
          dh = Phi::backward(h, da);
        }
        V::store(s.hidden_grad + i, dh);
        V::store(s.hidden + i, Phi::value(h));
      }
    }
    team.sync();  // g += dh1 W1 reads dh1 of every hidden feature, and overwrites g the row mean read
    gemm<V>(o1 - o0, live, m, W1 + o0, 1, n, s.hidden_grad, Rp, g + o0 * Rp, Rp, true, ahead);
  }

  // The tile's rows added into dW2_l = dh2^T a, dW1_l = dh1^T x_l, db2_l = sum_rows dh2 and db1_l = sum_rows
  // dh1, from the planes backward_layer left, by one thread.
  template <class Ahead>
  static void add_weight_gradients(const MlpStackProblem<T>& p, const MlpStackBackwardBuffers<T>& buf, const Planes& s,
                                   int64_t l, int64_t b0, int64_t rows, T* packed, T* sums, Ahead& ahead) {
    const int64_t n = p.width, m = p.hidden_width, B = p.batch, Rp = s.padded;
    const int64_t n_padded = whole_vectors<V>(n), m_padded = whole_vectors<V>(m);
    T* inputs = packed;                    // x_l, row-major
    T* hidden = packed + rows * n_padded;  // a_l, row-major
    const auto same = [](Vec x) { return x; };
    pack_transposed<V>(inputs, n_padded, buf.saved + state_offset(l, 0, n, B) + b0, B, n, rows, same);
    pack_transposed<V>(hidden, m_padded, s.hidden, Rp, m, rows, same);
    gemm<V>(n, m, rows, s.branch, Rp, 1, hidden, m_padded, buf.grad_weight2 + p.weight_offset(l), m, b0 > 0, ahead);
    gemm<V>(m, n, rows, s.hidden_grad, Rp, 1, inputs, n_padded, buf.grad_weight1 + p.weight_offset(l), n, b0 > 0,
            ahead);
    if (buf.grad_bias2) add_row_sums<V>(s.branch, Rp, 0, n, rows, b0, B, sums, buf.grad_bias2 + l * n);
    if (buf.grad_bias1) add_row_sums<V>(s.hidden_grad, Rp, 0, m, rows, b0, B, sums + n * V::W, buf.grad_bias1 + l * m);
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
