// LayerNorm / RMSNorm CPU kernels: OpenMP-parallel over rows (at::parallel_for),
// `omp simd` reductions inside a row, math from ckpt_ops/norm_math.h (the same
// expressions the CUDA kernels run).
//
// Backward reduces dweight/dbias without a second pass over x: the rows are cut
// into a fixed number of chunks (a function of M only, so results do not depend
// on the thread count), each chunk accumulates its partial sums in an fp32/fp64
// row of a (chunks, N) buffer while it computes dx, and a final pass adds the
// chunk rows in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "ckpt_ops/cpu_isa.h"
#include "ckpt_ops/norm_host.h"
#include "ckpt_ops/norm_math.h"

namespace ckpt_ops {
namespace {

// Rows [begin, end) of the forward: one ISA body (ckpt_ops/cpu_isa.h).
template <bool kRms, bool kW, bool kB>
struct NormFwdRows {
  template <typename scalar_t>
  static CKPT_CPU_ALWAYS_INLINE void run(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y,
                                         acc_t<scalar_t>* mean, acc_t<scalar_t>* rstd, int64_t N,
                                         acc_t<scalar_t> eps, int64_t begin, int64_t end) {
    using acc = acc_t<scalar_t>;
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* xr = x + row * N;
      scalar_t* yr = y + row * N;
      acc m = 0;
      if (!kRms) {
        acc s = 0;
        #pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < N; ++j) s += static_cast<acc>(xr[j]);
        m = norm::mean_from_sum(s, N);
        mean[row] = m;
      }
      acc q = 0;
      #pragma omp simd reduction(+ : q)
      for (int64_t j = 0; j < N; ++j) {
        const acc c = norm::centered<kRms>(static_cast<acc>(xr[j]), m);
        q += c * c;
      }
      const acc r = norm::row_rstd<kRms>(q, N, eps);
      rstd[row] = r;
      #pragma omp simd
      for (int64_t j = 0; j < N; ++j) {
        const acc xh = norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
        yr[j] = cpu::narrow<scalar_t>(norm::affine(xh, kW ? static_cast<acc>(w[j]) : acc(1),
                                                   kB ? static_cast<acc>(b[j]) : acc(0), kW, kB));
      }
    }
  }
};

template <bool kRms, bool kW, bool kB, typename scalar_t>
void norm_fwd_kernel(const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y, acc_t<scalar_t>* mean,
                     acc_t<scalar_t>* rstd, int64_t M, int64_t N, acc_t<scalar_t> eps) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
  const auto rows = cpu::isa_fn<NormFwdRows<kRms, kW, kB>>(x, w, b, y, mean, rstd, N, eps, M, M);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) { rows(x, w, b, y, mean, rstd, N, eps, begin, end); });
}

// Row chunks [cbegin, cend) of the backward: one ISA body (ckpt_ops/cpu_isa.h).
template <bool kRms, bool kW>
struct NormBwdChunks {
  template <typename scalar_t>
  static CKPT_CPU_ALWAYS_INLINE void run(const scalar_t* dy, const scalar_t* x, const scalar_t* w,
                                         const acc_t<scalar_t>* mean, const acc_t<scalar_t>* rstd, scalar_t* dx,
                                         acc_t<scalar_t>* dw_part, acc_t<scalar_t>* db_part, int64_t M, int64_t N,
                                         int64_t chunks, int64_t cbegin, int64_t cend) {
    using acc = acc_t<scalar_t>;
    for (int64_t c = cbegin; c < cend; ++c) {
      const int64_t rbegin = c * M / chunks, rend = (c + 1) * M / chunks;
      acc* pdw = dw_part ? dw_part + c * N : nullptr;
      acc* pdb = db_part ? db_part + c * N : nullptr;
      for (int64_t row = rbegin; row < rend; ++row) {
        const scalar_t* xr = x + row * N;
        const scalar_t* dyr = dy + row * N;
        const acc m = kRms ? acc(0) : mean[row];
        const acc r = rstd[row];
        if (dx) {
          acc sg = 0, sgx = 0;
          #pragma omp simd reduction(+ : sg, sgx)
          for (int64_t j = 0; j < N; ++j) {
            const acc g = kW ? static_cast<acc>(dyr[j]) * static_cast<acc>(w[j]) : static_cast<acc>(dyr[j]);
            sg += g;
            sgx += g * norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
          }
          acc c1, c2;
          norm::dx_coeffs<kRms>(sg, sgx, N, &c1, &c2);
          scalar_t* dxr = dx + row * N;
          #pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            const acc g = kW ? static_cast<acc>(dyr[j]) * static_cast<acc>(w[j]) : static_cast<acc>(dyr[j]);
            const acc xh = norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
            dxr[j] = cpu::narrow<scalar_t>(norm::dx(g, xh, r, c1, c2));
          }
        }
        if (pdw) {
          #pragma omp simd
          for (int64_t j = 0; j < N; ++j)
            pdw[j] += static_cast<acc>(dyr[j]) * norm::xhat<kRms>(static_cast<acc>(xr[j]), m, r);
        }
        if (pdb) {
          #pragma omp simd
          for (int64_t j = 0; j < N; ++j) pdb[j] += static_cast<acc>(dyr[j]);
        }
      }
    }
  }
};

