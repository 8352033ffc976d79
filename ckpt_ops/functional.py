"""Functional API of the fused checkpointed layers (see each function's docstring)."""
from ckpt_ops.attention import attention
from ckpt_ops.block import transformer_block
from ckpt_ops.mlp import mlp
from ckpt_ops.norm import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm", "mlp", "attention", "transformer_block"]
