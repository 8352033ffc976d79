// Host-side argument checks shared by the CPU and CUDA op implementations.
// The Python layer validates user input first (ValueError/TypeError); these
// TORCH_CHECKs guard direct torch.ops.ckpt_ops.* calls, each naming the
// argument and the expectation.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

namespace ckpt_ops {

inline void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "ckpt_ops: ", name, " must be 2-D (rows, features); got ", t.dim(), " dims");
  TORCH_CHECK(t.is_contiguous(), "ckpt_ops: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf ||
                  t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kDouble,
              "ckpt_ops: ", name, " must be float16, bfloat16, float32 or float64; got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "ckpt_ops: ", name, " must have shape ", x.sizes(), "; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "ckpt_ops: ", name, " must have dtype ", x.scalar_type(),
              "; got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "ckpt_ops: ", name, " must be on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "ckpt_ops: ", name, " must be contiguous");
}

inline void check_vec(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "ckpt_ops: ", name, " must have shape (", x.size(1),
              ",); got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), "ckpt_ops: ", name, " must have dtype ", x.scalar_type(),
              "; got ", t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), "ckpt_ops: ", name, " must be on ", x.device());
  TORCH_CHECK(t->is_contiguous(), "ckpt_ops: ", name, " must be contiguous");
}

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_stats(const at::Tensor& s, const at::Tensor& x, const char* name) {
  TORCH_CHECK(s.dim() == 1 && s.size(0) == x.size(0), "ckpt_ops: ", name, " must have shape (", x.size(0),
              ",); got ", s.sizes());
  TORCH_CHECK(s.scalar_type() == acc_dtype(x.scalar_type()), "ckpt_ops: ", name, " must have dtype ",
              acc_dtype(x.scalar_type()), "; got ", s.scalar_type());
  TORCH_CHECK(s.device() == x.device() && s.is_contiguous(), "ckpt_ops: ", name,
              " must be contiguous on ", x.device());
}

inline const void* opt_ptr(const c10::optional<at::Tensor>& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

}  // namespace ckpt_ops
