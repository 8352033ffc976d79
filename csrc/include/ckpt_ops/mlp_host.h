// Host-side glue of the MLP elementwise ops (act_fwd, act_bwd, dropout_fwd,
// dropout_bwd), shared by the CPU and CUDA implementations: argument checks,
// output allocation (empty tensors for outputs not requested), the early exit
// on empty tensors, and the registration of the four schema-level ops on top of
// a device's three kernel launchers.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "ckpt_ops/activation_math.h"
#include "ckpt_ops/checks.h"

namespace ckpt_ops {
namespace mlp {

inline void check_elementwise(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "ckpt_ops: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
              "ckpt_ops: ", name, " must be float16, bfloat16, float32 or float64; got ", t.scalar_type());
}

inline void check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation < act::kNumActivations,
              "ckpt_ops: activation must be 0 (gelu), 1 (gelu_tanh), 2 (relu) or 3 (silu); got ", activation);
}

inline void check_gate(const c10::optional<at::Tensor>& g, const at::Tensor& h) {
  if (g.has_value()) check_like(*g, h, "g");
}

inline void check_dropout(const at::Tensor& y, const char* name, const at::Tensor& seed, double p) {
  check_elementwise(y, name);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "ckpt_ops: seed must be a 1-element int64 "
              "tensor; got ", seed.numel(), " elements of ", seed.scalar_type());
  TORCH_CHECK(seed.device() == y.device(), "ckpt_ops: seed must be on ", y.device(), " (the ", name,
              " device); got ", seed.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "ckpt_ops: dropout p must satisfy 0 <= p < 1; got ", p);
}

struct ActBwdOut {
  at::Tensor a, dh, dg;  // a empty unless need_a; dg empty unless gated
};

// A device provides the launchers (inputs already checked, outputs allocated,
// numel > 0; `g`, `residual` null when absent, `out.a` / `out.dg` empty when
// not requested):
//   void ActFwd(const at::Tensor& h, const at::Tensor* g, int act, at::Tensor& a)
//   void ActBwd(const at::Tensor& da, const at::Tensor& h, const at::Tensor* g, int act, ActBwdOut& out)
//   void Dropout(const at::Tensor& y, const at::Tensor* residual, const at::Tensor& seed, double p,
//                at::Tensor& out)      (p == 0: out = residual + y, no random bits)
// and registers the schema-level ops with register_ops<ActFwd, ActBwd, Dropout>(m).
template <auto ActFwd, auto ActBwd, auto Dropout>
void register_ops(torch::Library& m) {
  m.impl("act_fwd", [](const at::Tensor& h, const c10::optional<at::Tensor>& g, int64_t activation) {
    check_elementwise(h, "h");
    check_gate(g, h);
    check_activation(activation);
    at::Tensor a = at::empty_like(h);
    if (h.numel() > 0) ActFwd(h, g.has_value() ? &*g : nullptr, static_cast<int>(activation), a);
    return a;
  });
  m.impl("act_bwd", [](const at::Tensor& da, const at::Tensor& h, const c10::optional<at::Tensor>& g,
                       int64_t activation, bool need_a) {
    check_elementwise(h, "h");
    check_like(da, h, "da");
    check_gate(g, h);
    check_activation(activation);
    // distinct empty tensors: outputs must not alias one another
    ActBwdOut o{need_a ? at::empty_like(h) : at::empty({0}, h.options()), at::empty_like(h),
                g.has_value() ? at::empty_like(h) : at::empty({0}, h.options())};
    if (h.numel() > 0) ActBwd(da, h, g.has_value() ? &*g : nullptr, static_cast<int>(activation), o);
    return std::make_tuple(o.a, o.dh, o.dg);
  });
  m.impl("dropout_fwd", [](const at::Tensor& y, const c10::optional<at::Tensor>& residual, const at::Tensor& seed,
                           double p) {
    check_dropout(y, "y", seed, p);
    if (residual.has_value()) check_like(*residual, y, "residual");
    at::Tensor out = at::empty_like(y);
    if (y.numel() > 0) Dropout(y, residual.has_value() ? &*residual : nullptr, seed, p, out);
    return out;
  });
  m.impl("dropout_bwd", [](const at::Tensor& dout, const at::Tensor& seed, double p) {
    check_dropout(dout, "dout", seed, p);
    at::Tensor dy = at::empty_like(dout);
    if (dout.numel() > 0) Dropout(dout, nullptr, seed, p, dy);
    return dy;
  });
}

// act_bwd_ (dh written into da) and act_bwd_rebuild_ (a into h, dh into da, dg into g) on a device whose ActBwd launcher reads da[i] before it writes
// dh[i] in the same element step (the CPU loops; not the CUDA kernel, whose pointers are
// __restrict__).
template <auto ActBwd>
void register_inplace_bwd(torch::Library& m) {
  m.impl("act_bwd_", [](at::Tensor& da, const at::Tensor& h, const c10::optional<at::Tensor>& g,
                        int64_t activation, bool need_a) {
    check_elementwise(h, "h");
    check_like(da, h, "da");
    check_gate(g, h);
    check_activation(activation);
    ActBwdOut o{need_a ? at::empty_like(h) : at::empty({0}, h.options()), da,
                g.has_value() ? at::empty_like(h) : at::empty({0}, h.options())};
    if (h.numel() > 0) ActBwd(da, h, g.has_value() ? &*g : nullptr, static_cast<int>(activation), o);
    return std::make_tuple(o.a, o.dg);
  });
  // The launcher's block loop reads da/h/g of an element block before it writes a/dh/dg of it
  // (element by element for fp64), so the three outputs may sit on the three inputs.
  m.impl("act_bwd_rebuild_", [](at::Tensor& da, at::Tensor& h, const c10::optional<at::Tensor>& g,
                                int64_t activation) {
    check_elementwise(h, "h");
    check_like(da, h, "da");
    check_gate(g, h);
    check_activation(activation);
    at::assert_no_overlap(da, h);  // each output sits on its own input, never on another's
    if (g.has_value()) {
      at::assert_no_overlap(*g, h);
      at::assert_no_overlap(*g, da);
    }
    ActBwdOut o{h, da, g.has_value() ? *g : at::empty({0}, h.options())};
    if (h.numel() > 0) ActBwd(da, h, g.has_value() ? &*g : nullptr, static_cast<int>(activation), o);
  });
}

// f(std::integral_constant<int, activation>{}) for a runtime activation code.
template <typename F>
void dispatch_activation(int activation, F&& f) {
  switch (activation) {
    case act::kGelu: f(std::integral_constant<int, act::kGelu>{}); break;
    case act::kGeluTanh: f(std::integral_constant<int, act::kGeluTanh>{}); break;
    case act::kRelu: f(std::integral_constant<int, act::kRelu>{}); break;
    case act::kSilu: f(std::integral_constant<int, act::kSilu>{}); break;
    default: TORCH_CHECK(false, "ckpt_ops: unknown activation code ", activation);
  }
}

}  // namespace mlp
}  // namespace ckpt_ops
