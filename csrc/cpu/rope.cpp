// RoPE CPU kernel: rope_ in place on the q and k heads of the packed qkv
// (the v heads are untouched). at::parallel_for over the B*S rows, `omp simd`
// over the r/2 pairs of a head (r = 2 * half the rotary width, <= hd: dims
// [r, hd) of each head pass through untouched, partial rotary); per-pair math from ckpt_ops/rope_math.h (the
// expressions the CUDA kernel runs). Every pair is independent, so results do
// not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>

#include "ckpt_ops/attention_host.h"
#include "ckpt_ops/cpu_isa.h"
#include "ckpt_ops/rope_math.h"

namespace ckpt_ops {
namespace {

// Pairs per task: a rotation is ~4 flops on 2 loads/stores; a task of this
// size amortises the OpenMP hand-off.
constexpr int64_t kRopeGrainPairs = 16384;

// Rows [begin, end): one ISA body (ckpt_ops/cpu_isa.h).
template <bool kInverse>
struct RopeRows {
  template <typename scalar_t>
  static CKPT_CPU_ALWAYS_INLINE void run(scalar_t* qkv, const acc_t<scalar_t>* cos, const acc_t<scalar_t>* sin,
                                         int64_t S, int64_t heads, int64_t hd, int64_t half, int64_t width,
                                         int64_t table_batch_stride, int64_t begin, int64_t end) {
    using acc = acc_t<scalar_t>;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / S, s = r % S;
      const acc* c = cos + b * table_batch_stride + s * half;
      const acc* sn = sin + b * table_batch_stride + s * half;
      scalar_t* row = qkv + r * width;
      for (int64_t h = 0; h < heads; ++h) {  // the q and k heads: the first H + KV of the row
        scalar_t* x1 = row + h * hd;
        scalar_t* x2 = x1 + half;
        #pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          acc y1, y2;
          rope::rotate<kInverse>(static_cast<acc>(x1[i]), static_cast<acc>(x2[i]), c[i], sn[i], &y1, &y2);
          x1[i] = cpu::narrow<scalar_t>(y1);
          x2[i] = cpu::narrow<scalar_t>(y2);
        }
      }
    }
  }
};

template <bool kInverse, typename scalar_t>
void rope_kernel(scalar_t* qkv, const acc_t<scalar_t>* cos, const acc_t<scalar_t>* sin, int64_t rows, int64_t S,
                 int64_t heads, int64_t hd, int64_t half, int64_t width, int64_t table_batch_stride) {
  const int64_t grain = std::max<int64_t>(1, kRopeGrainPairs / std::max<int64_t>(1, heads * half));
  const auto run =
      cpu::isa_fn<RopeRows<kInverse>>(qkv, cos, sin, S, heads, hd, half, width, table_batch_stride, rows, rows);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    run(qkv, cos, sin, S, heads, hd, half, width, table_batch_stride, begin, end);
  });
}

void rope_launch(at::Tensor& qkv, const attn::QkvShape& sh, const attn::RopeTables& t, bool inverse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "ckpt_ops::rope_", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_bool(inverse, [&](auto kInverse) {
      rope_kernel<decltype(kInverse)::value, scalar_t>(qkv.mutable_data_ptr<scalar_t>(), t.cos.const_data_ptr<acc>(),
                                                       t.sin.const_data_ptr<acc>(), sh.B * sh.S, sh.S, sh.H + sh.KV,
                                                       sh.hd, t.half, sh.width(), t.batch_stride);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CPU, m) { attn::register_rope<rope_launch>(m); }

}  // namespace ckpt_ops
