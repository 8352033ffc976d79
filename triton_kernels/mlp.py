"""MLP elementwise Triton kernels (activation and its gradient, dropout + residual), their launchers and the
``ckpt_ops::*_triton`` ops.

All kernels walk flat contiguous tensors in blocks of ``BLOCK`` elements (int64 offsets, masked tail) and
compute in fp32 whatever the storage dtype, rounding once on store. The contract of every op is the pure-torch
function of the same name in ``ckpt_ops.reference`` (``act_fwd``, ``act_bwd``, ``dropout_fwd``,
``dropout_bwd``); schemas at the end of this file:

    act_fwd:      a = act(h)                      | gated (g given): a = act(g) * h
    act_bwd:      a (if need_a), dh = da * act'(h) | gated: a = act(g) * h, dh = da * act(g), dg = da * h * act'(g)
    dropout_fwd:  out = residual + where(keep, y * scale, 0),  keep = dropout_bits(seed, flat index) >= threshold(p)
    dropout_bwd:  dy = where(keep, dout * scale, 0)           (the forward's mask, rebuilt from the seed)

Activation codes (``ckpt_ops._consts.ACTIVATIONS``): 0 gelu (erf), 1 gelu_tanh, 2 relu, 3 silu. The backward
recomputes ``a`` with the very helper the forward uses, and both are launched with ``enable_fp_fusion=False``
(no FMA contraction), so on the GPU too the recomputed ``a`` is bitwise the forward's. Dropout masks are never
stored: Philox4x32-10 of the element's flat index regenerates them from a 1-element int64 seed tensor.

Inputs: contiguous tensors of one shape (any rank), float16/bfloat16/float32. Outputs that are not requested
(``a`` without need_a, ``dg`` without g) come back as empty tensors of h's dtype.
Registration (``triton_op`` on CUDA, ``custom_op`` under the interpreter) and the output cast: ``._common``.
"""
import struct

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton  # a bare name: triton_op's kernel discovery looks for it

from ckpt_ops import _meta  # the fake implementations, shared with the extension's ops

from ._common import DTYPES, _cast_out, _emulate_rtne, _interpreted, _register, launch  # noqa: F401  (_interpreted: tests)

# constants of ckpt_ops.reference.act_and_grad / philox4x32_10 (constexpr: Triton only reads constexpr globals)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_TANH_C = tl.constexpr(0.044715)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)

# Elementwise and memory-bound: 1024 elements per program with 4 warps is 8 elements per thread (two 16-byte
# fp32 vectors, one in 16-bit), enough bytes in flight per SM with many resident programs; bigger blocks only
# cut the (tiny) program count. The interpreter ignores num_warps and runs a block as one numpy array.
_BLOCK = 1024
_NUM_WARPS = 4


def _launch(numel):
    """Grid and launch options shared by every kernel here. ``enable_fp_fusion=False``: no FMA contraction, so
    the activation recomputed in ``_act_bwd_kernel`` is bitwise the one ``_act_fwd_kernel`` stored, and
    ``residual + y * scale`` rounds like the reference (a product, then a sum)."""
    return (triton.cdiv(numel, _BLOCK),), dict(BLOCK=_BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False)


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _act_and_grad(x, ACT: tl.constexpr):
    """(act(x), act'(x)) of fp32 x; the formulas of ``reference.act_and_grad``, in the same evaluation order.

    gelu_tanh: Triton 3.8 has no tl.math.tanh, so it uses 0.5 * (1 + tanh(u)) = sigmoid(2u) =: s and
    1 - tanh(u)^2 = 4 s (1 - s) with 1 - s = sigmoid(-2u) =: r computed directly:
        a = x * s,   act' = s + 2 x s r sqrt(2/pi) (1 + 3 c x^2).
    The same function; no cancellation in 1 + tanh(u) (u -> -inf) nor in 1 - s (u -> +inf, where 1 - s
    computed by subtraction would be quantized to multiples of 2^-24 and act' off by ~2e-6 near x = 5).
    exp overflow is benign: s or r becomes 1 / inf = 0, no NaN.
    In the forward kernel the derivative is dead code (removed by the compiler)."""
    if ACT == 0:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
        a = x * cdf
        d = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    elif ACT == 1:  # gelu_tanh
        u = _SQRT_2_OVER_PI * (x + _GELU_TANH_C * x * x * x)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        r = 1.0 / (1.0 + tl.exp(2.0 * u))
        a = x * s
        d = s + 2.0 * x * s * r * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * x * x)
    elif ACT == 2:  # relu (NaN propagates, like torch.clamp_min)
        a = tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)
        d = (x > 0.0).to(tl.float32)
    else:  # silu
        s = 1.0 / (1.0 + tl.exp(-x))
        a = x * s
        d = s * (1.0 + x * (1.0 - s))
    return a, d


