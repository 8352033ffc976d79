"""``torch.nn.Module`` front-ends of the fused checkpointed layers.

Every module is a drop-in for its PyTorch counterpart: same constructor, same parameters, same
``state_dict`` keys, same ``extra_repr``. Each has a ``backend`` attribute (``None`` = ``"auto"``
or ``$CKPT_OPS_BACKEND``) choosing the kernels; see ``ckpt_ops.backend_info()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ckpt_ops import attention as _attn
from ckpt_ops import block as _block
from ckpt_ops import mlp as _mlp
from ckpt_ops import norm as _norm
from ckpt_ops._consts import ACTIVATIONS

__all__ = ["LayerNorm", "RMSNorm", "MLP", "Attention", "TransformerBlock", "Sequential"]


def _check_level(recompute, levels):
    if recompute not in levels:
        raise ValueError(f"recompute must be one of {levels}; got {recompute!r}")
    return recompute


class _Recompute:
    """The ``recompute`` attribute: validated whenever it is set (at construction or later), so an
    invalid level raises ValueError at the assignment, not a KeyError in the next forward."""

    def __init__(self, levels):
        self.levels = levels

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__["_recompute"]

    def __set__(self, obj, value):
        obj.__dict__["_recompute"] = _check_level(value, self.levels)


def _positive_int(v, name):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int; got {v!r}")
    return v


def _dropout_p(p, name="dropout"):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1); got {p!r}")
    return float(p)


def _make_norm(norm, d_model, factory):
    if norm is None:
        return None
    if norm == "layernorm":
        return LayerNorm(d_model, **factory)
    if norm == "rmsnorm":
        return RMSNorm(d_model, **factory)
    raise ValueError(f"norm must be None, 'layernorm' or 'rmsnorm'; got {norm!r}")


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
    """Fused RMSNorm; saves x and per-row rstd for backward. ``eps=None`` behaves as in
    ``torch.nn.RMSNorm`` (see ``ckpt_ops.norm.rms_norm``). Subclasses ``torch.nn.RMSNorm``,
    replacing ``forward``."""

    backend: Optional[str] = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _norm.rms_norm(input, self.normalized_shape, self.weight, self.eps, backend=self.backend)


class MLP(torch.nn.Module):
    """Fused checkpointed MLP: ``[x +] dropout(fc2(act(fc1(n))))`` (gated:
    ``fc2(act(gate(n)) * fc1(n))``) with ``n = norm(x)`` or ``x``; see ``ckpt_ops.mlp`` for what
    each ``recompute`` level saves and recomputes.

    Submodules ``norm`` (only with ``norm=``), ``fc1``, ``gate`` (gated activations only), ``fc2``
    are ordinary ``nn.Linear`` / norm modules, so weights load from an eager MLP by name.
    Dropout is active in ``train()`` mode only.
    """

    recompute = _Recompute(_mlp.LEVELS)

    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu_tanh", bias: bool = True,
                 dropout: float = 0.0, norm: Optional[str] = None, residual: bool = False,
                 recompute: str = "full", device=None, dtype=None):
        super().__init__()
        _positive_int(d_model, "d_model")
        _positive_int(d_hidden, "d_hidden")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.dropout = _dropout_p(dropout)
        self.residual = bool(residual)
        self.recompute = recompute
        self.backend: Optional[str] = None
        self.norm = _make_norm(norm, d_model, factory)
        self.fc1 = torch.nn.Linear(d_model, d_hidden, bias=bias, **factory)
        self.gate = torch.nn.Linear(d_model, d_hidden, bias=bias, **factory) if ACTIVATIONS[activation][1] else None
        self.fc2 = torch.nn.Linear(d_hidden, d_model, bias=bias, **factory)

    @property
    def norm_kind(self) -> Optional[str]:
        if self.norm is None:
            return None
        return "layernorm" if isinstance(self.norm, torch.nn.LayerNorm) else "rmsnorm"

    def _args(self, recompute: Optional[str] = None):
        """(positional, keyword) arguments of ckpt_ops.functional.mlp for this module."""
        nk = self.norm_kind
        pos = (self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        kw = dict(activation=self.activation, gate_weight=self.gate.weight if self.gate is not None else None,
                  gate_bias=self.gate.bias if self.gate is not None else None, norm=nk,
                  norm_weight=self.norm.weight if nk else None,
                  norm_bias=getattr(self.norm, "bias", None) if nk == "layernorm" else None,
                  norm_eps=self.norm.eps if nk else None, dropout=self.dropout, training=self.training,
                  residual=self.residual, recompute=recompute or self.recompute, backend=self.backend)
        return pos, kw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos, kw = self._args()
        return _mlp.mlp(x, *pos, **kw)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation!r}, "
                f"dropout={self.dropout}, residual={self.residual}, recompute={self.recompute!r}")


class Attention(torch.nn.Module):
    """Fused checkpointed self-attention: ``[x +] dropout(out(attn(rope(qkv(n)))))`` with
    ``n = norm(x)`` or ``x``; multi-head, grouped-query (``num_kv_heads``) or multi-query
    attention, causal or not, with a (B, S) padding mask. See ``ckpt_ops.attention`` for what each
    ``recompute`` level ("full", "keep_attn", "selective", "none") saves and recomputes.

    Submodules ``norm`` (only with ``norm=``), ``qkv`` (``nn.Linear`` d_model ->
    (H + 2 KV) * head_dim, rows [q | k | v]) and ``out`` (``nn.Linear`` H * head_dim -> d_model).
    ``dropout`` applies to the output projection (residual dropout); ``attn_dropout`` to the
    attention probabilities, inside the attention kernels (Philox bits at (batch, head, query, key)
    regenerated in backward, never stored). Both are off in eval mode.
    RoPE positions are 0..S-1 ("rotate half", base ``rope_theta``); ``rotary_dim`` (even, <= head_dim,
    default head_dim) rotates only the first rotary_dim dims of each q/k head (partial rotary).
    ``sliding_window`` (a positive int, causal only): query i attends keys i - w < j <= i;
    ``softcap`` (a positive float c): logits c * tanh(scale q.k / c). None: off.
    """

    recompute = _Recompute(_attn.LEVELS)

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: Optional[int] = None, causal: bool = True,
                 bias: bool = True, dropout: float = 0.0, norm: Optional[str] = None, rope: bool = False,
                 rope_theta: float = 10000.0, residual: bool = False, recompute: str = "full", device=None,
                 dtype=None, attn_dropout: float = 0.0, rotary_dim: Optional[int] = None,
                 sliding_window: Optional[int] = None, softcap: Optional[float] = None):
        super().__init__()
        _positive_int(d_model, "d_model")
        _positive_int(num_heads, "num_heads")
        _attn.check_window_softcap(sliding_window, softcap, causal)
        self.sliding_window, self.softcap = sliding_window, softcap
        kv = num_heads if num_kv_heads is None else num_kv_heads
        _positive_int(kv, "num_kv_heads")
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        if num_heads % kv:
            raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={kv}")
        head_dim = d_model // num_heads
        if rotary_dim is not None:
            _positive_int(rotary_dim, "rotary_dim")
            if not rope or rotary_dim % 2 or rotary_dim > head_dim:
                raise ValueError(f"rotary_dim must be even, <= head_dim={head_dim}, and needs rope=True; "
                                 f"got rotary_dim={rotary_dim}, rope={rope}")
        elif rope and head_dim % 2:
            raise ValueError(f"rope needs an even head_dim; got d_model/num_heads = {head_dim}")
        self.rotary_dim = rotary_dim
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.num_kv_heads, self.head_dim = d_model, num_heads, kv, head_dim
        self.causal, self.rope, self.rope_theta = bool(causal), bool(rope), float(rope_theta)
        self.dropout = _dropout_p(dropout)
        self.attn_dropout = _dropout_p(attn_dropout, "attn_dropout")
        self.residual = bool(residual)
        self.recompute = recompute
        self.backend: Optional[str] = None
        self.norm = _make_norm(norm, d_model, factory)
        self.qkv = torch.nn.Linear(d_model, (num_heads + 2 * kv) * head_dim, bias=bias, **factory)
        self.out = torch.nn.Linear(num_heads * head_dim, d_model, bias=bias, **factory)

    def _args(self, attention_mask=None, recompute: Optional[str] = None, rope_cos=None, rope_sin=None):
        """(positional, keyword) arguments of ckpt_ops.functional.attention for this module."""
        nk = None if self.norm is None else ("layernorm" if isinstance(self.norm, torch.nn.LayerNorm) else "rmsnorm")
        pos = (self.qkv.weight, self.qkv.bias, self.out.weight, self.out.bias)
        kw = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, attention_mask=attention_mask,
                  causal=self.causal, scale=None, norm=nk, norm_weight=self.norm.weight if nk else None,
                  norm_bias=getattr(self.norm, "bias", None) if nk == "layernorm" else None,
                  norm_eps=self.norm.eps if nk else None, rope=self.rope, rope_theta=self.rope_theta,
                  rope_cos=rope_cos, rope_sin=rope_sin, dropout=self.dropout, training=self.training,
                  residual=self.residual, recompute=recompute or self.recompute, backend=self.backend,
                  attn_dropout=self.attn_dropout, rotary_dim=self.rotary_dim, sliding_window=self.sliding_window,
                  softcap=self.softcap)
        return pos, kw

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        pos, kw = self._args(attention_mask)
        return _attn.attention(x, *pos, **kw)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, rope={self.rope}, dropout={self.dropout}, attn_dropout={self.attn_dropout}, "
                f"residual={self.residual}, "
                + (f"sliding_window={self.sliding_window}, " if self.sliding_window is not None else "")
                + (f"softcap={self.softcap}, " if self.softcap is not None else "")
                + f"recompute={self.recompute!r}")


class TransformerBlock(torch.nn.Module):
    """A pre-norm transformer block, checkpointed as ONE segment (see ``ckpt_ops.block``):
    ``h = x + attn(x); out = h + mlp(h)``, where ``attn`` and ``mlp`` carry their own norm and
    residual.

    Styles:
        ``"gpt2"``: LayerNorm, biases, gelu_tanh MLP with d_hidden = 4 * d_model, no RoPE.
        ``"llama"``: RMSNorm, no biases, SwiGLU MLP (d_hidden default: 8/3 d_model rounded up to a
        multiple of 64), RoPE (``rope_theta``; ``rotary_dim``: partial rotary), grouped-query
        attention (``num_kv_heads``).

    Submodules ``attn`` (:class:`Attention` with norm + residual) and ``mlp`` (:class:`MLP` with
    norm + residual). ``recompute``: "full" | "keep_attn" | "keep_mlp" | "selective" | "none"
    (see ckpt_ops.block).
    forward(x (B, S, d_model), attention_mask=None (B, S), rope_cos=None, rope_sin=None).
    """

    recompute = _Recompute(_block.LEVELS)

    def __init__(self, d_model: int, num_heads: int, d_hidden: Optional[int] = None, style: str = "gpt2",
                 recompute: str = "full", num_kv_heads: Optional[int] = None, dropout: float = 0.0,
                 causal: bool = True, rope_theta: float = 10000.0, device=None, dtype=None,
                 attn_dropout: float = 0.0, rotary_dim: Optional[int] = None, sliding_window: Optional[int] = None,
                 softcap: Optional[float] = None):
        super().__init__()
        if style not in ("gpt2", "llama"):
            raise ValueError(f"style must be 'gpt2' or 'llama'; got {style!r}")
        _positive_int(d_model, "d_model")
        if d_hidden is None:
            d_hidden = 4 * d_model if style == "gpt2" else 64 * -(-int(8 * d_model / 3) // 64)
        _positive_int(d_hidden, "d_hidden")
        self.style = style
        self.recompute = recompute
        self.backend: Optional[str] = None
        llama = style == "llama"
        factory = {"device": device, "dtype": dtype}
        self.attn = Attention(d_model, num_heads, num_kv_heads if llama else num_kv_heads, causal=causal,
                              bias=not llama, dropout=dropout, norm="rmsnorm" if llama else "layernorm",
                              rope=llama, rope_theta=rope_theta, residual=True, attn_dropout=attn_dropout,
                              rotary_dim=rotary_dim, sliding_window=sliding_window, softcap=softcap, **factory)
        self.mlp = MLP(d_model, d_hidden, activation="swiglu" if llama else "gelu_tanh", bias=not llama,
                       dropout=dropout, norm="rmsnorm" if llama else "layernorm", residual=True, **factory)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                rope_cos: Optional[torch.Tensor] = None, rope_sin: Optional[torch.Tensor] = None) -> torch.Tensor:
        level = self.recompute
        for m in (self.attn, self.mlp):
            m.backend = self.backend if self.backend is not None else m.backend
        apos, akw = self.attn._args(attention_mask, _block._ATTN_LEVEL[level], rope_cos, rope_sin)
        acfg, mask, cos, sin = _attn.prepare(x, *apos, **akw)
        mpos, mkw = self.mlp._args(_block._MLP_LEVEL[level])
        mcfg = _mlp.prepare(x, *mpos, **mkw)
        ap = dict(zip(_attn.PARAMS, (akw["norm_weight"], akw["norm_bias"], *_attn.qkv_params(apos[0], apos[1]),
                                     apos[2], apos[3])))
        mp = dict(zip(_mlp.PARAMS, (mkw["norm_weight"], mkw["norm_bias"], mpos[0], mpos[1], mkw["gate_weight"],
                                    mkw["gate_bias"], mpos[2], mpos[3])))
        return _block.transformer_block(x, ap, mp, acfg, mcfg, level, mask, cos, sin)

    def extra_repr(self) -> str:
        return f"style={self.style!r}, recompute={self.recompute!r}"


from ckpt_ops.sequential import Sequential  # noqa: E402  (segment checkpointing, ckpt_ops.sequential)
