"""Flash attention Triton kernels over the packed qkv buffer (forward, backward), their launchers and the
``ckpt_ops::attention_{fwd,bwd}_triton`` ops; importing this module also registers ``rope_triton_``
(``.rope``, the in-place RoPE pass and the note on why it is not fused here).

Layout (the contract of ``ckpt_ops.reference.attention_fwd`` / ``attention_bwd``):
    qkv (B, S, (H + 2KV) * hd), rows [q heads | k heads | v heads]; query head h reads KV head h // (H / KV)
    o   (B, S, H * hd) in qkv's dtype;   lse (B, H, S) fp32, natural log, +inf for a row with no key
    key_mask (B, S) bool/integer, nonzero = attend, or None;  causal: query i sees keys j <= i
    dqkv (B, S, (H + 2KV) * hd): dq, dk, dv written by three kernels at the q / k / v column offsets

Forward (FlashAttention-2, Triton tutorial 06): per (query block, b, h), over key blocks, fp32 online softmax
in base 2 (c = scale * log2(e) folded into the scores):
    s = c * q k^T (masked: -inf),  m' = max(m, rowmax s),  p = 2^(s - m'),  l' = l 2^(m - m') + rowsum p,
    acc' = acc 2^(m - m') + p v,   o = acc / l,   lse = (m + log2 l) ln 2
A row with no valid key keeps m = -inf (the exponent offset is taken as 0 there, so no -inf - -inf NaN),
l = 0, acc = 0: o = 0 exactly and lse = +inf. Under causal the key loop stops at the diagonal block.
Backward (P rebuilt tile by tile from lse, never stored; +inf lse gives P = 0):
    P = exp(scale q k^T - lse),  delta = rowsum(dO * O)            (_attn_bwd_preprocess)
    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK = scale dS^T Q     (_attn_bwd_dkdv_kernel)
    dQ = scale dS K                                                           (_attn_bwd_dq_kernel)
Attention-probability dropout (DROPOUT, a constexpr: the kernels without it are unchanged): element (b, h, q, k)
is kept when ``_dropout_bits(seed, ((b H + h) S + q) S + k) >= threshold`` -- the residual dropout's Philox
mapping (``.mlp``) over the flattened (batch, head, query, key) index, so the bits are the C++ CPU kernel's and
the reference's (``reference.attention_dropout_keep``). z = 1 / (1 - p); with Z = keep * z:
    forward: acc' = acc 2^(m - m') + (p Z) v  (l from the undropped p, so o = (P Z) V)
    backward: dV = (P Z)^T dO,  dS = P * ((dO V^T) Z - delta)      (delta = rowsum(dO * O) as without dropout)
Each kernel regenerates the bits of its own tiles from the seed (a 1-element int64 tensor read on the device);
nothing is stored.
Sliding window (WINDOW, constexpr; runtime ``window`` w, causal only) and logit soft-capping (SOFTCAP; runtime
cap_scale = scale / c, cap_log2 = c log2 e): the kernels without them are unchanged (the AOT table's rows of the
plain kernels compile to the same resources).
    window: valid &= i - j < w (transformers' sliding_window_overlay); the forward and dq kernels start their
            key loop at the block holding key start_m - w + 1, the dk/dv kernel stops its query loop after the
            block holding query start_n + BLOCK_N + w - 2: blocks outside the window are never loaded
    softcap: s = c log2(e) tanh(scale q k^T / c) (base 2, as the scores above), lse of the capped scores;
            backward: t = tanh(...) recomputed from the same dot, dS = P * (dP - delta) * (1 - t^2)
A window >= S is no window (the plain kernels run).
The dk/dv kernel owns one KV head's key block and loops over the H/KV query heads of its group (and the query
blocks, from the diagonal on under causal), so GQA/MQA sums happen in registers: no atomics, one store.

Precision: loads in the storage dtype, dot operands in that dtype (P and dS rounded to it, as in every flash
kernel) with fp32 accumulation; fp32 dots use input_precision="ieee" (no TF32, ``_dot``); softmax
statistics, delta and the output scaling in fp32, one rounding on store. Under the interpreter bf16 dots
are computed in fp32 (DOT_FP32): its tl.dot on bf16 operands is wrong; the operands are still bf16 values
(loaded from bf16, P and dS rounded to bf16 to nearest even by ``_operand``) and the products of two bf16
values are exact in fp32, so the interpreter sees the GPU's roundings; compiled kernels always use the
storage dtype.
Grids are 1-D, (blocks of S) x (batch * heads) folded into axis x (``_split_pid``): no 65,535 cap on B * H.
Tiles come from ``attention_tiles(head_dim, dtype, shared-memory limit)``, per kernel; ``._aot`` compiles
every choice for sm_80/86/89/90/100/120 and docs/gpu_resources.md lists what each uses.
Registration (``triton_op`` on CUDA, ``custom_op`` under the interpreter) and the output cast: ``._common``.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton  # a bare name: triton_op's kernel discovery looks for it

from ckpt_ops import _meta

from . import rope  # noqa: F401  (registers ckpt_ops::rope_triton_)
from ._common import _cast_out, _emulate_rtne, _interpreted, _register, device_limits, launch
from .mlp import _dropout_bits, _dropout_scale, _dropout_threshold
from .rope import _check_heads

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E_PY = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc):
    """a @ b (+ acc), fp32 accumulation. fp32 operands use IEEE fp32 products (the default would be TF32, ~1e-3
    relative, far from the fp32 contract); 16-bit operands keep the default (tensor cores; the precision
    argument only concerns fp32). The branch is resolved at compile time from the operand dtype."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _split_pid(S, BLOCK: tl.constexpr):
    """1-D grid folded as (head, block): block = pid % cdiv(S, BLOCK) (fastest, so neighbouring programs share
    a head's K/V in L2), head = pid // cdiv(S, BLOCK) as int64. One axis of up to 2^31 - 1 programs: no
    65,535 cap on batch * heads (CUDA's limit on grid axes y and z)."""
    pid = tl.program_id(0)
    n_blk = tl.cdiv(S, BLOCK)
    return pid % n_blk, (pid // n_blk).to(tl.int64)


@triton.jit
def _operand(x, STORE_DTYPE: tl.constexpr, DOT_FP32: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 P or dS -> the dot operand: rounded to the storage dtype, as a compiled kernel does. Under the
    interpreter with DOT_FP32 (bf16 dots computed in fp32) the value is still rounded to bf16 (round to
    nearest even, ``_cast_out``) and widened back, so the interpreter sees the GPU's rounding."""
    if DOT_FP32:
        return _cast_out(x, STORE_DTYPE, RTNE_BF16).to(tl.float32)
    else:
        return x.to(STORE_DTYPE)


@triton.jit
def _load_rows(BASE, rows, S, stride_s, col, offs_d, HD, DOT_FP32: tl.constexpr):
    """(len(rows), BLOCK_D) tile of one head: BASE + row * stride_s + col + d, zero outside S x HD."""
    ptrs = BASE + rows.to(tl.int64)[:, None] * stride_s + col + offs_d[None, :]
    t = tl.load(ptrs, mask=(rows[:, None] < S) & (offs_d[None, :] < HD), other=0.0)
    if DOT_FP32:
        t = t.to(tl.float32)
    return t


@triton.jit
def _key_ok(KMASK, b, offs_n, S, HAS_MASK: tl.constexpr):
    """Keys in range and not padding (key_mask as uint8 (B, S), nonzero = attend)."""
    ok = offs_n < S
    if HAS_MASK:
        ok = ok & (tl.load(KMASK + b * S + offs_n, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (odd: sign(x) (1 - e) / (1 + e), e = 2^(-2 |x| log2 e) in (0, 1], no overflow);
    absolute error ~1 ulp of 1, which is what the capped softmax sees."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(dot, qk_scale, cap_scale, cap_log2, SOFTCAP: tl.constexpr):
    """Base-2 scores of a raw dot-product tile and the tanh of the cap (for the backward's 1 - t^2):
    without SOFTCAP dot * qk_scale (t unused); with it c log2(e) tanh(scale dot / c) (cap_scale = scale / c,
    cap_log2 = c log2 e)."""
    if SOFTCAP:
        t = _tanh(dot * tl.cast(cap_scale, tl.float32))
        return t * tl.cast(cap_log2, tl.float32), t
    else:
        return dot * qk_scale, dot


@triton.jit
def _in_window(rows, cols, window, WINDOW: tl.constexpr):
    """rows - cols < window (sliding window, on top of causal) for broadcast row/column index tiles."""
    return (rows - cols) < window


@triton.jit
def _key_block(base, q, offs_m, offs_n, S, stride_s, k_col, v_col, offs_d, HD, KMASK, b, qk_scale,
               HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
               window=0, cap_scale=1.0, cap_log2=1.0, WINDOW: tl.constexpr = False,
               SOFTCAP: tl.constexpr = False):
    """One key block seen from a query block: (k, v, scaled scores q k^T * qk_scale, valid, t), valid
    = key not padded (and j <= i when causal; and i - j < window with WINDOW); SOFTCAP: scores
    c log2(e) tanh(scale q k^T / c) and t the tanh. Shared by the forward and the dq kernel so both
    mask exactly the same entries."""
    k = _load_rows(base, offs_n, S, stride_s, k_col, offs_d, HD, DOT_FP32)
    v = _load_rows(base, offs_n, S, stride_s, v_col, offs_d, HD, DOT_FP32)
    valid = _key_ok(KMASK, b, offs_n, S, HAS_MASK)[None, :]
    if CAUSAL:
        valid = valid & (offs_m[:, None] >= offs_n[None, :])
    if WINDOW:
        valid = valid & _in_window(offs_m[:, None], offs_n[None, :], window, WINDOW)
    s, t = _capped(_dot(q, tl.trans(k), None), qk_scale, cap_scale, cap_log2, SOFTCAP)
    return k, v, s, valid, t


@triton.jit
def _keep(seed, rows, cols, S, threshold):
    """Keep bits of the (rows x cols) tile of one (b, h): ``rows`` the flattened (b H + h) S + q as int64 (a
    column or a row vector), ``cols`` the key indices broadcast against it."""
    return _dropout_bits(seed, rows * S + cols.to(tl.int64)) >= tl.cast(threshold, tl.uint32)


@triton.jit
def _attn_fwd_kernel(
    QKV, KMASK, O, LSE,  # qkv (B, S, W); key_mask uint8 (B, S) or None; o (B, S, H*hd); lse fp32 (B, H, S)
    S, H, GROUP, HD,  # GROUP = H / KV query heads per KV head
    stride_qkv_b, stride_qkv_s, stride_o_b, stride_o_s,
    qk_scale,  # scale * log2(e)
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, RTNE_BF16: tl.constexpr,
    SEED=None, threshold=0, dscale=1.0, DROPOUT: tl.constexpr = False,  # probability dropout (module docstring)
    window=0, cap_scale=1.0, cap_log2=1.0, WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    """Grid (cdiv(S, BLOCK_M) * B * H,) (``_split_pid``). One query block of one head, online softmax over
    the key blocks (math in the module docstring); stores o and lse for its rows. WINDOW: the key loop
    starts at the block holding the first row's first key (start_m - window + 1)."""
    pid_m, pid_bh = _split_pid(S, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    kv = H // GROUP
    qk_scale = tl.cast(qk_scale, tl.float32)  # pin: Inductor passes Python floats as fp64
    base = QKV + b * stride_qkv_b
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(base, offs_m, S, stride_qkv_s, h * HD, offs_d, HD, DOT_FP32)
    if DROPOUT:
        seed = tl.load(SEED).to(tl.int64)
        dscale = tl.cast(dscale, tl.float32)
        rows = (pid_bh * S + offs_m.to(tl.int64))[:, None]
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)  # causal block skipping: nothing right of the diagonal block
    else:
        hi = S
    if WINDOW:  # window block skipping: nothing left of the block holding key start_m - window + 1
        lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s, valid, t = _key_block(base, q, offs_m, offs_n, S, stride_qkv_s, (H + kvh) * HD,
                                       (H + kv + kvh) * HD, offs_d, HD, KMASK, b, qk_scale, HAS_MASK, CAUSAL,
                                       DOT_FP32, window, cap_scale, cap_log2, WINDOW, SOFTCAP)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_off = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no valid key yet: p = 2^-inf = 0
        p = tl.math.exp2(s - m_off[:, None])
        alpha = tl.math.exp2(m_i - m_off)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the sum above is the undropped softmax's; P V sees the dropped, rescaled p
            p = tl.where(_keep(seed, rows, offs_n[None, :], S, threshold), p * dscale, 0.0)
        acc = _dot(_operand(p, QKV.dtype.element_ty, DOT_FP32, RTNE_BF16), v, acc * alpha[:, None])
        m_i = m_new
    has_key = l_i > 0.0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]  # no key: acc == 0, o = 0 exactly
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * _LN2, float("inf"))
    m_ok = offs_m < S
    o_ptrs = O + b * stride_o_b + offs_m.to(tl.int64)[:, None] * stride_o_s + h * HD + offs_d[None, :]
    tl.store(o_ptrs, _cast_out(o, O.dtype.element_ty, RTNE_BF16), mask=m_ok[:, None] & (offs_d[None, :] < HD))
    tl.store(LSE + pid_bh * S + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,  # o, do (B, S, H*hd); delta fp32 (B, H, S)
    S, H, HD, stride_o_b, stride_o_s, stride_do_b, stride_do_s,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_M) * B * H,):  delta = rowsum(dO * O) in fp32 (the softmax-gradient correction)."""
    pid_m, pid_bh = _split_pid(S, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_o_b, offs_m, S, stride_o_s, h * HD, offs_d, HD, True)
    do = _load_rows(DO + b * stride_do_b, offs_m, S, stride_do_s, h * HD, offs_d, HD, True)
    tl.store(DELTA + pid_bh * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@triton.jit
def _attn_bwd_dkdv_kernel(
    QKV, KMASK, DO, LSE, DELTA, DQKV,
    S, H, GROUP, HD,
    stride_qkv_b, stride_qkv_s, stride_do_b, stride_do_s, stride_dqkv_b, stride_dqkv_s,
    qk_scale, scale,  # scale * log2(e), scale
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, RTNE_BF16: tl.constexpr,
    SEED=None, threshold=0, dscale=1.0, DROPOUT: tl.constexpr = False,
    window=0, cap_scale=1.0, cap_log2=1.0, WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    """Grid (cdiv(S, BLOCK_N) * B * KV,). One key block of one KV head; for each of the GROUP query heads that
    read it and each query block (causal: from the block holding the diagonal on), transposed tiles:
        P^T = 2^(c k q^T - lse log2 e)  (0 on masked entries),   dV += P^T dO,
        dP^T = v dO^T,   dS^T = P^T * (dP^T - delta),            dK += dS^T q
    and finally dK *= scale; dk, dv stored once into dqkv's k / v columns. WINDOW: query blocks up to the one
    holding the last key's last query (start_n + BLOCK_N - 1 + window - 1); SOFTCAP: dS^T *= 1 - t^2."""
    pid_n, pid_bk = _split_pid(S, BLOCK_N)
    kv = H // GROUP
    b = pid_bk // kv
    kvh = pid_bk % kv
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    base = QKV + b * stride_qkv_b
    do_base = DO + b * stride_do_b
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(base, offs_n, S, stride_qkv_s, (H + kvh) * HD, offs_d, HD, DOT_FP32)
    v = _load_rows(base, offs_n, S, stride_qkv_s, (H + kv + kvh) * HD, offs_d, HD, DOT_FP32)
    key_ok = _key_ok(KMASK, b, offs_n, S, HAS_MASK)[:, None]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEED).to(tl.int64)
        dscale = tl.cast(dscale, tl.float32)
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # earlier query blocks see none of these keys
    else:
        lo = 0
    if WINDOW:  # later query blocks see none of these keys either
        hi = tl.minimum(S, start_n + BLOCK_N + window - 1)
    else:
        hi = S
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        row0 = (b * H + h) * S  # into lse / delta (B, H, S)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < S
            q = _load_rows(base, offs_m, S, stride_qkv_s, h * HD, offs_d, HD, DOT_FP32)
            do = _load_rows(do_base, offs_m, S, stride_do_s, h * HD, offs_d, HD, DOT_FP32)
            lse = tl.load(LSE + row0 + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
            valid = key_ok
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            if WINDOW:
                valid = valid & _in_window(offs_m[None, :], offs_n[:, None], window, WINDOW)
            s_t, t_t = _capped(_dot(k, tl.trans(q), None), qk_scale, cap_scale, cap_log2, SOFTCAP)
            p_t = tl.where(valid, tl.math.exp2(s_t - lse[None, :] * _LOG2E), 0.0)
            # (the no-dropout path keeps the original instruction order: same registers, docs/gpu_resources.md)
            if DROPOUT:  # transposed tile: rows are keys, columns queries
                keep_t = _keep(seed, (row0 + offs_m.to(tl.int64))[None, :], offs_n[:, None], S, threshold)
                dv = _dot(_operand(tl.where(keep_t, p_t * dscale, 0.0), QKV.dtype.element_ty, DOT_FP32,
                                   RTNE_BF16), do, dv)
            else:
                dv = _dot(_operand(p_t, QKV.dtype.element_ty, DOT_FP32, RTNE_BF16), do, dv)
            dp_t = _dot(v, tl.trans(do), None)
            if DROPOUT:
                dp_t = tl.where(keep_t, dp_t * dscale, 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - t_t * t_t)
            dk = _dot(_operand(ds_t, QKV.dtype.element_ty, DOT_FP32, RTNE_BF16), q, dk)
    dk = dk * scale
    n_mask = (offs_n[:, None] < S) & (offs_d[None, :] < HD)
    out = DQKV + b * stride_dqkv_b + offs_n.to(tl.int64)[:, None] * stride_dqkv_s + offs_d[None, :]
    tl.store(out + (H + kvh) * HD, _cast_out(dk, DQKV.dtype.element_ty, RTNE_BF16), mask=n_mask)
    tl.store(out + (H + kv + kvh) * HD, _cast_out(dv, DQKV.dtype.element_ty, RTNE_BF16), mask=n_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    QKV, KMASK, DO, LSE, DELTA, DQKV,
    S, H, GROUP, HD,
    stride_qkv_b, stride_qkv_s, stride_do_b, stride_do_s, stride_dqkv_b, stride_dqkv_s,
    qk_scale, scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, RTNE_BF16: tl.constexpr,
    SEED=None, threshold=0, dscale=1.0, DROPOUT: tl.constexpr = False,
    window=0, cap_scale=1.0, cap_log2=1.0, WINDOW: tl.constexpr = False, SOFTCAP: tl.constexpr = False,
):
    """Grid (cdiv(S, BLOCK_M) * B * H,). One query block of one head, over the key blocks (causal: up to the
    diagonal block; WINDOW: from the forward's first block; SOFTCAP: dS *= 1 - t^2):  P = 2^(c q k^T - lse log2 e),  dP = dO v^T,  dS = P * (dP - delta),  dQ += dS k;
    dQ *= scale, stored into dqkv's q columns."""
    pid_m, pid_bh = _split_pid(S, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    kvh = h // GROUP
    kv = H // GROUP
    qk_scale = tl.cast(qk_scale, tl.float32)
    scale = tl.cast(scale, tl.float32)
    base = QKV + b * stride_qkv_b
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < S
    q = _load_rows(base, offs_m, S, stride_qkv_s, h * HD, offs_d, HD, DOT_FP32)
    do = _load_rows(DO + b * stride_do_b, offs_m, S, stride_do_s, h * HD, offs_d, HD, DOT_FP32)
    lse = tl.load(LSE + pid_bh * S + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * S + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if DROPOUT:
        seed = tl.load(SEED).to(tl.int64)
        dscale = tl.cast(dscale, tl.float32)
        rows = (pid_bh * S + offs_m.to(tl.int64))[:, None]
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
    else:
        hi = S
    if WINDOW:
        lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        lo = 0
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, s, valid, t = _key_block(base, q, offs_m, offs_n, S, stride_qkv_s, (H + kvh) * HD,
                                       (H + kv + kvh) * HD, offs_d, HD, KMASK, b, qk_scale, HAS_MASK, CAUSAL,
                                       DOT_FP32, window, cap_scale, cap_log2, WINDOW, SOFTCAP)
        p = tl.where(valid, tl.math.exp2(s - lse[:, None] * _LOG2E), 0.0)
        dp = _dot(do, tl.trans(v), None)
        if DROPOUT:
            dp = tl.where(_keep(seed, rows, offs_n[None, :], S, threshold), dp * dscale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(_operand(ds, QKV.dtype.element_ty, DOT_FP32, RTNE_BF16), k, dq)
    dq = dq * scale
    out = DQKV + b * stride_dqkv_b + offs_m.to(tl.int64)[:, None] * stride_dqkv_s + h * HD + offs_d[None, :]
    tl.store(out, _cast_out(dq, DQKV.dtype.element_ty, RTNE_BF16), mask=m_ok[:, None] & (offs_d[None, :] < HD))


# ----------------------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------------------
# Interpreter tiles: small, and unequal in the backward like the GPU ones, so tests on S <= 129 see several
# blocks, ragged tails, diagonal blocks that straddle tile borders, and lo = (start_n // BLOCK_M) * BLOCK_M != start_n.
# The delta pre-pass: o and dO tiles of _PRE_ELEMS elements (32 fp32 values per thread each with 4 warps).
_PRE_ELEMS = 4096
_INTERPRETER_TILES = dict(fwd=(16, 16, 1, 1), dkdv=(16, 32, 1, 1), dq=(32, 16, 1, 1))

# GPU tiles per (BLOCK_D, operand bytes): per kernel (BLOCK_M, BLOCK_N, num_warps, num_stages). Entries from the
# largest to the smallest footprint, each (smem_needed, tiles): ``attention_tiles`` takes the first whose
# smem_needed fits the device's opt-in shared memory per block. smem_needed is the most any of the three
# kernels takes with those tiles on sm_80/86/89/90/100/120 (Triton 3.8, measured by ``._aot``, rounded up to
# 4 KB; docs/gpu_resources.md has every figure); the AOT test fails if a compile exceeds it, or spills.
# 16-bit: Triton tutorial 06 / FA-2 sizes, trimmed where ptxas spilled (dk/dv at hd 64: 32 x 32 keys).
# fp32: the dots are IEEE FMA loops on CUDA cores (no TF32) whose operand tiles live in registers, so the
# tiles are small (16 x 16 .. 32 x 32): the FA-2 sizes spilled up to 38 KB per thread. The fp32 dk/dv kernel
# at hd 128 still spills a few bytes on some archs with every tile tried (16 x 16 .. 32 x 32, 2-8 warps;
# 2 warps the least); ``._aot`` bounds fp32 spills at FP32_SPILL_BYTES and lists them.
# The last entry of each list (16 x 16 tiles) is the fallback for parts with less shared memory.
_SMALL = dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 4, 1))
_GPU_TILES = {
    (64, 2): [(60 << 10, dict(fwd=(64, 64, 4, 3), dkdv=(16, 32, 8, 1), dq=(64, 32, 4, 3))), (20 << 10, _SMALL)],
    (128, 2): [(84 << 10, dict(fwd=(64, 32, 8, 1), dkdv=(32, 64, 8, 2), dq=(64, 32, 8, 2))), (36 << 10, _SMALL)],
    # the fallback's dk/dv with 8 warps: with 4, the WINDOW variants spilled 8-12 B on sm_86
    (256, 2): [(84 << 10, dict(fwd=(16, 32, 4, 1), dkdv=(32, 32, 8, 1), dq=(16, 32, 8, 1))),
               (68 << 10, dict(_SMALL, dkdv=(16, 16, 8, 1)))],
    (64, 4): [(40 << 10, dict(fwd=(32, 32, 8, 1), dkdv=(32, 32, 8, 1), dq=(16, 32, 4, 1))), (20 << 10, _SMALL)],
    (128, 4): [(52 << 10, dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 2, 1), dq=(16, 32, 4, 1)))],
    (256, 4): [(68 << 10, dict(fwd=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), dq=(16, 16, 8, 1)))],
}
# Probability dropout (the DROPOUT variants: Philox bits per score tile) holds more live registers: at hd 64 in
# 16-bit the forward's 64 x 64 tiles spilled 8-24 B (sm_80, sm_100) and dk/dv's 16 x 32 with 8 warps 20 B on
# sm_90; these do not spill on any arch (docs/gpu_resources.md). Other (BLOCK_D, width) keys: as without dropout.
_DROPOUT_TILES = {
    (64, 2): [(60 << 10, dict(fwd=(32, 64, 4, 3), dkdv=(16, 32, 4, 1), dq=(64, 32, 4, 3))), (20 << 10, _SMALL)],
}


