"""Self-attention as one checkpointed segment:

    out = [x +] dropout(out_proj(attention(rope(qkv_proj(n)))))      with n = norm(x) or x

The QKV projection writes one packed buffer qkv (B, S, (H + 2KV) * hd), rows [q | k | v]; RoPE
rotates its q and k heads in place; the attention kernels read q/k/v straight from it (query head
h uses KV head h // (H/KV): grouped-query attention without repeating K/V) and write o
(B, S, H * hd), which feeds the output projection without a copy, plus the per-(row, head)
log-sum-exp. The backward kernels write the gradient into one packed dqkv, RoPE's transpose is
applied to it in place, and dqkv feeds the QKV projection's two backward GEMMs directly.
Attention probabilities are never stored at any level: flash-style kernels rebuild them from the
log-sum-exp. Dropout is applied to the output projection (residual dropout), from a Philox seed.

Recompute levels (what ``AttentionFunction`` keeps for backward; parameters are not counted):

===============  ===========================================  ==================================
level            saves                                        recomputes in backward
===============  ===========================================  ==================================
``"full"``       x, padding mask, dropout seed                norm, QKV GEMM, RoPE, the attention
                                                              forward (for O: delta and dWo);
                                                              never the output projection
``"keep_attn"``  + O and the LSE                              norm, QKV GEMM, RoPE -- never the
                                                              attention forward (cost ~ S^2)
``"selective"``  + qkv (after RoPE)                           norm (for dWqkv): elementwise only
``"none"``       + n and the norm statistics                  nothing but the dropout mask
===============  ===========================================  ==================================

GEMMs of a step (projections; the attention core is counted apart): eager, ``"none"``,
``"selective"``: 6 (QKV and out forward, 2 backward each); ``"full"`` and ``"keep_attn"``: 7
(+ the QKV replay), like torch.utils.checkpoint(use_reentrant=False) (whose early stop skips the
output projection unless a dropout mask after it is saved: then 8). Attention core (~4 S^2 hd
FLOPs per head forward): ``"full"`` runs its forward twice, like torch.utils.checkpoint;
``"keep_attn"`` and the others once.

The full-level LSE: the issue's budget allows keeping it, but the attention forward replayed in
backward produces it again (bit-identically), so ``"full"`` keeps only x.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ckpt_ops import _amp, _autograd, _backend, _validate
from ckpt_ops import reference as _ref
from ckpt_ops.mlp import _norm_fwd, load, mm, norm_backward, residual_dropout, save
from ckpt_ops.norm import default_rms_eps

Tensor = torch.Tensor

LEVELS = ("full", "keep_attn", "selective", "none")

_backend.register_family(
    "attention",
    {
        "cpu": {k: f"torch.ops.ckpt_ops.{k}" for k in ("rope_", "attention_fwd", "attention_bwd")},
        "triton": {"rope_": "torch.ops.ckpt_ops.rope_triton_", "attention_fwd": "torch.ops.ckpt_ops.attention_fwd_triton",
                   "attention_bwd": "torch.ops.ckpt_ops.attention_bwd_triton"},
        "reference": {k: getattr(_ref, k) for k in ("rope_", "attention_fwd", "attention_bwd")},
    },
    triton_module="ckpt_ops.triton_kernels.attention",
    depends=("layer_norm", "rms_norm", "mlp"),
)


class AttnConfig(NamedTuple):
    """Python constants of one attention segment."""
    num_heads: int
    num_kv_heads: int
    causal: bool
    scale: float
    norm: Optional[str]
    norm_eps: Optional[float]
    rope: bool
    rope_theta: float
    p: float
    residual: bool
    level: str
    backend: str
    qkv_split: Optional[tuple] = None  # (q rows, k rows, v rows) when q/k/v weights come apart
    amp: Optional[torch.dtype] = None  # autocast: the GEMM / attention dtype (ckpt_ops._amp), else None


class _Plan(NamedTuple):
    up: bool        # the attention backward runs (anything upstream of o trains)
    o: bool         # o is needed in backward (delta, or the output projection's weight gradient)
    qkv: bool       # qkv is needed (attention backward, or replaying the attention forward)
    n: bool         # n is needed (QKV weight gradient, or the QKV replay)
    norm_bwd: bool  # the norm's backward runs
    dn: bool        # dn = dqkv @ Wqkv is needed


def _plan(cfg: AttnConfig, need) -> _Plan:
    need_x, need_nw, need_nb = need[:3]
    need_wqkv = any(need[3:6])
    need_bqkv = any(need[6:9])
    need_wo = need[9]
    dn = need_x or need_nw or need_nb
    up = dn or need_wqkv or need_bqkv
    o = up or need_wo
    qkv = up or (need_wo and cfg.level == "full")
    n = need_wqkv or (qkv and cfg.level in ("full", "keep_attn"))
    return _Plan(up, o, qkv, n, cfg.norm is not None and dn, dn)


def _tables(cfg: AttnConfig, cos, sin, seq_len: int, head_dim: int, device, dtype=torch.float32):
    """RoPE tables: the caller's (positions of a converted model) or, for the standalone module,
    positions 0..S-1 rebuilt from rope_theta (deterministic, so forward and backward agree)."""
    if cos is not None:
        return cos, sin
    return _ref.rope_tables(seq_len, head_dim, cfg.rope_theta, device, dtype)


# The QKV projection is either packed (wq = the whole ((H+2KV)*hd, D) weight, wk = wv = None;
# GPT-2's c_attn, ckpt_ops.nn.Attention) or split into three (Llama's q/k/v_proj): the split
# form runs three GEMMs into one qkv buffer instead of concatenating the weights, which would
# keep a weight-sized copy alive for backward.
PARAMS = ("nw", "nb", "wq", "wk", "wv", "bq", "bk", "bv", "wo", "bo")
_IDX = {k: i + 1 for i, k in enumerate(PARAMS)}  # position in needs_input_grad / grads (x is 0)


def _qkv_linear(n: Tensor, t: dict) -> Tensor:
    if t["wk"] is None:
        return F.linear(n, t["wq"], t["bq"])
    return torch.cat([F.linear(n, t["wq"], t["bq"]), F.linear(n, t["wk"], t["bk"]), F.linear(n, t["wv"], t["bv"])],
                     dim=-1)


def _qkv_backward(cfg, dqkv2: Tensor, n: Optional[Tensor], t: dict, need, grads: list, want_dn: bool):
    """Weight/bias gradients of the QKV projection into `grads`; returns dn when `want_dn`."""
    if cfg.qkv_split is None:
        parts = [("wq", "bq", dqkv2)]
    else:
        parts = list(zip(("wq", "wk", "wv"), ("bq", "bk", "bv"), dqkv2.split(list(cfg.qkv_split), dim=-1)))
    dn = None
    for wname, bname, d in parts:
        if need[_IDX[wname]]:
            grads[_IDX[wname]] = d.t() @ n
        if need[_IDX[bname]]:
            grads[_IDX[bname]] = d.sum(0)
        if want_dn:
            dn = d @ t[wname] if dn is None else dn + d @ t[wname]
    return dn


def segment_forward(cfg: AttnConfig, x: Tensor, p: dict, key_mask, cos, sin, seed):
    """Run the segment on x (B, S, D) contiguous. Returns (out (B*S, D), state)."""
    k = lambda name: _backend.kernel("attention", cfg.backend, name)  # noqa: E731
    b, s, d = x.shape
    x2d = x.view(b * s, d)
    n, mean, rstd = _norm_fwd(cfg, x2d, p["nw"], p["nb"])
    qkv = _rows(_qkv_linear(mm(cfg, n), p), b, s)
    if cfg.rope:
        hd = qkv.shape[-1] // (cfg.num_heads + 2 * cfg.num_kv_heads)
        c, sn = _tables(cfg, cos, sin, s, hd, x.device, _ref.acc_dtype(qkv.dtype))
        k("rope_")(qkv, c, sn, cfg.num_heads, cfg.num_kv_heads, False)
    o, lse = k("attention_fwd")(qkv, key_mask, cfg.num_heads, cfg.num_kv_heads, cfg.causal, cfg.scale)
    out = output_projection(cfg, x, o, p["wo"], p["bo"], seed)
    return out, {"n": n, "mean": mean, "rstd": rstd, "qkv": qkv, "o": o, "lse": lse}


def _rows(t: Tensor, b: int, s: int) -> Tensor:
    """(B*S, W) -> (B, S, W) view; explicit W so that B = 0 or S = 0 works."""
    return t.view(b, s, t.shape[-1])


def qkv_params(qkv_weight, qkv_bias) -> tuple:
    """(wq, wk, wv, bq, bk, bv) in PARAMS order from a packed weight or a (q, k, v) triple."""
    if isinstance(qkv_weight, (tuple, list)):
        b = tuple(qkv_bias) if qkv_bias is not None else (None, None, None)
        return (*qkv_weight, *b)
    return (qkv_weight, None, None, qkv_bias, None, None)


def output_projection(cfg: AttnConfig, x: Tensor, o: Tensor, wo, bo, seed) -> Tensor:
    """[x +] dropout(o @ wo^T + bo) as (B*S, D); the same kernels whether in the forward or when a
    block's backward rebuilds its MLP input, so both are bit-identical."""
    b, s, d = x.shape
    if seed is None:  # not kept when p == 0: the kernels still take one
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    return residual_dropout(cfg, F.linear(o.view(b * s, o.shape[-1]), wo, bo), x.view(b * s, d), seed)


