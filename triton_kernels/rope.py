"""Rotary position embedding (RoPE) Triton kernel, in place on the packed qkv buffer, and the
``ckpt_ops::rope_triton_`` op. Contract: ``ckpt_ops.reference.rope_``.

    qkv (B, S, (H + 2KV) * hd), rows [q heads | k heads | v heads]; cos, sin (S, r/2) or (B, S, r/2),
    r the rotary width (even, <= hd; r < hd: partial rotary, x[r:] of each head passes through)
    forward, on each q and k head, halves x1 = x[:r/2], x2 = x[r/2:r] (fp32, rounded once on store):
        x1' = x1 cos - x2 sin,      x2' = x2 cos + x1 sin
    backward (inverse=True, in place on the gradient dqkv): the transposed rotation, sin -> -sin:
        g1 = g1' cos + g2' sin,     g2 = g2' cos - g1' sin
    v heads are not touched.

RoPE as a separate in-place pass vs fused into the attention loads
------------------------------------------------------------------
On paper, GPT-2-small-like sizes (B 4, S 2048, H = KV 12, hd 64, bf16): qkv is 4*2048*2304 elements = 37.7 MB,
its q and k heads 25.2 MB. The in-place pass reads and writes those: 50.3 MB of HBM traffic (+0.5 MB of fp32
tables) and 3 FLOPs per element (38 MFLOP), about 17 us at 3 TB/s; the inverse pass on dqkv in backward costs
the same. Causal attention on the same sizes is 4*B*H*S^2*hd/2 = 25.8 GFLOP forward and ~64 GFLOP backward,
~0.1 ms and ~0.25 ms on an H100-class GPU: the two passes add ~10% to the attention core. Fusing RoPE into the
attention loads saves those 100 MB but is not free: k is re-loaded once per query block (S/BLOCK_M = 32,
~16.5 on average under causal), so k is rotated ~16x per pass (0.3 GFLOP on CUDA cores, plus the table tiles
from L2), both backward kernels rotate q and k again and inverse-rotate dq/dk before storing, and the
rotate-half pairing splits every q/k tile into two half-width tiles (q1 k1^T + q2 k2^T). Choice: the separate
in-place pass. The attention kernels stay RoPE-agnostic (the same contract as the CPU/CUDA-extension
backends), and the pass leaves post-RoPE q/k in qkv, which is exactly what the "selective" level saves anyway,
so the backward never re-applies RoPE; only the "full"/"keep_attn" recomputation replays the pass (one more
50 MB pass, next to a QKV GEMM that re-reads the layer input and weights).

Registration (``triton_op`` on CUDA, ``custom_op`` under the interpreter) and the output cast: ``._common``.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton  # a bare name: triton_op's kernel discovery looks for it

from ckpt_ops import _meta

from ._common import DTYPES, _cast_out, _emulate_rtne, _interpreted, _register, launch  # noqa: F401  (_interpreted: tests)

# Memory-bound: a program owns BLOCK_S rows of one sequence, loads their cos/sin once and walks the H + KV
# rotated heads, ~1024 elements (BLOCK_S x hd/2 pairs) per head step, 4 warps. Tables are read once per row.
_TILE_ELEMS = 1024
_NUM_WARPS = 4


@triton.jit
def _rope_kernel(
    QKV, COS, SIN,  # qkv: (B, S, W) with unit stride on W; cos/sin: (B or 1, S, r/2), unit stride on the last dim
    S, HALF, HD, NUM_QK_HEADS,  # HALF = r / 2 (r the rotary width, <= HD); NUM_QK_HEADS = H + KV (rotated)
    stride_qb, stride_qs, stride_cb, stride_cs,  # stride_cb = 0 for the 2-D (S, hd/2) tables
    INVERSE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """In place on the first NUM_QK_HEADS heads of every row, fp32 math, one rounding on store:
        x1' = x1 c - x2 s,  x2' = x2 c + x1 s   (s = -sin when INVERSE: the backward, R^T = R(-theta))
    Grid (cdiv(S, BLOCK_S), B)."""
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (rows[:, None] < S) & (cols[None, :] < HALF)
    rows64 = rows.to(tl.int64)
    t_off = b * stride_cb + rows64[:, None] * stride_cs + cols[None, :]
    c = tl.load(COS + t_off, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + t_off, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    base = QKV + b * stride_qb + rows64[:, None] * stride_qs + cols[None, :]
    for h in range(0, NUM_QK_HEADS):
        p1 = base + h * HD  # dims [2 * HALF, HD) of the head pass through
        p2 = p1 + HALF
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
        tl.store(p1, _cast_out(y1, QKV.dtype.element_ty, RTNE_BF16), mask=mask)
        tl.store(p2, _cast_out(y2, QKV.dtype.element_ty, RTNE_BF16), mask=mask)


def _check_heads(qkv, num_heads, num_kv_heads):
    """Shared by the attention launchers: returns hd. qkv (B, S, (H + 2KV) * hd), H a multiple of KV."""
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be 3-D (B, S, (H + 2KV) * hd), got shape {tuple(qkv.shape)}")
    if qkv.dtype not in DTYPES:
        raise TypeError(f"qkv must be float16, bfloat16 or float32, got {qkv.dtype}")
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    width = qkv.shape[2]
    groups = num_heads + 2 * num_kv_heads
    if width % groups != 0 or width == 0:
        raise ValueError(f"qkv's last dim ({width}) must be (num_heads + 2 * num_kv_heads) * head_dim "
                         f"= {groups} * head_dim")
    return width // groups


def rope_(qkv, cos, sin, num_heads, num_kv_heads, inverse):
    """Rotates the q and k heads of qkv in place (see the module docstring). Returns None."""
    hd = _check_heads(qkv, num_heads, num_kv_heads)
    if qkv.stride(2) != 1:
        raise ValueError("qkv must have unit stride on its last dim (the op writes into it in place)")
    b, s, _ = qkv.shape
    half = cos.shape[-1] if cos.dim() in (2, 3) else 0  # r/2: the rotary width r = 2 * half <= hd
    if half < 1 or 2 * half > hd:
        raise ValueError(f"RoPE needs an even head_dim or an even rotary width 2 <= r <= head_dim = {hd} "
                         f"(cos's last dim = r/2), got cos of shape {tuple(cos.shape)}")
    tables = []
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.is_floating_point() or t.device != qkv.device:
            raise ValueError(f"{name} must be a floating tensor on {qkv.device}, got {t.dtype} on {t.device}")
        if tuple(t.shape) not in ((s, half), (b, s, half), (1, s, half)):  # a leading 1 broadcasts (HF's tables)
            raise ValueError(f"{name} must be ({s}, {half}) or ({b} or 1, {s}, {half}), got {tuple(t.shape)}")
        t = t.contiguous()
        tables.append(t if t.dim() == 3 else t.unsqueeze(0))
    cos, sin = tables
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if qkv.numel() == 0:
        return None
    block_half = triton.next_power_of_2(half)
    block_s = max(1, min(_TILE_ELEMS // block_half, triton.next_power_of_2(s)))
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    launch(wrap_triton(_rope_kernel), (triton.cdiv(s, block_s), b),
        qkv, cos, sin, s, half, hd, num_heads + num_kv_heads,
        qkv.stride(0), qkv.stride(1), stride_cb, cos.stride(1),
        INVERSE=bool(inverse), BLOCK_S=block_s, BLOCK_HALF=block_half, RTNE_BF16=_emulate_rtne(qkv),
        num_warps=_NUM_WARPS)
    return None


rope_op = _register(
    "rope_triton_",
    "(Tensor(a!) qkv, Tensor cos, Tensor sin, int num_heads, int num_kv_heads, bool inverse) -> ()",
    rope_, _meta.rope_, mutates_args=("qkv",))
