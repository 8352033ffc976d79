// Run-time instruction-set choice of the C++ CPU kernels (host only: never
// included by a .cu file).
//
// Each kernel's inner work is a `Body` struct with an always-inline static
// `run(...)`. isa_fn<Body>(args...) returns one of three copies of it,
// compiled for the x86-64 baseline (SSE2; the only copy off x86), for AVX2 +
// FMA, or for AVX-512 F/BW/DQ/VL at 512-bit vectors; the `omp simd` loops and
// the shared math they inline are vectorised for that copy's instruction set
// (the ATen scheme of one kernel source compiled per CPU_CAPABILITY, here
// through target attributes in one translation unit). A kernel looks its copy
// up once, before at::parallel_for, so every task and every forward /
// recompute pair in a process runs the same code.
//
// The copy is the widest the CPU supports, or the one CKPT_OPS_CPU_ISA asks
// for (avx512 | avx2 | scalar | auto; read once, on the first kernel call).
// Asking for an instruction set the CPU lacks, or an unknown value, raises on
// that call (no silent fallback); ckpt_ops.backend_info()["cpu_isa"] reports
// the choice.
//
// Bits: the elementwise math leaves no FMA to the compiler (-ffp-contract=off)
// and writes its fused multiply-adds out (host_math::fma_, exact on every copy),
// so the activation, dropout and RoPE kernels return the same bits on every copy;
// the norms' row sums are split across vector lanes, so their last bits depend
// on the copy (never on the thread count).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "ckpt_ops/host_math.h"

#if defined(__GNUC__)
#define CKPT_CPU_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CKPT_CPU_ALWAYS_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define CKPT_CPU_X86 1
#define CKPT_CPU_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define CKPT_CPU_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,prefer-vector-width=512")))
#else
#define CKPT_CPU_X86 0
#endif

namespace ckpt_ops {
namespace cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct IsaInfo {
  Isa isa;                // the copy every kernel runs
  std::string name;       // "avx512" | "avx2" | "scalar"
  std::string requested;  // CKPT_OPS_CPU_ISA ("auto" when unset)
  std::string supported;  // what this CPU (and build) offers, e.g. "avx512,avx2,scalar"
  bool avx512_bf16;       // the CPU has AVX512_BF16 (reported; the kernels do not need it)
  std::string error;      // non-empty: the request cannot be served (kernels raise it)
};

// The choice, made once (csrc/cpu/isa.cpp). isa() raises IsaInfo::error.
const IsaInfo& isa_info();
Isa isa();

template <typename Body, typename... A>
void run_scalar(A... a) {
  Body::run(a...);
}
#if CKPT_CPU_X86
template <typename Body, typename... A>
CKPT_CPU_TARGET_AVX2 void run_avx2(A... a) {
  Body::run(a...);
}
template <typename Body, typename... A>
CKPT_CPU_TARGET_AVX512 void run_avx512(A... a) {
  Body::run(a...);
}
#endif

// The copy of Body::run for this process's ISA, for arguments of the types of `a`.
template <typename Body, typename... A>
auto isa_fn(const A&... /*a*/) -> void (*)(A...) {
#if CKPT_CPU_X86
  switch (isa()) {
    case Isa::kAvx512:
      return &run_avx512<Body, A...>;
    case Isa::kAvx2:
      return &run_avx2<Body, A...>;
    case Isa::kScalar:
      break;
  }
#else
  (void)isa();
#endif
  return &run_scalar<Body, A...>;
}

// v rounded to scalar_t in a form `omp simd` vectorises: for bf16, c10's rounding (to nearest
// even, NaN -> 0x7FC0) as integer arithmetic -- c10::BFloat16(float) branches on isnan, which
// keeps a loop scalar (7x slower than ATen's vectorised casts); otherwise a plain cast.
template <typename scalar_t, typename acc>
CKPT_CPU_ALWAYS_INLINE scalar_t narrow(acc v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t u = static_cast<uint32_t>(host_math::float_to_bits(v));
    const uint32_t rounded = (u + (UINT32_C(0x7FFF) + ((u >> 16) & 1u))) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? UINT32_C(0x7FC0) : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

}  // namespace cpu
}  // namespace ckpt_ops
