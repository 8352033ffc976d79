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

#include "ckpt_ops/activation_math.h"
#include "ckpt_ops/mlp_host.h"
#include "ckpt_ops/philox.h"

namespace ckpt_ops {
namespace {

// Elements per task: the transcendental activations cost ~20-50 ns an element,
// the dropout ~10 (ten Philox rounds); a task of this size amortises the
// OpenMP hand-off.
constexpr int64_t kActGrain = 16384;
constexpr int64_t kDropoutGrain = 32768;

template <int kAct, bool kGated, typename scalar_t>
void act_fwd_kernel(const scalar_t* h, const scalar_t* g, scalar_t* a, int64_t n) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, n, kActGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const acc hv = static_cast<acc>(h[i]);
      if constexpr (kGated) {
        a[i] = static_cast<scalar_t>(act::gated_fwd<kAct>(hv, static_cast<acc>(g[i])));
      } else {
        a[i] = static_cast<scalar_t>(act::fwd<kAct>(hv));
      }
    }
  });
}

template <int kAct, bool kGated, bool kNeedA, typename scalar_t>
void act_bwd_kernel(const scalar_t* da, const scalar_t* h, const scalar_t* g, scalar_t* a, scalar_t* dh,
                    scalar_t* dg, int64_t n) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, n, kActGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const acc dav = static_cast<acc>(da[i]), hv = static_cast<acc>(h[i]);
      acc av, dhv;
      if constexpr (kGated) {
        acc dgv;
        act::gated_bwd<kAct>(dav, hv, static_cast<acc>(g[i]), &av, &dhv, &dgv);
        dg[i] = static_cast<scalar_t>(dgv);
      } else {
        act::bwd<kAct>(dav, hv, &av, &dhv);
      }
      if constexpr (kNeedA) a[i] = static_cast<scalar_t>(av);
      dh[i] = static_cast<scalar_t>(dhv);
    }
  });
}

// out = residual + keep * y * scale (kRng), or residual + y (p == 0).
template <bool kRng, bool kResidual, typename scalar_t>
void dropout_kernel(const scalar_t* y, const scalar_t* residual, scalar_t* out, int64_t n, int64_t seed,
                    uint32_t threshold, acc_t<scalar_t> scale) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, n, kDropoutGrain, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const acc yv = static_cast<acc>(y[i]);
      const acc rv = kResidual ? static_cast<acc>(residual[i]) : acc(0);
      acc o;
      if constexpr (kRng) {
        o = philox::dropout_apply<kResidual>(yv, rv, philox::keep(seed, i, threshold), scale);
      } else {
        o = kResidual ? add_rn(rv, yv) : yv;
      }
      out[i] = static_cast<scalar_t>(o);
    }
  });
}

void act_fwd(const at::Tensor& h, const at::Tensor* g, int activation, at::Tensor& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ckpt_ops::act_fwd", [&] {
    mlp::dispatch_activation(activation, [&](auto kAct) {
      mlp::dispatch_bool(g != nullptr, [&](auto kGated) {
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
      mlp::dispatch_bool(g != nullptr, [&](auto kGated) {
        mlp::dispatch_bool(need_a, [&](auto kNeedA) {
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
    mlp::dispatch_bool(p > 0.0, [&](auto kRng) {
      mlp::dispatch_bool(residual != nullptr, [&](auto kResidual) {
        dropout_kernel<decltype(kRng)::value, decltype(kResidual)::value, scalar_t>(
            y.const_data_ptr<scalar_t>(), residual ? residual->const_data_ptr<scalar_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(), y.numel(), s, threshold, philox::dropout_scale<acc>(p));
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CPU, m) { mlp::register_ops<act_fwd, act_bwd, dropout>(m); }

}  // namespace ckpt_ops
