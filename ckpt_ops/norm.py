"""LayerNorm and RMSNorm as checkpointed segments.

Forward runs one fused kernel that writes y and the per-row statistics (mean and rstd for
LayerNorm, rstd for RMSNorm; fp32, fp64 for fp64 inputs). Backward runs one fused kernel that
rebuilds the normalized input xhat from x and the statistics *inside the kernel* while computing
dx, dweight and dbias, so the normalized output is never stored:

    saved    x (the segment input) + 4 or 8 bytes per row; nothing when only the bias trains,
             nothing at all under ``torch.no_grad()``
    eager    saves x + mean + rstd as well (PyTorch's native layer_norm backward also recomputes
             xhat), so on its own the norm costs the same memory both ways; the win comes when a
             norm is fused into a larger segment (MLP, attention, block) whose output it feeds.
    GEMMs    none
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ckpt_ops import _amp, _autograd, _backend, _validate
from ckpt_ops import reference as _ref

Tensor = torch.Tensor

for _name in ("layer_norm", "rms_norm"):
    _backend.register_family(
        _name,
        {
            "cpu": {"fwd": f"torch.ops.ckpt_ops.{_name}_fwd", "bwd": f"torch.ops.ckpt_ops.{_name}_bwd"},
            "cuda": {"fwd": f"torch.ops.ckpt_ops.{_name}_fwd", "bwd": f"torch.ops.ckpt_ops.{_name}_bwd"},
            "triton": {"fwd": f"torch.ops.ckpt_ops.{_name}_fwd_triton", "bwd": f"torch.ops.ckpt_ops.{_name}_bwd_triton"},
            "reference": {"fwd": getattr(_ref, f"{_name}_fwd"), "bwd": getattr(_ref, f"{_name}_bwd")},
        },
        triton_module="ckpt_ops.triton_kernels.norm",
    )


# ------------------------------------------------------------------------------------------------
# Autograd Functions
# ------------------------------------------------------------------------------------------------
class LayerNormFunction(torch.autograd.Function):
    """LayerNorm over the last dim of a 2-D contiguous x.

    Saves: x, mean/rstd (fp32 per row) and the weight (a parameter: not counted) when dx or
    dweight is needed; nothing when only dbias is needed.
    Recomputes: xhat = (x - mean) * rstd inside the backward kernel. Extra GEMMs: none.
    `amp`: under torch.autocast, x and the parameters come in their own dtypes and are upcast to
    fp32 here (and again in backward), so the originals are saved, never fp32 copies.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend, amp=False):
        ctx.dtypes = _amp.dtypes(x, weight, bias)
        x_in, w_in = x, weight
        if amp:
            x, weight, bias = _amp.fp32(x), _amp.fp32(weight), _amp.fp32(bias)
        y, mean, rstd = _backend.kernel("layer_norm", backend, "fwd")(x, weight, bias, eps)
        x, weight = x_in, w_in
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        ctx.backend, ctx.amp = backend, amp
        ctx.need = (need_dx, need_dw and weight is not None, need_db and bias is not None)
        keep = need_dx or ctx.need[1]
        ctx.save_for_backward(*((x, weight, mean, rstd) if keep else ()), _autograd.sentinel(x))
        return y

    @staticmethod
    @_autograd.once_differentiable("LayerNorm")
    def backward(ctx, dy):
        need_dx, need_dw, need_db = ctx.need
        saved = _autograd.saved(ctx)  # raises on a second backward, as eager does
        if not (need_dx or need_dw or need_db):
            return None, None, None, None, None, None
        dy = dy.contiguous()
        with _amp.off(dy.device.type):  # backward() called inside an autocast region
            if need_dx or need_dw:
                x, weight, mean, rstd = saved
                if ctx.amp:
                    x, weight = _amp.fp32(x), _amp.fp32(weight)
                dx, dw, db = _backend.kernel("layer_norm", ctx.backend, "bwd")(
                    dy, x, weight, mean, rstd, need_dx, need_dw, need_db)
            else:  # only the bias trains: db = sum of dy over rows, nothing was saved
                dx = dw = None
                db = dy.sum(0, dtype=_ref.acc_dtype(dy.dtype)).to(dy.dtype)
        grads = _amp.grads_to((dx if need_dx else None, dw if need_dw else None, db if need_db else None),
                              ctx.dtypes)
        return (*grads, None, None, None)


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dim of a 2-D contiguous x.

    Saves: x, rstd (fp32 per row) and the weight (a parameter: not counted) when dx or dweight
    is needed. Recomputes: xhat = x * rstd inside the backward kernel.
    Extra GEMMs: none. `amp`: as LayerNormFunction's.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, backend, amp=False):
        ctx.dtypes = _amp.dtypes(x, weight)
        x_in, w_in = x, weight
        if amp:
            x, weight = _amp.fp32(x), _amp.fp32(weight)
        y, rstd = _backend.kernel("rms_norm", backend, "fwd")(x, weight, eps)
        x, weight = x_in, w_in
        need_dx, need_dw = ctx.needs_input_grad[:2]
        ctx.backend, ctx.amp = backend, amp
        ctx.need = (need_dx, need_dw and weight is not None)
        keep = need_dx or ctx.need[1]
        ctx.save_for_backward(*((x, weight, rstd) if keep else ()), _autograd.sentinel(x))
        return y

    @staticmethod
    @_autograd.once_differentiable("RMSNorm")
    def backward(ctx, dy):
        need_dx, need_dw = ctx.need
        saved = _autograd.saved(ctx)  # raises on a second backward, as eager does
        if not (need_dx or need_dw):
            return None, None, None, None, None
        x, weight, rstd = saved
        if ctx.amp:
            x, weight = _amp.fp32(x), _amp.fp32(weight)
        with _amp.off(dy.device.type):
            dx, dw = _backend.kernel("rms_norm", ctx.backend, "bwd")(dy.contiguous(), x, weight, rstd, need_dx,
                                                                     need_dw)
        return (*_amp.grads_to((dx if need_dx else None, dw if need_dw else None), ctx.dtypes), None, None, None)


