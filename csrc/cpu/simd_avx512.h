// SIMD traits for float32 on AVX-512 (32 vector registers): 16 lanes per vector, lane masks as
// __mmask16.
//
// Include only after `#pragma GCC target("avx512f,...")` (see residual_stack_avx512.cpp). Every
// traits type provides:
// - T, Vec, Mask, W (lanes);
// - kTileRows[NJ - 1]: the register tile of the GEMM, rows of A per tile of NJ vectors of C columns,
//   for NJ up to kTileVectors (see stack_impl::gemm);
// - zero, broadcast, load/store (W lanes), load_n / store_n (first n lanes, the rest read as 0),
//   fma(a, b, c) = a*b + c, sum (of the lanes, in a fixed order), transpose (of W vectors of W lanes);
// - stream(p, v): a store of W lanes to p (aligned to W lanes) that bypasses the caches where the ISA has
//   one (non-temporal), and stream_fence(), after which those stores are visible to other threads;
// - bits(Mask) (lane i -> bit i) and mask(bits), its inverse;
// - min, max, round, ldexp for simd_math.h;
// - for Vec the arithmetic operators, <, <= and > giving a Mask, ! of a Mask, select(mask, a, b),
//   exp and tanh, so that the templates of activations.h apply to it.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "simd_math.h"

// GCC 12 flags the intentionally undefined pass-through operand of masked intrinsics inlined here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace dmup {
namespace avx512 {

struct Mask {
  __mmask16 bits;
};

struct Vec {
  __m512 v;
  Vec() = default;
  Vec(__m512 value) : v(value) {}
  explicit Vec(double s) : v(_mm512_set1_ps(static_cast<float>(s))) {}
  explicit Vec(float s) : v(_mm512_set1_ps(s)) {}
  explicit Vec(int s) : v(_mm512_set1_ps(static_cast<float>(s))) {}
};

inline Vec operator+(Vec a, Vec b) { return _mm512_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm512_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm512_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm512_div_ps(a.v, b.v); }
inline Vec& operator+=(Vec& a, Vec b) { return a = a + b; }
inline Mask operator<(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask operator<=(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_LE_OQ)}; }
inline Mask operator>(Vec a, Vec b) { return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask operator!(Mask m) { return {_knot_mask16(m.bits)}; }
inline Vec select(Mask m, Vec a, Vec b) { return _mm512_mask_blend_ps(m.bits, b.v, a.v); }

struct Simd {
  using T = float;
  using Vec = avx512::Vec;
  using Mask = avx512::Mask;
  static constexpr int W = 16;
  // 4 vectors x 4 rows = 16 accumulators (18 for 3 x 6): enough to cover the FMA latency on two
  // ports, with the B vectors and the broadcast A element still in registers.
  static constexpr int kTileVectors = 4;
  static constexpr int kTileRows[kTileVectors] = {16, 8, 6, 4};

  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec broadcast(float s) { return _mm512_set1_ps(s); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v.v); }
  static __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static Vec load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(first(n), p); }
  static void store_n(float* p, Vec v, int n) { _mm512_mask_storeu_ps(p, first(n), v.v); }
  static void stream(float* p, Vec v) { _mm512_stream_ps(p, v.v); }
  static void stream_fence() { _mm_sfence(); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a.v, b.v, c.v); }
  static float sum(Vec v) { return _mm512_reduce_add_ps(v.v); }
  // rows[0..15] <- their transpose: four rounds that swap the off-diagonal blocks of 8, 4, 2, 1.
  static void transpose(Vec rows[W]) {
    transpose_round<8>(rows);
    transpose_round<4>(rows);
    transpose_round<2>(rows);
    transpose_round<1>(rows);
  }
  // Rows i and i + m (i & m == 0) exchange, in every group of 2m lanes, the second m lanes of row
  // i with the first m lanes of row i + m.
  template <int m>
  static void transpose_round(Vec rows[W]) {
    alignas(64) int32_t index[W];
    for (int c = 0; c < W; ++c) {
      const int group = c / (2 * m) * (2 * m), pos = c % (2 * m);
      index[c] = pos < m ? group + pos : W + group + pos - m;
    }
    const __m512i low = _mm512_load_si512(index), high = _mm512_add_epi32(low, _mm512_set1_epi32(m));
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      if (i & m) continue;
      const __m512 a = rows[i].v, b = rows[i + m].v;
      rows[i] = _mm512_permutex2var_ps(a, low, b);
      rows[i + m] = _mm512_permutex2var_ps(a, high, b);
    }
  }
  static uint32_t bits(Mask m) { return m.bits; }
  static Mask mask(uint32_t bits) { return {static_cast<__mmask16>(bits)}; }
  // MIN/MAX return their second operand when one is NaN.
  static Vec min(Vec a, Vec b) { return _mm512_min_ps(a.v, b.v); }
  static Vec max(Vec a, Vec b) { return _mm512_max_ps(a.v, b.v); }
  static Vec round(Vec x) { return _mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static Vec ldexp(Vec p, Vec k) { return _mm512_scalef_ps(p.v, k.v); }
};

inline Vec exp(Vec x) { return exp_approx<Simd>(x); }
inline Vec tanh(Vec x) { return tanh_approx<Simd>(x); }

}  // namespace avx512
}  // namespace dmup

#pragma GCC diagnostic pop
