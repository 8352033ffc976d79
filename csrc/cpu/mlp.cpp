// MLP elementwise CPU kernels: activation forward / backward (fused with the
// recompute of the activation output) and dropout (+ residual) from Philox
// counters. OpenMP-parallel over flat elements (at::parallel_for), `omp simd`
// inner loops, math from ckpt_ops/activation_math.h and ckpt_ops/philox.h (the
// same expressions the CUDA kernels run). Every element is independent, so the
// results do not depend on the thread count or the chunking.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "ckpt_ops/activation_math.h"
#include "ckpt_ops/cpu_isa.h"
#include "ckpt_ops/mlp_host.h"
#include "ckpt_ops/philox.h"

namespace ckpt_ops {
namespace {

// Elements per task: the transcendental activations cost ~20-50 ns an element,
// the dropout a few (ten Philox rounds per four elements); a task of this size
// amortises the OpenMP hand-off.
constexpr int64_t kActGrain = 16384;
constexpr int64_t kDropoutGrain = 32768;

// act::bwd / gated_bwd with the results returned by value: a local whose
// address is taken inside an `omp simd` loop becomes an "omp simd array" that
// can keep the loop scalar.
template <typename acc>
struct BwdValues {
  acc a, dh, dg;
};
template <int kAct, bool kGated, typename acc>
CKPT_CPU_ALWAYS_INLINE BwdValues<acc> bwd_values(acc da, acc h, acc g) {
  BwdValues<acc> o{};
  if constexpr (kGated) {
    act::gated_bwd<kAct>(da, h, g, &o.a, &o.dh, &o.dg);
  } else {
    act::bwd<kAct>(da, h, &o.a, &o.dh);
  }
  return o;
}

// fp32 <-> bf16 / fp16 over a block (for fp32, a plain copy), in loops the compiler
// vectorises (the bf16 rounding is c10's: round to nearest even, NaN -> 0x7FC0).
template <typename scalar_t>
CKPT_CPU_ALWAYS_INLINE void to_float(const scalar_t* src, float* dst, int64_t n) {
  #pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      dst[i] = host_math::bits_to_float(static_cast<int32_t>(static_cast<uint32_t>(src[i].x) << 16));
    } else {
      dst[i] = static_cast<float>(src[i]);
    }
  }
}
template <typename scalar_t>
CKPT_CPU_ALWAYS_INLINE void from_float(const float* src, scalar_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = cpu::narrow<scalar_t>(src[i]);
}

// One chunk of a kernel, inlined into each ISA copy (ckpt_ops/cpu_isa.h) so that its
// `omp simd` loop (and the activation math inlined into it) is vectorised for
// that wrapper's instruction set. fp32 / fp64 run straight over the tensors; bf16 /
// fp16 are widened to fp32 a block at a time, run through the fp32 loop (so they
// get the fp32 results, rounded once), and narrowed back. (Until the math was forced
// inline -- CKPT_HD_INLINE, host_math.h -- the fp32 backward ran faster through
// the same blocks; with it, straight is faster: silu's backward 12.3 -> 9.7 ms,
// gelu_tanh's 21.9 -> 18.4 ms on 2048 x 3072, AVX2, 2 threads.)
constexpr int64_t kBlock = 256;

template <int kAct, bool kGated, typename acc>
CKPT_CPU_ALWAYS_INLINE void act_fwd_block(const acc* h, const acc* g, acc* a, int64_t begin, int64_t end) {
  #pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    if constexpr (kGated) {
      a[i] = act::gated_fwd<kAct>(h[i], g[i]);
    } else {
      a[i] = act::fwd<kAct>(h[i]);
    }
  }
}

template <int kAct, bool kGated, typename scalar_t>
CKPT_CPU_ALWAYS_INLINE void act_fwd_chunk(const scalar_t* h, const scalar_t* g, scalar_t* a, int64_t begin,
                                          int64_t end) {
  using acc = acc_t<scalar_t>;
  if constexpr (std::is_same_v<acc, scalar_t>) {  // fp32 / fp64 straight over the tensors (blocks gain nothing)
    act_fwd_block<kAct, kGated, acc>(h, g, a, begin, end);
  } else {
    alignas(64) float hb[kBlock], gb[kBlock], ab[kBlock];
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t n = std::min(kBlock, end - i0);
      to_float(h + i0, hb, n);
      if constexpr (kGated) to_float(g + i0, gb, n);
      act_fwd_block<kAct, kGated, float>(hb, gb, ab, 0, n);
      from_float(ab, a + i0, n);
    }
  }
}