template <bool kRms, bool kW, typename scalar_t>
void norm_bwd_kernel(const scalar_t* dy, const scalar_t* x, const scalar_t* w, const acc_t<scalar_t>* mean,
                     const acc_t<scalar_t>* rstd, scalar_t* dx, acc_t<scalar_t>* dw_part,
                     acc_t<scalar_t>* db_part, int64_t M, int64_t N, int64_t chunks) {
  const auto run = cpu::isa_fn<NormBwdChunks<kRms, kW>>(dy, x, w, mean, rstd, dx, dw_part, db_part, M, N, chunks,
                                                         chunks, chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
    run(dy, x, w, mean, rstd, dx, dw_part, db_part, M, N, chunks, cbegin, cend);
  });
}

// out[j] = sum_c part[c, j], added in chunk order (deterministic).
template <typename scalar_t>
void sum_chunks(const acc_t<scalar_t>* part, scalar_t* out, int64_t chunks, int64_t N) {
  using acc = acc_t<scalar_t>;
  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += part[c * N + j];
      out[j] = static_cast<scalar_t>(s);
    }
  });
}

norm::FwdOut norm_fwd(bool rms, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, double eps) {
  norm::FwdOut o = norm::fwd_prepare(rms, x, weight, bias);
  const int64_t M = x.size(0), N = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ckpt_ops::norm_fwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* w = static_cast<const scalar_t*>(opt_ptr(weight));
    const scalar_t* b = static_cast<const scalar_t*>(opt_ptr(bias));
    dispatch_bool(rms, [&](auto kRms) {
      dispatch_bool(w != nullptr, [&](auto kW) {
        dispatch_bool(b != nullptr, [&](auto kB) {
          norm_fwd_kernel<decltype(kRms)::value, decltype(kW)::value, decltype(kB)::value, scalar_t>(
              x.const_data_ptr<scalar_t>(), w, b, o.y.mutable_data_ptr<scalar_t>(),
              rms ? nullptr : o.mean.mutable_data_ptr<acc>(), o.rstd.mutable_data_ptr<acc>(), M, N,
              static_cast<acc>(eps));
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
  const int64_t M = x.dim() == 2 ? x.size(0) : 0, N = x.dim() == 2 ? x.size(1) : 0;
  const int64_t chunks = std::max<int64_t>(1, std::min(M, norm::kMaxCpuChunks));
  norm::BwdOut o = norm::bwd_prepare(rms, dy, x, weight, mean, rstd, need_dx, need_dw, need_db, chunks);
  if (!need_dx && !need_dw && !need_db) return {o.dx, o.dw, o.db};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ckpt_ops::norm_bwd", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* w = static_cast<const scalar_t*>(opt_ptr(weight));
    dispatch_bool(rms, [&](auto kRms) {
      dispatch_bool(w != nullptr, [&](auto kW) {
        norm_bwd_kernel<decltype(kRms)::value, decltype(kW)::value, scalar_t>(
            dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w,
            rms ? nullptr : mean->const_data_ptr<acc>(), rstd.const_data_ptr<acc>(),
            need_dx ? o.dx.mutable_data_ptr<scalar_t>() : nullptr,
            need_dw ? o.dw_part.mutable_data_ptr<acc>() : nullptr,
            need_db ? o.db_part.mutable_data_ptr<acc>() : nullptr, M, N, chunks);
      });
    });
    if (need_dw) sum_chunks<scalar_t>(o.dw_part.const_data_ptr<acc>(), o.dw.mutable_data_ptr<scalar_t>(), chunks, N);
    if (need_db) sum_chunks<scalar_t>(o.db_part.const_data_ptr<acc>(), o.db.mutable_data_ptr<scalar_t>(), chunks, N);
  });
  return {o.dx, o.dw, o.db};
}

}  // namespace

TORCH_LIBRARY_IMPL(ckpt_ops, CPU, m) { norm::register_ops<norm_fwd, norm_bwd>(m); }

}  // namespace ckpt_ops
