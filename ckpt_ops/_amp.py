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

How: the parameters and x enter the autograd Function in their own dtypes; the Function casts
them itself (:func:`cast_inputs`: x and the norm parameters to fp32, the GEMM parameters to ``cdt``)
and saves the originals, never the cast copies (:func:`originals`), so it keeps exactly what it
keeps outside autocast: a cast weight copy saved for backward would be a weight-sized non-leaf
tensor per GEMM (real memory, and counted by saved-tensor hooks), 4-5x the bytes of HF's own
checkpointing on small models. Backward casts the saved originals again (:func:`recast`; a cast
is cheap next to the GEMMs) and returns every gradient in its input's dtype (:func:`grads_to`),
which is what eager's cast nodes do (a bf16 weight gradient upcast into an fp32 ``.grad``). The
Function runs with autocast disabled and casts its own activations to ``cfg.amp`` in front of each
GEMM, in forward, replay and backward alike: the replay stays bit-identical to the forward, and
calling ``backward()`` inside an autocast region changes nothing. Tensors autocast does not touch
(fp64) are left alone: ``cfg.amp`` is None for them, as outside autocast.

Norms (:func:`norm_dtype`): torch's autocast puts ``layer_norm`` on CUDA's fp32 list (fp16/bf16
inputs upcast, fp32 output) but on no CPU list (a bf16 input normalises to bf16 there, in fp32
inside the kernel); ``rms_norm`` is on neither list in the lists ckpt_ops was checked against, so
its low-precision output dtype under CUDA autocast is not asserted here (``norm_dtype`` returns
None: callers fall back). Hugging Face's own RMSNorm classes do not depend on autocast at all
(they upcast by hand and cast back to the input dtype).
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


# Segment parameter names by the dtype they are computed in under autocast (ckpt_ops.attention.PARAMS,
# ckpt_ops.mlp.PARAMS): x and the fused norm's parameters in fp32, the rest (GEMM weights and biases)
# in the autocast dtype.
FP32_KEYS = ("x", "nw", "nb", "qw", "kw", "pw")  # + the q/k norm and post-norm weights


def cast_inputs(cdt: Optional[torch.dtype], p: dict) -> dict:
    """`p` (segment tensors by name) as the fused kernels take them under autocast (see FP32_KEYS);
    unchanged when cdt is None. Called inside the Functions' forward, so the casts are not graph
    nodes and their outputs are never what autograd keeps. Always a new dict."""
    if cdt is None:
        return dict(p)
    return {k: (fp32(v) if k in FP32_KEYS else to(v, cdt)) for k, v in p.items()}


def originals(kept: dict, cast: dict, orig: dict) -> dict:
    """`kept` (what a segment keeps for backward) with every cast copy in `cast` (same keys as
    `orig`) replaced by the original it was cast from: identity of the very tensor, so a kept
    intermediate is never mistaken for an input."""
    back = {id(c): orig[k] for k, c in cast.items() if c is not None}
    return {k: (None if v is None else back.get(id(v), v)) for k, v in kept.items()}


def recast(cdt: Optional[torch.dtype], kept: dict) -> dict:
    """The saved originals cast again as in forward (`cast_inputs`), in backward; `kept` keys may
    carry a prefix ("a_x", "m_w1": the block's). Kept intermediates are already in their dtype, so
    the cast is a no-op for them."""
    if cdt is None:
        return kept
    out = {}
    for k, v in kept.items():
        name = k.split("_", 1)[1] if k[:2] in ("a_", "m_") else k
        out[k] = fp32(v) if name in FP32_KEYS else (to(v, cdt) if name in _GEMM_KEYS else v)
    return out


_GEMM_KEYS = ("wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo", "w1", "b1", "wg", "bg", "w2", "b2")


def grads_to(grads, dtypes) -> list:
    """Each gradient in its input's dtype (None stays None)."""
    return [g if g is None or dt is None or g.dtype == dt else g.to(dt) for g, dt in zip(grads, dtypes, strict=True)]


def dtypes(*tensors) -> tuple:
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in tensors)


def norm_dtype(device_type: str, x_dtype: torch.dtype, op: str) -> Optional[torch.dtype]:
    """The dtype torch computes and returns ``torch.nn.functional.<op>`` in ("layer_norm" or
    "rms_norm") under autocast on `device_type`, for an input of `x_dtype`; None where ckpt_ops does
    not know it (then the caller runs torch's own forward). fp32/fp64 inputs: their own dtype."""
    if x_dtype not in LOW:
        return x_dtype
    if device_type == "cpu":  # no norm on any CPU autocast list: the input's dtype
        return x_dtype
    if device_type == "cuda" and op == "layer_norm":  # CUDA's fp32 list
        return torch.float32
    return None
