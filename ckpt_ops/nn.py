"""``torch.nn.Module`` front-ends of the fused checkpointed layers.

Every module is a drop-in for its PyTorch counterpart: same constructor, same parameters, same
``state_dict`` keys, same ``extra_repr``. Each has a ``backend`` attribute (``None`` = ``"auto"``
or ``$CKPT_OPS_BACKEND``) choosing the kernels; see ``ckpt_ops.backend_info()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ckpt_ops import norm as _norm

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """Fused LayerNorm; saves x and per-row mean/rstd for backward, never the normalized output.

    Subclasses ``torch.nn.LayerNorm`` (``isinstance`` checks, ``reset_parameters`` and
    ``state_dict`` are PyTorch's), replacing only ``forward``.
    """

    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _norm.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps,
                                backend=self.backend)


class RMSNorm(torch.nn.RMSNorm):
    """Fused RMSNorm; saves x and per-row rstd for backward. ``eps=None`` means
    ``torch.finfo(input.dtype).eps``. Subclasses ``torch.nn.RMSNorm``, replacing ``forward``."""

    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _norm.rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)
