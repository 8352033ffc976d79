// Portability macros shared by the C++ CPU and CUDA kernels.
//
// Everything in csrc/include/ is compiled twice: by the host compiler for the
// CPU kernels (and so executed by the CPU test-suite) and by nvcc for the CUDA
// kernels. Keep it free of host-only or device-only calls.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define CKPT_HD __host__ __device__
#define CKPT_HD_INLINE __host__ __device__ __forceinline__
#else
#define CKPT_HD
// Always inlined on the host too: the CPU kernels' `omp simd` loops are vectorised, and
// compiled for their ISA copy's instruction set (ckpt_ops/cpu_isa.h), only with every
// per-element helper inlined into them; one left out of line by the inliner's heuristics is a
// baseline-ISA call per element (measured: a 12x slower silu forward).
#if defined(__GNUC__)
#define CKPT_HD_INLINE inline __attribute__((always_inline))
#else
#define CKPT_HD_INLINE inline
#endif
#endif

#include <type_traits>

namespace ckpt_ops {

// Calls f(std::true_type{}) or f(std::false_type{}): turns a runtime flag into a template
// parameter (host code: kernel dispatch).
template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Accumulation type: fp64 for fp64 tensors, fp32 for everything else
// (fp32, fp16, bf16). Per-row statistics are stored in this type.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

// 1/sqrt(v), IEEE-rounded on host and device (no rsqrtf approximation), so
// the CPU and CUDA kernels agree on the statistics given the same sums.
CKPT_HD_INLINE float inv_sqrt(float v) { return 1.0f / sqrtf(v); }
CKPT_HD_INLINE double inv_sqrt(double v) { return 1.0 / sqrt(v); }

// Multiply / add without contraction into an FMA, so that an expression
// recomputed in another kernel rounds exactly as in the forward kernel (the
// host build uses -ffp-contract=off for the same reason).
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
#else
CKPT_HD_INLINE float mul_rn(float a, float b) { return a * b; }
CKPT_HD_INLINE double mul_rn(double a, double b) { return a * b; }
CKPT_HD_INLINE float add_rn(float a, float b) { return a + b; }
CKPT_HD_INLINE double add_rn(double a, double b) { return a + b; }
#endif

}  // namespace ckpt_ops