def segment_keep(cfg: AttnConfig, plan: _Plan, x, p: dict, st: dict, key_mask, cos, sin, seed) -> dict:
    """What the segment keeps for backward at cfg.level (None = not kept)."""
    lvl, has_norm = cfg.level, cfg.norm is not None
    keep_o = lvl != "full" and plan.o
    keep_qkv = lvl in ("selective", "none") and plan.qkv
    keep_n = lvl == "none" and plan.n and has_norm
    rebuild_n = has_norm and not keep_n and (plan.n or (plan.norm_bwd and lvl != "none"))
    replay_qkv = lvl in ("full", "keep_attn") and plan.qkv
    return {
        "x": x if (plan.norm_bwd or (plan.n and not keep_n)) else None,
        "mean": st["mean"] if lvl == "none" and plan.norm_bwd else None,
        "rstd": st["rstd"] if lvl == "none" and plan.norm_bwd else None,
        "n": st["n"] if keep_n else None,
        "qkv": st["qkv"] if keep_qkv else None,
        "o": st["o"] if keep_o else None,
        "lse": st["lse"] if (keep_o and plan.up) else None,
        "key_mask": key_mask if plan.qkv else None,
        "cos": cos if cfg.rope and cos is not None and plan.qkv else None,
        "sin": sin if cfg.rope and sin is not None and plan.qkv else None,
        "nw": p["nw"] if (plan.norm_bwd or rebuild_n) else None,
        "nb": p["nb"] if rebuild_n else None,
        **{w: p[w] if (plan.dn or replay_qkv) else None for w in ("wq", "wk", "wv")},
        **{bn: p[bn] if replay_qkv else None for bn in ("bq", "bk", "bv")},
        "wo": p["wo"] if plan.up else None,
        "seed": seed if cfg.p > 0.0 else None,
    }


