// Activation functions phi and their backward g * phi'(h), written once for every backend, with
// the block forms and the sign bits a stack saves for its backward (their rule and layout).
//
// Each formula is a template over the number type T, so the same text serves float and double on
// the host, float on a CUDA device, and the SIMD vector types of the CPU stack kernel. T needs
// + - *, comparisons (<, <=, >) whose results take !, `select(cond, a, b)` and `tanh(T)` / `exp(T)`
// found by argument-dependent lookup (std:: for built-in types). No torch headers: nvcc compiles
// this on its own.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define DMUP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DMUP_HOST_DEVICE inline
#endif

namespace dmup {

enum class Activation : int32_t { Identity = 0, Relu = 1, Abs = 2, Gelu = 3, Silu = 4 };

// The residual block forms (docs/design.md §2.2): x + s * MS(phi(W x + b)), phi after the GEMM
// ("post"), or x + s * MS(W phi(x) + b), phi before it ("pre"); MS subtracts the row mean when asked for.
enum class Block : int32_t { Post = 0, Pre = 1 };

// The stack's saved sign bits, the same on every device (docs/design.md §4.2): per layer, `planes`
// planes of (n, words) 16-bit words, bit r % 16 of word r / 16 of feature j holding row r's bit of h
// (the branch after the GEMM and bias): positive_sign_bit (plane 0) and, for abs, negative_sign_bit
// (plane 1), below. Smooth activations save nothing and recompute h in the backward. "pre" blocks save
// none: phi's argument there is x_l, which is saved anyway. The Python side calls this count sign_planes
// (dmup_kernels/_layout.py) and the planes the sign bits.
DMUP_HOST_DEVICE constexpr int mask_planes(Activation a, Block block) {
  return block != Block::Post ? 0 : a == Activation::Relu ? 1 : a == Activation::Abs ? 2 : 0;
}
// Rows per mask word: the bits are packed into 16-bit words (int16 tensors), which 1, 4, 8 and 16 SIMD
// lanes all divide, so every ISA and device packs them alike.
constexpr int64_t kMaskWordBits = 16;
DMUP_HOST_DEVICE constexpr int64_t mask_words(int64_t batch) { return (batch + kMaskWordBits - 1) / kMaskWordBits; }
// The checkpoints of a stack of `depth` layers that keeps x_0, x_k, x_2k, ... (k = every; docs/design.md
// §4.4): ceil(depth / every), the same on every device, written so that it does not overflow for any every >= 1.
DMUP_HOST_DEVICE constexpr int64_t checkpoint_count(int64_t depth, int64_t every) {
  return depth <= 0 ? 0 : (depth - 1) / every + 1;
}
// The segments of a checkpointed backward, from the last: f(segment, first layer, layer count).
template <class F>
void for_each_segment_from_last(int64_t depth, int64_t every, F&& f) {
  for (int64_t segment = checkpoint_count(depth, every) - 1; segment >= 0; --segment) {
    const int64_t first = segment * every;
    f(segment, first, depth - first < every ? depth - first : every);
  }
}

template <class T>
DMUP_HOST_DEVICE T select(bool cond, T a, T b) {
  return cond ? a : b;
}

#if !defined(__CUDA_ARCH__)
using std::exp;
using std::tanh;
#endif

template <Activation A>
struct Act;

// phi(h) = h
template <>
struct Act<Activation::Identity> {
  template <class T>
  static DMUP_HOST_DEVICE T value(T h) {
    return h;
  }
  template <class T>
  static DMUP_HOST_DEVICE T backward(T, T g) {
    return g;
  }
};

// phi(h) = max(h, 0). The backward is torch's threshold_backward: 0 where h <= 0 (even for g = inf),
// g elsewhere, so g also passes where h is NaN. NaN stays NaN in the forward (h < 0 is false for NaN).
template <>
struct Act<Activation::Relu> {
  template <class T>
  static DMUP_HOST_DEVICE T value(T h) {
    return select(h < T(0), T(0), h);
  }
  template <class T>
  static DMUP_HOST_DEVICE T backward(T h, T g) {
    return select(h <= T(0), T(0), g);
  }
};

// phi(h) = |h|; phi'(h) = sgn(h) with sgn(0) = 0 and sgn(NaN) = 0, as torch.abs's backward
// (g * torch.sign(h)): g * 0 there, which is NaN only when g is not finite.
template <>
struct Act<Activation::Abs> {
  template <class T>
  static DMUP_HOST_DEVICE T value(T h) {
    return select(h < T(0), T(0) - h, h);
  }
  template <class T>
  static DMUP_HOST_DEVICE T backward(T h, T g) {
    return g * select(h > T(0), T(1), select(h < T(0), T(-1), T(0)));
  }
};

// GELU, tanh form: phi(h) = h/2 * (1 + tanh(k (h + c h^3))), k = sqrt(2/pi), c = 0.044715.
template <>
struct Act<Activation::Gelu> {
  static constexpr double kSqrt2OverPi = 0.7978845608028654;
  static constexpr double kCubic = 0.044715;
  template <class T>
  static DMUP_HOST_DEVICE T value(T h) {
    T t = tanh(T(kSqrt2OverPi) * (h + T(kCubic) * h * h * h));
    return T(0.5) * h * (T(1) + t);
  }
  template <class T>
  static DMUP_HOST_DEVICE T backward(T h, T g) {
    T t = tanh(T(kSqrt2OverPi) * (h + T(kCubic) * h * h * h));
    T dinner = T(kSqrt2OverPi) * (T(1) + T(3 * kCubic) * h * h);
    return g * (T(0.5) * (T(1) + t) + T(0.5) * h * (T(1) - t * t) * dinner);
  }
};

// SiLU: phi(h) = h * sigmoid(h); phi'(h) = sigmoid(h) (1 + h (1 - sigmoid(h))).
template <>
struct Act<Activation::Silu> {
  template <class T>
  static DMUP_HOST_DEVICE T sigmoid(T h) {
    return T(1) / (T(1) + exp(T(0) - h));
  }
  template <class T>
  static DMUP_HOST_DEVICE T value(T h) {
    return h * sigmoid(h);
  }
  template <class T>
  static DMUP_HOST_DEVICE T backward(T h, T g) {
    T sg = sigmoid(h);
    return g * (sg * (T(1) + h * (T(1) - sg)));
  }
};

// The sign bits relu's and abs's backward read instead of h, chosen so that the backward matches
// torch's at NaN too. Plane 0, for relu: where the gradient passes, not h <= 0, so also at NaN
// (threshold_backward zeroes the gradient only where h <= 0); for abs: h > 0, so a NaN h (neither
// bit set) reads back as sign 0, as torch.sign(NaN). Plane 1, abs only: h < 0. For built-in T these
// are bool, for the CPU's SIMD vectors their lane masks. dmup_kernels/triton/common.py (sign_bits)
// follows the same rule.
template <Activation A, class T>
DMUP_HOST_DEVICE auto positive_sign_bit(T h) {
  static_assert(A == Activation::Relu || A == Activation::Abs, "only relu and abs save sign bits");
  if constexpr (A == Activation::Relu) {
    return !(h <= T(0));
  } else {
    return h > T(0);
  }
}
template <class T>
DMUP_HOST_DEVICE auto negative_sign_bit(T h) {
  return h < T(0);
}

template <Activation A>
using ActivationTag = std::integral_constant<Activation, A>;

// Calls f(ActivationTag<A>{}) with the compile-time activation named by a runtime value, so one
// kernel template is instantiated per activation and the activation costs no branch per element.
template <class F>
inline void dispatch_activation(Activation a, F&& f) {
  switch (a) {
    case Activation::Identity: f(ActivationTag<Activation::Identity>{}); break;
    case Activation::Relu: f(ActivationTag<Activation::Relu>{}); break;
    case Activation::Abs: f(ActivationTag<Activation::Abs>{}); break;
    case Activation::Gelu: f(ActivationTag<Activation::Gelu>{}); break;
    case Activation::Silu: f(ActivationTag<Activation::Silu>{}); break;
  }
}

}  // namespace dmup
