// Rotary position embedding (RoPE) math, shared by csrc/cpu/rope.cpp and
// csrc/cuda/rope.cu (and mirrored by ckpt_ops/reference.py rope_ and the
// Triton kernels). "Rotate half" convention of Llama-family models: a head
// vector x[0..hd) is split into halves x1 = x[0..hd/2), x2 = x[hd/2..hd), and
// pair i is rotated by the angle whose cosine/sine are c = cos[pos, i],
// s = sin[pos, i]. Partial rotary (GPT-NeoX rotary_pct): only the first r
// dims of a head rotate (x1 = x[0..r/2), x2 = x[r/2..r), r = 2 * the tables'
// last dim, even, <= hd); x[r..hd) passes through untouched:
//   forward:  x1' = x1 c - x2 s,   x2' = x2 c + x1 s
//   inverse:  x1' = x1 c + x2 s,   x2' = x2 c - x1 s     (the transpose: s -> -s)
// The inverse is the backward of RoPE (applied in place to dqkv) and undoes
// the forward up to rounding.
//
// `acc` is float (fp32/fp16/bf16 tensors) or double (fp64): inputs are widened,
// rotated and rounded once to the tensor dtype. Every product and sum is
// rounded on its own (mul_rn/add_rn, no FMA contraction), exactly as the
// reference's `t1 * cos - t2 * s` evaluates elementwise in torch, so the
// kernels agree with the reference bit for bit given the same tables.
#pragma once

#include "ckpt_ops/macros.h"

namespace ckpt_ops {
namespace rope {

template <bool kInverse, typename acc>
CKPT_HD_INLINE void rotate(acc x1, acc x2, acc c, acc s, acc* y1, acc* y2) {
  const acc sn = kInverse ? -s : s;
  *y1 = add_rn(mul_rn(x1, c), -mul_rn(x2, sn));
  *y2 = add_rn(mul_rn(x2, c), mul_rn(x1, sn));
}

}  // namespace rope
}  // namespace ckpt_ops
