"""Argument checks shared by the functional API. Every check raises before any kernel runs:
``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong value, shape or device, each
naming the argument and the expectation."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    return x


def float_tensor(x: object, name: str, min_dim: int = 0) -> torch.Tensor:
    """A floating-point tensor with at least `min_dim` dimensions. Empty tensors are allowed (a
    (0, S, D) batch or S = 0 gives an empty result, as torch's layers do)."""
    x = tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64); "
                        f"got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s) (..., features); "
                         f"got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    return x


def param_like(p: Optional[torch.Tensor], name: str, shape: Tuple[int, ...], like: torch.Tensor) -> None:
    """`p` (a weight or bias) is None or a tensor of `shape` with `like`'s dtype (under autocast:
    any fp16/bf16/fp32 when `like` is one of them) and device."""
    if p is None:
        return
    tensor(p, name)
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(p.shape)}")
    if p.dtype != like.dtype and not _autocast_mix(p, like):
        raise TypeError(f"{name} must have the input's dtype {like.dtype}; got {p.dtype}")
    if p.device != like.device:
        raise ValueError(f"{name} must be on the input's device {like.device}; got {p.device}")


def _autocast_mix(p: torch.Tensor, like: torch.Tensor) -> bool:
    """Under torch.autocast for like's device, fp16/bf16/fp32 inputs and parameters may differ:
    the entry points cast them as autocast's policy says (see ckpt_ops._amp)."""
    amp = (torch.float16, torch.bfloat16, torch.float32)
    return p.dtype in amp and like.dtype in amp and torch.is_autocast_enabled(like.device.type)


def normalized_shape(shape: Union[int, Sequence[int], torch.Size], x: torch.Tensor) -> Tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (int(shape),)
    if isinstance(shape, (str, bytes)) or isinstance(shape, bool):  # "8" would iterate to (8,)
        raise TypeError(f"normalized_shape must be an int or a sequence of ints; got {shape!r}")
    try:
        shape = tuple(int(s) for s in shape)  # type: ignore[union-attr]
    except TypeError:
        raise TypeError(f"normalized_shape must be an int or a sequence of ints; got {shape!r}") from None
    if len(shape) == 0 or any(s <= 0 for s in shape):
        raise ValueError(f"normalized_shape must be non-empty with positive sizes; got {shape}")
    if x.dim() < len(shape) or tuple(x.shape[-len(shape):]) != shape:
        raise ValueError(f"input of shape {tuple(x.shape)} must end with normalized_shape {shape}")
    return shape


def eps(value: object, name: str = "eps") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0; got {value}")
    return value


def backend_dtype(backend: str, x: torch.Tensor, name: str) -> None:
    """The chosen backend can compute in x's dtype (checked right after backend selection, before
    any kernel runs): the Triton kernels compute in fp32 and take no float64."""
    if backend == "triton" and x.dtype == torch.float64:
        raise TypeError(f"{name} is float64, which the triton backend does not support (its kernels compute in "
                        f"fp32); use backend='cuda', 'cpu' or 'reference' for fp64 accuracy, or cast {name} to "
                        f"float32")
