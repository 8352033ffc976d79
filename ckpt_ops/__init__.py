"""ckpt_ops: activation checkpointing whose recompute runs in fused kernels.

Layers save only their segment input plus tiny per-row statistics and recompute in backward, inside
fused kernels, only what the gradients need. Kernels: Triton (CUDA tensors), the C++/CUDA extension
``ckpt_ops._C`` (CPU and CUDA tensors), and a pure-PyTorch reference; ``backend_info()`` says which
serves what.

    import ckpt_ops
    ln = ckpt_ops.nn.LayerNorm(768)
    y = ckpt_ops.functional.rms_norm(x, (768,), weight)
    ckpt_ops.saved_bytes(ln, x)
"""
from ckpt_ops._backend import backend_info
from ckpt_ops.measure import saved_bytes
from ckpt_ops import functional, nn, reference  # noqa: E402  (registers the op families)
from ckpt_ops.convert import conversion_report, convert, unconvert  # noqa: E402
from ckpt_ops.sequential import checkpoint_sequential  # noqa: E402
from ckpt_ops.planner import Plan, plan  # noqa: E402
from ckpt_ops.report import memory_report  # noqa: E402

__version__ = "0.1.0"
__all__ = ["backend_info", "saved_bytes", "convert", "conversion_report", "unconvert", "functional", "nn",
           "reference", "checkpoint_sequential", "plan", "Plan", "memory_report",
           "__version__"]
