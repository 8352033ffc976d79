"""The eager references: the same computation as each ckpt_ops.nn module, in plain PyTorch ops
(no checkpointing, no fused kernels), built from the module's own parameters. One function per
layer; every benchmark and every peer provider (torch.utils.checkpoint, selective AC,
torch.compile) wraps these.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import reference


def norm_forward(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional layer_norm / rms_norm with the module's parameters and eps."""
    if isinstance(norm, torch.nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


_ACT = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu, "silu": F.silu,
        "swiglu": F.silu, "geglu": lambda t: F.gelu(t, approximate="tanh")}


def mlp_forward(m: ckpt_ops.nn.MLP, x: torch.Tensor) -> torch.Tensor:
    """``[x +] dropout(fc2(act(fc1(n))))`` (gated: ``fc2(act(gate(n)) * fc1(n))``), n = norm(x) or x."""
    n = norm_forward(m.norm, x) if m.norm is not None else x
    a = _ACT[m.activation](m.gate(n)) * m.fc1(n) if m.gate is not None else _ACT[m.activation](m.fc1(n))
    y = F.dropout(m.fc2(a), m.dropout, m.training)
    return x + y if m.residual else y


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, heads, S, hd) with (S, hd/2) tables (the Llama convention)."""
    t1, t2 = t.chunk(2, dim=-1)
    c, s = cos.to(t.dtype), sin.to(t.dtype)
    return torch.cat([t1 * c - t2 * s, t2 * c + t1 * s], dim=-1)


def attention_forward(m: ckpt_ops.nn.Attention, x: torch.Tensor,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[x +] dropout(out(sdpa(rope(qkv(n)))))`` with torch's scaled_dot_product_attention (causal
    or with a (B, S) padding mask), grouped-query heads via ``enable_gqa``. Dropout is residual
    dropout on the output projection, as in ckpt_ops (none on the probabilities)."""
    b, s, _ = x.shape
    h, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    n = norm_forward(m.norm, x) if m.norm is not None else x
    q, k, v = m.qkv(n).split([h * hd, kv * hd, kv * hd], dim=-1)
    q, k, v = (t.view(b, s, -1, hd).transpose(1, 2) for t in (q, k, v))
    if m.rope:
        cos, sin = reference.rope_tables(s, hd, m.rope_theta, x.device, reference.acc_dtype(x.dtype))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.to(torch.bool)[:, None, None, :]
        if m.causal:
            mask = mask & torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=m.causal and mask is None,
                                       enable_gqa=kv != h)
    y = F.dropout(m.out(o.transpose(1, 2).reshape(b, s, h * hd)), m.dropout, m.training)
    return x + y if m.residual else y


def block_forward(blk: ckpt_ops.nn.TransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """Pre-norm block: ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))`` (norms and residuals
    live in the sublayers, as in ckpt_ops.nn.TransformerBlock)."""
    return mlp_forward(blk.mlp, attention_forward(blk.attn, x))
