// SIMD traits of width 1: plain scalars. The portable fallback of the stack kernel, and its float64
// path. See simd_avx512.h for the interface every traits type provides.
#pragma once

#include <cstdint>

namespace dmup {

template <class Scalar>
struct ScalarSimd {
  using T = Scalar;
  using Vec = Scalar;
  using Mask = bool;
  static constexpr int W = 1;
  // Scalars in the 16 registers of x86-64 SSE (or Arm's 32): 12 accumulators, as on AVX2.
  static constexpr int kTileVectors = 3;
  static constexpr int kTileRows[kTileVectors] = {12, 6, 4};

  static Vec zero() { return T(0); }
  static Vec broadcast(T v) { return v; }
  static Vec load(const T* p) { return *p; }
  static void store(T* p, Vec v) { *p = v; }
  static Vec load_n(const T* p, int) { return *p; }
  static void store_n(T* p, Vec v, int) { *p = v; }
  static void stream(T* p, Vec v) { *p = v; }  // no non-temporal scalar store worth having
  static void stream_fence() {}
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static T sum(Vec v) { return v; }
  static void transpose(Vec*) {}
  static uint32_t bits(Mask m) { return m ? 1u : 0u; }
  static Mask mask(uint32_t bits) { return (bits & 1u) != 0; }
};

}  // namespace dmup