def segment_replay(cfg: AttnConfig, plan: _Plan, t: dict, shape) -> dict:
    """Fill `t` (in place) with what the backward needs and was not kept: n and the norm stats
    (the forward's norm kernel), qkv (QKV GEMM + RoPE), o and lse (the attention forward) --
    every replay bit-identical to the forward. Returns t."""
    k = lambda name: _backend.kernel("attention", cfg.backend, name)  # noqa: E731
    b, s, d = shape
    x2d = t["x"].view(b * s, d) if t["x"] is not None else None
    if t["n"] is None and (plan.n or (plan.norm_bwd and t["rstd"] is None)):
        t["n"], t["mean"], t["rstd"] = _norm_fwd(cfg, x2d, t["nw"], t["nb"])
    if t["qkv"] is None and plan.qkv:
        qkv = _rows(_qkv_linear(mm(cfg, t["n"]), t), b, s)
        if cfg.rope:  # in place on our own replayed buffer, never on a kept tensor
            c, sn = _tables(cfg, t["cos"], t["sin"], s, qkv.shape[-1] // (cfg.num_heads + 2 * cfg.num_kv_heads),
                            qkv.device, _ref.acc_dtype(qkv.dtype))
            k("rope_")(qkv, c, sn, cfg.num_heads, cfg.num_kv_heads, False)
        t["qkv"] = qkv
    if t["o"] is None:
        t["o"], t["lse"] = k("attention_fwd")(t["qkv"], t["key_mask"], cfg.num_heads, cfg.num_kv_heads,
                                              cfg.causal, cfg.scale)
    return t


