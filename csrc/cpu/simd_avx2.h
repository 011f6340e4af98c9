// SIMD traits for float32 on AVX2 + FMA (16 vector registers): 8 lanes per vector, lane masks as
// all-ones / all-zero lanes of a __m256. The interface is the one described in simd_avx512.h.
//
// Include only after `#pragma GCC target("avx2,fma")` (see residual_stack_avx2.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "simd_math.h"

namespace dmup {
namespace avx2 {

struct Mask {
  __m256 m;
};

struct Vec {
  __m256 v;
  Vec() = default;
  Vec(__m256 value) : v(value) {}
  explicit Vec(double s) : v(_mm256_set1_ps(static_cast<float>(s))) {}
  explicit Vec(float s) : v(_mm256_set1_ps(s)) {}
  explicit Vec(int s) : v(_mm256_set1_ps(static_cast<float>(s))) {}
};

inline Vec operator+(Vec a, Vec b) { return _mm256_add_ps(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return _mm256_sub_ps(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return _mm256_mul_ps(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return _mm256_div_ps(a.v, b.v); }
inline Vec& operator+=(Vec& a, Vec b) { return a = a + b; }
inline Mask operator<(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)}; }
inline Mask operator<=(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_LE_OQ)}; }
inline Mask operator>(Vec a, Vec b) { return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)}; }
inline Mask operator!(Mask m) { return {_mm256_xor_ps(m.m, _mm256_castsi256_ps(_mm256_set1_epi32(-1)))}; }
inline Vec select(Mask m, Vec a, Vec b) { return _mm256_blendv_ps(b.v, a.v, m.m); }

struct Simd {
  using T = float;
  using Vec = avx2::Vec;
  using Mask = avx2::Mask;
  static constexpr int W = 8;
  // Register tile for 16 registers: 12 accumulators (3 x 4, 2 x 6 or 1 x 12), the NJ vectors of B
  // and the broadcast A element make 14-16. 12 independent FMA chains cover the 4-cycle latency of
  // two FMA ports (8 needed); a 4 x 4 tile as on AVX-512 would need 21 registers and spill.
  static constexpr int kTileVectors = 3;
  static constexpr int kTileRows[kTileVectors] = {12, 6, 4};

  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec broadcast(float s) { return _mm256_set1_ps(s); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v.v); }
  // Lanes [0, n) all ones: lane index < n.
  static __m256i first(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // Masked moves are slow on AMD (a masked store costs about ten plain ones on Zen 3), and most
  // calls move whole vectors.
  static Vec load_n(const float* p, int n) { return n == W ? load(p) : _mm256_maskload_ps(p, first(n)); }
  static void store_n(float* p, Vec v, int n) {
    if (n == W) return store(p, v);
    _mm256_maskstore_ps(p, first(n), v.v);
  }
  static void stream(float* p, Vec v) { _mm256_stream_ps(p, v.v); }
  static void stream_fence() { _mm_sfence(); }
  static Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a.v, b.v, c.v); }
  static float sum(Vec v) {
    const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v.v), _mm256_extractf128_ps(v.v, 1));
    const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
    return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
  }
  // rows[0..7] <- their transpose: 2 x 2 blocks of pairs (unpack), of 2 x 2 lanes (shuffle), then
  // exchange of the 128-bit halves.
  static void transpose(Vec rows[W]) {
    __m256 t[W], u[W];
    for (int i = 0; i < W; i += 2) {
      t[i] = _mm256_unpacklo_ps(rows[i].v, rows[i + 1].v);
      t[i + 1] = _mm256_unpackhi_ps(rows[i].v, rows[i + 1].v);
    }
    for (int i = 0; i < W; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
      rows[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      rows[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
  }
  static uint32_t bits(Mask m) { return static_cast<uint32_t>(_mm256_movemask_ps(m.m)); }
  static Mask mask(uint32_t bits) {
    const __m256i lane_bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i set = _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), lane_bit);
    return {_mm256_castsi256_ps(_mm256_cmpeq_epi32(set, lane_bit))};
  }
  // MIN/MAX return their second operand when one is NaN.
  static Vec min(Vec a, Vec b) { return _mm256_min_ps(a.v, b.v); }
  static Vec max(Vec a, Vec b) { return _mm256_max_ps(a.v, b.v); }
  static Vec round(Vec x) { return _mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^k as p * 2^(k/2) * 2^(k - k/2): both factors are normal floats for k in [-150, 128], the
  // first product is exact, and only the second rounds (into the subnormals or to inf as needed).
  static Vec ldexp(Vec p, Vec k) {
    const __m256i ki = _mm256_cvtps_epi32(k.v);
    const __m256i k1 = _mm256_srai_epi32(ki, 1), k2 = _mm256_sub_epi32(ki, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
    const __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p.v, f1), f2);
  }
};

inline Vec exp(Vec x) { return exp_approx<Simd>(x); }
inline Vec tanh(Vec x) { return tanh_approx<Simd>(x); }

}  // namespace avx2
}  // namespace dmup
