// Host-only (CPU) fp32 exp / tanh / normal CDF that `#pragma omp simd` can
// vectorise: branch-free arithmetic (selects, no calls, no tables), exponent
// built by integer bit manipulation. Used by ckpt_ops/activation_math.h on the
// host in place of libm's expf / tanhf / erff, which are opaque calls that keep
// the CPU activation loops scalar. The CUDA kernels keep the device libm.
//
// Only + - * /, selects and explicit fused multiply-adds (fma_ below: one
// rounding, so an exact, IEEE-defined result); nothing is left to the
// compiler's contraction (the host build uses -ffp-contract=off). So every
// function returns the same bits whatever vector width or instruction set the
// compiler picks (AVX2 / AVX-512 vfmadd, or libm's correctly rounded fmaf in the
// baseline copy): a forward kernel and a backward kernel's recompute agree bit
// for bit on every machine, and so do the ISA copies of a kernel.
// Accuracy (fp32, vs the exact value; measured over dense sweeps):
//   exp_:        ~1 ulp (Cephes expf polynomial, Cody-Waite reduction),
//                inf above ln(FLT_MAX), gradual underflow down to 0, NaN kept.
//   tanh_:       ~2 ulp; odd polynomial for |u| < 0.625 (no cancellation),
//                1 - 2 / (exp(2|u|) + 1) above, saturating to +-1 exactly.
//   normal_cdf:  Phi(x) = 0.5 erfc(-x / sqrt 2) to a few ulp *relative* for all
//                x, the lower tail included (0.5 (1 + erf) would cancel there):
//                erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0, the
//                Chebyshev fit of Numerical Recipes (erfcc, fractional error
//                < 1.2e-7), with -z^2 = -x^2 / 2 carried exactly (its rounding error by an FMA)
//                into the exponential.
#pragma once

#include <cstdint>
#include <cstring>

// Always inlined, for the reason of CKPT_HD_INLINE (ckpt_ops/macros.h): out of line, each of
// these is a baseline-ISA call per element, which keeps the calling loop scalar.
#if defined(__GNUC__)
#define CKPT_HOST_MATH_INLINE inline __attribute__((always_inline))
#else
#define CKPT_HOST_MATH_INLINE inline
#endif