template <int kAct, bool kGated, bool kNeedA, typename acc>
CKPT_CPU_ALWAYS_INLINE void act_bwd_block(const acc* da, const acc* h, const acc* g, acc* a, acc* dh, acc* dg,
                                          int64_t begin, int64_t end) {
  #pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const BwdValues<acc> o = bwd_values<kAct, kGated>(da[i], h[i], kGated ? g[i] : acc(0));
    if constexpr (kGated) dg[i] = o.dg;
    if constexpr (kNeedA) a[i] = o.a;
    dh[i] = o.dh;
  }
}

template <int kAct, bool kGated, bool kNeedA, typename scalar_t>
CKPT_CPU_ALWAYS_INLINE void act_bwd_chunk(const scalar_t* da, const scalar_t* h, const scalar_t* g, scalar_t* a,
                                          scalar_t* dh, scalar_t* dg, int64_t begin, int64_t end) {
  if constexpr (std::is_same_v<scalar_t, double> || std::is_same_v<scalar_t, float>) {
    act_bwd_block<kAct, kGated, kNeedA, scalar_t>(da, h, g, a, dh, dg, begin, end);
  } else {
    alignas(64) float dab[kBlock], hb[kBlock], gb[kBlock], ab[kBlock], dhb[kBlock], dgb[kBlock];
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t n = std::min(kBlock, end - i0);
      to_float(da + i0, dab, n);
      to_float(h + i0, hb, n);
      if constexpr (kGated) to_float(g + i0, gb, n);
      act_bwd_block<kAct, kGated, kNeedA, float>(dab, hb, gb, ab, dhb, dgb, 0, n);
      if constexpr (kNeedA) from_float(ab, a + i0, n);
      from_float(dhb, dh + i0, n);
      if constexpr (kGated) from_float(dgb, dg + i0, n);
    }
  }
}

// The chunks as ISA bodies (ckpt_ops/cpu_isa.h): one copy per instruction set,
// picked once per kernel call. The activation math contracts nothing itself
// (-ffp-contract=off) and its explicit FMAs are exact (host_math::fma_), so every
// copy returns the same bits; a forward and a backward kernel run the same copy anyway.
template <int kAct, bool kGated>
struct ActFwd {
  template <typename scalar_t>
  static CKPT_CPU_ALWAYS_INLINE void run(const scalar_t* h, const scalar_t* g, scalar_t* a, int64_t begin,
                                         int64_t end) {
    act_fwd_chunk<kAct, kGated>(h, g, a, begin, end);
  }
};
template <int kAct, bool kGated, bool kNeedA>
struct ActBwd {
  template <typename scalar_t>
  static CKPT_CPU_ALWAYS_INLINE void run(const scalar_t* da, const scalar_t* h, const scalar_t* g, scalar_t* a,
                                         scalar_t* dh, scalar_t* dg, int64_t begin, int64_t end) {
    act_bwd_chunk<kAct, kGated, kNeedA>(da, h, g, a, dh, dg, begin, end);
  }
};

template <int kAct, bool kGated, typename scalar_t>
void act_fwd_kernel(const scalar_t* h, const scalar_t* g, scalar_t* a, int64_t n) {
  const auto chunk = cpu::isa_fn<ActFwd<kAct, kGated>>(h, g, a, n, n);
  at::parallel_for(0, n, kActGrain, [&](int64_t begin, int64_t end) { chunk(h, g, a, begin, end); });
}

template <int kAct, bool kGated, bool kNeedA, typename scalar_t>
void act_bwd_kernel(const scalar_t* da, const scalar_t* h, const scalar_t* g, scalar_t* a, scalar_t* dh,
                    scalar_t* dg, int64_t n) {
  const auto chunk = cpu::isa_fn<ActBwd<kAct, kGated, kNeedA>>(da, h, g, a, dh, dg, n, n);
  at::parallel_for(0, n, kActGrain, [&](int64_t begin, int64_t end) { chunk(da, h, g, a, dh, dg, begin, end); });
}

