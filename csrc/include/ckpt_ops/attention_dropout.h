// Attention-probability dropout: the keep bits and the per-element math shared
// by the CPU kernel (csrc/cpu/attention.cpp) and any device kernel, identical
// to ckpt_ops/reference.py (attention_dropout_keep, attention_fwd/bwd).
//
// Element (b, h, q, k) of the (B, H, S, S) probabilities draws the Philox bits
// of flat index ((b * H + h) * S + q) * S + k (philox.h: word index % 4 at
// counter index / 4, key = the call's seed) and is kept when
// bits >= dropout_threshold(p). Nothing is stored: backward regenerates the
// same bits from the same seed.
//
//   forward:   Pd = keep ? P * z : 0,  O = Pd V          (z = 1 / (1 - p), P the undropped softmax)
//   backward:  dV = Pd^T dO,  dPd = dO V^T,  dP = keep ? dPd * z : 0,
//              dS = P * (dP - delta),  delta = rowsum(dO * O) (= rowsum(P * dP))
#pragma once

#include <cstdint>

#include "ckpt_ops/macros.h"
#include "ckpt_ops/philox.h"

namespace ckpt_ops {
namespace attn_dropout {

// Flat index of element (b, h, q, 0): the row's first key.
CKPT_HD_INLINE int64_t row_index(int64_t b, int64_t h, int64_t q, int64_t H, int64_t S) {
  return ((b * H + h) * S + q) * S;
}

// Bits of flat elements [start, start + n) (n >= 1): fills buf with whole Philox
// evaluations (four words each) covering them and returns the pointer to element
// `start`'s bits. buf needs room for 4 * (n / 4 + 2) words.
CKPT_HD_INLINE const uint32_t* row_bits(int64_t seed, int64_t start, int64_t n, uint32_t* buf) {
  const int64_t c0 = start >> 2, c1 = (start + n - 1) >> 2;
  philox::fill_bits(seed, c0, c1 - c0 + 1, buf);
  return buf + (start & 3);
}

// Forward: the dropped, rescaled probability fed to P V.
template <typename acc>
CKPT_HD_INLINE acc dropped(acc p, uint32_t bits, uint32_t threshold, acc z) {
  return bits >= threshold ? mul_rn(p, z) : acc(0);
}

// Backward: dS = P * (keep ? dPd * z : 0) - delta) for one element.
template <typename acc>
CKPT_HD_INLINE acc grad_scores(acc p, acc dpd, acc delta, uint32_t bits, uint32_t threshold, acc z) {
  const acc dp = bits >= threshold ? mul_rn(dpd, z) : acc(0);
  return mul_rn(p, dp - delta);
}

}  // namespace attn_dropout
}  // namespace ckpt_ops
