"""LayerNorm / RMSNorm Triton kernels, their launchers and the ``ckpt_ops::*_triton`` ops.

One forward kernel and one backward kernel serve both norms (``IS_RMS`` constexpr). The forward keeps only the
per-row statistics (mean for LayerNorm, rstd for both, fp32); the backward rebuilds the normalized input
``xhat`` from ``x`` and those statistics inside the kernel, so the normalized output ``y`` is never stored
for backward, and it produces dx together with per-program partial dweight/dbias in a single pass over x/dy.

Registered ops (``torch.ops.ckpt_ops.<name>_triton``, schemas at the end of this file): x, dy contiguous
(M, N) float16/bfloat16/float32; weight/bias (N,) of x's dtype or None; mean/rstd float32 (M,). Outputs that
are not requested come back as empty tensors (``numel() == 0``) of the dtype they would have had.

Registration (``triton_op`` on CUDA, ``custom_op`` under the interpreter) and the output cast: ``._common``.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton  # a bare name: triton_op's kernel discovery looks for it

from ckpt_ops import _meta  # the fake implementations, shared with the extension's ops

from ._common import DTYPES as _DTYPES
from ._common import _cast_out, _emulate_rtne, _interpreted, _register, device_limits, launch  # noqa: F401  (_interpreted: tests)

# Widest row kept in registers in one block. The backward holds about five fp32 vectors of BLOCK_N elements
# per program (x, dy, w, dweight and dbias accumulators) and everything is computed in fp32 whatever the
# input dtype, so the cap is in elements, not bytes: 8192 elements with 16 warps is 16 fp32 values per
# thread per vector (~80 registers + addressing: budgeted at 136, ``_bwd_regs``; measured 118-126), under
# the 255-register limit but one 512-thread program per SM; 16384 would start to spill.
# Wider rows take the column-block loop (re-reads x from L2). Tests lower it to exercise that loop.
_MAX_BLOCK_N = 8192


# ----------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,  # x, y: (M, N) contiguous; w, b: (N,) or None; mean, rstd: (M,) fp32
    N, eps,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """One program per row; all arithmetic in fp32.

    Forward:
        LayerNorm: mean = sum(x) / N,  var = sum((x - mean)^2) / N   (two-pass, not E[x^2] - E[x]^2)
        RMSNorm:   mean = 0,           var = sum(x^2) / N
        rstd = 1 / sqrt(var + eps),    xhat = (x - mean) * rstd,    y = xhat * w (+ b)   (w = 1 if absent)
        Stores y in x's dtype, mean (LayerNorm only) and rstd in fp32.
    Backward (see ``_norm_bwd_kernel``), with wdy = dy * w:
        dx = rstd * (wdy - (xhat * c2 + c1)),  c2 = sum(wdy * xhat) / N,  c1 = sum(wdy) / N (0 for RMSNorm)
        dw = sum_rows(dy * xhat),              db = sum_rows(dy)
    ONE_BLOCK: the row fits in BLOCK_N, is loaded once and stays in registers; otherwise the row is walked in
    BLOCK_N column blocks three times (sum -> mean, squared deviations -> rstd, normalize -> write).
    """
    row = tl.program_id(0).to(tl.int64)
    X += row * N
    Y += row * N
    eps = tl.cast(eps, tl.float32)  # pin: Inductor passes Python floats as fp64
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if IS_RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
        else:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
            sq = tl.sum(xc * xc, axis=0)
            rstd = 1.0 / tl.sqrt_rn(sq / N + eps) + (sq - sq)  # an overflowed variance: NaN, as eager
        y = (x - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + cols, _cast_out(y, Y.dtype.element_ty, RTNE_BF16), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            mask = off + cols < N
            x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
        if IS_RMS:
            mean = 0.0
            rstd = 1.0 / tl.sqrt_rn(tl.sum(acc, axis=0) / N + eps)
        else:
            mean = tl.sum(acc, axis=0) / N
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                mask = off + cols < N
                x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
            sq = tl.sum(acc, axis=0)
            rstd = 1.0 / tl.sqrt_rn(sq / N + eps) + (sq - sq)  # an overflowed variance: NaN, as eager
        for off in range(0, N, BLOCK_N):
            mask = off + cols < N
            x = tl.load(X + off + cols, mask=mask, other=0.0).to(tl.float32)
            y = (x - mean) * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + off + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                y = y + tl.load(B + off + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(Y + off + cols, _cast_out(y, Y.dtype.element_ty, RTNE_BF16), mask=mask)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_chunk(X, DY, W, row, N, c, mask, mean, rstd, HAS_WEIGHT: tl.constexpr):
    """One column block of a row in the multi-block backward: (dy, xhat, w * dy), fp32; xhat rebuilt
    from x and the saved statistics, identically in both passes over the row."""
    x = tl.load(X + row * N + c, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * N + c, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    if HAS_WEIGHT:
        wdy = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
    else:
        wdy = dy
    return dy, xhat, wdy


@triton.jit
def _dx(wdy, xhat, rstd, c1, c2, IS_RMS: tl.constexpr):
    """dx = rstd * (w dy - (xhat c2 + c1)); RMSNorm has no c1 term."""
    if IS_RMS:
        return (wdy - xhat * c2) * rstd
    else:
        return (wdy - (xhat * c2 + c1)) * rstd


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, MEAN, RSTD,  # dy, x: (M, N) contiguous; w: (N,) or None; mean (None for RMS), rstd: (M,) fp32
    DX, DW_PART, DB_PART,  # dx: (M, N) or None; partials: (num_programs, N) fp32 or None
    M, N, rows_per_program,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    ONE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, RTNE_BF16: tl.constexpr,
):
    """Program p handles the contiguous rows [p * R, min((p + 1) * R, M)), R = rows_per_program.

    Forward (see ``_norm_fwd_kernel``): xhat = (x - mean) * rstd (mean = 0 for RMSNorm), y = xhat * w + b.
    Backward, per row, in fp32, recomputing xhat from x and the saved mean/rstd (y is never read), with the
    same expression as the forward so the recomputation is bitwise identical whatever the tiling:
        wdy = dy * w                  (dy if there is no weight)
        c2  = sum(wdy * xhat) / N,    c1 = sum(wdy) / N   (c1 = 0 for RMSNorm: no mean was subtracted)
        dx  = rstd * (wdy - (xhat * c2 + c1))
    and, accumulated over the program's rows in fp32:
        DW_PART[p] = sum_rows(dy * xhat),   DB_PART[p] = sum_rows(dy)
    The launcher sums the partials over programs, so dweight/dbias need no second pass over x.
    ONE_BLOCK: rows fit in BLOCK_N; x, dy and the partial accumulators stay in registers. Otherwise each row
    is walked in column blocks: pass 1 accumulates c1/c2 and adds dy*xhat, dy into the program's own row of
    the (zero-initialised) partial buffers (read-modify-write; no races, each program owns its row);
    pass 2 (NEED_DX only) writes dx.
    """
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    part = pid.to(tl.int64) * N  # this program's row of DW_PART / DB_PART
    cols = tl.arange(0, BLOCK_N)
    if ONE_BLOCK:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r in range(row_start, row_end):
            row = tl.cast(r, tl.int64)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                mean = 0.0
            else:
                mean = tl.load(MEAN + row)
            x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            if HAS_WEIGHT:
                wdy = dy * w
            else:
                wdy = dy
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DB:
                db_acc += dy
            if NEED_DX:
                c2 = tl.sum(wdy * xhat, axis=0) / N
                c1 = 0.0 if IS_RMS else tl.sum(wdy, axis=0) / N
                dx = _dx(wdy, xhat, rstd, c1, c2, IS_RMS)
                tl.store(DX + row * N + cols, _cast_out(dx, DX.dtype.element_ty, RTNE_BF16), mask=mask)
        if NEED_DW:
            tl.store(DW_PART + part + cols, dw_acc, mask=mask)
        if NEED_DB:
            tl.store(DB_PART + part + cols, db_acc, mask=mask)
    else:
        for r in range(row_start, row_end):
            row = tl.cast(r, tl.int64)
            rstd = tl.load(RSTD + row)
            if IS_RMS:
                mean = 0.0
            else:
                mean = tl.load(MEAN + row)
            acc_wdy_xhat = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_wdy = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                dy, xhat, wdy = _bwd_chunk(X, DY, W, row, N, c, mask, mean, rstd, HAS_WEIGHT)
                if NEED_DX:
                    acc_wdy_xhat += wdy * xhat
                    if not IS_RMS:
                        acc_wdy += wdy
                if NEED_DW:
                    p = tl.load(DW_PART + part + c, mask=mask, other=0.0)
                    tl.store(DW_PART + part + c, p + dy * xhat, mask=mask)
                if NEED_DB:
                    p = tl.load(DB_PART + part + c, mask=mask, other=0.0)
                    tl.store(DB_PART + part + c, p + dy, mask=mask)
            if NEED_DX:
                c2 = tl.sum(acc_wdy_xhat, axis=0) / N
                c1 = 0.0 if IS_RMS else tl.sum(acc_wdy, axis=0) / N
                for off in range(0, N, BLOCK_N):
                    c = off + cols
                    mask = c < N
                    dy, xhat, wdy = _bwd_chunk(X, DY, W, row, N, c, mask, mean, rstd, HAS_WEIGHT)
                    dx = _dx(wdy, xhat, rstd, c1, c2, IS_RMS)
                    tl.store(DX + row * N + c, _cast_out(dx, DX.dtype.element_ty, RTNE_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------------
# launch heuristics
# ----------------------------------------------------------------------------------------------------------
def _block_n(n):
    """Column block: the row rounded up to a power of two (tl.arange needs one), capped at _MAX_BLOCK_N.

    ``int(n)`` specialises a symbolic width under torch.compile: BLOCK_N is a compile-time constant anyway
    and the normalized width is fixed in practice (only the row count M varies)."""
    return min(triton.next_power_of_2(max(int(n), 1)), _MAX_BLOCK_N)


def _bwd_block_n(n):
    """The backward's column block: the whole row up to the cap (ONE_BLOCK, registers only); wider rows take
    the column loop with a quarter of the cap. The loop keeps two fp32 accumulators of BLOCK_N live across the
    passes besides the chunk of x, dy and w it works on: at the full cap it spilled on sm_86/89, at half the
    cap 12 B in fp16 on sm_120 (docs/gpu_resources.md, before); at a quarter (2048, 8 warps) it does not."""
    block_n = _block_n(n)
    return block_n if n <= block_n else block_n // 4


def _num_warps(block_n):
    """About 256 columns (8 per thread) per warp, 1..16 warps: a 768-wide row gets 4 warps, 8192 gets 16.
    Ignored by the interpreter."""
    return max(1, min(block_n // 256, 16))


def _bwd_regs(block_n):
    """Registers per thread the backward is budgeted for: about five fp32 vectors of BLOCK_N / threads
    elements each (x, dy, w and the dweight / dbias accumulators) plus ~56 for addresses, row state and the
    reductions, rounded up to the allocation granule of 8. ``._aot`` checks every compiled backward stays
    within it (docs/gpu_resources.md)."""
    per_thread = max(1, block_n // (32 * _num_warps(block_n)))
    return min(256, -(-(56 + 5 * per_thread) // 8) * 8)


def _bwd_programs_per_sm(block_n, limits):
    """Programs resident per SM, 1 or 2: two when the register file and the thread limit hold two (more
    programs only grow the (G, N) partial buffers and their final sum), else one. E.g. 16 warps at
    BLOCK_N 8192 budget 136 registers: 512 threads x 136 > 65536 / 2, so one program per SM."""
    threads = 32 * _num_warps(block_n)
    fit = min(limits.regs_per_sm // (threads * _bwd_regs(block_n)), limits.max_threads_per_sm // threads)
    return max(1, min(2, fit))


def _bwd_programs(m, block_n, limits):
    """Backward grid size G. GPU: SMs x ``_bwd_programs_per_sm`` fills the GPU while keeping the (G, N)
    partial buffers and their final sum small. CPU (interpreter): 4, so tests see several programs with
    several rows each."""
    target = 4 if limits is None else limits.sm_count * _bwd_programs_per_sm(block_n, limits)
    return max(1, min(m, target))


# ----------------------------------------------------------------------------------------------------------
# launchers (plain functions; the registered ops below call them)
# ----------------------------------------------------------------------------------------------------------
def _check_rows(name, t):
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (M, N), got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_param(name, p, x):
    if p is None:
        return None
    if p.shape != (x.shape[1],) or p.dtype != x.dtype or p.device != x.device:
        raise ValueError(f"{name} must be ({x.shape[1]},) {x.dtype} on {x.device}, "
                         f"got {tuple(p.shape)} {p.dtype} on {p.device}")
    return p.contiguous()


def _check_stat(name, s, x):
    if s.shape != (x.shape[0],) or s.dtype != torch.float32:
        raise ValueError(f"{name} must be ({x.shape[0]},) float32, got {tuple(s.shape)} {s.dtype}")
    return s.contiguous()


def _norm_fwd(x, weight, bias, eps, is_rms):
    """Returns y (x's dtype), mean (fp32 (M,), LayerNorm only, else None) and rstd (fp32 (M,))."""
    _check_rows("x", x)
    if x.shape[1] == 0:
        raise ValueError("x must have at least one column to normalize, got shape (M, 0)")
    x = x.contiguous()
    weight = _check_param("weight", weight, x)
    bias = _check_param("bias", bias, x)
    m, n = x.shape
    y = torch.empty_like(x)
    mean = None if is_rms else torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        block_n = _block_n(n)
        launch(wrap_triton(_norm_fwd_kernel), (m,),
            x, y, weight, bias, mean, rstd, n, eps,
            IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            ONE_BLOCK=n <= block_n, BLOCK_N=block_n, RTNE_BF16=_emulate_rtne(x), num_warps=_num_warps(block_n),
        )
    return y, mean, rstd


def _norm_bwd(dy, x, weight, mean, rstd, need_dx, need_dw, need_db, is_rms):
    """Returns dx, dweight, dbias; those not requested are empty tensors of their would-be dtype."""
    _check_rows("x", x)
    if dy.shape != x.shape or dy.dtype != x.dtype:
        raise ValueError(f"dy must match x {tuple(x.shape)} {x.dtype}, got {tuple(dy.shape)} {dy.dtype}")
    if need_dw and weight is None:
        raise ValueError("need_dweight=True requires a weight")
    x, dy = x.contiguous(), dy.contiguous()
    weight = _check_param("weight", weight, x)
    mean = None if is_rms else _check_stat("mean", mean, x)
    rstd = _check_stat("rstd", rstd, x)
    m, n = x.shape
    dev = x.device
    dw_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty_like(x) if need_dx else torch.empty(0, dtype=x.dtype, device=dev)
    if m == 0 or n == 0 or not (need_dx or need_dw or need_db):
        dweight = torch.zeros(n, dtype=dw_dtype, device=dev) if need_dw else torch.empty(0, dtype=dw_dtype, device=dev)
        dbias = torch.zeros(n, dtype=x.dtype, device=dev) if need_db else torch.empty(0, dtype=x.dtype, device=dev)
        return dx, dweight, dbias
    block_n = _bwd_block_n(n)
    one_block = n <= block_n
    rows_per_program = triton.cdiv(m, _bwd_programs(m, block_n, device_limits(dev)))
    grid = triton.cdiv(m, rows_per_program)  # <= G, and no program without rows
    # One block: each program stores its whole partial row once, so no zero-fill is needed. Column loop:
    # partials are accumulated by read-modify-write and must start at zero.
    alloc = torch.empty if one_block else torch.zeros
    dw_part = alloc((grid, n), dtype=torch.float32, device=dev) if need_dw else None
    db_part = alloc((grid, n), dtype=torch.float32, device=dev) if need_db else None
    launch(wrap_triton(_norm_bwd_kernel), (grid,),
        dy, x, weight, mean, rstd, dx if need_dx else None, dw_part, db_part,
        m, n, rows_per_program,
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None,
        NEED_DX=need_dx, NEED_DW=need_dw, NEED_DB=need_db,
        ONE_BLOCK=one_block, BLOCK_N=block_n, RTNE_BF16=_emulate_rtne(x), num_warps=_num_warps(block_n),
    )
    dweight = dw_part.sum(0).to(dw_dtype) if need_dw else torch.empty(0, dtype=dw_dtype, device=dev)
    dbias = db_part.sum(0).to(x.dtype) if need_db else torch.empty(0, dtype=x.dtype, device=dev)
    return dx, dweight, dbias


def layer_norm_fwd(x, weight, bias, eps):
    return _norm_fwd(x, weight, bias, eps, is_rms=False)


def layer_norm_bwd(dy, x, weight, mean, rstd, need_dx, need_dweight, need_dbias):
    return _norm_bwd(dy, x, weight, mean, rstd, need_dx, need_dweight, need_dbias, is_rms=False)


def rms_norm_fwd(x, weight, eps):
    y, _, rstd = _norm_fwd(x, weight, None, eps, is_rms=True)
    return y, rstd


def rms_norm_bwd(dy, x, weight, rstd, need_dx, need_dweight):
    dx, dweight, _ = _norm_bwd(dy, x, weight, None, rstd, need_dx, need_dweight, False, is_rms=True)
    return dx, dweight


# ----------------------------------------------------------------------------------------------------------
# op registration
# ----------------------------------------------------------------------------------------------------------
layer_norm_fwd_op = _register(
    "layer_norm_fwd_triton",
    "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)",
    layer_norm_fwd, _meta.layer_norm_fwd)
layer_norm_bwd_op = _register(
    "layer_norm_bwd_triton",
    "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_dx, bool need_dweight, "
    "bool need_dbias) -> (Tensor dx, Tensor dweight, Tensor dbias)",
    layer_norm_bwd, _meta.layer_norm_bwd)
rms_norm_fwd_op = _register(
    "rms_norm_fwd_triton",
    "(Tensor x, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)",
    rms_norm_fwd, _meta.rms_norm_fwd)
rms_norm_bwd_op = _register(
    "rms_norm_bwd_triton",
    "(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, bool need_dx, bool need_dweight) -> (Tensor dx, Tensor dweight)",
    rms_norm_bwd, _meta.rms_norm_bwd)
