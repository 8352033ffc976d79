// RoPE CUDA kernel: rope_ in place on the q and k heads of the packed qkv.
// Same contract and same per-pair math as csrc/cpu/rope.cpp
// (ckpt_ops/rope_math.h): a grid-stride loop over the int64 flat pair index
//   p = ((row * (H + KV) + head) * r/2 + i),   row = b * S + s,
// one pair (x[i], x[i + r/2]) per thread per step, so consecutive threads
// read consecutive elements of each half; r = 2 * half is the rotary width
// (<= hd; dims [r, hd) of a head are never touched: partial rotary). The
// tables come in the accumulation dtype (attention_host.h check_rope_tables),
// row (b, s) at b * batch_stride + s * r/2.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ckpt_ops/attention_host.h"
#include "ckpt_ops/rope_math.h"

namespace ckpt_ops {
namespace {

constexpr int kThreads = 256;

template <bool kInverse, typename scalar_t>
__global__ void rope_kernel(scalar_t* __restrict__ qkv, const acc_t<scalar_t>* __restrict__ cos,
                            const acc_t<scalar_t>* __restrict__ sin, int64_t n_pairs, int64_t S, int64_t heads,
                            int64_t hd, int64_t half, int64_t width, int64_t table_batch_stride) {
  using acc = acc_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_pairs; p += stride) {
    const int64_t i = p % half;
    const int64_t t = p / half;
    const int64_t head = t % heads, row = t / heads;
    const int64_t b = row / S, s = row % S;
    const int64_t tab = b * table_batch_stride + s * half + i;
    scalar_t* x1 = qkv + row * width + head * hd + i;
    scalar_t* x2 = x1 + half;
    acc y1, y2;
    rope::rotate<kInverse>(static_cast<acc>(*x1), static_cast<acc>(*x2), cos[tab], sin[tab], &y1, &y2);
    *x1 = static_cast<scalar_t>(y1);
    *x2 = static_cast<scalar_t>(y2);
  }
}

// Enough blocks to fill the device a few times over; the grid-stride loop
// covers the rest.
unsigned grid_for(int64_t n, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * 16)));
}

void rope_launch(at::Tensor& qkv, const attn::QkvShape& sh, const attn::RopeTables& t, bool inverse) {
  TORCH_CHECK(qkv.is_cuda(), "ckpt_ops: qkv must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(qkv.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t heads = sh.H + sh.KV, n_pairs = sh.B * sh.S * heads * t.half;
  const unsigned blocks = grid_for(n_pairs, qkv.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "ckpt_ops::rope_cuda", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_bool(inverse, [&](auto kInverse) {
      rope_kernel<decltype(kInverse)::value, scalar_t><<<blocks, kThreads, 0, stream>>>(
          qkv.mutable_data_ptr<scalar_t>(), t.cos.const_data_ptr<acc>(), t.sin.const_data_ptr<acc>(), n_pairs,
          sh.S, heads, sh.hd, t.half, sh.width(), t.batch_stride);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CUDA, m) { attn::register_rope<rope_launch>(m); }

}  // namespace ckpt_ops
