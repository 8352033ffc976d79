// Attention core on CPU: attention_fwd / attention_bwd over the packed qkv
// (contract: ckpt_ops/reference.py attention_fwd / attention_bwd).
//
// Choice: these ops wrap ATen's CPU flash-attention kernels
// (at::_scaled_dot_product_flash_attention_for_cpu and its _backward) instead
// of a kernel of our own. Why:
//  * speed: they are blocked-GEMM flash kernels (q/kv tiles through the CPU
//    BLAS, online softmax, OpenMP over batch x head x q-block), which a
//    hand-written per-row online-softmax loop does not approach on CPU, where
//    matmuls dominate (DESIGN.md section 1);
//  * parity with the baseline: eager F.scaled_dot_product_attention on CPU runs
//    exactly these kernels, so the "selective"/"keep_attn" levels (which call
//    attention_fwd/bwd once each, like eager) stay within noise of eager
//    instead of paying a slower attention core.
//    Measured (fwd + bwd, causal, fp32, 1 thread, median of interleaved
//    rounds on a shared 2-core host, so +-5% noise): this wrapper vs the
//    two ATen calls made directly (no packing): +0.2% (B4 S512 H12 hd64, no
//    mask), +1% (same, key mask), +3..5% (B2 S1024 H16 KV4, key mask; the
//    dqkv packing copy); vs eager SDPA + autograd (bool (B,1,S,S) mask):
//    0.70-0.95x; the materialising reference (what a straightforward
//    non-GEMM-blocked kernel approaches at best): 3.8-4.4x eager.
//  * GQA: they accept num_kv_heads < num_heads (query head h reads KV head
//    h / (H / KV)) and return dk/dv already summed over each group; verified
//    against the reference in tests/test_attention_kernels.py (MHA/GQA/MQA).
// The glue around them:
//  * q/k/v are strided views of qkv (no copy); the output o comes back laid
//    out (B, S, H, hd), i.e. it *is* (B, S, H * hd) contiguous (reshape is a
//    view; .contiguous() below only copies if a future torch changes that).
//  * key_mask becomes an additive (B, 1, 1, S) mask of qkv's dtype (0 / -inf);
//    causal is passed as is_causal (top-left aligned, as the reference's tril).
//  * rows with no key to attend (a fully padded sequence, or left padding
//    under causal) come out of ATen with o = 0 and lse = 0; the contract wants
//    lse = +inf there (probabilities rebuild to exactly 0), so those rows are
//    found from the mask (per batch they form the prefix [0, n_empty)) and
//    set: o = 0 exactly, lse = +inf. The backward is then NaN-free: every key
//    of such a row has score -inf, and exp(-inf - lse) = 0 for lse = +inf.
//  * lse is returned (B, H, S) contiguous in the accumulation dtype: fp32, fp64
//    for fp64 inputs (ATen's is (B, S, H)-strided), so fp64 keeps fp64 accuracy.
//  * dq/dk/dv are packed into one (B, S, (H + 2KV) * hd) tensor (one copy).
// No S x S matrix is materialised beyond ATen's own per-tile buffers. Inputs
// are never written.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu_backward.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "ckpt_ops/attention_host.h"

