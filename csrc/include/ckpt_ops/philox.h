// Counter-based random bits for dropout: Philox4x32-10 (Salmon et al., SC'11),
// shared by csrc/cpu/mlp.cpp and csrc/cuda/mlp.cu and identical, bit for bit,
// to ckpt_ops/reference.py (philox4x32_10, dropout_bits) and the Triton kernels.
//
// Element i of a contiguous tensor (flat row-major index, int64 >= 0) draws
// word (i mod 4) of Philox4x32-10 with
//   counter (c0, c1, c2, c3) = (lo32(i / 4), hi32(i / 4), 0, 0),  key (k0, k1) = (lo32(seed), hi32(seed))
// and ten rounds of
//   c0' = hi(M1 * c2) ^ c1 ^ k0    c1' = lo(M1 * c2)
//   c2' = hi(M0 * c0) ^ c3 ^ k1    c3' = lo(M0 * c0)
//   k0 += W0, k1 += W1             (all mod 2^32)
// so one evaluation serves four neighbouring elements (the CPU kernel evaluates
// it once per four; a GPU thread evaluates it and keeps its word: memory-bound).
// Keep rule: keep(i) = bits(i) >= threshold(p), threshold = min(floor(p 2^32), 2^32 - 1),
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

struct Words {
  uint32_t w0, w1, w2, w3;
};

// Philox4x32-10 for counter (lo(counter), hi(counter), 0, 0) and key (lo(seed), hi(seed)).
CKPT_HD_INLINE Words philox4x32_10(int64_t seed, int64_t counter) {
  const uint64_t s = static_cast<uint64_t>(seed), i = static_cast<uint64_t>(counter);
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
  return Words{c0, c1, c2, c3};
}

// The random bits of flat element `index` (one evaluation per call: the GPU path).
CKPT_HD_INLINE uint32_t bits_at(int64_t seed, int64_t index) {
  const Words w = philox4x32_10(seed, index >> 2);
  const int k = static_cast<int>(index & 3);
  return k < 2 ? (k == 0 ? w.w0 : w.w1) : (k == 2 ? w.w2 : w.w3);
}

// bits[4 j + k] = word k at counter (first_counter + j), j < n_counters: the bits of elements
// 4 first_counter ... 4 (first_counter + n_counters) - 1, one evaluation per four (the CPU path;
// the loop over j vectorises).
CKPT_HD_INLINE void fill_bits(int64_t seed, int64_t first_counter, int64_t n_counters, uint32_t* bits) {
#if !defined(__CUDA_ARCH__)
#pragma omp simd
#endif
  for (int64_t j = 0; j < n_counters; ++j) {
    const Words w = philox4x32_10(seed, first_counter + j);
    bits[4 * j] = w.w0;
    bits[4 * j + 1] = w.w1;
    bits[4 * j + 2] = w.w2;
    bits[4 * j + 3] = w.w3;
  }
}

// Elements with Philox value >= threshold are kept: min(floor(p * 2^32), 2^32 - 1).
CKPT_HD_INLINE uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
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
// CUDA kernels) given the element's random bits: residual + keep * y * scale, or residual + y
// when p == 0 (kRng false: `bits` unused).
template <bool kRng, bool kResidual, typename acc>
CKPT_HD_INLINE acc dropout_element(acc y, acc residual, uint32_t bits, uint32_t threshold, acc scale) {
  if constexpr (kRng) {
    return dropout_apply<kResidual>(y, residual, bits >= threshold, scale);
  } else {
    return kResidual ? add_rn(residual, y) : y;
  }
}

}  // namespace philox
}  // namespace ckpt_ops