def segment_backward(cfg: AttnConfig, plan: _Plan, need, dout: Tensor, t: dict, shape) -> list:
    """Gradients [dx (B*S, D), *d(PARAMS)] from dout (B*S, D) and the kept tensors `t`."""
    k = lambda name: _backend.kernel("attention", cfg.backend, name)  # noqa: E731
    b, s, d = shape
    dout = dout.contiguous()
    grads = [None] * (1 + len(PARAMS))
    dy = _backend.kernel("mlp", cfg.backend, "dropout_bwd")(dout, t["seed"], cfg.p) if cfg.p > 0.0 else dout
    if need[_IDX["bo"]]:
        grads[_IDX["bo"]] = dy.sum(0)
    if need[0] and cfg.residual and not plan.dn:
        grads[0] = dout
    if not plan.o:
        return grads
    t = segment_replay(cfg, plan, t, shape)
    dyc = mm(cfg, dy)  # autocast: the output projection's backward GEMMs in the GEMM dtype
    if need[_IDX["wo"]]:
        grads[_IDX["wo"]] = dyc.t() @ t["o"].view(b * s, t["o"].shape[-1])
    if not plan.up:
        return grads
    do = _rows(dyc @ t["wo"], b, s)
    dqkv = k("attention_bwd")(do, t["qkv"], t["o"], t["lse"], t["key_mask"], cfg.num_heads, cfg.num_kv_heads,
                              cfg.causal, cfg.scale)
    if cfg.rope:  # RoPE's transpose, in place on the fresh gradient
        c, sn = _tables(cfg, t["cos"], t["sin"], s, dqkv.shape[-1] // (cfg.num_heads + 2 * cfg.num_kv_heads),
                        dqkv.device, _ref.acc_dtype(dqkv.dtype))
        k("rope_")(dqkv, c, sn, cfg.num_heads, cfg.num_kv_heads, True)
    n = mm(cfg, t["n"]) if t["n"] is not None else None
    dn = _qkv_backward(cfg, dqkv.view(b * s, dqkv.shape[-1]), n, t, need, grads, plan.dn)
    if not plan.dn:
        return grads
    x2d = t["x"].view(b * s, d) if t["x"] is not None else None
    dx = norm_backward(cfg, dn, x2d, t["nw"], t["mean"], t["rstd"], need[:3], grads)
    if need[0]:
        grads[0] = dx + dout if cfg.residual else dx
    return grads


