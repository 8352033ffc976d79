// Per-element activation math of the MLP ops, shared by csrc/cpu/mlp.cpp and
// csrc/cuda/mlp.cu (and mirrored, expression by expression, by
// ckpt_ops/reference.py act_and_grad). Codes (ckpt_ops/_consts.py):
//   0 gelu (erf):  f = x * Phi(x),  Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))
//                  f' = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)
//   1 gelu_tanh:   t = tanh(sqrt(2/pi) * (x + c x^3)),  c = 0.044715
//                  f = 0.5 x (1 + t)
//                  f' = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 c x^2)
//   2 relu:        f = max(x, 0),  f' = [x > 0]
//   3 silu:        s = 1 / (1 + exp(-x)),  f = x s,  f' = s (1 + x (1 - s))
//
// Fused per-element forms (h the fc1 / "up" output, g the gate, da = dL/da):
//   non-gated  forward  a = f(h)
//              backward a = f(h),      dh = da * f'(h)
//   gated      forward  a = f(g) * h
//              backward a = f(g) * h,  dh = da * f(g),  dg = (da * h) * f'(g)
// The `a` of a forward kernel and the `a` a backward kernel recomputes go
// through the same `value_*` helper, so the recompute is bitwise identical to
// the forward on the same device (no FMA contraction: mul_rn/add_rn here,
// -ffp-contract=off on the host, --fmad=false for nvcc). `acc` is float or
// double (ckpt_ops::acc_t); constants are rounded once to `acc`, as torch
// rounds a Python float multiplying an fp32 tensor.
//
// Transcendentals: the device code and the fp64 host code call libm (erff /
// tanhf / expf on the GPU, erf / tanh / exp on the host). The fp32 host code
// calls ckpt_ops/host_math.h instead (host-only, behind #if !__CUDA_ARCH__):
// branch-free exp / tanh / Phi (their Horner steps written as exact FMAs) that
// `omp simd` vectorises, where libm calls
// would keep the CPU loops scalar. Two fp32 host terms are evaluated in a
// mathematically equal but more accurate form than the contract's expression:
//   Phi(x)          0.5 erfc(-x / sqrt 2)  (no cancellation of 1 + erf for x << 0)
//   exp(-x^2 / 2)   with x^2 carried exactly (no amplified rounding of x^2)
#pragma once

#include "ckpt_ops/macros.h"
#if !defined(__CUDA_ARCH__)
#include "ckpt_ops/host_math.h"
#endif

