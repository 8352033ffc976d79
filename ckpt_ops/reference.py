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
        var = xc.square().mean(-1)
        # an overflowed variance gives NaN rows, as eager's layer_norm (not rsqrt(inf) = 0 rows)
        rstd = torch.rsqrt(var + eps) + (var - var)
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


# ------------------------------------------------------------------------------------------------
# Activations (MLP). Codes shared with the kernels: ckpt_ops/_consts.py ACTIVATIONS.
# ------------------------------------------------------------------------------------------------
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_TANH_C = 0.044715
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def act_and_grad(x: Tensor, activation: int) -> Tuple[Tensor, Tensor]:
    """(act(x), act'(x)) in x's dtype (call it on fp32/fp64 values). Codes: 0 gelu (erf),
    1 gelu_tanh, 2 relu, 3 silu."""
    if activation == 0:
        cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
        return x * cdf, cdf + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if activation == 1:
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)
        return 0.5 * x * (1.0 + t), d
    if activation == 2:
        return torch.clamp_min(x, 0.0), (x > 0).to(x.dtype)
    if activation == 3:
        s = torch.sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    raise ValueError(f"unknown activation code {activation}")


def act_fwd(h: Tensor, g: Optional[Tensor], activation: int) -> Tensor:
    """Kernel contract of ``ckpt_ops::act_fwd``: a = act(h), or for gated MLPs a = act(g) * h
    (h the "up" projection fc1, g the gate). Elementwise over contiguous tensors of one shape."""
    acc = acc_dtype(h.dtype)
    if g is None:
        return act_and_grad(h.to(acc), activation)[0].to(h.dtype)
    return (act_and_grad(g.to(acc), activation)[0] * h.to(acc)).to(h.dtype)


