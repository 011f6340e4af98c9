// The AVX-512 traits (csrc/cpu/simd_avx512.h) on a CPU without AVX-512, for stack_kernel_check.cpp:
// force-included before it (run_check.py's avx512-simde target), so that the AVX-512 instantiation of the
// kernel core is checked on every x86-64 machine, not only on those that run AVX-512.
//
// SIMDe (Debian's libsimde-dev) implements the AVX-512 intrinsics in portable code (here on AVX2) under
// their own names when SIMDE_ENABLE_NATIVE_ALIASES is set. Debian 12's SIMDe 0.7.4 lacks five of those
// simd_avx512.h uses, and computes scalef as a * exp2(floor(b)), which overflows at b = 128 where the
// instruction rounds the product once. This header defines those six by the instructions' definitions
// (Intel SDM: KNOTW, VMOVUPS with a zeroing or merging mask, VMOVNTPS, VSCALEFPS), and
// _mm512_reduce_add_ps in the order GCC's header adds (halves of 8, 4, then 2 and 1 lanes).
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <algorithm>
#include <cmath>

namespace dmup_simde {

inline __mmask16 knot_mask16(__mmask16 m) { return static_cast<__mmask16>(~m); }

inline simde__m512 maskz_loadu_ps(__mmask16 k, const void* p) {
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = (k >> i) & 1 ? static_cast<const float*>(p)[i] : 0.0f;
  return simde__m512_from_private(r);
}

inline void mask_storeu_ps(void* p, __mmask16 k, simde__m512 v) {
  const simde__m512_private a = simde__m512_to_private(v);
  for (int i = 0; i < 16; ++i) {
    if ((k >> i) & 1) static_cast<float*>(p)[i] = a.f32[i];
  }
}

inline float reduce_add_ps(simde__m512 v) {
  const simde__m512_private a = simde__m512_to_private(v);
  float eight[8], four[4];
  for (int i = 0; i < 8; ++i) eight[i] = a.f32[i + 8] + a.f32[i];
  for (int i = 0; i < 4; ++i) four[i] = eight[i + 4] + eight[i];
  return (four[0] + four[2]) + (four[1] + four[3]);
}

// a * 2^floor(b), rounded once; NaN in, NaN out; 0 * 2^inf and inf * 2^-inf are NaN.
inline float scalef(float a, float b) {
  if (std::isnan(a) || std::isnan(b)) return a + b;
  if (std::isinf(b)) return b > 0 ? a * b : a / -b;
  return std::ldexp(a, static_cast<int>(std::clamp(std::floor(b), -1000.0f, 1000.0f)));
}

inline simde__m512 scalef_ps(simde__m512 a, simde__m512 b) {
  const simde__m512_private x = simde__m512_to_private(a), y = simde__m512_to_private(b);
  simde__m512_private r;
  for (int i = 0; i < 16; ++i) r.f32[i] = scalef(x.f32[i], y.f32[i]);
  return simde__m512_from_private(r);
}

}  // namespace dmup_simde

#undef _knot_mask16
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#undef _mm512_reduce_add_ps
#undef _mm512_stream_ps
#undef _mm512_scalef_ps
#define _knot_mask16 dmup_simde::knot_mask16
#define _mm512_maskz_loadu_ps dmup_simde::maskz_loadu_ps
#define _mm512_mask_storeu_ps dmup_simde::mask_storeu_ps
#define _mm512_reduce_add_ps dmup_simde::reduce_add_ps
#define _mm512_stream_ps _mm512_store_ps  // the cache hint aside, an aligned store
#define _mm512_scalef_ps dmup_simde::scalef_ps
