// What the CUDA layer kernels of the stacks (residual_stack.cu, residual_mlp_stack.cu) share: the block
// shape, and the epilogue of a GEMM h (bias, phi, sign bits by warp vote) on feature-major (n, batch) planes
// (element (j, b) at j * batch + b).
//
// A block is one warp of kColumns consecutive batch rows (columns b) by kSlices warps; warp y takes the
// features y, y + kSlices, ... Offsets are int64, so n * batch may exceed 2^31. No torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../activations.h"

namespace dmup {
namespace cuda {
namespace {

constexpr int kColumns = 32;  // one warp: the lanes' 32 rows make two mask words
constexpr int kSlices = 8;
constexpr int kLayerThreads = kColumns * kSlices;
constexpr unsigned kFullMask = 0xffffffffu;

// One block per kColumns batch rows.
dim3 layer_grid(int64_t batch) { return dim3(static_cast<unsigned>((batch + kColumns - 1) / kColumns)); }
const dim3 kLayerBlock(kColumns, kSlices);

// h + bias at feature j, column b of an (n, batch) plane.
template <class T>
__device__ T branch_at(const T* h, const T* bias, int64_t j, int64_t batch, int64_t b) {
  return bias ? h[j * batch + b] + bias[j] : h[j * batch + b];
}

// Stores the warp's 32 bits (lane i: row b - lane + i) as the two 16-bit words they fill, of the
// `words` words of one feature. Every lane of the warp must call it.
__device__ void store_vote(uint16_t* feature_words, int64_t words, int64_t b, bool bit) {
  const unsigned vote = __ballot_sync(kFullMask, bit);
  if (threadIdx.x % 16 == 0 && b / 16 < words) feature_words[b / 16] = static_cast<uint16_t>(vote >> threadIdx.x);
}

// phi(h + bias) at feature j of n, column b (0 where the column is past the batch), and, with `mask` (the
// layer's sign-bit planes, activations.h), the sign bits of h + bias by warp vote. Every lane of the warp
// must call it.
template <class T, Activation A>
__device__ T activate_and_vote(const T* h, const T* bias, uint16_t* mask, int64_t n, int64_t batch, int64_t j,
                               int64_t b) {
  constexpr int kPlanes = mask_planes(A, Block::Post);
  const bool live = b < batch;  // the lanes past the batch still vote (as 0)
  const T hb = live ? branch_at(h, bias, j, batch, b) : T(0);
  const int64_t words = mask_words(batch);
  if constexpr (kPlanes >= 1) {
    if (mask) store_vote(mask + j * words, words, b, live && positive_sign_bit<A>(hb));
  }
  if constexpr (kPlanes == 2) {
    if (mask) store_vote(mask + (n + j) * words, words, b, live && negative_sign_bit(hb));
  }
  return Act<A>::value(hb);
}

}  // namespace
}  // namespace cuda
}  // namespace dmup
