// MLP elementwise CUDA kernels. Same contract and same per-element math as
// csrc/cpu/mlp.cpp (ckpt_ops/activation_math.h, ckpt_ops/philox.h): grid-stride
// loops over the flat int64 element index, one element per thread per step.
// The dropout seed is read from device memory inside the kernel (no host
// synchronisation); the Philox counter is the flat index, so the mask does not
// depend on the launch configuration and dropout_bwd rebuilds exactly the mask
// of dropout_fwd.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ckpt_ops/activation_math.h"
#include "ckpt_ops/mlp_host.h"
#include "ckpt_ops/philox.h"

namespace ckpt_ops {
namespace {

constexpr int kThreads = 256;

template <int kAct, bool kGated, typename scalar_t>
__global__ void act_fwd_kernel(const scalar_t* __restrict__ h, const scalar_t* __restrict__ g,
                               scalar_t* __restrict__ a, int64_t n) {
  using acc = acc_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc hv = static_cast<acc>(h[i]);
    if constexpr (kGated) {
      a[i] = static_cast<scalar_t>(act::gated_fwd<kAct>(hv, static_cast<acc>(g[i])));
    } else {
      a[i] = static_cast<scalar_t>(act::fwd<kAct>(hv));
    }
  }
}

template <int kAct, bool kGated, bool kNeedA, typename scalar_t>
__global__ void act_bwd_kernel(const scalar_t* __restrict__ da, const scalar_t* __restrict__ h,
                               const scalar_t* __restrict__ g, scalar_t* __restrict__ a,
                               scalar_t* __restrict__ dh, scalar_t* __restrict__ dg, int64_t n) {
  using acc = acc_t<scalar_t>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
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
}

// out = residual + keep * y * scale (kRng), or residual + y (p == 0, seed unused).
template <bool kRng, bool kResidual, typename scalar_t>
__global__ void dropout_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ residual,
                               scalar_t* __restrict__ out, int64_t n, const int64_t* __restrict__ seed_ptr,
                               uint32_t threshold, acc_t<scalar_t> scale) {
  using acc = acc_t<scalar_t>;
  const int64_t seed = kRng ? *seed_ptr : 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc rv = kResidual ? static_cast<acc>(residual[i]) : acc(0);
    const uint32_t bits = kRng ? philox::bits_at(seed, i) : 0u;
    out[i] = static_cast<scalar_t>(
        philox::dropout_element<kRng, kResidual>(static_cast<acc>(y[i]), rv, bits, threshold, scale));
  }
}

// Enough blocks to fill the device a few times over; the grid-stride loops
// cover the rest.
unsigned grid_for(int64_t n, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * 16)));
}

void act_fwd(const at::Tensor& h, const at::Tensor* g, int activation, at::Tensor& a) {
  TORCH_CHECK(h.is_cuda(), "ckpt_ops: h must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = h.numel();
  const unsigned blocks = grid_for(n, h.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ckpt_ops::act_fwd_cuda", [&] {
    mlp::dispatch_activation(activation, [&](auto kAct) {
      dispatch_bool(g != nullptr, [&](auto kGated) {
        act_fwd_kernel<decltype(kAct)::value, decltype(kGated)::value, scalar_t><<<blocks, kThreads, 0, stream>>>(
            h.const_data_ptr<scalar_t>(), g ? g->const_data_ptr<scalar_t>() : nullptr,
            a.mutable_data_ptr<scalar_t>(), n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void act_bwd(const at::Tensor& da, const at::Tensor& h, const at::Tensor* g, int activation, mlp::ActBwdOut& o) {
  TORCH_CHECK(h.is_cuda(), "ckpt_ops: h must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(h.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = h.numel();
  const unsigned blocks = grid_for(n, h.get_device());
  const bool need_a = o.a.numel() > 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "ckpt_ops::act_bwd_cuda", [&] {
    mlp::dispatch_activation(activation, [&](auto kAct) {
      dispatch_bool(g != nullptr, [&](auto kGated) {
        dispatch_bool(need_a, [&](auto kNeedA) {
          act_bwd_kernel<decltype(kAct)::value, decltype(kGated)::value, decltype(kNeedA)::value, scalar_t>
              <<<blocks, kThreads, 0, stream>>>(
                  da.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
                  g ? g->const_data_ptr<scalar_t>() : nullptr, need_a ? o.a.mutable_data_ptr<scalar_t>() : nullptr,
                  o.dh.mutable_data_ptr<scalar_t>(), g ? o.dg.mutable_data_ptr<scalar_t>() : nullptr, n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
}

void dropout(const at::Tensor& y, const at::Tensor* residual, const at::Tensor& seed, double p, at::Tensor& out) {
  TORCH_CHECK(y.is_cuda(), "ckpt_ops: dropout input must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(y.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = y.numel();
  const unsigned blocks = grid_for(n, y.get_device());
  const uint32_t threshold = philox::dropout_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "ckpt_ops::dropout_cuda", [&] {
    using acc = acc_t<scalar_t>;
    dispatch_bool(p > 0.0, [&](auto kRng) {
      dispatch_bool(residual != nullptr, [&](auto kResidual) {
        dropout_kernel<decltype(kRng)::value, decltype(kResidual)::value, scalar_t><<<blocks, kThreads, 0, stream>>>(
            y.const_data_ptr<scalar_t>(), residual ? residual->const_data_ptr<scalar_t>() : nullptr,
            out.mutable_data_ptr<scalar_t>(), n, seed.const_data_ptr<int64_t>(), threshold,
            philox::dropout_scale<acc>(p));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CUDA, m) { mlp::register_ops<act_fwd, act_bwd, dropout>(m); }

}  // namespace ckpt_ops
