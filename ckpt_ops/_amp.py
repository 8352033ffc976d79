"""``torch.autocast`` semantics of the fused segments (DESIGN §6, mixed precision).

Under ``torch.autocast(device_type, dtype=cdt)`` the segments ``ckpt_ops.functional.attention``,
``mlp`` and ``transformer_block`` (and the modules using them) compute what eager PyTorch computes
under autocast from the same parameters, following autocast's own op policy:

* GEMMs (QKV, output projection, fc1 / gate / fc2) and the attention core run in ``cdt``
  (autocast's lower-precision list: linear, matmul, bmm); the activation runs on their ``cdt``
  output, as eager's gelu/silu do;
* the fused pre-norm runs in fp32 (autocast's fp32 list: layer_norm, rms_norm);
* the residual add runs in the promoted dtype, so an fp32 residual stream stays fp32;
* output dtype = eager's: ``promote(x.dtype, cdt)`` with ``residual``, ``cdt`` without;
* every parameter gets its gradient in its own dtype (fp32 parameters: fp32 ``.grad``), ``x`` in
  ``x``'s dtype.

How: the entry casts x (when fp16/bf16) and the norm parameters to fp32 and the GEMM parameters to
``cdt`` with differentiable ``.to()`` *outside* the autograd Function (what autocast's weight-cast
cache does; the gradients flow back through the casts into the parameters' dtype). The Function
then runs with autocast disabled and casts its own activations to ``cfg.amp`` in front of each GEMM,
in forward, replay and backward alike: the replay stays bit-identical to the forward, and calling
``backward()`` inside an autocast region changes nothing. Tensors autocast does not touch (fp64)
are left alone: ``cfg.amp`` is None for them, as outside autocast.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

AMP_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOW = (torch.float16, torch.bfloat16)


def gemm_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype the GEMMs of a segment on `x` run in, or None (autocast off or x not
    eligible)."""
    dev = x.device.type
    if x.dtype in AMP_DTYPES and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def enabled(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type)


def off(device_type: str):
    """Autocast disabled for `device_type` (a no-op context when it is not enabled)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def to(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """t cast to dtype (None and dtype=None pass through; differentiable)."""
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def fp32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """fp16/bf16 t upcast to fp32 (autocast's fp32 policy); anything else unchanged."""
    return t.float() if t is not None and t.dtype in LOW else t


def out_dtype(x_dtype: torch.dtype, cdt: torch.dtype, residual: bool) -> torch.dtype:
    """Output dtype of eager PyTorch under autocast: linear output cdt, + x promotes."""
    return torch.promote_types(x_dtype, cdt) if residual else cdt