# ------------------------------------------------------------------------------------------------
# Functional API
# ------------------------------------------------------------------------------------------------
def _prepare(input, normalized_shape, params, names, op):
    """(x, x2d, params, amp, out_dtype). Under torch.autocast with a fp16/bf16 input or parameter
    (amp True) the norm computes in fp32 -- the Functions upcast inside, so they save the inputs
    themselves -- and returns in the dtype torch's own `op` returns under autocast on that device
    (ckpt_ops._amp.norm_dtype: fp32 on CUDA's fp32 list, the input's dtype on CPU; fp32 where it
    is not known). fp64 is left alone."""
    x = _validate.float_tensor(input, "input")
    shape = _validate.normalized_shape(normalized_shape, x)
    for p, name in zip(params, names):
        _validate.param_like(p, name, shape, x)
    amp, out_dtype = False, None
    if _amp.gemm_dtype(x) is not None and any(t is not None and t.dtype in _amp.LOW for t in (x, *params)):
        amp = True
        out_dtype = _amp.norm_dtype(x.device.type, x.dtype, op) or torch.float32
    n = 1
    for s in shape:
        n *= s
    params = [p.reshape(n).contiguous() if p is not None else None for p in params]  # strided weights too
    return x, x.reshape(-1, n).contiguous(), params, amp, out_dtype


def _needs_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """Fused LayerNorm, a drop-in for ``torch.nn.functional.layer_norm``.

    Args:
        input: (..., *normalized_shape) float16/bfloat16/float32/float64 tensor, any strides.
        normalized_shape: trailing shape normalised over.
        weight, bias: ``normalized_shape`` tensors of the input's dtype and device, or None.
        eps: added to the variance.
        backend: ``"auto"`` (default: ``$CKPT_OPS_BACKEND`` or auto), ``"triton"``, ``"cuda"``,
            ``"cpu"`` or ``"reference"`` (see ``ckpt_ops.backend_info()``).

    Saves x plus mean/rstd per row for backward (see the module docstring).
    """
    eps = _validate.eps(eps)
    x, x2d, (w, b), amp, out_dtype = _prepare(input, normalized_shape, [weight, bias], ["weight", "bias"],
                                              "layer_norm")
    be = _backend.resolve("layer_norm", x.device, backend)
    _validate.backend_dtype(be, x, "input")
    with _amp.off(x.device.type):  # the kernels see exactly the dtypes chosen above
        if _needs_graph(x2d, w, b):
            y = LayerNormFunction.apply(x2d, w, b, eps, be, amp)
        else:
            y = _backend.kernel("layer_norm", be, "fwd")(*_fp32_if(amp, x2d, w, b), eps)[0]
    y = y.view(x.shape)
    return y if out_dtype is None else y.to(out_dtype)


def _fp32_if(amp: bool, *tensors):
    return [_amp.fp32(t) for t in tensors] if amp else list(tensors)


def default_rms_eps(dtype: torch.dtype) -> float:
    """RMSNorm's eps when None: epsilon of the accumulation dtype, matching torch's kernels."""
    return torch.finfo(_ref.acc_dtype(dtype)).eps


def rms_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
             eps: Optional[float] = None, *, backend: Optional[str] = None) -> Tensor:
    """Fused RMSNorm, a drop-in for ``torch.nn.functional.rms_norm``.

    ``eps=None`` means what PyTorch 2.14 does: the machine epsilon of the computation dtype
    (``finfo(float32).eps`` for float16/bfloat16/float32 inputs, ``finfo(float64).eps`` for float64;
    its documentation says ``finfo(input.dtype).eps``, its kernels use the opmath type). Other
    arguments as in :func:`layer_norm`. Saves x plus rstd per row for backward.
    """
    x, x2d, (w,), amp, out_dtype = _prepare(input, normalized_shape, [weight], ["weight"], "rms_norm")
    eps = default_rms_eps(x.dtype) if eps is None else _validate.eps(eps)
    be = _backend.resolve("rms_norm", x.device, backend)
    _validate.backend_dtype(be, x, "input")
    with _amp.off(x.device.type):
        if _needs_graph(x2d, w):
            y = RMSNormFunction.apply(x2d, w, eps, be, amp)
        else:
            y = _backend.kernel("rms_norm", be, "fwd")(*_fp32_if(amp, x2d, w), eps)[0]
    y = y.view(x.shape)
    return y if out_dtype is None else y.to(out_dtype)
