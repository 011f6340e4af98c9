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

  static Vec zero() { return T(0); }
  static Vec broadcast(T v) { return v; }
  static Vec load(const T* p) { return *p; }
  static void store(T* p, Vec v) { *p = v; }
  static Vec load_n(const T* p, int) { return *p; }
  static void store_n(T* p, Vec v, int) { *p = v; }
  static Vec fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static T sum(Vec v) { return v; }
  static void transpose(Vec*) {}
  // One bit per row in 16-bit words; words start zeroed, and a word is only written by one tile.
  static void store_bits(uint16_t* words, int64_t row, Mask m) {
    if (m) words[row / 16] = static_cast<uint16_t>(words[row / 16] | (1u << (row % 16)));
  }
  static Mask load_bits(const uint16_t* words, int64_t row) { return (words[row / 16] >> (row % 16)) & 1u; }
};

}  // namespace dmup
