// Host-side glue of the attention ops, shared by the CPU and CUDA
// implementations: the packed-qkv layout checks (rope_, attention_fwd,
// attention_bwd), the rotary-table checks and normalisation, and the
// registration of the schema-level rope_ on top of a device's launcher.
//
// Layout (csrc/ops.cpp, ckpt_ops/reference.py "Attention"):
//   qkv (B, S, (H + 2 KV) * hd) contiguous, rows [q heads | k heads | v heads]
//   cos/sin (S, r/2) or (B, S, r/2) (a leading 1 broadcasts over the batch),
//   any float dtype; read in the accumulation dtype. r = 2 * cos.size(-1) is the
//   rotary width: even, 2 <= r <= hd; the first r dims of each q/k head rotate
//   (halves [0, r/2) and [r/2, r)), the rest pass through (partial rotary).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <type_traits>

#include "ckpt_ops/checks.h"

namespace ckpt_ops {
namespace attn {

struct QkvShape {
  int64_t B, S, H, KV, hd;
  int64_t width() const { return (H + 2 * KV) * hd; }
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline QkvShape check_qkv(const at::Tensor& qkv, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.dim() == 3, "ckpt_ops: qkv must be 3-D (B, S, (H + 2KV) * head_dim); got ", qkv.dim(), " dims");
  TORCH_CHECK(qkv.is_contiguous(), "ckpt_ops: qkv must be contiguous");
  TORCH_CHECK(is_float_dtype(qkv.scalar_type()), "ckpt_ops: qkv must be float16, bfloat16, float32 or float64; got ",
              qkv.scalar_type());
  TORCH_CHECK(num_heads >= 1 && num_kv_heads >= 1, "ckpt_ops: num_heads and num_kv_heads must be >= 1; got ",
              num_heads, " and ", num_kv_heads);
  TORCH_CHECK(num_heads % num_kv_heads == 0, "ckpt_ops: num_heads (", num_heads,
              ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
  const int64_t heads = num_heads + 2 * num_kv_heads, width = qkv.size(2);
  TORCH_CHECK(width > 0 && width % heads == 0, "ckpt_ops: qkv last dim (", width,
              ") must be a positive multiple of num_heads + 2 * num_kv_heads = ", heads);
  return {qkv.size(0), qkv.size(1), num_heads, num_kv_heads, width / heads};
}

// key_mask: (B, S) bool or integer (nonzero = attend), on qkv's device.
inline void check_key_mask(const c10::optional<at::Tensor>& key_mask, const QkvShape& sh, const at::Tensor& qkv) {
  if (!key_mask.has_value()) return;
  const at::Tensor& m = *key_mask;
  TORCH_CHECK(m.dim() == 2 && m.size(0) == sh.B && m.size(1) == sh.S, "ckpt_ops: key_mask must have shape (",
              sh.B, ", ", sh.S, "); got ", m.sizes());
  TORCH_CHECK(m.scalar_type() == at::kBool || at::isIntegralType(m.scalar_type(), /*includeBool=*/false),
              "ckpt_ops: key_mask must be bool or an integer dtype (nonzero = attend); got ", m.scalar_type());
  TORCH_CHECK(m.device() == qkv.device(), "ckpt_ops: key_mask must be on ", qkv.device(), " (qkv's device); got ",
              m.device());
}

// A tensor of qkv's batch/sequence with `features` per row: do, o (B, S, H * hd).
inline void check_rows_of(const at::Tensor& t, const QkvShape& sh, int64_t features, const at::Tensor& qkv,
                          const char* name) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == sh.B && t.size(1) == sh.S && t.size(2) == features, "ckpt_ops: ", name,
              " must have shape (", sh.B, ", ", sh.S, ", ", features, "); got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == qkv.scalar_type(), "ckpt_ops: ", name, " must have qkv's dtype ",
              qkv.scalar_type(), "; got ", t.scalar_type());
  TORCH_CHECK(t.device() == qkv.device(), "ckpt_ops: ", name, " must be on ", qkv.device());
  TORCH_CHECK(t.is_contiguous(), "ckpt_ops: ", name, " must be contiguous");
}

// Rotary tables after the checks: contiguous, in the accumulation dtype; row
// (b, s) starts at b * batch_stride + s * half (batch_stride 0 for a 2-D table
// or a leading dim of 1). half = r/2, r the rotary width (<= hd).
struct RopeTables {
  at::Tensor cos, sin;
  int64_t batch_stride, half;
};

inline RopeTables check_rope_tables(const at::Tensor& cos, const at::Tensor& sin, const QkvShape& sh,
                                    const at::Tensor& qkv) {
  TORCH_CHECK(cos.dim() == 2 || cos.dim() == 3, "ckpt_ops: cos must be (S, r/2) or (B, S, r/2) (r the rotary width, "
              "even, <= head_dim); got ", cos.dim(), " dims");
  const bool batched = cos.dim() == 3;
  const int64_t s_dim = batched ? 1 : 0;
  // the rotary width r = 2 * half: the whole head (r = hd) or its first r dims (partial rotary)
  const int64_t half = cos.size(s_dim + 1);
  TORCH_CHECK(half >= 1 && 2 * half <= sh.hd, "ckpt_ops: rope_ needs an even head_dim or an even rotary width ",
              "2 <= r <= head_dim (cos/sin last dim = r/2); got r = ", 2 * half, " for head_dim ", sh.hd);
  TORCH_CHECK(cos.size(s_dim) == sh.S && (!batched || cos.size(0) == sh.B || cos.size(0) == 1),
              "ckpt_ops: cos must have shape (", sh.S, ", r/2) or (", sh.B, " or 1, ", sh.S, ", r/2); got ",
              cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "ckpt_ops: sin must have cos's shape ", cos.sizes(), "; got ", sin.sizes());
  TORCH_CHECK(is_float_dtype(cos.scalar_type()) && is_float_dtype(sin.scalar_type()),
              "ckpt_ops: cos/sin must be floating point; got ", cos.scalar_type(), " and ", sin.scalar_type());
  TORCH_CHECK(cos.device() == qkv.device() && sin.device() == qkv.device(), "ckpt_ops: cos/sin must be on ",
              qkv.device(), " (qkv's device); got ", cos.device(), " and ", sin.device());
  // The tables are tiny (S * r/2): widening them once here keeps one kernel
  // instance per qkv dtype; a no-op for the usual contiguous fp32 tables.
  const auto acc = acc_dtype(qkv.scalar_type());
  const bool per_batch = batched && cos.size(0) == sh.B && sh.B > 1;
  return {cos.to(acc).contiguous(), sin.to(acc).contiguous(), per_batch ? sh.S * half : 0, half};
}

// A device provides the launcher (checks done, qkv.numel() > 0):
//   void Rope(at::Tensor& qkv, const QkvShape& sh, const RopeTables& t, bool inverse)
// and registers the schema-level op with register_rope<Rope>(m).
template <auto Rope>
void register_rope(torch::Library& m) {
  m.impl("rope_", [](at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t num_heads,
                     int64_t num_kv_heads, bool inverse) {
    const QkvShape sh = check_qkv(qkv, num_heads, num_kv_heads);
    const RopeTables t = check_rope_tables(cos, sin, sh, qkv);
    if (qkv.numel() > 0) Rope(qkv, sh, t, inverse);
  });
}

}  // namespace attn
}  // namespace ckpt_ops
