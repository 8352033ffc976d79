// LayerNorm / RMSNorm CUDA kernels. Same contract and same per-element math as
// csrc/cpu/norm.cpp (ckpt_ops/norm_math.h); only the reduction order differs:
//  - forward: one block per row, block-wide sums (two-pass: mean, then the sum
//    of squared deviations), then y;
//  - backward: a grid of min(M, 2*SMs) blocks, block c owns the rows of chunk c
//    (the CPU's chunking with another chunk count). For each row it recomputes
//    xhat from x and the saved mean/rstd, writes dx, and adds dy*xhat and dy
//    into its own row of the (chunks, N) partial buffers: thread t always owns
//    columns t, t+T, ..., so there are no races and no second pass over x.
//    A last kernel sums the chunk rows in order (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ckpt_ops/norm_host.h"
#include "ckpt_ops/norm_math.h"
#include "reduce.cuh"

namespace ckpt_ops {
namespace {

template <bool kRms, bool kW, bool kB, typename scalar_t>
__global__ void norm_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ b, scalar_t* __restrict__ y,
                                acc_t<scalar_t>* __restrict__ mean, acc_t<scalar_t>* __restrict__ rstd, int64_t N,
                                acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  __shared__ acc smem[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * N;
  scalar_t* yr = y + row * N;
  acc m = 0;
  if (!kRms) {
    acc s = 0;
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) s += static_cast<acc>(xr[j]);
    m = norm::mean_from_sum(cuda::block_sum(s, smem), N);
  }
  acc q = 0;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const acc c = norm::centered<kRms>(static_cast<acc>(xr[j]), m);
    q += c * c;
  }
  const acc r = norm::row_rstd<kRms>(cuda::block_sum(q, smem), N, eps);
  if (threadIdx.x == 0) {
    if (!kRms) mean[row] = m;
    rstd[row] = r;
  }
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    const acc xh = norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
    yr[j] = static_cast<scalar_t>(
        norm::affine(xh, kW ? static_cast<acc>(w[j]) : acc(1), kB ? static_cast<acc>(b[j]) : acc(0), kW, kB));
  }
}

template <bool kRms, bool kW, typename scalar_t>
__global__ void norm_bwd_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                const scalar_t* __restrict__ w, const acc_t<scalar_t>* __restrict__ mean,
                                const acc_t<scalar_t>* __restrict__ rstd, scalar_t* __restrict__ dx,
                                acc_t<scalar_t>* __restrict__ dw_part, acc_t<scalar_t>* __restrict__ db_part,
                                int64_t M, int64_t N) {
  using acc = acc_t<scalar_t>;
  __shared__ acc smem[32];
  const int64_t chunks = gridDim.x, c = blockIdx.x;
  const int64_t rbegin = c * M / chunks, rend = (c + 1) * M / chunks;
  acc* pdw = dw_part ? dw_part + c * N : nullptr;
  acc* pdb = db_part ? db_part + c * N : nullptr;
  for (int64_t row = rbegin; row < rend; ++row) {
    const scalar_t* xr = x + row * N;
    const scalar_t* dyr = dy + row * N;
    const acc m = kRms ? acc(0) : mean[row];
    const acc r = rstd[row];
    if (dx != nullptr) {
      acc sg = 0, sgx = 0;
      for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
        const acc g = kW ? static_cast<acc>(dyr[j]) * static_cast<acc>(w[j]) : static_cast<acc>(dyr[j]);
        sg += g;
        sgx += g * norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
      }
      acc c1, c2;
      norm::dx_coeffs<kRms>(kRms ? acc(0) : cuda::block_sum(sg, smem), cuda::block_sum(sgx, smem), N, &c1, &c2);
      scalar_t* dxr = dx + row * N;
      for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
        const acc g = kW ? static_cast<acc>(dyr[j]) * static_cast<acc>(w[j]) : static_cast<acc>(dyr[j]);
        const acc xh = norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
        dxr[j] = static_cast<scalar_t>(norm::dx(g, xh, r, c1, c2));
      }
    }
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const acc d = static_cast<acc>(dyr[j]);
      if (pdw != nullptr) pdw[j] += d * norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
      if (pdb != nullptr) pdb[j] += d;
    }
  }
}

