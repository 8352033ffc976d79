"""Pure-PyTorch references.

Two roles, kept apart:

* ``*_ref`` functions: the oracle of every test and benchmark -- the plain eager PyTorch
  computation, differentiated by autograd, without checkpointing.
* ``*_fwd`` / ``*_bwd`` functions: the ``"reference"`` backend, i.e. the same kernel contracts as
  the Triton and C++ kernels (2-D contiguous inputs, per-row statistics in the accumulation dtype,
  empty tensors for gradients not requested), written with ordinary torch ops. They run on any
  device and need neither Triton nor the extension.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / statistics dtype: fp64 for fp64 tensors, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(0, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm
# ------------------------------------------------------------------------------------------------
def layer_norm_ref(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Oracle: ``torch.nn.functional.layer_norm``."""
    return F.layer_norm(x, tuple(normalized_shape), weight, bias, eps)


def rms_norm_ref(x: Tensor, normalized_shape: Sequence[int], weight: Optional[Tensor] = None,
                 eps: Optional[float] = None) -> Tensor:
    """Oracle: ``torch.nn.functional.rms_norm``."""
    return F.rms_norm(x, tuple(normalized_shape), weight, eps)


def _norm_stats(x: Tensor, eps: float, rms: bool) -> Tuple[Tensor, Tensor, Tensor]:
    xa = x.to(acc_dtype(x.dtype))
    if rms:
        mean = xa.new_empty(0)
        rstd = torch.rsqrt(xa.square().mean(-1) + eps)
        xhat = xa * rstd[:, None]
    else:
        mean = xa.mean(-1)
        xc = xa - mean[:, None]
        rstd = torch.rsqrt(xc.square().mean(-1) + eps)
        xhat = xc * rstd[:, None]
    return mean, rstd, xhat


def _affine(xhat: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    y = xhat * weight.to(xhat.dtype) if weight is not None else xhat
    return y + bias.to(xhat.dtype) if bias is not None else y


def _norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, rms: bool,
              need_dx: bool, need_dw: bool, need_db: bool) -> Tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(x.dtype)
    xa, dya = x.to(acc), dy.to(acc)
    xhat = (xa if rms else xa - mean[:, None]) * rstd[:, None]
    dx = dw = db = None
    if need_dx:
        g = dya * weight.to(acc) if weight is not None else dya
        c2 = (g * xhat).mean(-1, keepdim=True)
        c1 = 0.0 if rms else g.mean(-1, keepdim=True)
        dx = (rstd[:, None] * (g - (xhat * c2 + c1))).to(x.dtype)
    if need_dw:
        dw = (dya * xhat).sum(0).to(weight.dtype)
    if need_db:
        db = dya.sum(0).to(x.dtype)
    wdtype = weight.dtype if weight is not None else x.dtype
    return (dx if dx is not None else _empty(x.dtype, x.device),
            dw if dw is not None else _empty(wdtype, x.device),
            db if db is not None else _empty(x.dtype, x.device))


def layer_norm_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Kernel contract of ``ckpt_ops::layer_norm_fwd``: x (M, N) -> (y, mean, rstd)."""
    mean, rstd, xhat = _norm_stats(x, eps, rms=False)
    return _affine(xhat, weight, bias).to(x.dtype), mean, rstd


def layer_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, need_dx: bool,
                   need_dweight: bool, need_dbias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Kernel contract of ``ckpt_ops::layer_norm_bwd``."""
    return _norm_bwd(dy, x, weight, mean, rstd, False, need_dx, need_dweight, need_dbias)


def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Tensor]:
    """Kernel contract of ``ckpt_ops::rms_norm_fwd``: x (M, N) -> (y, rstd)."""
    _, rstd, xhat = _norm_stats(x, eps, rms=True)
    return _affine(xhat, weight, None).to(x.dtype), rstd


def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor, need_dx: bool,
                 need_dweight: bool) -> Tuple[Tensor, Tensor]:
    """Kernel contract of ``ckpt_ops::rms_norm_bwd``."""
    dx, dw, _ = _norm_bwd(dy, x, weight, rstd.new_empty(0), rstd, True, need_dx, need_dweight, False)
    return dx, dw
