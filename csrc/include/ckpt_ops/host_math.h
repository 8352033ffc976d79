// Host-only (CPU) fp32 exp / tanh / normal CDF that `#pragma omp simd` can
// vectorise: branch-free arithmetic (selects, no calls, no tables), exponent
// built by integer bit manipulation. Used by ckpt_ops/activation_math.h on the
// host in place of libm's expf / tanhf / erff, which are opaque calls that keep
// the CPU activation loops scalar. The CUDA kernels keep the device libm.
//
// Only + - * / and selects, never an FMA (the host build uses
// -ffp-contract=off), so every function returns the same bits whatever vector
// width or instruction set (SSE2, AVX2) the compiler picks: a forward kernel
// and a backward kernel's recompute agree bit for bit on every machine.
//
// Accuracy (fp32, vs the exact value; measured over dense sweeps):
//   exp_:        ~1 ulp (Cephes expf polynomial, Cody-Waite reduction),
//                inf above ln(FLT_MAX), gradual underflow down to 0, NaN kept.
//   tanh_:       ~2 ulp; odd polynomial for |u| < 0.625 (no cancellation),
//                1 - 2 / (exp(2|u|) + 1) above, saturating to +-1 exactly.
//   normal_cdf:  Phi(x) = 0.5 erfc(-x / sqrt 2) to a few ulp *relative* for all
//                x, the lower tail included (0.5 (1 + erf) would cancel there):
//                erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0, the
//                Chebyshev fit of Numerical Recipes (erfcc, fractional error
//                < 1.2e-7), with -z^2 = -x^2 / 2 carried exactly (Dekker split)
//                into the exponential.
#pragma once

#include <cstdint>
#include <cstring>

namespace ckpt_ops {
namespace host_math {

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

// c ? a : b as bit operations on values both already computed. A plain `?:`
// lets the compiler sink the computation of each arm into a branch, which it
// then may not if-convert (a division could raise a trap under the default
// -ftrapping-math), and the loop stays scalar.
inline float select(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

inline double select(bool c, double a, double b) {
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
inline float exp_hilo(float hi, float lo) {
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
  const float shifted = x * kLog2e + kRound;
  const float n = shifted - kRound;
  const int32_t ni = float_to_bits(shifted) - float_to_bits(kRound);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  r = r + lo;
  // exp(r), Cephes expf: 1 + r + r^2 (1/2 + r (1/6 + ...))
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = (p * (r * r) + r) + 1.0f;
  // y * 2^n in two steps, so n in [-150, 128] never leaves the normal exponent range
  const int32_t n1 = ni >> 1, n2 = ni - n1;
  const float s1 = bits_to_float((n1 + 127) << 23), s2 = bits_to_float((n2 + 127) << 23);
  const float out = (y * s1) * s2;
  return select(hi > kMax, __builtin_inff(), out);
}

inline float exp_(float x) { return exp_hilo(x, 0.0f); }

// tanh(u), branch-free: both forms are evaluated, one selected.
inline float tanh_(float u) {
  const float a = select(u < 0.0f, -u, u);
  // |u| < 0.625: u + u^3 P(u^2) (Cephes tanhf)
  const float z = u * u;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397044138e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = (p * z) * u + u;
  // |u| >= 0.625: 1 - 2 / (exp(2|u|) + 1); exp -> inf gives exactly 1
  const float big = 1.0f - 2.0f / (exp_(a + a) + 1.0f);
  return select(a < 0.625f, small, select(u < 0.0f, -big, big));
}

// Phi(x) = 0.5 erfc(-x / sqrt 2), the standard normal CDF, few-ulp relative.
inline float normal_cdf(float x) {
  constexpr float kInvSqrt2 = 0.70710678118654752f;
  // |x| > 16: Phi underflows to 0 (or rounds to 1); clamping keeps the split finite
  float ax = select(x < 0.0f, -x, x);
  ax = select(ax > 16.0f, 16.0f, ax);
  const float z = ax * kInvSqrt2;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  // -z^2 = -ax^2 / 2 exactly as sq_hi + sq_lo: Dekker split ax = xh + xl (12 + 12 bits)
  const float c = 4097.0f * ax;
  const float xh = c - (c - ax);
  const float xl = ax - xh;
  const float sq_hi = -0.5f * (xh * xh);                        // exact
  const float sq_lo = -0.5f * ((xh + xh) * xl + xl * xl);       // tiny
  // sq_hi + p as a rounded sum plus its exact error (two-sum), into exp_hilo
  const float s = sq_hi + p;
  const float bb = s - sq_hi;
  const float err = (sq_hi - (s - bb)) + (p - bb);
  const float half_erfc = (0.5f * t) * exp_hilo(s, err + sq_lo);  // 0.5 erfc(|x| / sqrt 2)
  return select(x < 0.0f, half_erfc, 1.0f - half_erfc);
}

// exp(-x^2 / 2) with the square carried exactly (the normal density without its
// 1/sqrt(2 pi)): no error amplification by the rounding of x^2 at large |x|.
inline float exp_neg_half_sq(float x) {
  float ax = select(x < 0.0f, -x, x);
  ax = select(ax > 16.0f, 16.0f, ax);
  const float c = 4097.0f * ax;
  const float xh = c - (c - ax);
  const float xl = ax - xh;
  return exp_hilo(-0.5f * (xh * xh), -0.5f * ((xh + xh) * xl + xl * xl));
}

}  // namespace host_math
}  // namespace ckpt_ops
