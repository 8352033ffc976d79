// Host-side glue of the norm ops, shared by the CPU and CUDA implementations:
// argument checks, output allocation, and the registration of the four
// schema-level ops on top of a device's two kernels launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ckpt_ops/checks.h"

namespace ckpt_ops {
namespace norm {

// Rows of the backward are cut into at most this many chunks; each chunk keeps
// one partial row of dweight/dbias. A function of M only (not of the thread or
// SM count) on CPU, so CPU results do not depend on torch.get_num_threads().
constexpr int64_t kMaxCpuChunks = 64;

struct FwdOut {
  at::Tensor y, mean, rstd;
};

inline FwdOut fwd_prepare(bool rms, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias) {
  check_rows(x, "x");
  check_vec(weight, x, "weight");
  check_vec(bias, x, "bias");
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  return {at::empty_like(x), at::empty({rms ? 0 : x.size(0)}, acc_opts), at::empty({x.size(0)}, acc_opts)};
}

struct BwdOut {
  at::Tensor dx, dw, db;        // returned (empty when not requested)
  at::Tensor dw_part, db_part;  // (chunks, N) accumulation-dtype partial sums, zeroed
};

inline BwdOut bwd_prepare(bool rms, const at::Tensor& dy, const at::Tensor& x,
                          const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& mean,
                          const at::Tensor& rstd, bool need_dx, bool need_dw, bool need_db, int64_t chunks) {
  check_rows(x, "x");
  check_like(dy, x, "dy");
  check_vec(weight, x, "weight");
  if (!rms) check_stats(*mean, x, "mean");
  check_stats(rstd, x, "rstd");
  TORCH_CHECK(!need_dw || weight.has_value(), "ckpt_ops: need_dweight=True requires a weight");
  const int64_t N = x.size(1);
  const auto acc_opts = x.options().dtype(acc_dtype(x.scalar_type()));
  BwdOut out;
  out.dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  out.dw = at::empty({need_dw ? N : 0}, weight.has_value() ? weight->options() : x.options());
  out.db = at::empty({need_db ? N : 0}, x.options());
  if (need_dw) out.dw_part = at::zeros({chunks, N}, acc_opts);
  if (need_db) out.db_part = at::zeros({chunks, N}, acc_opts);
  return out;
}

// A device provides
//   FwdOut Fwd(bool rms, x, weight, bias, double eps)
//   std::tuple<Tensor,Tensor,Tensor> Bwd(bool rms, dy, x, weight, mean, rstd, need_dx, need_dw, need_db)
// and registers the schema-level ops with register_ops<Fwd, Bwd>(m).
template <auto Fwd, auto Bwd>
void register_ops(torch::Library& m) {
  m.impl("layer_norm_fwd", [](const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                              const c10::optional<at::Tensor>& bias, double eps) {
    FwdOut o = Fwd(false, x, weight, bias, eps);
    return std::make_tuple(o.y, o.mean, o.rstd);
  });
  m.impl("layer_norm_bwd", [](const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                              const at::Tensor& mean, const at::Tensor& rstd, bool need_dx, bool need_dweight,
                              bool need_dbias) {
    return Bwd(false, dy, x, weight, mean, rstd, need_dx, need_dweight, need_dbias);
  });
  m.impl("rms_norm_fwd", [](const at::Tensor& x, const c10::optional<at::Tensor>& weight, double eps) {
    FwdOut o = Fwd(true, x, weight, c10::nullopt, eps);
    return std::make_tuple(o.y, o.rstd);
  });
  m.impl("rms_norm_bwd", [](const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                            const at::Tensor& rstd, bool need_dx, bool need_dweight) {
    auto o = Bwd(true, dy, x, weight, c10::nullopt, rstd, need_dx, need_dweight, false);
    return std::make_tuple(std::get<0>(o), std::get<1>(o));
  });
}

}  // namespace norm
}  // namespace ckpt_ops