// out = residual + keep * y * scale (kRng), or residual + y (p == 0), tile by tile: with kRng,
// Philox once per four elements into `bits` (philox::fill_bits), then the element loop; tiles
// start at multiples of 4, so a chunk may begin mid-tile.
template <bool kRng, bool kResidual, typename scalar_t>
CKPT_CPU_ALWAYS_INLINE void dropout_chunk(const scalar_t* y, const scalar_t* residual, scalar_t* out, int64_t begin, int64_t end,
                          int64_t seed, uint32_t threshold, acc_t<scalar_t> scale) {
  using acc = acc_t<scalar_t>;
  constexpr int64_t kTile = 512;  // elements (128 Philox counters): 2 KiB of bits, in L1
  alignas(64) uint32_t bits[kTile];
  for (int64_t t0 = begin & ~int64_t(3); t0 < end; t0 += kTile) {
    const int64_t t1 = std::min(t0 + kTile, end);
    if constexpr (kRng) philox::fill_bits(seed, t0 >> 2, (t1 - t0 + 3) >> 2, bits);
    #pragma omp simd
    for (int64_t i = std::max(t0, begin); i < t1; ++i) {
      const acc rv = kResidual ? static_cast<acc>(residual[i]) : acc(0);
      const uint32_t b = kRng ? bits[i - t0] : 0u;
      out[i] = cpu::narrow<scalar_t>(
          philox::dropout_element<kRng, kResidual>(static_cast<acc>(y[i]), rv, b, threshold, scale));
    }
  }
}

// Philox's 32x32->64 multiplies vectorise to vpmuludq; integer math, so every copy agrees bitwise.
template <bool kRng, bool kResidual>
struct Dropout {
  template <typename scalar_t>
  static CKPT_CPU_ALWAYS_INLINE void run(const scalar_t* y, const scalar_t* residual, scalar_t* out, int64_t begin,
                                         int64_t end, int64_t seed, uint32_t threshold, acc_t<scalar_t> scale) {
    dropout_chunk<kRng, kResidual>(y, residual, out, begin, end, seed, threshold, scale);
  }
};

template <bool kRng, bool kResidual, typename scalar_t>
void dropout_kernel(const scalar_t* y, const scalar_t* residual, scalar_t* out, int64_t n, int64_t seed,
                    uint32_t threshold, acc_t<scalar_t> scale) {
  const auto chunk = cpu::isa_fn<Dropout<kRng, kResidual>>(y, residual, out, n, n, seed, threshold, scale);
  at::parallel_for(0, n, kDropoutGrain, [&](int64_t begin, int64_t end) {
    chunk(y, residual, out, begin, end, seed, threshold, scale);
  });
}

void act_fwd(const at::Tensor& h, const at::Tensor* g, int activation, at::Tensor& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ckpt_ops::act_fwd", [&] {
    mlp::dispatch_activation(activation, [&](auto kAct) {
      dispatch_bool(g != nullptr, [&](auto kGated) {
        act_fwd_kernel<decltype(kAct)::value, decltype(kGated)::value, scalar_t>(
            h.const_data_ptr<scalar_t>(), g ? g->const_data_ptr<scalar_t>() : nullptr,
            a.mutable_data_ptr<scalar_t>(), h.numel());
      });
    });
  });
}

void act_bwd(const at::Tensor& da, const at::Tensor& h, const at::Tensor* g, int activation, mlp::ActBwdOut& o) {
  const bool need_a = o.a.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ckpt_ops::act_bwd", [&] {
    mlp::dispatch_activation(activation, [&](auto kAct) {
      dispatch_bool(g != nullptr, [&](auto kGated) {
        dispatch_bool(need_a, [&](auto kNeedA) {
          act_bwd_kernel<decltype(kAct)::value, decltype(kGated)::value, decltype(kNeedA)::value, scalar_t>(
              da.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
              g ? g->const_data_ptr<scalar_t>() : nullptr, need_a ? o.a.mutable_data_ptr<scalar_t>() : nullptr,
              o.dh.mutable_data_ptr<scalar_t>(), g ? o.dg.mutable_data_ptr<scalar_t>() : nullptr, h.numel());
        });
      });
    });
  });
}

void dropout(const at::Tensor& y, const at::Tensor* residual, const at::Tensor& seed, double p, at::Tensor& out) {
  const int64_t s = seed.const_data_ptr<int64_t>()[0];
  const uint32_t threshold = philox::dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "ckpt_ops::dropout", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_bool(p > 0.0, [&](auto kRng) {
      dispatch_bool(residual != nullptr, [&](auto kResidual) {
        dropout_kernel<decltype(kRng)::value, decltype(kResidual)::value, scalar_t>(
            y.const_data_ptr<scalar_t>(), residual ? residual->const_data_ptr<scalar_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(), y.numel(), s, threshold, philox::dropout_scale<acc>(p));
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CPU, m) {
  mlp::register_ops<act_fwd, act_bwd, dropout>(m);
  mlp::register_inplace_bwd<act_bwd>(m);
}

}  // namespace ckpt_ops