namespace ckpt_ops {
namespace act {

enum Code : int { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };
constexpr int kNumActivations = 4;

constexpr double kInvSqrt2 = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;
constexpr double kSqrt2OverPi = 0.7978845608028654;
constexpr double kGeluTanhC = 0.044715;

template <typename acc>
CKPT_HD_INLINE acc k(double c) {
  return static_cast<acc>(c);
}

// tanh / exp overloads: libm on the device and for fp64, host_math for fp32 on
// the host.
CKPT_HD_INLINE double tanh_(double x) { return tanh(x); }
CKPT_HD_INLINE double exp_(double x) { return exp(x); }
#if defined(__CUDA_ARCH__)
CKPT_HD_INLINE float tanh_(float x) { return tanhf(x); }
CKPT_HD_INLINE float exp_(float x) { return expf(x); }
#else
CKPT_HD_INLINE float tanh_(float x) { return host_math::tanh_(x); }
CKPT_HD_INLINE float exp_(float x) { return host_math::exp_(x); }
#endif

// Phi(x) = 0.5 * (1 + erf(x * (1/sqrt 2))), the contract's expression; on the
// host in fp32, 0.5 erfc(-x / sqrt 2) (host_math::normal_cdf).
CKPT_HD_INLINE double normal_cdf_(double x) {
  return mul_rn(0.5, add_rn(1.0, erf(mul_rn(x, kInvSqrt2))));
}
// exp(-x^2 / 2) as exp((-0.5 * x) * x); on the host in fp32 with x^2 carried
// exactly (host_math::exp_neg_half_sq).
CKPT_HD_INLINE double exp_neg_half_sq_(double x) { return exp(mul_rn(mul_rn(-0.5, x), x)); }
#if defined(__CUDA_ARCH__)
CKPT_HD_INLINE float normal_cdf_(float x) {
  return mul_rn(0.5f, add_rn(1.0f, erff(mul_rn(x, k<float>(kInvSqrt2)))));
}
CKPT_HD_INLINE float exp_neg_half_sq_(float x) { return expf(mul_rn(mul_rn(-0.5f, x), x)); }
#else
CKPT_HD_INLINE float normal_cdf_(float x) { return host_math::normal_cdf(x); }
CKPT_HD_INLINE float exp_neg_half_sq_(float x) { return host_math::exp_neg_half_sq(x); }
#endif

// c ? 1 : 0. On the host as bit operations: a `?:` of constants lets the
// compiler turn `da * df` into a branch around `da * 0`, which keeps the loop
// scalar (it may not speculate a multiplication that could trap).
template <typename acc>
CKPT_HD_INLINE acc indicator_(bool c) {
#if defined(__CUDA_ARCH__)
  return c ? acc(1) : acc(0);
#else
  return host_math::select(c, acc(1), acc(0));
#endif
}

// ---- shared intermediates: the single source of every value f(x) ----------
// gelu: Phi(x)
template <typename acc>
CKPT_HD_INLINE acc gelu_cdf(acc x) {
  return normal_cdf_(x);
}
// gelu_tanh: t = tanh(sqrt(2/pi) * (x + ((c * x) * x) * x))
template <typename acc>
CKPT_HD_INLINE acc gelu_tanh_t(acc x) {
  const acc cube = mul_rn(mul_rn(mul_rn(k<acc>(kGeluTanhC), x), x), x);
  return tanh_(mul_rn(k<acc>(kSqrt2OverPi), add_rn(x, cube)));
}
// silu: s = 1 / (1 + exp(-x))
template <typename acc>
CKPT_HD_INLINE acc sigmoid(acc x) {
  return acc(1) / add_rn(acc(1), exp_(-x));
}

// f(x) from the intermediate above (`m` = Phi, t or s; unused for relu).
template <int kAct, typename acc>
CKPT_HD_INLINE acc value_from(acc x, acc m) {
  if constexpr (kAct == kGelu || kAct == kSilu) {
    return mul_rn(x, m);
  } else if constexpr (kAct == kGeluTanh) {
    return mul_rn(mul_rn(k<acc>(0.5), x), add_rn(acc(1), m));
  } else {
    return x < acc(0) ? acc(0) : x;  // max(x, 0); NaN propagates
  }
}

template <int kAct, typename acc>
CKPT_HD_INLINE acc intermediate(acc x) {
  if constexpr (kAct == kGelu) {
    return gelu_cdf(x);
  } else if constexpr (kAct == kGeluTanh) {
    return gelu_tanh_t(x);
  } else if constexpr (kAct == kSilu) {
    return sigmoid(x);
  } else {
    return acc(0);
  }
}

// f(x)
template <int kAct, typename acc>
CKPT_HD_INLINE acc value(acc x) {
  return value_from<kAct>(x, intermediate<kAct>(x));
}

// f(x) (bitwise equal to value(x)) and f'(x).
template <int kAct, typename acc>
CKPT_HD_INLINE void value_and_grad(acc x, acc* f, acc* df) {
  const acc m = intermediate<kAct>(x);
  *f = value_from<kAct>(x, m);
  if constexpr (kAct == kGelu) {
    // Phi + (x * exp((-0.5 * x) * x)) * (1/sqrt(2 pi))
    const acc e = exp_neg_half_sq_(x);
    *df = add_rn(m, mul_rn(mul_rn(x, e), k<acc>(kInvSqrt2Pi)));
  } else if constexpr (kAct == kGeluTanh) {
    // 0.5 (1 + t) + (((0.5 x) (1 - t t)) sqrt(2/pi)) (1 + ((3c) x) x)
    const acc left = mul_rn(k<acc>(0.5), add_rn(acc(1), m));
    const acc sech2 = acc(1) - mul_rn(m, m);
    const acc poly = add_rn(acc(1), mul_rn(mul_rn(k<acc>(3.0 * kGeluTanhC), x), x));
    *df = add_rn(left, mul_rn(mul_rn(mul_rn(mul_rn(k<acc>(0.5), x), sech2), k<acc>(kSqrt2OverPi)), poly));
  } else if constexpr (kAct == kRelu) {
    *df = indicator_<acc>(x > acc(0));  // [x > 0]
  } else {
    // s (1 + x (1 - s))
    *df = mul_rn(m, add_rn(acc(1), mul_rn(x, acc(1) - m)));
  }
}

// ---- the fused per-element forms used by the kernels -----------------------
// Non-gated: a = f(h).
template <int kAct, typename acc>
CKPT_HD_INLINE acc fwd(acc h) {
  return value<kAct>(h);
}
// Non-gated backward: a = f(h) (== fwd(h) bitwise), dh = da * f'(h).
template <int kAct, typename acc>
CKPT_HD_INLINE void bwd(acc da, acc h, acc* a, acc* dh) {
  acc f, df;
  value_and_grad<kAct>(h, &f, &df);
  *a = f;
  *dh = mul_rn(da, df);
}

// Gated: a = f(g) * h.
template <int kAct, typename acc>
CKPT_HD_INLINE acc gated_fwd(acc h, acc g) {
  return mul_rn(value<kAct>(g), h);
}
// Gated backward: a = f(g) * h (== gated_fwd bitwise), dh = da * f(g),
// dg = (da * h) * f'(g).
template <int kAct, typename acc>
CKPT_HD_INLINE void gated_bwd(acc da, acc h, acc g, acc* a, acc* dh, acc* dg) {
  acc f, df;
  value_and_grad<kAct>(g, &f, &df);
  *a = mul_rn(f, h);
  *dh = mul_rn(da, f);
  *dg = mul_rn(mul_rn(da, h), df);
}

}  // namespace act
}  // namespace ckpt_ops
