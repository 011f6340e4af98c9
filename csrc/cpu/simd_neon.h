// SIMD traits for float32 on AArch64 Advanced SIMD (NEON, 32 vector registers): 4 lanes per
// vector, lane masks as all-ones / all-zero lanes of a uint32x4_t. The interface is the one
// described in simd_avx512.h. NEON is part of the AArch64 baseline: no target flags needed.
#pragma once

#include <arm_neon.h>

#include <cstdint>

#include "simd_math.h"

namespace dmup {
namespace neon {

struct Mask {
  uint32x4_t m;
};

struct Vec {
  float32x4_t v;
  Vec() = default;
  Vec(float32x4_t value) : v(value) {}
  explicit Vec(double s) : v(vdupq_n_f32(static_cast<float>(s))) {}
  explicit Vec(float s) : v(vdupq_n_f32(s)) {}
  explicit Vec(int s) : v(vdupq_n_f32(static_cast<float>(s))) {}
};

inline Vec operator+(Vec a, Vec b) { return vaddq_f32(a.v, b.v); }
inline Vec operator-(Vec a, Vec b) { return vsubq_f32(a.v, b.v); }
inline Vec operator*(Vec a, Vec b) { return vmulq_f32(a.v, b.v); }
inline Vec operator/(Vec a, Vec b) { return vdivq_f32(a.v, b.v); }
inline Vec& operator+=(Vec& a, Vec b) { return a = a + b; }
inline Mask operator<(Vec a, Vec b) { return {vcltq_f32(a.v, b.v)}; }
inline Mask operator<=(Vec a, Vec b) { return {vcleq_f32(a.v, b.v)}; }
inline Mask operator>(Vec a, Vec b) { return {vcgtq_f32(a.v, b.v)}; }
inline Mask operator!(Mask m) { return {vmvnq_u32(m.m)}; }
inline Vec select(Mask m, Vec a, Vec b) { return vbslq_f32(m.m, a.v, b.v); }

struct Simd {
  using T = float;
  using Vec = neon::Vec;
  using Mask = neon::Mask;
  static constexpr int W = 4;
  // Register tile for 32 registers: 24 accumulators (4 x 6, 3 x 8, 2 x 12, 1 x 24) with the NJ
  // vectors of B and the broadcast A element, 26-29 registers. 24 chains cover the FMA latency of
  // two or four pipes (4 cycles on Neoverse) with room to spare.
  static constexpr int kTileVectors = 4;
  static constexpr int kTileRows[kTileVectors] = {24, 12, 8, 6};

  static Vec zero() { return vdupq_n_f32(0.0f); }
  static Vec broadcast(float s) { return vdupq_n_f32(s); }
  static Vec load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, Vec v) { vst1q_f32(p, v.v); }
  static Vec load_n(const float* p, int n) {
    if (n == W) return load(p);
    float lanes[W] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < n; ++i) lanes[i] = p[i];
    return vld1q_f32(lanes);
  }
  static void store_n(float* p, Vec v, int n) {
    if (n == W) return store(p, v);
    float lanes[W];
    vst1q_f32(lanes, v.v);
    for (int i = 0; i < n; ++i) p[i] = lanes[i];
  }
  // A64's non-temporal store (STNP) stores register pairs and has no intrinsic: a plain store.
  static void stream(float* p, Vec v) { store(p, v); }
  static void stream_fence() {}
  static Vec fma(Vec a, Vec b, Vec c) { return vfmaq_f32(c.v, a.v, b.v); }
  static float sum(Vec v) { return vaddvq_f32(v.v); }
  // rows[0..3] <- their transpose: 2 x 2 blocks of lanes (trn), then of lane pairs (64-bit trn).
  static void transpose(Vec rows[W]) {
    const float32x4x2_t a = vtrnq_f32(rows[0].v, rows[1].v), b = vtrnq_f32(rows[2].v, rows[3].v);
    const auto lo = [](float32x4_t x, float32x4_t y) {
      return vreinterpretq_f32_f64(vtrn1q_f64(vreinterpretq_f64_f32(x), vreinterpretq_f64_f32(y)));
    };
    const auto hi = [](float32x4_t x, float32x4_t y) {
      return vreinterpretq_f32_f64(vtrn2q_f64(vreinterpretq_f64_f32(x), vreinterpretq_f64_f32(y)));
    };
    rows[0] = lo(a.val[0], b.val[0]);
    rows[1] = lo(a.val[1], b.val[1]);
    rows[2] = hi(a.val[0], b.val[0]);
    rows[3] = hi(a.val[1], b.val[1]);
  }
  static uint32_t bits(Mask m) {
    const uint32_t lane_bit[W] = {1, 2, 4, 8};
    return vaddvq_u32(vandq_u32(m.m, vld1q_u32(lane_bit)));
  }
  static Mask mask(uint32_t bits) {
    const uint32_t lane_bit[W] = {1, 2, 4, 8};
    return {vtstq_u32(vdupq_n_u32(bits), vld1q_u32(lane_bit))};
  }
  // FMIN/FMAX give NaN when either operand is NaN.
  static Vec min(Vec a, Vec b) { return vminq_f32(a.v, b.v); }
  static Vec max(Vec a, Vec b) { return vmaxq_f32(a.v, b.v); }
  static Vec round(Vec x) { return vrndnq_f32(x.v); }
  // p * 2^k as p * 2^(k/2) * 2^(k - k/2): both factors are normal floats for k in [-150, 128], the
  // first product is exact, and only the second rounds (into the subnormals or to inf as needed).
  static Vec ldexp(Vec p, Vec k) {
    const int32x4_t ki = vcvtq_s32_f32(k.v);
    const int32x4_t k1 = vshrq_n_s32(ki, 1), k2 = vsubq_s32(ki, k1);
    const int32x4_t bias = vdupq_n_s32(127);
    const float32x4_t f1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k1, bias), 23));
    const float32x4_t f2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(k2, bias), 23));
    return vmulq_f32(vmulq_f32(p.v, f1), f2);
  }
};

inline Vec exp(Vec x) { return exp_approx<Simd>(x); }
inline Vec tanh(Vec x) { return tanh_approx<Simd>(x); }

}  // namespace neon
}  // namespace dmup