# Logit soft-capping (SOFTCAP variants: the tanh tile lives until dS): at hd 64 in 16-bit the dq kernel's 64 x 32
# tiles with 4 warps spilled 4 B on sm_86 (with WINDOW); 8 warps do not spill on any arch. The forward and dk/dv
# take the plain tiles. With dropout too, the dropout tiles (not in the AOT sweep).
_SOFTCAP_TILES = {
    (64, 2): [(60 << 10, dict(fwd=(64, 64, 4, 3), dkdv=(16, 32, 8, 1), dq=(64, 32, 8, 3))), (20 << 10, _SMALL)],
}


def tile_entries(block_d, width, dropout=False, softcap=False):
    """The ``(smem_needed, tiles)`` entries ``attention_tiles`` chooses from (``._aot`` checks against them)."""
    key = (max(64, block_d), width)
    return ((_DROPOUT_TILES.get(key) if dropout else None) or (_SOFTCAP_TILES.get(key) if softcap else None)
            or _GPU_TILES[key])


def attention_tiles(head_dim, dtype, smem_limit, dropout=False, softcap=False):
    """Every launch's (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and BLOCK_D, for a GPU whose blocks
    may use ``smem_limit`` bytes of shared memory: the largest ``_GPU_TILES`` entry of (BLOCK_D, operand
    bytes) that fits. A pure function of its arguments (unit-tested; ``._aot`` compiles what it returns).

    Depending on nothing else (not S, B or the mask) makes the recomputed forward ("full" level) bitwise the
    original: same device, dtype and dropout, so the same tiles and the same reduction order. ``dropout``:
    the DROPOUT kernel variants, which get their own tiles where the plain ones would spill (_DROPOUT_TILES);
    ``softcap``: likewise the SOFTCAP variants (_SOFTCAP_TILES). A window takes the plain tiles.
    BLOCK_D = next power of two >= hd (>= 16, tl.dot's minimum), masked on d."""
    block_d = max(16, triton.next_power_of_2(int(head_dim)))
    if block_d > 256:
        raise ValueError(f"head_dim must be <= 256 for the Triton attention kernels, got {head_dim}")
    width = 4 if dtype == torch.float32 else 2
    entries = tile_entries(block_d, width, dropout, softcap)
    for need, tiles in entries:
        if need <= smem_limit:
            return dict(tiles, block_d=block_d)
    raise ValueError(f"no attention tiles for head_dim {head_dim} {dtype} fit {smem_limit} bytes of shared "
                     f"memory per block (the smallest needs {entries[-1][0]})")


