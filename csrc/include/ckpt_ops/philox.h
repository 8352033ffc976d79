// Counter-based random bits for dropout: Philox4x32-10 (Salmon et al., SC'11),
// shared by csrc/cpu/mlp.cpp and csrc/cuda/mlp.cu and identical, bit for bit,
// to ckpt_ops/reference.py philox_uint32 and the Triton kernels (tl.randint).
//
// Element i of a contiguous tensor (flat row-major index, int64) draws the
// first 32-bit output of Philox4x32-10 with
//   counter (c0, c1, c2, c3) = (lo32(i), hi32(i), 0, 0),  key (k0, k1) = (lo32(seed), hi32(seed))
// and ten rounds of
//   c0' = hi(M1 * c2) ^ c1 ^ k0    c1' = lo(M1 * c2)
//   c2' = hi(M0 * c0) ^ c3 ^ k1    c3' = lo(M0 * c0)
//   k0 += W0, k1 += W1             (all mod 2^32)
// Keep rule: keep(i) = philox(i) >= threshold(p), threshold = min(floor(p 2^32), 2^32 - 1),
// so P(keep) = 1 - p up to 2^-32. Kept values are scaled by 1/(1 - p), computed
// in double and rounded once to the accumulation type.
#pragma once

#include <cstring>
#include <type_traits>

#include "ckpt_ops/macros.h"

namespace ckpt_ops {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

CKPT_HD_INLINE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First 32-bit output of Philox4x32-10 for counter (lo(index), hi(index), 0, 0)
// and key (lo(seed), hi(seed)).
CKPT_HD_INLINE uint32_t uint32_at(int64_t seed, int64_t index) {
  const uint64_t s = static_cast<uint64_t>(seed), i = static_cast<uint64_t>(index);
  uint32_t c0 = static_cast<uint32_t>(i), c1 = static_cast<uint32_t>(i >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi_b = mulhi32(kM1, c2), lo_b = kM1 * c2;
    const uint32_t hi_a = mulhi32(kM0, c0), lo_a = kM0 * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kW0;
    k1 += kW1;
  }
  return c0;
}

// Elements with Philox value >= threshold are kept: min(floor(p * 2^32), 2^32 - 1).
CKPT_HD_INLINE uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

CKPT_HD_INLINE bool keep(int64_t seed, int64_t index, uint32_t threshold) {
  return uint32_at(seed, index) >= threshold;
}

// 1 / (1 - p) computed in double, rounded once to acc.
template <typename acc>
CKPT_HD_INLINE acc dropout_scale(double p) {
  return static_cast<acc>(1.0 / (1.0 - p));
}

// out = residual + (keep ? y * scale : 0), in acc, as reference.dropout_fwd
// (residual.to(acc) + where(keep, y * scale, 0)); without residual, the
// where() term alone.
template <bool kResidual, typename acc>
CKPT_HD_INLINE acc dropout_apply(acc y, acc residual, bool kept, acc scale) {
#if defined(__CUDA_ARCH__)
  const acc v = kept ? mul_rn(y, scale) : acc(0);
#else
  // Branch-free select (bit mask) so the host loop vectorises: a `?:` on floats stays scalar
  // under -ftrapping-math. Same value as the select: +0 when dropped, y * scale when kept.
  using bits_t = std::conditional_t<sizeof(acc) == 4, uint32_t, uint64_t>;
  const bits_t mask = static_cast<bits_t>(0) - static_cast<bits_t>(kept);
  bits_t b;
  const acc prod = mul_rn(y, scale);
  std::memcpy(&b, &prod, sizeof(acc));
  b &= mask;
  acc v;
  std::memcpy(&v, &b, sizeof(acc));
#endif
  return kResidual ? add_rn(residual, v) : v;
}

// One output element of dropout_fwd / dropout_bwd (the whole per-element body of the CPU and
// CUDA kernels): residual + keep * y * scale with Philox, or residual + y when p == 0.
template <bool kRng, bool kResidual, typename acc>
CKPT_HD_INLINE acc dropout_element(acc y, acc residual, int64_t seed, int64_t index, uint32_t threshold,
                                   acc scale) {
  if constexpr (kRng) {
    return dropout_apply<kResidual>(y, residual, keep(seed, index, threshold), scale);
  } else {
    return kResidual ? add_rn(residual, y) : y;
  }
}

}  // namespace philox
}  // namespace ckpt_ops