// out[j] = sum_c part[c, j], in chunk order.
template <typename scalar_t>
__global__ void sum_chunks_kernel(const acc_t<scalar_t>* __restrict__ part, scalar_t* __restrict__ out,
                                  int64_t chunks, int64_t N) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= N) return;
  acc_t<scalar_t> s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += part[c * N + j];
  out[j] = static_cast<scalar_t>(s);
}

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

norm::FwdOut norm_fwd(bool rms, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
  norm::FwdOut o = norm::fwd_prepare(rms, x, weight, bias);
  const int64_t M = x.size(0), N = x.size(1);
  if (M == 0 || N == 0) return o;
  TORCH_CHECK(M <= INT32_MAX, "ckpt_ops: layer/rms norm supports at most 2^31-1 rows on CUDA");
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = cuda::row_threads(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ckpt_ops::norm_fwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* w = static_cast<const scalar_t*>(opt_ptr(weight));
    const scalar_t* b = static_cast<const scalar_t*>(opt_ptr(bias));
    dispatch_bool(rms, [&](auto kRms) {
      dispatch_bool(w != nullptr, [&](auto kW) {
        dispatch_bool(b != nullptr, [&](auto kB) {
          norm_fwd_kernel<decltype(kRms)::value, decltype(kW)::value, decltype(kB)::value, scalar_t>
              <<<static_cast<unsigned>(M), threads, 0, stream>>>(
                  x.const_data_ptr<scalar_t>(), w, b, o.y.mutable_data_ptr<scalar_t>(),
                  rms ? nullptr : o.mean.mutable_data_ptr<acc>(), o.rstd.mutable_data_ptr<acc>(), N,
                  static_cast<acc>(eps));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return o;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(bool rms, const at::Tensor& dy, const at::Tensor& x,
                                                        const c10::optional<at::Tensor>& weight,
                                                        const c10::optional<at::Tensor>& mean,
                                                        const at::Tensor& rstd, bool need_dx, bool need_dw,
                                                        bool need_db) {
  TORCH_CHECK(x.is_cuda(), "ckpt_ops: x must be a CUDA tensor");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.dim() == 2 ? x.size(0) : 0, N = x.dim() == 2 ? x.size(1) : 0;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(M, 2 * sm_count(x.get_device())));
  norm::BwdOut o = norm::bwd_prepare(rms, dy, x, weight, mean, rstd, need_dx, need_dw, need_db, chunks);
  if ((!need_dx && !need_dw && !need_db) || M == 0 || N == 0) return {o.dx, o.dw, o.db};
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int threads = cuda::row_threads(N);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ckpt_ops::norm_bwd_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* w = static_cast<const scalar_t*>(opt_ptr(weight));
    dispatch_bool(rms, [&](auto kRms) {
      dispatch_bool(w != nullptr, [&](auto kW) {
        norm_bwd_kernel<decltype(kRms)::value, decltype(kW)::value, scalar_t>
            <<<static_cast<unsigned>(chunks), threads, 0, stream>>>(
                dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w,
                rms ? nullptr : mean->const_data_ptr<acc>(), rstd.const_data_ptr<acc>(),
                need_dx ? o.dx.mutable_data_ptr<scalar_t>() : nullptr,
                need_dw ? o.dw_part.mutable_data_ptr<acc>() : nullptr,
                need_db ? o.db_part.mutable_data_ptr<acc>() : nullptr, M, N);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    const unsigned blocks = static_cast<unsigned>((N + 255) / 256);
    if (need_dw) {
      sum_chunks_kernel<scalar_t><<<blocks, 256, 0, stream>>>(o.dw_part.const_data_ptr<acc>(),
                                                              o.dw.mutable_data_ptr<scalar_t>(), chunks, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (need_db) {
      sum_chunks_kernel<scalar_t><<<blocks, 256, 0, stream>>>(o.db_part.const_data_ptr<acc>(),
                                                              o.db.mutable_data_ptr<scalar_t>(), chunks, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {o.dx, o.dw, o.db};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CUDA, m) { norm::register_ops<norm_fwd, norm_bwd>(m); }

}  // namespace ckpt_ops
