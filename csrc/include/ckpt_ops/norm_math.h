// Per-row LayerNorm / RMSNorm math, shared by csrc/cpu/norm.cpp and
// csrc/cuda/norm.cu (and mirrored by triton_kernels/norm.py).
//
// Forward, for one row x[0..N):
//   LayerNorm: mean = sum(x)/N, var = sum((x-mean)^2)/N   (two-pass, not E[x^2]-E[x]^2)
//              rstd = 1/sqrt(var + eps),  xhat = (x - mean) * rstd
//   RMSNorm:   rstd = 1/sqrt(sum(x^2)/N + eps), xhat = x * rstd   (mean is not used)
//   y = xhat * w + b      (w, b optional)
// Backward, with g = dy * w (or dy without weight):
//   c1 = sum(g)/N (LayerNorm) or 0 (RMSNorm),  c2 = sum(g * xhat)/N
//   dx = rstd * (g - (xhat * c2 + c1))
//   dw = sum over rows of dy * xhat,  db = sum over rows of dy
// Kernels compute the row sums in whatever order suits the device and call
// these functions for everything else, so the CPU tests execute the very
// expressions the CUDA kernels run.
#pragma once

#include "ckpt_ops/macros.h"

namespace ckpt_ops {
namespace norm {

// Statistics from the row sums. For LayerNorm `sq_dev_sum` is sum((x-mean)^2);
// for RMSNorm it is sum(x^2).
template <typename acc>
CKPT_HD_INLINE acc mean_from_sum(acc sum, int64_t n) {
  return sum / static_cast<acc>(n);
}

template <typename acc>
CKPT_HD_INLINE acc rstd_from_sq_sum(acc sq_sum, int64_t n, acc eps) {
  return inv_sqrt(sq_sum / static_cast<acc>(n) + eps);
}

// The row's rstd as every kernel stores it. LayerNorm: a sum of squared deviations that
// overflowed to +inf (|x| >~ 1e19 in fp32) would give rstd = 0 and a silently all-zero (bias)
// row; eager PyTorch's layer_norm returns NaN there (from ~1e20 on, by its vector width), so the
// rstd is made NaN: sq_sum - sq_sum is 0 for a finite sum and NaN for an infinite one, and adding
// 0 leaves r exact. RMSNorm keeps 1/sqrt(inf) = 0, which is what eager's rms_norm returns.
template <bool kRms, typename acc>
CKPT_HD_INLINE acc row_rstd(acc sq_sum, int64_t n, acc eps) {
  const acc r = rstd_from_sq_sum(sq_sum, n, eps);
  return kRms ? r : r + (sq_sum - sq_sum);
}

// The value whose square the second pass sums: x - mean (LN) or x (RMS).
template <bool kRms, typename acc>
CKPT_HD_INLINE acc centered(acc x, acc mean) {
  return kRms ? x : x - mean;
}

template <bool kRms, typename acc>
CKPT_HD_INLINE acc xhat(acc x, acc mean, acc rstd) {
  return mul_rn(centered<kRms>(x, mean), rstd);
}

// y = xhat * w + b. has_weight/has_bias select the affine terms; the same
// expression (same rounding) is used by every forward and every recompute.
template <typename acc>
CKPT_HD_INLINE acc affine(acc xh, acc w, acc b, bool has_weight, bool has_bias) {
  acc y = has_weight ? mul_rn(xh, w) : xh;
  return has_bias ? add_rn(y, b) : y;
}

// The per-row constants of the input gradient.
template <bool kRms, typename acc>
CKPT_HD_INLINE void dx_coeffs(acc sum_g, acc sum_g_xhat, int64_t n, acc* c1, acc* c2) {
  const acc inv_n = static_cast<acc>(1) / static_cast<acc>(n);
  *c1 = kRms ? static_cast<acc>(0) : sum_g * inv_n;
  *c2 = sum_g_xhat * inv_n;
}

template <typename acc>
CKPT_HD_INLINE acc dx(acc g, acc xh, acc rstd, acc c1, acc c2) {
  return rstd * (g - (xh * c2 + c1));
}

}  // namespace norm
}  // namespace ckpt_ops
