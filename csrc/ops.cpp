// ckpt_ops._C: the op schemas (defined once, here) and the Python module.
//
// Each device registers its kernels beside its own code with
// TORCH_LIBRARY_IMPL(ckpt_ops, CPU|CUDA, m) (csrc/cpu/*.cpp, csrc/cuda/*.cu).
// Fake (meta) implementations are registered in Python (ckpt_ops/_ops.py) so
// torch.compile can trace every op without running it.
#include <Python.h>

#include <torch/library.h>

#include "ckpt_ops/cpu_isa.h"

TORCH_LIBRARY(ckpt_ops, m) {
  // ---- LayerNorm / RMSNorm (csrc/cpu/norm.cpp, csrc/cuda/norm.cu) --------
  // x: contiguous (M, N); weight/bias: (N,) of x's dtype; mean/rstd: (M,) in
  // the accumulation dtype (fp32, or fp64 for fp64 x). Gradients that are not
  // requested come back as empty tensors.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_dx, "
      "bool need_dweight, bool need_dbias) -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def(
      "rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, bool need_dx, bool need_dweight) "
      "-> (Tensor dx, Tensor dweight)");

  // ---- MLP elementwise kernels (csrc/cpu/mlp.cpp, csrc/cuda/mlp.cu) ---------
  // Elementwise over contiguous tensors of one shape; the flat element index is
  // the Philox counter. activation: 0 gelu (erf), 1 gelu_tanh, 2 relu, 3 silu.
  //   act_fwd:  a = act(h)            | gated (g given): a = act(g) * h
  //   act_bwd:  a (if need_a), dh = da * act'(h), dg empty
  //             gated: a = act(g) * h, dh = da * act(g), dg = da * h * act'(g)
  //   dropout_fwd: out = residual + y * keep / (1 - p)   (keep: Philox >= threshold(p))
  //   dropout_bwd: dy = dout * keep / (1 - p)
  // seed: a 1-element int64 tensor on the tensors' device.
  m.def("act_fwd(Tensor h, Tensor? g, int activation) -> Tensor");
  m.def("act_bwd(Tensor da, Tensor h, Tensor? g, int activation, bool need_a) -> (Tensor a, Tensor dh, Tensor dg)");
  m.def("dropout_fwd(Tensor y, Tensor? residual, Tensor seed, float p) -> Tensor");
  m.def("dropout_bwd(Tensor dout, Tensor seed, float p) -> Tensor");

  // ---- Attention (csrc/cpu/attention.cpp, csrc/cuda/rope.cu) -----------------
  // qkv: (B, S, (H + 2KV) * hd) contiguous, rows [q heads | k heads | v heads];
  // o: (B, S, H * hd); lse: (B, H, S) fp32, fp64 for fp64 (+inf for rows with no key to attend);
  // key_mask: (B, S) bool/int, nonzero = attend. Query head h uses KV head h / (H/KV).
  //   rope_: in place on the q and k heads of qkv; cos/sin (S, hd/2) or (B, S, hd/2);
  //          inverse=True applies the transposed rotation (backward, on dqkv).
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, bool inverse) -> ()");
  m.def(
      "attention_fwd(Tensor qkv, Tensor? key_mask, int num_heads, int num_kv_heads, bool causal, float scale) "
      "-> (Tensor o, Tensor lse)");
  m.def(
      "attention_bwd(Tensor do, Tensor qkv, Tensor o, Tensor lse, Tensor? key_mask, int num_heads, "
      "int num_kv_heads, bool causal, float scale) -> Tensor dqkv");
}

namespace {

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef CKPT_OPS_WITH_CUDA
  PyObject* with_cuda = Py_True;
#ifdef CKPT_OPS_CUDA_ARCHS
  const char* archs = CKPT_OPS_CUDA_ARCHS;
#else
  const char* archs = "";
#endif
#else
  PyObject* with_cuda = Py_False;
  const char* archs = "";
#endif
#ifdef CKPT_OPS_TORCH_VERSION
  const char* torch_version = CKPT_OPS_TORCH_VERSION;
#else
  const char* torch_version = "";
#endif
  return Py_BuildValue("{s:O,s:s,s:s}", "with_cuda", with_cuda, "cuda_archs", archs,
                       "torch_version", torch_version);
}

// The CPU kernels' instruction set (ckpt_ops/cpu_isa.h): {isa, requested, supported,
// avx512_bf16, error}; error is "" unless CKPT_OPS_CPU_ISA cannot be served.
PyObject* cpu_isa(PyObject* /*self*/, PyObject* /*args*/) {
  const ckpt_ops::cpu::IsaInfo& i = ckpt_ops::cpu::isa_info();
  return Py_BuildValue("{s:s,s:s,s:s,s:O,s:s}", "isa", i.name.c_str(), "requested", i.requested.c_str(),
                       "supported", i.supported.c_str(), "avx512_bf16", i.avx512_bf16 ? Py_True : Py_False,
                       "error", i.error.c_str());
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "Compile-time facts: with_cuda (bool), cuda_archs, torch_version built against."},
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "The CPU kernels' instruction set: isa, requested (CKPT_OPS_CPU_ISA), supported, avx512_bf16, error."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                      "ckpt_ops C++/CUDA kernels (registered as torch.ops.ckpt_ops.*)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