def _tiles(head_dim, dtype, device, dropout=False, softcap=False):
    """The tiles of a launch on ``device``: ``attention_tiles`` for its shared memory (``device_limits``),
    or the interpreter's small tiles on CPU tensors."""
    limits = device_limits(device)
    if limits is None:
        return dict(_INTERPRETER_TILES, block_d=max(16, triton.next_power_of_2(int(head_dim))))
    return attention_tiles(head_dim, dtype, limits.smem, dropout, softcap)


# ----------------------------------------------------------------------------------------------------------
# launchers (plain functions; the registered ops below call them)
# ----------------------------------------------------------------------------------------------------------
def _prep_mask(key_mask, b, s, device):
    """(B, S) bool/integer -> contiguous uint8 0/1 (an integer mask of 256 must not wrap to 0), or None."""
    if key_mask is None:
        return None
    if key_mask.is_floating_point() or key_mask.is_complex():
        raise TypeError(f"key_mask must be bool or integer, got {key_mask.dtype}")
    if tuple(key_mask.shape) != (b, s) or key_mask.device != device:
        raise ValueError(f"key_mask must be ({b}, {s}) on {device}, got {tuple(key_mask.shape)} on {key_mask.device}")
    return (key_mask != 0).to(torch.uint8).contiguous()