def act_bwd(da: Tensor, h: Tensor, g: Optional[Tensor], activation: int,
            need_a: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Kernel contract of ``ckpt_ops::act_bwd``: one pass that recomputes the activation output
    (when `need_a`, e.g. for fc2's weight gradient) and applies the activation's derivative:

        non-gated: a = act(h),      dh = da * act'(h),       dg = empty
        gated:     a = act(g) * h,  dh = da * act(g),        dg = da * h * act'(g)
    """
    acc = acc_dtype(h.dtype)
    daa, ha = da.to(acc), h.to(acc)
    if g is None:
        fa, dfa = act_and_grad(ha, activation)
        a = fa.to(h.dtype) if need_a else _empty(h.dtype, h.device)
        return a, (daa * dfa).to(h.dtype), _empty(h.dtype, h.device)
    fg, dfg = act_and_grad(g.to(acc), activation)
    a = (fg * ha).to(h.dtype) if need_a else _empty(h.dtype, h.device)
    return a, (daa * fg).to(h.dtype), (daa * ha * dfg).to(h.dtype)


# ------------------------------------------------------------------------------------------------
# Dropout from a counter-based generator (Philox4x32-10), identical in every backend
# ------------------------------------------------------------------------------------------------
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mulhilo32(a: Tensor, b: int) -> Tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for uint32 values held in int64 (no int64 overflow)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    x, y = a * b_hi, a * b_lo  # each < 2**48
    hi = (x + (y >> 16)) >> 16
    lo = (y + ((x & 0xFFFF) << 16)) & _U32
    return hi, lo


def philox4x32_10(seed: int, counter: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four 32-bit output words of Philox4x32-10 (Salmon et al., SC'11) for counter
    (counter lo, counter hi, 0, 0) and key (seed lo, seed hi), as int64 values in [0, 2**32).
    Same rounds as csrc/include/ckpt_ops/philox.h and the Triton kernels."""
    c0, c1 = counter & _U32, (counter >> 32) & _U32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(c2, PHILOX_M1)
        hi_a, lo_a = _mulhilo32(c0, PHILOX_M0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def dropout_bits(seed: int, index: Tensor) -> Tensor:
    """The 32 random bits of flat element ``index`` (non-negative int64): word ``index % 4`` of
    Philox4x32-10 at counter ``index // 4``, so one Philox evaluation serves four neighbouring
    elements (the CPU kernel evaluates it once per four; GPU threads select their word)."""
    words = torch.stack(philox4x32_10(seed, index >> 2))
    return words.gather(0, (index & 3).unsqueeze(0)).squeeze(0)


def dropout_threshold(p: float) -> int:
    """An element is kept when its Philox value is >= this threshold (keep rate 1 - p)."""
    return min(int(p * 4294967296.0), 4294967295)


def dropout_keep_mask(seed: Tensor, numel: int, p: float, device: torch.device) -> Tensor:
    """The boolean keep mask of ``numel`` elements (flat, row-major) for this seed and p."""
    s = int(seed.reshape(-1)[0].item())
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    return dropout_bits(s, idx) >= dropout_threshold(p)


def dropout_scale(p: float, dtype: torch.dtype) -> float:
    """1 / (1 - p) rounded once to the accumulation dtype (the kernels receive the same value)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=acc_dtype(dtype)))


def dropout_fwd(y: Tensor, residual: Optional[Tensor], seed: Tensor, p: float) -> Tensor:
    """Kernel contract of ``ckpt_ops::dropout_fwd``: out = residual + y * keep * 1/(1-p), computed
    in the accumulation dtype; `seed` is a 1-element int64 tensor; p == 0 keeps everything."""
    acc = acc_dtype(y.dtype)
    ya = y.to(acc)
    if p > 0.0:
        keep = dropout_keep_mask(seed, y.numel(), p, y.device).view(y.shape)
        ya = torch.where(keep, ya * dropout_scale(p, y.dtype), torch.zeros((), dtype=acc, device=y.device))
    if residual is not None:
        ya = residual.to(acc) + ya
    return ya.to(y.dtype)


def dropout_bwd(dout: Tensor, seed: Tensor, p: float) -> Tensor:
    """Kernel contract of ``ckpt_ops::dropout_bwd``: dy = dout * keep * 1/(1-p), the mask rebuilt
    from the seed (never stored)."""
    if p == 0.0:
        return dout.clone()
    return dropout_fwd(dout, None, seed, p)


# ------------------------------------------------------------------------------------------------
# Attention: rotary embeddings and the attention core over a packed qkv buffer
# ------------------------------------------------------------------------------------------------
# Layout shared by every backend: qkv is (B, S, (H + 2*KV) * hd) contiguous, the output of the
# fused QKV projection, rows [q heads | k heads | v heads]; o is (B, S, H * hd) contiguous (feeds
# the output projection without a copy); lse is (B, H, S) fp32 (fp64 for fp64 qkv). Query head h reads key/value head
# h // (H // KV) (grouped-query attention, K/V never repeated in memory by the kernels).
def rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device,
                dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """(cos, sin) of shape (S, head_dim // 2) in `dtype` (fp32; fp64 for fp64 models), positions
    0..S-1, frequencies theta ** (-2i / head_dim): the "rotate half" convention of Llama-family models.
    Partial rotary (GPT-NeoX): pass the rotary width r as `head_dim` (frequencies theta ** (-2i / r),
    as HF computes them for rotary_ndims)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype) / head_dim))
    ang = torch.arange(seq_len, dtype=torch.int64, device=device).to(dtype)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def _rope_apply(t: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """t (B, S, heads, hd) in the accumulation dtype; cos/sin broadcastable to (B, S, 1, hd/2)."""
    half = t.shape[-1] // 2
    t1, t2 = t[..., :half], t[..., half:]
    s = -sin if inverse else sin
    return torch.cat([t1 * cos - t2 * s, t2 * cos + t1 * s], dim=-1)


def _rope_cs(cos: Tensor, sin: Tensor, acc: torch.dtype) -> Tuple[Tensor, Tensor]:
    # (S, hd/2) or (B, S, hd/2) -> broadcastable to (B, S, heads, hd/2)
    return cos.to(acc).unsqueeze(-2), sin.to(acc).unsqueeze(-2)


def rope_(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int, inverse: bool) -> None:
    """Kernel contract of ``ckpt_ops::rope_`` (in place): rotate the q and k heads of the packed
    qkv (B, S, (H + 2KV) * hd) by the tables cos/sin ((S, r/2) or (B, S, r/2), any float dtype,
    used in fp32), r = 2 * cos.shape[-1] the rotary width (even, <= hd; r = hd: the whole head):
    x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin on the halves x1 = x[:r/2], x2 = x[r/2:r] of each
    head; x[r:] passes through unchanged (partial rotary, GPT-NeoX's rotary_pct). ``inverse``
    applies the transposed rotation (sin -> -sin): the backward of RoPE, used in place on the
    gradient dqkv. The v heads are left alone."""
    b, s, width = qkv.shape
    hd = width // (num_heads + 2 * num_kv_heads)
    r = 2 * cos.shape[-1]
    acc = acc_dtype(qkv.dtype)
    c, sn = _rope_cs(cos, sin, acc)
    nqk = (num_heads + num_kv_heads) * hd
    qk = qkv[..., :nqk].view(b, s, num_heads + num_kv_heads, hd)[..., :r]
    qk.copy_(_rope_apply(qk.to(acc), c, sn, inverse).to(qkv.dtype))


def _split_heads(qkv: Tensor, num_heads: int, num_kv_heads: int):
    b, s, width = qkv.shape
    hd = width // (num_heads + 2 * num_kv_heads)
    q = qkv[..., :num_heads * hd].view(b, s, num_heads, hd).transpose(1, 2)
    k = qkv[..., num_heads * hd:(num_heads + num_kv_heads) * hd].view(b, s, num_kv_heads, hd).transpose(1, 2)
    v = qkv[..., (num_heads + num_kv_heads) * hd:].view(b, s, num_kv_heads, hd).transpose(1, 2)
    return q, k, v, hd


def attention_valid(key_mask: Optional[Tensor], b: int, s: int, causal: bool, device, window: int = 0) -> Tensor:
    """(B or 1, 1, S, S) bool: may query i attend key j. ``window`` w > 0 (causal only): additionally
    i - j < w, transformers' ``sliding_window_overlay`` (kv_idx > q_idx - w): w = 1 sees only the diagonal."""
    ok = torch.ones(1, 1, s, s, dtype=torch.bool, device=device)
    if causal:
        ok = torch.tril(ok)
    if window > 0:
        if not causal:
            raise ValueError("window needs causal=True")
        ok = ok & ~torch.tril(ok, diagonal=-window)
    if key_mask is not None:
        ok = ok & key_mask.to(torch.bool)[:, None, None, :]
    return ok


def attention_dropout_keep(seed: Tensor, b: int, h: int, s: int, p: float, device) -> Tensor:
    """(B, H, S, S) bool keep mask of attention-probability dropout (keep rate 1 - p): element
    (b, h, q, k) is kept when ``dropout_bits(seed, ((b * H + h) * S + q) * S + k) >= threshold(p)``,
    i.e. the Philox4x32-10 stream of the residual dropout (same counter/word mapping) over the
    flattened (batch, head, query, key) index. The C++ CPU kernel and the Triton kernels draw the
    same bits at the same positions; nothing is stored: every backend regenerates them in backward."""
    sd = int(seed.reshape(-1)[0].item())
    idx = torch.arange(b * h * s * s, dtype=torch.int64, device=device)
    return (dropout_bits(sd, idx) >= dropout_threshold(p)).view(b, h, s, s)


def _check_attn_dropout(dropout_p: float, seed: Optional[Tensor], device) -> bool:
    """True when the call applies attention-probability dropout (validated: p in [0, 1), and then
    a 1-element int64 seed on the tensors' device)."""
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    if dropout_p == 0.0:
        return False
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(f"seed must be a 1-element int64 tensor on {device} when dropout_p > 0; got "
                         f"{None if seed is None else (tuple(seed.shape), seed.dtype, seed.device)}")
    return True


def _check_window_softcap(window: int, softcap: float, causal: bool) -> None:
    """window: int >= 0 (0 = none; > 0 needs causal); softcap: float >= 0 (0 = none)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = no window); got {window!r}")
    if window > 0 and not causal:
        raise ValueError("window > 0 needs causal=True (a causal sliding window)")
    if not (float(softcap) >= 0.0) or softcap != softcap or float(softcap) == float("inf"):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = none); got {softcap!r}")


def _scores(q: Tensor, k: Tensor, scale: float, softcap: float) -> Tuple[Tensor, Optional[Tensor]]:
    """(scores, tanh) : scale q k^T, or with softcap c > 0 c * tanh(scale q k^T / c) (Gemma2's eager
    attention) and the tanh (for the backward's 1 - tanh^2)."""
    raw = (q @ k.transpose(-1, -2)) * scale
    if softcap > 0.0:
        t = torch.tanh(raw / softcap)
        return t * softcap, t
    return raw, None


def attention_fwd(qkv: Tensor, key_mask: Optional[Tensor], num_heads: int, num_kv_heads: int, causal: bool,
                  scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None, window: int = 0,
                  softcap: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Kernel contract of ``ckpt_ops::attention_fwd``: softmax attention of the packed qkv.

    key_mask: (B, S) bool/integer, nonzero = attend (padding mask), or None. Returns o (B, S, H*hd)
    in qkv's dtype and lse (B, H, S) in the accumulation dtype (fp32; fp64 for fp64), the log-sum-exp of each row's scaled scores. A row
    with no key to attend (all padding, or left padding under causal) gets o = 0 and lse = +inf,
    so its probabilities rebuild to exactly 0 in backward.

    dropout_p > 0 (with a 1-element int64 ``seed``): dropout on the attention probabilities,
    O = (P * keep / (1 - p)) V with keep = :func:`attention_dropout_keep` (p applied after the
    softmax, before P V; the LSE is that of the undropped softmax). The mask is never returned or
    stored: attention_bwd regenerates it from the same seed.

    window w > 0 (causal only): query i sees key j iff j <= i and i - j < w (:func:`attention_valid`).
    softcap c > 0: scores s = c * tanh(scale * q.k / c) before masking and softmax; lse is that of
    the capped scores."""
    _check_window_softcap(window, softcap, causal)
    drop = _check_attn_dropout(dropout_p, seed, qkv.device)
    b, s, _ = qkv.shape
    acc = acc_dtype(qkv.dtype)
    q, k, v, hd = _split_heads(qkv, num_heads, num_kv_heads)
    rep = num_heads // num_kv_heads
    q, k, v = q.to(acc), k.to(acc).repeat_interleave(rep, 1), v.to(acc).repeat_interleave(rep, 1)
    scores, _ = _scores(q, k, scale, softcap)
    ok = attention_valid(key_mask, b, s, causal, qkv.device, window)
    scores = scores.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                       # -inf on empty rows
    empty = torch.isneginf(lse)
    p = torch.exp(scores - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    if drop:
        keep = attention_dropout_keep(seed, b, num_heads, s, dropout_p, qkv.device)
        p = torch.where(keep, p * dropout_scale(dropout_p, qkv.dtype), torch.zeros((), dtype=acc, device=p.device))
    o = (p @ v).transpose(1, 2).reshape(b, s, num_heads * hd)
    lse = torch.where(empty, torch.full_like(lse, float("inf")), lse)
    return o.to(qkv.dtype).contiguous(), lse.to(acc)  # contiguous also for head_dim 1


def attention_bwd(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, key_mask: Optional[Tensor], num_heads: int,
                  num_kv_heads: int, causal: bool, scale: float, dropout_p: float = 0.0,
                  seed: Optional[Tensor] = None, window: int = 0, softcap: float = 0.0) -> Tensor:
    """Kernel contract of ``ckpt_ops::attention_bwd``: the gradient dqkv (B, S, (H+2KV)*hd) of
    the packed qkv, from do (B, S, H*hd), the forward's o and lse (probabilities are rebuilt as
    exp(scale * q k^T - lse), never stored); dk/dv are summed over the query heads of a group:

        P = exp(scale * Q K^T - lse),  dV = P^T dO,  dP = dO V^T,  delta = rowsum(dO * O)
        dS = P * (dP - delta),  dQ = scale * dS K,  dK = scale * dS^T Q

    With dropout (dropout_p > 0, the forward's seed): Z = keep / (1 - p) regenerated from the seed,
        dV = (P * Z)^T dO,  dP = (dO V^T) * Z,  delta = rowsum(dO * O) = rowsum(P * dP),
    and dS, dQ, dK as above.

    window: the forward's mask. softcap c > 0: P rebuilt from the capped scores c * t, t = tanh(scale
    q k^T / c) (recomputed, never stored), and the score gradient taken through the cap:
    dS = P * (dP - delta) * (1 - t^2) before dQ, dK.
    """
    _check_window_softcap(window, softcap, causal)
    drop = _check_attn_dropout(dropout_p, seed, qkv.device)
    b, s, _ = qkv.shape
    acc = acc_dtype(qkv.dtype)
    q, k, v, hd = _split_heads(qkv, num_heads, num_kv_heads)
    rep = num_heads // num_kv_heads
    q, k, v = q.to(acc), k.to(acc).repeat_interleave(rep, 1), v.to(acc).repeat_interleave(rep, 1)
    dO = do.view(b, s, num_heads, hd).transpose(1, 2).to(acc)
    O = o.view(b, s, num_heads, hd).transpose(1, 2).to(acc)
    ok = attention_valid(key_mask, b, s, causal, qkv.device, window)
    scores, t = _scores(q, k, scale, softcap)
    p = torch.exp(scores - lse.to(acc)[..., None]).masked_fill(~ok, 0.0)
    dp = dO @ v.transpose(-1, -2)
    if drop:
        keep = attention_dropout_keep(seed, b, num_heads, s, dropout_p, qkv.device)
        zero, sc = torch.zeros((), dtype=acc, device=p.device), dropout_scale(dropout_p, qkv.dtype)
        dv = torch.where(keep, p * sc, zero).transpose(-1, -2) @ dO
        dp = torch.where(keep, dp * sc, zero)
    else:
        dv = p.transpose(-1, -2) @ dO
    delta = (dO * O).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1.0 - t * t)
    dq = (ds @ k) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale
    dk = dk.view(b, num_kv_heads, rep, s, hd).sum(2)
    dv = dv.view(b, num_kv_heads, rep, s, hd).sum(2)
    dqkv = torch.cat([t.transpose(1, 2).reshape(b, s, t.shape[1] * t.shape[3]) for t in (dq, dk, dv)], dim=-1)
    return dqkv.to(qkv.dtype)