namespace ckpt_ops {
namespace {

struct Heads {
  at::Tensor q, k, v;  // (B, heads, S, hd) strided views of qkv
};

Heads split_heads(const at::Tensor& qkv, const attn::QkvShape& sh) {
  const at::Tensor x = qkv.view({sh.B, sh.S, sh.H + 2 * sh.KV, sh.hd});
  return {x.narrow(2, 0, sh.H).transpose(1, 2), x.narrow(2, sh.H, sh.KV).transpose(1, 2),
          x.narrow(2, sh.H + sh.KV, sh.KV).transpose(1, 2)};
}

// (B, S, H * hd) -> (B, H, S, hd) view
at::Tensor heads_view(const at::Tensor& t, const attn::QkvShape& sh, int64_t heads) {
  return t.view({sh.B, sh.S, heads, sh.hd}).transpose(1, 2);
}

// (B, heads, S, hd) -> (B, S, heads * hd), a view when laid out (B, S, heads, hd)
at::Tensor rows_view(const at::Tensor& t, const attn::QkvShape& sh) {
  return t.transpose(1, 2).reshape({sh.B, sh.S, -1});
}

c10::optional<at::Tensor> additive_mask(const c10::optional<at::Tensor>& key_mask, const attn::QkvShape& sh,
                                        const at::Tensor& qkv) {
  if (!key_mask.has_value()) return c10::nullopt;
  const at::Tensor masked = key_mask->eq(0).view({sh.B, 1, 1, sh.S});
  return at::zeros({sh.B, 1, 1, sh.S}, qkv.options()).masked_fill_(masked, -std::numeric_limits<double>::infinity());
}

// Number of leading query rows of each batch that have no key to attend: all
// S rows when the sequence is fully padded; under causal, the rows before the
// first valid key (left padding). Other rows always see at least one key.
std::vector<int64_t> empty_prefix(const c10::optional<at::Tensor>& key_mask, const attn::QkvShape& sh,
                                  bool causal) {
  std::vector<int64_t> n(sh.B, 0);
  if (!key_mask.has_value()) return n;
  const at::Tensor attend = at::ne(*key_mask, 0).contiguous();
  const bool* a = attend.const_data_ptr<bool>();
  for (int64_t b = 0; b < sh.B; ++b) {
    int64_t first = 0;
    while (first < sh.S && !a[b * sh.S + first]) ++first;
    n[b] = (causal || first == sh.S) ? first : 0;
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& qkv, const c10::optional<at::Tensor>& key_mask,
                                                 int64_t num_heads, int64_t num_kv_heads, bool causal,
                                                 double scale) {
  const attn::QkvShape sh = attn::check_qkv(qkv, num_heads, num_kv_heads);
  attn::check_key_mask(key_mask, sh, qkv);
  TORCH_CHECK(qkv.device().is_cpu(), "ckpt_ops: attention_fwd (C++) takes CPU tensors; got ", qkv.device());
  if (sh.B == 0 || sh.S == 0) {
    return {at::empty({sh.B, sh.S, sh.H * sh.hd}, qkv.options()),
            at::empty({sh.B, sh.H, sh.S}, qkv.options().dtype(acc_dtype(qkv.scalar_type())))};
  }
  const Heads x = split_heads(qkv, sh);
  auto [o4, lse4] = at::_scaled_dot_product_flash_attention_for_cpu(x.q, x.k, x.v, /*dropout_p=*/0.0, causal,
                                                                    additive_mask(key_mask, sh, qkv), scale);
  at::Tensor o = rows_view(o4, sh).contiguous();
  at::Tensor lse = lse4.to(acc_dtype(qkv.scalar_type())).contiguous();  // fp64 stays fp64
  const std::vector<int64_t> n_empty = empty_prefix(key_mask, sh, causal);
  for (int64_t b = 0; b < sh.B; ++b) {
    if (n_empty[b] == 0) continue;
    o.select(0, b).narrow(0, 0, n_empty[b]).zero_();
    lse.select(0, b).narrow(1, 0, n_empty[b]).fill_(std::numeric_limits<double>::infinity());
  }
  return {o, lse};
}

at::Tensor attention_bwd(const at::Tensor& dout, const at::Tensor& qkv, const at::Tensor& o, const at::Tensor& lse,
                         const c10::optional<at::Tensor>& key_mask, int64_t num_heads, int64_t num_kv_heads,
                         bool causal, double scale) {
  const attn::QkvShape sh = attn::check_qkv(qkv, num_heads, num_kv_heads);
  attn::check_key_mask(key_mask, sh, qkv);
  TORCH_CHECK(qkv.device().is_cpu(), "ckpt_ops: attention_bwd (C++) takes CPU tensors; got ", qkv.device());
  attn::check_rows_of(dout, sh, sh.H * sh.hd, qkv, "do");
  attn::check_rows_of(o, sh, sh.H * sh.hd, qkv, "o");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == sh.B && lse.size(1) == sh.H && lse.size(2) == sh.S,
              "ckpt_ops: lse must have shape (", sh.B, ", ", sh.H, ", ", sh.S, "); got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == acc_dtype(qkv.scalar_type()), "ckpt_ops: lse must be ",
              acc_dtype(qkv.scalar_type()), " (float64 for float64 qkv, else float32); got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == qkv.device() && lse.is_contiguous(), "ckpt_ops: lse must be contiguous on ",
              qkv.device());
  if (sh.B == 0 || sh.S == 0) return at::empty_like(qkv);
  const Heads x = split_heads(qkv, sh);
  const at::Tensor& lse_in = lse;  // already the accumulation dtype ATen wants (fp64 for fp64)
  auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
      heads_view(dout, sh, sh.H), x.q, x.k, x.v, heads_view(o, sh, sh.H), lse_in, /*dropout_p=*/0.0, causal,
      additive_mask(key_mask, sh, qkv), scale);
  return at::cat({rows_view(dq, sh), rows_view(dk, sh), rows_view(dv, sh)}, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CPU, m) {
  m.impl("attention_fwd", attention_fwd);
  m.impl("attention_bwd", attention_bwd);
}

}  // namespace ckpt_ops
