// exp and tanh of float32 vectors, written once over a SIMD traits type V (simd_avx512.h,
// simd_avx2.h, simd_neon.h), so every instruction set computes them with the same algorithm and
// accuracy. V provides min/max (NaN in either operand gives NaN or the second operand, which is x
// below), round (to nearest, ties to even), fma and ldexp(p, k) = p * 2^k for integral k in
// [-150, 128], rounded once (correctly rounded into the subnormal range, inf above the range).
#pragma once

namespace dmup {

// Inputs clamped to this range: e^x rounds to 0 below -103.97 and overflows above 88.72, so the
// clamped reduction gives exactly 0 and inf there, as std::exp does (then silu(-inf) = -inf * 0 is
// NaN, as in torch).
constexpr float kExpClampLow = -104.0f;
constexpr float kExpClampHigh = 89.0f;

// e^x: Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2 (ln2 split into a part exact in float and a
// correction), a degree-7 polynomial for e^r (Cephes coefficients, about 1 ulp), then 2^k.
template <class V>
inline typename V::Vec exp_approx(typename V::Vec x) {
  using Vec = typename V::Vec;
  const Vec t = V::min(Vec(kExpClampHigh), V::max(Vec(kExpClampLow), x));
  const Vec k = V::round(t * Vec(1.44269504088896341f));
  Vec r = V::fma(k, Vec(-0.693359375f), t);
  r = V::fma(k, Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  p = V::fma(p, r, Vec(1.3981999507e-3f));
  p = V::fma(p, r, Vec(8.3334519073e-3f));
  p = V::fma(p, r, Vec(4.1665795894e-2f));
  p = V::fma(p, r, Vec(1.6666665459e-1f));
  p = V::fma(p, r, Vec(5.0000001201e-1f));
  p = V::fma(p, r * r, r + Vec(1.0f));
  return V::ldexp(p, k);
}

// tanh(x) = 1 - 2 / (e^{2x} + 1): exact limits at +-inf, absolute error about 1e-7 near 0.
template <class V>
inline typename V::Vec tanh_approx(typename V::Vec x) {
  using Vec = typename V::Vec;
  const Vec one(1.0f);
  return one - Vec(2.0f) / (exp_approx<V>(x + x) + one);
}

}  // namespace dmup