namespace ckpt_ops {
namespace host_math {

CKPT_HOST_MATH_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
CKPT_HOST_MATH_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// a * b + c rounded once (kFma, the default) or as a multiply and an add. The
// fused form is one vfmadd in a copy built for FMA hardware (AVX2 + FMA,
// AVX-512; ckpt_ops/cpu_isa.h), which `omp simd` vectorises, and a call to
// libm's fmaf in the baseline copy (also exact: glibc uses the FMA instruction
// where the CPU has one and an exact software form elsewhere), so that copy is
// slower, not different. Horner steps and range reductions with it take half
// the instructions and are at least as accurate (silu's forward, AVX2: 2.9 ->
// 2.3 ms per 2^20 elements). kFma = false is for code outside the ISA copies
// (the attention kernels' soft-capping tanh), where a call per step would
// cost more than the multiply and add; such code must then run its forward
// and its recompute through the same form.
template <bool kFma = true>
CKPT_HOST_MATH_INLINE float fma_(float a, float b, float c) {
  if constexpr (kFma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

// c ? a : b as bit operations on values both already computed. A plain `?:`
// lets the compiler sink the computation of each arm into a branch, which it
// then may not if-convert (a division could raise a trap under the default
// -ftrapping-math), and the loop stays scalar.
CKPT_HOST_MATH_INLINE float select(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

CKPT_HOST_MATH_INLINE double select(bool c, double a, double b) {
  const int64_t m = -static_cast<int64_t>(c);
  int64_t ai, bi;
  std::memcpy(&ai, &a, sizeof ai);
  std::memcpy(&bi, &b, sizeof bi);
  const int64_t r = (ai & m) | (bi & ~m);
  double out;
  std::memcpy(&out, &r, sizeof out);
  return out;
}

// exp(hi + lo), |lo| small against 1 (a correction term of hi). Branch-free.
template <bool kFma = true>
CKPT_HOST_MATH_INLINE float exp_hilo(float hi, float lo) {
  constexpr float kMax = 88.72283935546875f;  // largest float with exp() finite, rounded down
  constexpr float kMin = -104.0f;             // exp() < FLT_TRUE_MIN / 2 below: 0
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;       // 355/512: n * kLn2Hi exact for |n| <= 2^15
  constexpr float kLn2Lo = -2.12194440e-4f;    // ln 2 - kLn2Hi
  constexpr float kRound = 12582912.0f;        // 1.5 * 2^23: adding it rounds to an integer
  // clamp (NaN passes through: both comparisons false)
  float x = select(hi > kMax, kMax, hi);
  x = select(x < kMin, kMin, x);
  // n = rint(x / ln 2), r = x - n ln 2 + lo, |r| <~ ln2 / 2
  const float shifted = fma_<kFma>(x, kLog2e, kRound);
  const float n = shifted - kRound;
  const int32_t ni = float_to_bits(shifted) - float_to_bits(kRound);
  float r = fma_<kFma>(-n, kLn2Hi, x);  // exact (n kLn2Hi and the difference are representable)
  r = fma_<kFma>(-n, kLn2Lo, r);
  r = r + lo;
  // exp(r), Cephes expf: 1 + r + r^2 (1/2 + r (1/6 + ...))
  float p = 1.9875691500e-4f;
  p = fma_<kFma>(p, r, 1.3981999507e-3f);
  p = fma_<kFma>(p, r, 8.3334519073e-3f);
  p = fma_<kFma>(p, r, 4.1665795894e-2f);
  p = fma_<kFma>(p, r, 1.6666665459e-1f);
  p = fma_<kFma>(p, r, 5.0000001201e-1f);
  const float y = fma_<kFma>(p, r * r, r) + 1.0f;
  // y * 2^n in two steps, so n in [-150, 128] never leaves the normal exponent range
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const float s1 = bits_to_float((n1 + 127) << 23), s2 = bits_to_float((n2 + 127) << 23);
  const float out = (y * s1) * s2;
  return select(hi > kMax, __builtin_inff(), out);
}

template <bool kFma = true>
CKPT_HOST_MATH_INLINE float exp_(float x) { return exp_hilo<kFma>(x, 0.0f); }

// tanh(u), branch-free: both forms are evaluated, one selected.
template <bool kFma = true>
CKPT_HOST_MATH_INLINE float tanh_(float u) {
  const float a = select(u < 0.0f, -u, u);
  // |u| < 0.625: u + u^3 P(u^2) (Cephes tanhf)
  const float z = u * u;
  float p = -5.70498872745e-3f;
  p = fma_<kFma>(p, z, 2.06390887954e-2f);
  p = fma_<kFma>(p, z, -5.37397044138e-2f);
  p = fma_<kFma>(p, z, 1.33314422036e-1f);
  p = fma_<kFma>(p, z, -3.33332819422e-1f);
  const float small = fma_<kFma>(p * z, u, u);
  // |u| >= 0.625: 1 - 2 / (exp(2|u|) + 1); exp -> inf gives exactly 1
  const float big = 1.0f - 2.0f / (exp_<kFma>(a + a) + 1.0f);
  return select(a < 0.625f, small, select(u < 0.0f, -big, big));
}

// Phi(x) = 0.5 erfc(-x / sqrt 2), the standard normal CDF, few-ulp relative.
CKPT_HOST_MATH_INLINE float normal_cdf(float x) {
  constexpr float kInvSqrt2 = 0.70710678118654752f;
  // |x| > 16: Phi underflows to 0 (or rounds to 1); clamping keeps the split finite
  float ax = select(x < 0.0f, -x, x);
  ax = select(ax > 16.0f, 16.0f, ax);
  const float z = ax * kInvSqrt2;
  const float t = 1.0f / fma_(0.5f, z, 1.0f);
  float p = 0.17087277f;
  p = fma_(p, t, -0.82215223f);
  p = fma_(p, t, 1.48851587f);
  p = fma_(p, t, -1.13520398f);
  p = fma_(p, t, 0.27886807f);
  p = fma_(p, t, -0.18628806f);
  p = fma_(p, t, 0.09678418f);
  p = fma_(p, t, 0.37409196f);
  p = fma_(p, t, 1.00002368f);
  p = fma_(p, t, -1.26551223f);
  // -z^2 = -ax^2 / 2 exactly as sq_hi + sq_lo: ax^2 = sq + fma(ax, ax, -sq) exactly
  const float sq = ax * ax;
  const float sq_hi = -0.5f * sq;                     // exact
  const float sq_lo = -0.5f * fma_(ax, ax, -sq);      // tiny
  // sq_hi + p as a rounded sum plus its exact error (two-sum), into exp_hilo
  const float s = sq_hi + p;
  const float bb = s - sq_hi;
  const float err = (sq_hi - (s - bb)) + (p - bb);
  const float half_erfc = (0.5f * t) * exp_hilo(s, err + sq_lo);  // 0.5 erfc(|x| / sqrt 2)
  return select(x < 0.0f, half_erfc, 1.0f - half_erfc);
}

// exp(-x^2 / 2) with the square carried exactly (the normal density without its
// 1/sqrt(2 pi)): no error amplification by the rounding of x^2 at large |x|.
CKPT_HOST_MATH_INLINE float exp_neg_half_sq(float x) {
  float ax = select(x < 0.0f, -x, x);
  ax = select(ax > 16.0f, 16.0f, ax);
  const float sq = ax * ax;
  return exp_hilo(-0.5f * sq, -0.5f * fma_(ax, ax, -sq));
}

}  // namespace host_math
}  // namespace ckpt_ops
