// Sliding-window attention and logit soft-capping: the per-element math shared
// by the CPU kernel (csrc/cpu/attention.cpp) and any device kernel, identical
// to ckpt_ops/reference.py (attention_valid, attention_fwd/bwd).
//
// window w > 0 (causal only): query i sees key j iff j <= i and i - j < w,
//   transformers' sliding_window_overlay (kv_idx > q_idx - w); w = 0: no window.
//   The keys of query i are [first_key(i, w), i]; a tile of queries [q0, q1)
//   needs keys [first_key(q0, w), q1) only (blocks outside are skipped).
// softcap c > 0: s = c * tanh(raw / c) with raw = scale * q.k (Gemma2's eager
//   attention); the softmax, lse and dropout see s. Backward: t = tanh(raw / c)
//   recomputed from q, k (never stored), dRaw = dS * (1 - t^2).
#pragma once

#include <cstdint>

#include "ckpt_ops/macros.h"
#if !defined(__CUDA_ARCH__)
#include "ckpt_ops/host_math.h"
#endif

namespace ckpt_ops {
namespace attn_window {

// First key query q may see (0 without a window).
CKPT_HD_INLINE int64_t first_key(int64_t q, int64_t window) {
  return (window > 0 && q - window + 1 > 0) ? q - window + 1 : 0;
}

// tanh in the accumulation dtype: libm on the device and for fp64; on the host in fp32 host_math's
// branch-free tanh (~2 ulp), which `omp simd` vectorises (libm's tanhf keeps the score loop scalar).
CKPT_HD_INLINE double tanh_acc(double x) { return tanh(x); }
#if defined(__CUDA_ARCH__)
CKPT_HD_INLINE float tanh_acc(float x) { return tanhf(x); }
#else
CKPT_HD_INLINE float tanh_acc(float x) { return host_math::tanh_</*kFma=*/false>(x); }  // outside the ISA copies
#endif

// The capped score c * tanh(dot * inv) of a raw dot product q.k, inv = scale / c
// (= c * tanh(scale q.k / c)); t receives the tanh (for the backward).
template <typename acc>
CKPT_HD_INLINE acc capped(acc dot, acc inv, acc cap, acc* t) {
  *t = tanh_acc(dot * inv);
  return cap * *t;
}

// Gradient of the raw score from the gradient of the capped one.
template <typename acc>
CKPT_HD_INLINE acc cap_grad(acc ds, acc t) {
  return ds * (acc(1) - t * t);
}

}  // namespace attn_window
}  // namespace ckpt_ops