def _check_like(name, t, shape, dtype, device):
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    return t.contiguous()


def _meta_for(kernel, qkv, causal, key_mask, cfg):
    """Launch options of the forward, dk/dv or dq kernel (``kernel``: "fwd", "dkdv", "dq")."""
    block_m, block_n, warps, stages = cfg[kernel]
    return dict(CAUSAL=bool(causal), HAS_MASK=key_mask is not None, BLOCK_D=cfg["block_d"],
                DOT_FP32=qkv.dtype == torch.bfloat16 and _interpreted(), RTNE_BF16=_emulate_rtne(qkv),
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def _dropout_meta(dropout_p, seed, device):
    """Extra launch arguments of probability dropout: {} when dropout_p == 0 (the plain kernels)."""
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    if dropout_p == 0.0:
        return {}
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(f"seed must be a 1-element int64 tensor on {device} when dropout_p > 0")
    return dict(SEED=seed.reshape(1), threshold=_dropout_threshold(dropout_p), dscale=_dropout_scale(dropout_p),
                DROPOUT=True)


def _window_meta(window, softcap, causal, seq_len, scale):
    """Extra launch arguments of a sliding window / logit cap: {} without either (the plain kernels); a window
    >= seq_len hides nothing and is dropped."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0 = no window); got {window!r}")
    if window > 0 and not causal:
        raise ValueError("window > 0 needs causal=True (a causal sliding window)")
    softcap = float(softcap)
    if not (0.0 <= softcap < float("inf")):
        raise ValueError(f"softcap must be a finite float >= 0 (0 = none); got {softcap!r}")
    meta = {}
    if 0 < window < seq_len:
        meta.update(window=int(window), WINDOW=True)
    if softcap > 0.0:
        meta.update(cap_scale=float(scale) / softcap, cap_log2=softcap * _LOG2E_PY, SOFTCAP=True)
    return meta


def attention_fwd(qkv, key_mask, num_heads, num_kv_heads, causal, scale, dropout_p=0.0, seed=None, window=0,
                  softcap=0.0):
    """Returns o (B, S, H*hd) in qkv's dtype and lse (B, H, S) fp32 (+inf on rows with no key); dropout_p > 0:
    dropout on the probabilities from the seed (module docstring); window > 0: causal sliding window
    (i - j < window); softcap > 0: scores softcap * tanh(scale q.k / softcap)."""
    hd = _check_heads(qkv, num_heads, num_kv_heads)
    drop = _dropout_meta(dropout_p, seed, qkv.device)
    drop.update(_window_meta(window, softcap, causal, qkv.shape[1], scale))
    qkv = qkv.contiguous()
    b, s, _ = qkv.shape
    mask = _prep_mask(key_mask, b, s, qkv.device)
    o = qkv.new_empty(b, s, num_heads * hd)
    lse = qkv.new_empty(b, num_heads, s, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    cfg = _tiles(hd, qkv.dtype, qkv.device, bool(drop.get("DROPOUT")), bool(drop.get("SOFTCAP")))
    meta = dict(_meta_for("fwd", qkv, causal, mask, cfg), **drop)
    launch(wrap_triton(_attn_fwd_kernel), (triton.cdiv(s, meta["BLOCK_M"]) * b * num_heads,),
        qkv, mask, o, lse, s, num_heads, num_heads // num_kv_heads, hd,
        qkv.stride(0), qkv.stride(1), o.stride(0), o.stride(1), float(scale) * _LOG2E_PY, **meta)
    return o, lse


def attention_bwd(do, qkv, o, lse, key_mask, num_heads, num_kv_heads, causal, scale, dropout_p=0.0, seed=None,
                  window=0, softcap=0.0):
    """Returns dqkv (B, S, (H + 2KV) * hd) in qkv's dtype; dk/dv summed over each KV head's query heads; the
    forward's dropout bits regenerated from the same seed; window / softcap as the forward's."""
    hd = _check_heads(qkv, num_heads, num_kv_heads)
    drop = _dropout_meta(dropout_p, seed, qkv.device)
    drop.update(_window_meta(window, softcap, causal, qkv.shape[1], scale))
    qkv = qkv.contiguous()
    b, s, _ = qkv.shape
    o = _check_like("o", o, (b, s, num_heads * hd), qkv.dtype, qkv.device)
    do = _check_like("do", do, (b, s, num_heads * hd), qkv.dtype, qkv.device)
    lse = _check_like("lse", lse, (b, num_heads, s), torch.float32, qkv.device)
    mask = _prep_mask(key_mask, b, s, qkv.device)
    dqkv = torch.empty_like(qkv)
    if dqkv.numel() == 0:
        return dqkv
    cfg = _tiles(hd, qkv.dtype, qkv.device, bool(drop.get("DROPOUT")), bool(drop.get("SOFTCAP")))
    group = num_heads // num_kv_heads
    qk_scale = float(scale) * _LOG2E_PY
    delta = torch.empty_like(lse)
    pre_m = _PRE_ELEMS // cfg["block_d"]  # row sums: any row block gives the same delta
    launch(wrap_triton(_attn_bwd_preprocess), (triton.cdiv(s, pre_m) * b * num_heads,),
        o, do, delta, s, num_heads, hd, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        BLOCK_M=pre_m, BLOCK_D=cfg["block_d"], num_warps=4, num_stages=1)
    args = (qkv, mask, do, lse, delta, dqkv, s, num_heads, group, hd, qkv.stride(0), qkv.stride(1),
            do.stride(0), do.stride(1), dqkv.stride(0), dqkv.stride(1), qk_scale, float(scale))
    meta = dict(_meta_for("dkdv", qkv, causal, mask, cfg), **drop)
    launch(wrap_triton(_attn_bwd_dkdv_kernel), (triton.cdiv(s, meta["BLOCK_N"]) * b * num_kv_heads,),
        *args, **meta)
    meta = dict(_meta_for("dq", qkv, causal, mask, cfg), **drop)
    launch(wrap_triton(_attn_bwd_dq_kernel), (triton.cdiv(s, meta["BLOCK_M"]) * b * num_heads,),
        *args, **meta)
    return dqkv


# ----------------------------------------------------------------------------------------------------------
# op registration
# ----------------------------------------------------------------------------------------------------------
attention_fwd_op = _register(
    "attention_fwd_triton",
    "(Tensor qkv, Tensor? key_mask, int num_heads, int num_kv_heads, bool causal, float scale, "
    "float dropout_p=0.0, Tensor? seed=None, int window=0, float softcap=0.0) -> (Tensor o, Tensor lse)",
    attention_fwd, _meta.attention_fwd)
attention_bwd_op = _register(
    "attention_bwd_triton",
    "(Tensor do, Tensor qkv, Tensor o, Tensor lse, Tensor? key_mask, int num_heads, int num_kv_heads, "
    "bool causal, float scale, float dropout_p=0.0, Tensor? seed=None, int window=0, float softcap=0.0) "
    "-> Tensor dqkv",
    attention_bwd, _meta.attention_bwd)
