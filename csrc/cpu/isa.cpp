// The run-time ISA choice of the CPU kernels (see ckpt_ops/cpu_isa.h).
#include "ckpt_ops/cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>

namespace ckpt_ops {
namespace cpu {
namespace {

IsaInfo choose() {
  IsaInfo o{Isa::kScalar, "scalar", "auto", "scalar", false, ""};
  bool avx2 = false, avx512 = false;
#if CKPT_CPU_X86
  __builtin_cpu_init();
  avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  o.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
#endif
  o.supported = avx512 ? "avx512,avx2,scalar" : avx2 ? "avx2,scalar" : "scalar";
  const char* env = std::getenv("CKPT_OPS_CPU_ISA");
  o.requested = (env && *env) ? env : "auto";
  const std::string& r = o.requested;
  if (r == "auto") {
    o.isa = avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kScalar;
  } else if (r == "avx512" || r == "avx2" || r == "scalar") {
    const bool ok = r == "scalar" || (r == "avx2" && avx2) || (r == "avx512" && avx512);
    if (!ok) {
      o.error = "CKPT_OPS_CPU_ISA=" + r + " but this CPU (or build) supports only " + o.supported;
    }
    o.isa = r == "avx512" ? Isa::kAvx512 : r == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  } else {
    o.error = "CKPT_OPS_CPU_ISA must be one of avx512, avx2, scalar, auto; got '" + r + "'";
  }
  if (!o.error.empty()) o.isa = Isa::kScalar;
  o.name = o.isa == Isa::kAvx512 ? "avx512" : o.isa == Isa::kAvx2 ? "avx2" : "scalar";
  return o;
}

}  // namespace

const IsaInfo& isa_info() {
  static const IsaInfo info = choose();
  return info;
}

Isa isa() {
  const IsaInfo& i = isa_info();
  TORCH_CHECK_VALUE(i.error.empty(), i.error);
  return i.isa;
}

}  // namespace cpu
}  // namespace ckpt_ops