class AttentionFunction(torch.autograd.Function):
    """The attention segment (see the module docstring for what each level saves/recomputes).

    forward(x (B, S, D) contiguous, *PARAMS, key_mask (B, S) or None, cos, sin (or None), seed, cfg)
    """

    @staticmethod
    def forward(ctx, x, nw, nb, wq, wk, wv, bq, bk, bv, wo, bo, key_mask, cos, sin, seed, cfg: AttnConfig):
        p_in = {"x": x, **dict(zip(PARAMS, (nw, nb, wq, wk, wv, bq, bk, bv, wo, bo)))}
        p = _amp.cast_inputs(cfg.amp, p_in)  # autocast: cast here, save the originals (ckpt_ops._amp)
        xc = p.pop("x")
        out, st = segment_forward(cfg, xc, p, key_mask, cos, sin, seed)
        plan = _plan(cfg, ctx.needs_input_grad)
        ctx.cfg, ctx.plan, ctx.shape = cfg, plan, tuple(x.shape)
        ctx.dtypes = _amp.dtypes(*p_in.values())
        keep = segment_keep(cfg, plan, xc, p, st, key_mask, cos, sin, seed)
        if cfg.amp is not None:
            keep = _amp.originals(keep, {"x": xc, **p}, p_in)
        save(ctx, keep)
        return out.view(x.shape)

    @staticmethod
    @_autograd.once_differentiable("Attention")
    def backward(ctx, dout):
        b, s, d = ctx.shape
        with _amp.off(dout.device.type):  # backward() called inside an autocast region
            grads = segment_backward(ctx.cfg, ctx.plan, ctx.needs_input_grad, dout.reshape(b * s, d),
                                     _amp.recast(ctx.cfg.amp, load(ctx)), ctx.shape)
        if grads[0] is not None:
            grads[0] = grads[0].view(b, s, d)
        grads = _amp.grads_to(grads, ctx.dtypes)
        return (*grads, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------
# Functional API
# ------------------------------------------------------------------------------------------------
def _check_mask(mask: Optional[Tensor], b: int, s: int, device) -> Optional[Tensor]:
    if mask is None:
        return None
    _validate.tensor(mask, "attention_mask")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be a bool or integer tensor (1/True = attend); got {mask.dtype}")
    if tuple(mask.shape) != (b, s):
        raise ValueError(f"attention_mask must have shape (batch, seq) = {(b, s)}; got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"attention_mask must be on the input's device {device}; got {mask.device}")
    return mask.contiguous()


def attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Optional[Tensor], out_weight: Tensor,
              out_bias: Optional[Tensor], *, num_heads: int, num_kv_heads: Optional[int] = None,
              attention_mask: Optional[Tensor] = None, causal: bool = True, scale: Optional[float] = None,
              norm: Optional[str] = None, norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
              norm_eps: Optional[float] = None, rope: bool = False, rope_theta: float = 10000.0,
              rope_cos: Optional[Tensor] = None, rope_sin: Optional[Tensor] = None, dropout: float = 0.0,
              training: bool = True, residual: bool = False, recompute: str = "full",
              backend: Optional[str] = None) -> Tensor:
    """Fused checkpointed attention segment ``[x +] dropout(out(attn(rope(qkv(norm(x))))))``.

    Args:
        x: (B, S, d_model), float16/bfloat16/float32/float64.
        qkv_weight, qkv_bias: ((H + 2 KV) * hd, d_model), ((H + 2 KV) * hd,) or None; rows [q | k | v];
            or (q, k, v) triples of separate projections (run as three GEMMs into one buffer).
        out_weight, out_bias: (d_model, H * hd), (d_model,) or None.
        num_heads, num_kv_heads: H and KV (default H; H % KV == 0: GQA, KV = 1: MQA).
        attention_mask: (B, S) bool or integer, 1/True = attend (padding mask), or None. Query rows
            with no key to attend produce exactly zero attention output and zero gradients.
        causal: causal masking; scale: default 1/sqrt(hd).
        norm, norm_weight, norm_bias, norm_eps: pre-norm fused into the segment (as ``mlp``).
        rope: rotary embeddings ("rotate half") on q and k; positions 0..S-1 with base rope_theta,
            or the caller's tables rope_cos/rope_sin ((S, hd/2) or (B, S, hd/2)).
        dropout: on the output projection (residual dropout), Philox seed, regenerated in backward.
        recompute: "full" | "keep_attn" | "selective" | "none" (see the module docstring).
    """
    cfg, mask, cos, sin = prepare(x, qkv_weight, qkv_bias, out_weight, out_bias, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, attention_mask=attention_mask, causal=causal,
                                  scale=scale, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
                                  norm_eps=norm_eps, rope=rope, rope_theta=rope_theta, rope_cos=rope_cos,
                                  rope_sin=rope_sin, dropout=dropout, training=training, residual=residual,
                                  recompute=recompute, backend=backend)
    b, s, d = x.shape
    if cfg.p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    else:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    # torch.autocast: x and the parameters go into the Function in their own dtypes; it casts them
    # itself, so that it saves them and not weight-sized cast copies (see ckpt_ops._amp).
    out_dtype = None if cfg.amp is None else _amp.out_dtype(x.dtype, cfg.amp, cfg.residual)
    params = [norm_weight, norm_bias, *qkv_params(qkv_weight, qkv_bias), out_weight, out_bias]
    xc = x.contiguous()
    args = (xc, *params, mask, cos, sin, seed)
    with _amp.off(x.device.type):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            out = AttentionFunction.apply(*args, cfg)
        else:
            with torch.no_grad():
                p = _amp.cast_inputs(cfg.amp, {"x": xc, **dict(zip(PARAMS, params))})
                out = segment_forward(cfg, p.pop("x"), p, mask, cos, sin, seed)[0].view(b, s, d)
    return out if out_dtype is None else out.to(out_dtype)


def prepare(x, qkv_weight, qkv_bias, out_weight, out_bias, *, num_heads, num_kv_heads, attention_mask, causal,
            scale, norm, norm_weight, norm_bias, norm_eps, rope, rope_theta, rope_cos, rope_sin, dropout, training,
            residual, recompute, backend):
    """Validate the arguments of :func:`attention` (raising before any kernel runs) and return
    (AttnConfig, mask, cos, sin)."""
    x = _validate.float_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (batch, seq, d_model); got shape {tuple(x.shape)}")
    b, s, d = x.shape
    if recompute not in LEVELS:
        raise ValueError(f"recompute must be one of {LEVELS}; got {recompute!r}")
    h = num_heads
    kv = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
        raise ValueError(f"num_heads must be a positive int; got {h!r}")
    if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or h % kv:
        raise ValueError(f"num_kv_heads must be a positive divisor of num_heads={h}; got {kv!r}")
    split = isinstance(qkv_weight, (tuple, list))
    w0 = qkv_weight[0] if split else qkv_weight
    _validate.tensor(w0, "qkv_weight")
    rows = (h + 2 * kv) if not split else h
    if w0.dim() != 2 or w0.shape[1] != d or w0.shape[0] % rows:
        raise ValueError(f"qkv_weight must have shape ((num_heads + 2*num_kv_heads) * head_dim, d_model={d}) "
                         f"(or be a (q, k, v) triple); got {tuple(w0.shape)}")
    hd = w0.shape[0] // rows
    if split:
        if len(qkv_weight) != 3 or (qkv_bias is not None and len(qkv_bias) != 3):
            raise ValueError("a split qkv_weight/qkv_bias must be (q, k, v) triples")
        for i, (name, r) in enumerate((("q", h), ("k", kv), ("v", kv))):
            _validate.param_like(qkv_weight[i], f"qkv_weight[{name}]", (r * hd, d), x)
            _validate.param_like(None if qkv_bias is None else qkv_bias[i], f"qkv_bias[{name}]", (r * hd,), x)
    else:
        _validate.param_like(qkv_weight, "qkv_weight", ((h + 2 * kv) * hd, d), x)
        _validate.param_like(qkv_bias, "qkv_bias", ((h + 2 * kv) * hd,), x)
    _validate.param_like(out_weight, "out_weight", (d, h * hd), x)
    _validate.param_like(out_bias, "out_bias", (d,), x)
    if out_weight is None:
        raise TypeError("out_weight must be a tensor")
    if rope and hd % 2:
        raise ValueError(f"rope needs an even head_dim; got head_dim={hd}")
    if (rope_cos is None) != (rope_sin is None):
        raise ValueError("rope_cos and rope_sin go together")
    if rope_cos is not None:
        if not rope:
            raise ValueError("rope_cos/rope_sin given with rope=False")
        for t, name in ((rope_cos, "rope_cos"), (rope_sin, "rope_sin")):
            _validate.tensor(t, name)
            if t.shape[-2:] != (s, hd // 2) or t.dim() not in (2, 3) or (t.dim() == 3 and t.shape[0] not in (1, b)):
                raise ValueError(f"{name} must have shape (S, hd/2) = {(s, hd // 2)} or (B, S, hd/2); "
                                 f"got {tuple(t.shape)}")
    mask = _check_mask(attention_mask, b, s, x.device)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")
    if norm not in (None, "layernorm", "rmsnorm"):
        raise ValueError(f"norm must be None, 'layernorm' or 'rmsnorm'; got {norm!r}")
    eps = None
    if norm is not None:
        _validate.param_like(norm_weight, "norm_weight", (d,), x)
        _validate.param_like(norm_bias, "norm_bias", (d,), x)
        eps = (1e-5 if norm == "layernorm" else default_rms_eps(x.dtype)) if norm_eps is None \
            else _validate.eps(norm_eps, "norm_eps")
    p = float(dropout) if training else 0.0
    be = _backend.resolve("attention", x.device, backend)
    _validate.backend_dtype(be, x, "x")
    cfg = AttnConfig(h, kv, bool(causal), float(scale) if scale is not None else hd ** -0.5, norm, eps, bool(rope),
                     float(rope_theta), p, bool(residual), recompute, be,
                     (h * hd, kv * hd, kv * hd) if split else None, _amp.gemm_dtype(x))
    cos = rope_cos.contiguous() if rope_cos is not None else None
    sin = rope_sin.contiguous() if rope_sin is not None else None
    return cfg, mask, cos, sin