@triton.jit
def _act_fwd_kernel(
    H, G, A,  # flat contiguous, numel elements; G None unless GATED
    numel,
    ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """Forward, fp32:  a = act(h)  |  GATED: a = act(g) * h.
    Backward (``_act_bwd_kernel``): dh = da * act'(h)  |  GATED: dh = da * act(g), dg = da * h * act'(g)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        fg, _ = _act_and_grad(g, ACT)
        a = fg * h
    else:
        a, _ = _act_and_grad(h, ACT)
    tl.store(A + offs, _cast_out(a, A.dtype.element_ty, RTNE_BF16), mask=mask)


@triton.jit
def _act_bwd_kernel(
    DA, H, G,  # inputs, flat contiguous; G None unless GATED
    A, DH, DG,  # outputs; A None unless NEED_A, DG None unless GATED
    numel,
    ACT: tl.constexpr, GATED: tl.constexpr, NEED_A: tl.constexpr, BLOCK: tl.constexpr,
    RTNE_BF16: tl.constexpr,
):
    """One pass over da, h (and g), fp32, act and act' from one ``_act_and_grad`` call:
        a  = act(h)            (NEED_A; bitwise the forward's: same helper, same expression, same options)
        dh = da * act'(h)
    GATED:
        a  = act(g) * h        (NEED_A),    dh = da * act(g),    dg = da * h * act'(g)
    ``a`` is what fc2's weight gradient needs when the forward did not keep it (recompute)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    da = tl.load(DA + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        fg, dfg = _act_and_grad(g, ACT)
        if NEED_A:
            tl.store(A + offs, _cast_out(fg * h, A.dtype.element_ty, RTNE_BF16), mask=mask)
        tl.store(DH + offs, _cast_out(da * fg, DH.dtype.element_ty, RTNE_BF16), mask=mask)
        tl.store(DG + offs, _cast_out(da * h * dfg, DG.dtype.element_ty, RTNE_BF16), mask=mask)
    else:
        fh, dfh = _act_and_grad(h, ACT)
        if NEED_A:
            tl.store(A + offs, _cast_out(fh, A.dtype.element_ty, RTNE_BF16), mask=mask)
        tl.store(DH + offs, _cast_out(da * dfh, DH.dtype.element_ty, RTNE_BF16), mask=mask)


@triton.jit
def _philox4x32_10(seed, counter):
    """The four output words of Philox4x32-10, counter (counter lo, counter hi, 0, 0), key (seed lo, seed hi);
    ``seed`` an int64 scalar, ``counter`` a block of non-negative int64. Bit for bit
    ``reference.philox4x32_10``."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_PHILOX_M1, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(_PHILOX_M0, _c0) ^ c3 ^ k1
        c1 = tl.mul(_PHILOX_M1, _c2, sanitize_overflow=False)
        c3 = tl.mul(_PHILOX_M0, _c0, sanitize_overflow=False)
        k0 = tl.add(k0, _PHILOX_W0, sanitize_overflow=False)
        k1 = tl.add(k1, _PHILOX_W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _dropout_bits(seed, idx):
    """Random bits of flat elements ``idx`` (non-negative int64): word ``idx % 4`` of Philox at counter
    ``idx // 4``, bit for bit ``reference.dropout_bits``. One evaluation per element, as tl.randint does: the
    kernel is memory-bound on GPUs (the CPU kernel shares each evaluation among four elements)."""
    w0, w1, w2, w3 = _philox4x32_10(seed, idx >> 2)
    k = idx & 3
    return tl.where(k < 2, tl.where(k == 0, w0, w1), tl.where(k == 2, w2, w3))


@triton.jit
def _dropout_fwd_kernel(
    Y, R, SEED, OUT,  # y, residual (None unless HAS_RESIDUAL), out: flat contiguous; SEED: 1-element int64
    numel, index_base, threshold, scale,
    HAS_RESIDUAL: tl.constexpr, APPLY: tl.constexpr, BLOCK: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """Forward, fp32, rounded once:  out = residual + where(keep, y * scale, 0)
        keep = dropout_bits(seed, index_base + i) >= threshold   (uint32 compare; i the flat index)
    APPLY=False (p == 0): no RNG, out = residual + y. Without residual this is also the backward:
        dy = where(keep, dout * scale, 0)   (the same bits as the forward, from the same seed)
    ``index_base`` is 0 for the ops; tests shift it to reach Philox counters >= 2**32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    v = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    if APPLY:
        seed = tl.load(SEED).to(tl.int64)  # on the device: no host sync for the seed
        scale = tl.cast(scale, tl.float32)  # pin: Inductor passes Python floats as fp64
        bits = _dropout_bits(seed, offs + index_base)
        keep = bits >= tl.cast(threshold, tl.uint32)
        v = tl.where(keep, v * scale, 0.0)
    if HAS_RESIDUAL:
        v = tl.load(R + offs, mask=mask, other=0.0).to(tl.float32) + v
    tl.store(OUT + offs, _cast_out(v, OUT.dtype.element_ty, RTNE_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launchers (plain functions; the registered ops below call them)
# ----------------------------------------------------------------------------------------------------------
def _check(name, t, like=None):
    """Dtype (and, given ``like``, shape/dtype/device) check; returns t contiguous."""
    if like is None:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    elif t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must match {tuple(like.shape)} {like.dtype} on {like.device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t.contiguous()


def _check_activation(activation):
    if activation not in (0, 1, 2, 3):
        raise ValueError(f"activation must be 0 (gelu), 1 (gelu_tanh), 2 (relu) or 3 (silu), got {activation}")


def _new(like):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def act_fwd(h, g, activation):
    """a = act(h), or a = act(g) * h for gated MLPs (g the gate projection). Returns a (h's dtype and shape)."""
    _check_activation(activation)
    h = _check("h", h)
    g = None if g is None else _check("g", g, h)
    a = _new(h)
    if h.numel() > 0:
        grid, meta = _launch(h.numel())
        launch(wrap_triton(_act_fwd_kernel), grid,
            h, g, a, h.numel(), ACT=activation, GATED=g is not None, RTNE_BF16=_emulate_rtne(h), **meta)
    return a


def act_bwd(da, h, g, activation, need_a):
    """Returns (a, dh, dg): a only if need_a, dg only if gated; those not computed are empty of h's dtype."""
    _check_activation(activation)
    h = _check("h", h)
    da = _check("da", da, h)
    g = None if g is None else _check("g", g, h)
    a = _new(h) if need_a else h.new_empty(0)
    dh = _new(h)
    dg = _new(h) if g is not None else h.new_empty(0)
    if h.numel() > 0:
        grid, meta = _launch(h.numel())
        launch(wrap_triton(_act_bwd_kernel), grid,
            da, h, g, a if need_a else None, dh, dg if g is not None else None, h.numel(),
            ACT=activation, GATED=g is not None, NEED_A=bool(need_a), RTNE_BF16=_emulate_rtne(h), **meta)
    return a, dh, dg


def _dropout_scale(p):
    """1 / (1 - p) rounded once to fp32 (= ``reference.dropout_scale`` for 16/32-bit dtypes), without
    building a tensor, so the launcher also traces under torch.compile."""
    return struct.unpack("f", struct.pack("f", 1.0 / (1.0 - p)))[0]


def _dropout_threshold(p):
    """= ``reference.dropout_threshold``: keep when the Philox word is >= this (keep rate 1 - p)."""
    return min(int(p * 4294967296.0), 4294967295)


def _dropout(y, residual, seed, p, index_base=0):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    y = _check("y", y)
    residual = None if residual is None else _check("residual", residual, y)
    if seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != y.device:
        raise ValueError(f"seed must be a 1-element int64 tensor on {y.device}, "
                         f"got {tuple(seed.shape)} {seed.dtype} on {seed.device}")
    out = _new(y)
    if y.numel() > 0:
        grid, meta = _launch(y.numel())
        launch(wrap_triton(_dropout_fwd_kernel), grid,
            y, residual, seed.reshape(1), out, y.numel(), index_base, _dropout_threshold(p), _dropout_scale(p),
            HAS_RESIDUAL=residual is not None, APPLY=p > 0.0, RTNE_BF16=_emulate_rtne(y), **meta)
    return out


def dropout_fwd(y, residual, seed, p):
    """out = residual + dropout(y): keep = Philox(seed, flat index) >= threshold(p), kept values scaled by
    1/(1-p) (fp32). residual may be None; p == 0 keeps everything (no RNG)."""
    return _dropout(y, residual, seed, p)


def dropout_bwd(dout, seed, p):
    """dy = dout * keep * 1/(1-p) with the forward's mask rebuilt from the seed (never stored)."""
    return _dropout(dout, None, seed, p)


# ----------------------------------------------------------------------------------------------------------
# op registration
# ----------------------------------------------------------------------------------------------------------
act_fwd_op = _register(
    "act_fwd_triton",
    "(Tensor h, Tensor? g, int activation) -> Tensor",
    act_fwd, _meta.act_fwd)
act_bwd_op = _register(
    "act_bwd_triton",
    "(Tensor da, Tensor h, Tensor? g, int activation, bool need_a) -> (Tensor a, Tensor dh, Tensor dg)",
    act_bwd, _meta.act_bwd)
dropout_fwd_op = _register(
    "dropout_fwd_triton",
    "(Tensor y, Tensor? residual, Tensor seed, float p) -> Tensor",
    dropout_fwd, _meta.dropout_fwd)
dropout_bwd_op = _register(
    "dropout_bwd_triton",
    "(Tensor dout, Tensor seed, float p) -> Tensor",
    dropout_bwd, _meta.dropout_bwd)
