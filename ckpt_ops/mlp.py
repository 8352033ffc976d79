"""The MLP as one checkpointed segment:

    out = [x +] dropout(fc2(act(fc1(n))))                      non-gated
    out = [x +] dropout(fc2(act(gate(n)) * fc1(n)))            gated (swiglu, geglu)
    with n = norm(x) or x

GEMMs run through ATen (cuBLAS / MKL); everything elementwise runs in fused kernels of the chosen
backend: norm (forward writes n and the row statistics), bias-free activation forward
(``act_fwd``), one backward pass that recomputes the activation output *and* applies its
derivative (``act_bwd``), dropout (+ residual) forward and backward whose mask is regenerated
from a Philox seed, never stored.

Recompute levels (what ``MLPFunction`` keeps for backward; parameters are not counted):

=============  ==========================================  =====================================
level          saves                                       recomputes in backward
=============  ==========================================  =====================================
``"full"``     x, the dropout seed                         norm (stats + n, the forward kernel
                                                           itself: bit-identical), fc1 (+gate),
                                                           the activation -- never fc2
``"selective"``x, h = fc1(n) (+ g = gate(n)), seed         norm, the activation (elementwise)
``"none"``     x, norm stats, n, h (+ g), a, seed          nothing but the dropout mask
=============  ==========================================  =====================================

GEMM count of one training step (forward + backward), non-gated / gated:

=====================================================  ============  ===========
strategy                                               non-gated     gated
=====================================================  ============  ===========
eager, ``"none"``, ``"selective"``                     6             9
``"full"``                                             7             11
torch.utils.checkpoint(use_reentrant=False)            7             11
  ... with dropout after fc2 (its stored mask forces
  fc2 to be replayed)                                  8             12
torch.utils.checkpoint(use_reentrant=True)             8             12
=====================================================  ============  ===========

(forward: fc1, [gate], fc2; backward: fc2 dgrad + wgrad, fc1 dgrad + wgrad, [gate dgrad + wgrad];
``"full"`` adds the fc1 [and gate] replay.)

Post-norm (``post_norm_weight``; Gemma2/3, OLMo2): out = [x +] dropout(rms(y)), y = fc2(a), by the
fused rms_norm kernel (``rms_rows``; under autocast in fp32 on the GEMM-dtype y, cast back). Its
backward needs y: ``"full"`` replays it (fc2 once more: 8 / 12 GEMMs) and its rstd, keeping nothing
more; ``"selective"`` keeps y (M x D) and recomputes the rstd; ``"none"`` keeps y and its rstd
(M floats). Only what ``ctx.needs_input_grad`` requires is saved
and computed: frozen weights skip their weight gradients, a frozen fc2 skips the activation
output, an input without grad skips dx, and under ``torch.no_grad()`` nothing is saved.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ckpt_ops import _amp, _autograd, _backend, _validate
from ckpt_ops import lora as _lora
from ckpt_ops import reference as _ref
from ckpt_ops._consts import ACTIVATIONS
from ckpt_ops.norm import default_rms_eps

Tensor = torch.Tensor

LEVELS = ("full", "selective", "none")
NORMS = (None, "layernorm", "rmsnorm")

_backend.register_family(
    "mlp",
    {
        "cpu": {k: f"torch.ops.ckpt_ops.{k}" for k in ("act_fwd", "act_bwd", "act_bwd_", "act_bwd_rebuild_",
                                                        "dropout_fwd", "dropout_bwd")},
        "cuda": {k: f"torch.ops.ckpt_ops.{k}" for k in ("act_fwd", "act_bwd", "dropout_fwd", "dropout_bwd")},
        "triton": {k: f"torch.ops.ckpt_ops.{k}_triton" for k in ("act_fwd", "act_bwd", "dropout_fwd", "dropout_bwd")},
        "reference": {k: getattr(_ref, k) for k in ("act_fwd", "act_bwd", "dropout_fwd", "dropout_bwd")},
    },
    triton_module="ckpt_ops.triton_kernels.mlp",
    depends=("layer_norm", "rms_norm"),
)


class MLPConfig(NamedTuple):
    """Python constants of one MLP segment (passed to the Function as one argument)."""
    norm: Optional[str]
    norm_eps: Optional[float]
    activation: int
    gated: bool
    p: float
    residual: bool
    level: str
    backend: str
    amp: Optional[torch.dtype] = None  # autocast: the GEMM dtype (ckpt_ops._amp), else None
    # post-sublayer norm: out = [x +] dropout(rmsnorm(fc2(...))) (Gemma2/3, OLMo2), weight PARAMS "pw"
    post_norm: bool = False
    post_eps: Optional[float] = None


def mm(cfg, t: Tensor) -> Tensor:
    """A GEMM operand in the segment's GEMM dtype (under autocast cfg.amp, else unchanged)."""
    return t if cfg.amp is None or t.dtype == cfg.amp else t.to(cfg.amp)


def residual_dropout(cfg, y: Tensor, x: Tensor, seed: Tensor) -> Tensor:
    """[x +] dropout(y) of a segment's last GEMM output y (cfg.p, cfg.residual), by the fused
    dropout (+ residual) kernel. Under autocast y is in the GEMM dtype and x is not: with dropout,
    y is promoted first (the kernel takes one dtype); at p == 0 the residual add is torch's
    promoting add -- one pass, as eager's ``x + y``, not a cast and then the kernel -- with the
    same fp32 sum, so the bits are the kernel's."""
    if cfg.p == 0.0:
        if not cfg.residual:
            return y
        if y.dtype != x.dtype:
            return torch.add(x, y)
    elif cfg.residual and y.dtype != x.dtype:
        y = y.to(torch.promote_types(y.dtype, x.dtype))
    return _backend.kernel("mlp", cfg.backend, "dropout_fwd")(y, x if cfg.residual else None, seed, cfg.p)


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    """The norm kernels take contiguous parameters; a strided weight (rare) is copied."""
    return t.contiguous() if t is not None else None


def _norm_fwd(cfg: MLPConfig, x, nw, nb):
    """(n, mean, rstd) with the backend's fused norm kernel; n = x without a norm."""
    nw, nb = _contig(nw), _contig(nb)
    if cfg.norm == "layernorm":
        return _backend.kernel("layer_norm", cfg.backend, "fwd")(x, nw, nb, cfg.norm_eps)
    if cfg.norm == "rmsnorm":
        n, rstd = _backend.kernel("rms_norm", cfg.backend, "fwd")(x, nw, cfg.norm_eps)
        return n, None, rstd
    return x, None, None


def rms_rows(cfg, x: Tensor, w: Tensor, eps: float):
    """RMSNorm of x over rows of width w.numel() (x's last dim or a divisor of it: per-head q/k
    norms) by the backend's fused rms_norm kernel: the q/k norms and the post-sublayer norms.
    Returns (n in x's dtype and shape, rstd per row). Under autocast x is a GEMM output in the GEMM
    dtype and w is fp32: x is normalised in fp32 (as HF's RMSNorms upcast) and n cast back."""
    x2 = x.reshape(-1, w.shape[0])
    xin = x2 if x2.dtype == w.dtype else x2.to(w.dtype)
    n, rstd = _backend.kernel("rms_norm", cfg.backend, "fwd")(xin.contiguous(), _contig(w), eps)
    return n.to(x.dtype).view(x.shape), rstd


def rms_rows_bwd(cfg, dn: Tensor, x: Tensor, w: Tensor, rstd: Tensor, need_w: bool):
    """Backward of :func:`rms_rows`: (dx in x's dtype and shape, dw or None)."""
    x2 = x.reshape(-1, w.shape[0])
    xin = x2 if x2.dtype == w.dtype else x2.to(w.dtype)
    dn2 = dn.reshape(-1, w.shape[0]).to(w.dtype).contiguous()
    dx, dw = _backend.kernel("rms_norm", cfg.backend, "bwd")(dn2, xin.contiguous(), _contig(w), rstd, True, need_w)
    return dx.to(x.dtype).view(x.shape), (dw if need_w else None)


class _Plan(NamedTuple):
    """What backward must produce and therefore what forward keeps (from ctx.needs_input_grad)."""
    up: bool          # anything upstream of fc2's input trains: da = dy @ w2 and dh are needed
    h: bool           # h (and g) are needed: for dh, or to rebuild a for fc2's weight gradient
    n: bool           # n is needed in backward: for fc1/gate weight gradients or the fc1 replay
    norm_bwd: bool    # the norm's backward runs (dx or the norm's own parameters train)
    dn: bool          # dn = dh @ w1 (+ dg @ wg) is needed (dx or norm parameters)
    y: bool = False   # the post-norm's backward runs: its input y = fc2(a) is needed


def _plan(cfg: MLPConfig, need) -> _Plan:
    need_x, need_nw, need_nb, need_w1, need_b1, need_wg, need_bg, need_w2, need_b2 = need[:9]
    need_pw = len(need) > 9 and need[9]
    dn = need_x or need_nw or need_nb
    up = dn or need_w1 or need_b1 or need_wg or need_bg
    h = up or need_w2
    y = cfg.post_norm and (h or need_b2 or need_pw)
    h = h or (y and cfg.level == "full")  # "full" replays y = fc2(act(fc1(n))): h (and n) are needed
    n = need_w1 or need_wg or (h and cfg.level == "full")
    return _Plan(up, h, n, cfg.norm is not None and dn, dn, y)


# Parameter names of the segment, in the order of the Function's inputs after x.
PARAMS = ("nw", "nb", "w1", "b1", "wg", "bg", "w2", "b2", "pw")


def _fc(lc, nm: Tensor, t: dict, w: str, b: str) -> Tensor:
    """One projection of the segment (+ its LoRA adapters, ckpt_ops.lora): forward and replay."""
    return _lora.add(lc, w, nm, F.linear(nm, t[w], t[b]))


def segment_forward(cfg: MLPConfig, x: Tensor, p: dict, seed: Tensor, lc=None):
    """Run the segment on x (M, D) contiguous with parameters `p` (keys PARAMS) and LoRA adapters
    `lc` (ckpt_ops.lora; None without). Returns (out, state) where state holds every intermediate
    a backward could use."""
    k = lambda name: _backend.kernel("mlp", cfg.backend, name)  # noqa: E731
    n, mean, rstd = _norm_fwd(cfg, x, p["nw"], p["nb"])
    nm = mm(cfg, n)  # autocast: one cast of n for fc1 and the gate
    h = _fc(lc, nm, p, "w1", "b1")
    g = _fc(lc, nm, p, "wg", "bg") if cfg.gated else None
    a = k("act_fwd")(h, g, cfg.activation)
    y = _fc(lc, a, p, "w2", "b2")
    z, prstd = rms_rows(cfg, y, p["pw"], cfg.post_eps) if cfg.post_norm else (y, None)
    out = residual_dropout(cfg, z, x, seed)
    # n is only ever a GEMM operand (the norm's backward reads x, mean and rstd): the state holds
    # its GEMM-dtype copy, so "none" under autocast keeps n at eager's bytes (the bf16 copy, as
    # eager's linear saves) and its backward does not cast it again
    return out, {"n": nm, "mean": mean, "rstd": rstd, "h": h, "g": g, "a": a, "y": y, "prstd": prstd}


def segment_keep(cfg: MLPConfig, plan: _Plan, need, x: Tensor, p: dict, st: dict, seed: Tensor) -> dict:
    """What the segment keeps for backward at cfg.level (None = not kept), given `need`
    (needs_input_grad of x and PARAMS)."""
    lvl, has_norm = cfg.level, cfg.norm is not None
    keep_n = lvl == "none" and plan.n and has_norm            # "none" keeps n itself
    rebuild_n = lvl != "none" and has_norm and (plan.n or plan.norm_bwd)  # norm re-run in bwd
    keep_x = plan.norm_bwd or (plan.n and not keep_n)         # n is x without a norm
    replay_h = lvl == "full" and plan.h
    keep_h = lvl != "full" and (plan.up or (plan.h and lvl == "selective"))
    return {
        "x": x if keep_x else None,
        "mean": st["mean"] if lvl == "none" and plan.norm_bwd else None,
        "rstd": st["rstd"] if lvl == "none" and plan.norm_bwd else None,
        "n": st["n"] if keep_n else None,
        "h": st["h"] if keep_h else None,
        "g": st["g"] if keep_h else None,
        "a": st["a"] if lvl == "none" and need[7] else None,
        "nw": p["nw"] if (plan.norm_bwd or rebuild_n) else None,
        "nb": p["nb"] if rebuild_n else None,
        "w1": p["w1"] if (plan.dn or replay_h) else None,
        "b1": p["b1"] if replay_h else None,
        "wg": p["wg"] if (plan.dn or replay_h) else None,
        "bg": p["bg"] if replay_h else None,
        "w2": p["w2"] if (plan.up or (plan.y and lvl == "full")) else None,
        "b2": p["b2"] if (plan.y and lvl == "full") else None,
        "y": st["y"] if (plan.y and lvl != "full") else None,       # post-norm input: kept below "full"
        "prstd": st["prstd"] if (plan.y and lvl == "none") else None,
        "pw": p["pw"] if plan.y else None,
        "seed": seed if cfg.p > 0.0 else None,
    }


def segment_backward(cfg: MLPConfig, plan: _Plan, need, dout: Tensor, t: dict, lc=None) -> list:
    """Gradients [dx, *d(PARAMS)] from dout (M, D) and the kept tensors `t` (segment_keep's keys);
    whatever is missing is recomputed: n and the norm statistics by the forward's own norm kernel,
    h/g by replaying fc1/gate, a inside the fused activation backward. LoRA adapters (`lc`,
    ckpt_ops.lora): their gradients into lc.grads; `plan` then comes from `need` widened by the
    adapters that train (ckpt_ops.lora.widen), `need` itself decides the base gradients."""
    k = lambda name: _backend.kernel("mlp", cfg.backend, name)  # noqa: E731
    x, n, h, g, a, mean, rstd = t["x"], t["n"], t["h"], t["g"], t["a"], t["mean"], t["rstd"]
    dout = dout.contiguous()
    grads = [None] * (1 + len(PARAMS))
    free = _autograd.can_release()  # y, h, g, a, n below: this segment's own intermediates
    dy = k("dropout_bwd")(dout, t["seed"], cfg.p) if cfg.p > 0.0 else dout
    if need[0] and cfg.residual and not plan.dn:
        grads[0] = dout
    nm = None  # n in the GEMM dtype (autocast: cast once for the replay and the weight gradients)

    def replay_nh():
        nonlocal n, mean, rstd, h, g, nm
        if n is None and (plan.n or (plan.norm_bwd and rstd is None)):
            if cfg.norm is None:
                n = x
            else:  # the forward's own norm kernel: n, mean and rstd bit-identical to the forward's
                n, mean, rstd = _norm_fwd(cfg, x, t["nw"], t["nb"])
        if h is None and (plan.up or a is None):  # "full": replay fc1 (and gate), bit-identical
            nm = mm(cfg, n)
            h = _fc(lc, nm, t, "w1", "b1")
            g = _fc(lc, nm, t, "wg", "bg") if cfg.gated else None

    if cfg.post_norm:  # dy = the post-norm's backward, from its input y = fc2(a) (kept, or replayed at "full")
        if not plan.y:
            return grads
        y, prstd = t["y"], t["prstd"]
        if y is None:  # "full": replay fc2 on the replayed activation (one more GEMM)
            replay_nh()
            if a is None:
                a = k("act_fwd")(h, g, cfg.activation)
            y = _fc(lc, a, t, "w2", "b2")
        if prstd is None:  # the forward's own norm kernel: bit-identical statistics
            prstd = rms_rows(cfg, y, t["pw"], cfg.post_eps)[1]
        dy, grads[9] = rms_rows_bwd(cfg, dy, y, t["pw"], prstd, bool(need[9]))
        _autograd.release(free, y)  # fc2's output
        del y
    if need[8]:
        grads[8] = dy.sum(0)
    if not plan.h:
        return grads
    replay_nh()

    lw2 = _lora.trains(lc, "w2")
    rebuild_a = (need[7] or lw2) and a is None
    dyc = mm(cfg, dy)  # autocast: fc2's backward GEMMs in the GEMM dtype, like eager's
    du2 = _lora.dus(lc, "w2", dyc) if (plan.up or lw2) else {}
    spare = None  # a dead kept `a` whose pages take da (same shape and dtype: (M, H), the GEMM dtype)
    if a is not None:  # kept ("none"): fc2's weight gradient first, then `a` can go (as eager's order)
        if need[7]:
            grads[7] = dyc.t() @ a
        _lora.weight_grads(lc, "w2", dyc, du2, a)
        if free and plan.up and a.is_contiguous() and a.dtype == dyc.dtype and cfg.backend == "cpu":
            spare = a  # CPU: a fresh 25 MB buffer is fresh pages (page faults, measured +13 % on this GEMM)
        else:
            _autograd.release(free, a)
        a = None
        w2_done = True
    else:
        w2_done = False
    if plan.up:
        da = dyc @ t["w2"] if spare is None else torch.mm(dyc, t["w2"], out=spare)
        spare = None
        dl = _lora.input_grad(lc, "w2", du2, da.dtype)
        da = da if dl is None else da.add_(dl)  # da: a fresh product of this backward
        cpu = cfg.backend == "cpu" and not torch.compiler.is_compiling()
        if cpu and free and rebuild_a:  # h and g are dead after this: a into h, dh into da, dg
            k("act_bwd_rebuild_")(da, h, g, cfg.activation)  # into g -- no fresh buffer at all
            a, dh, dg = h, da, g
        else:
            if cpu:
                a_re, dg = k("act_bwd_")(da, h, g, cfg.activation, rebuild_a)  # dh written into da (one
                dh = da                                   # activation-sized allocation fewer than eager)
            else:
                a_re, dh, dg = k("act_bwd")(da, h, g, cfg.activation, rebuild_a)
            if rebuild_a:
                a = a_re
            del a_re
            _autograd.release(free, h, g)
        del da, dl
    elif rebuild_a:
        a = k("act_fwd")(h, g, cfg.activation)
    if not w2_done:
        if need[7]:
            grads[7] = dyc.t() @ a
        _lora.weight_grads(lc, "w2", dyc, du2, a)
        _autograd.release(free, a)
    if not plan.up:
        return grads

    if nm is None and (need[3] or (cfg.gated and need[5]) or _lora.trains(lc, "w1") or _lora.trains(lc, "wg")):
        nm = mm(cfg, n)
    du1 = _lora.dus(lc, "w1", dh) if (plan.dn or _lora.trains(lc, "w1")) else {}
    _lora.weight_grads(lc, "w1", dh, du1, nm)
    dug = _lora.dus(lc, "wg", dg) if cfg.gated and (plan.dn or _lora.trains(lc, "wg")) else {}
    _lora.weight_grads(lc, "wg", dg, dug, nm)
    if need[3]:
        grads[3] = dh.t() @ nm
    if need[4]:
        grads[4] = dh.sum(0)
    if cfg.gated and need[5]:
        grads[5] = dg.t() @ nm
    if cfg.gated and need[6]:
        grads[6] = dg.sum(0)
    if cfg.norm is not None:
        _autograd.release(free, n)  # the norm's output (kept or replayed), not x
    nm = None  # (a closure cell of replay_nh: assigned, not `del`, which torch.compile cannot trace)
    if not plan.dn:
        _autograd.release(free, dh, dg)  # they may sit in kept pages (a, g): freed like them
        return grads
    dn = dh @ t["w1"]
    for dl in (_lora.input_grad(lc, "w1", du1, dn.dtype), _lora.input_grad(lc, "wg", dug, dn.dtype)):
        dn = dn if dl is None else dn + dl
    if cfg.gated:
        dn = dn.addmm_(dg, t["wg"])  # dn: this backward's own product; accumulated in the GEMM
    _autograd.release(free, dh, dg)  # they may sit in kept pages (a, g): freed like them
    del dh, dg
    dx = norm_backward(cfg, dn, x, t["nw"], mean, rstd, need[:3], grads)
    del dn
    if need[0]:
        grads[0] = add_residual_grad(dx, dout, free) if cfg.residual else dx
    return grads


def add_residual_grad(dx: Tensor, dout: Tensor, inplace: bool) -> Tensor:
    """dx + dout for a residual segment; into dx (a fresh gradient of the segment's own) when
    `inplace` (eager backward, see ckpt_ops._autograd.can_release) and the dtypes agree."""
    if inplace and dx.dtype == dout.dtype and dx.shape == dout.shape:
        return dx.add_(dout)
    return dx + dout


def norm_backward(cfg, dn: Tensor, x: Tensor, nw, mean, rstd, need3, grads: list) -> Tensor:
    """The fused pre-norm's backward: returns dx (or dn without a norm) and stores the norm's
    parameter gradients into grads[1], grads[2] when needed."""
    if cfg.norm is not None and dn.dtype != x.dtype:  # autocast: GEMM-dtype dn into the fp32 norm
        dn = dn.to(x.dtype)
    nw = _contig(nw)
    if cfg.norm == "layernorm":
        dx, dw, db = _backend.kernel("layer_norm", cfg.backend, "bwd")(dn, x, nw, mean, rstd, *need3)
    elif cfg.norm == "rmsnorm":
        dx, dw = _backend.kernel("rms_norm", cfg.backend, "bwd")(dn, x, nw, rstd, need3[0], need3[1])
        db = None
    else:
        return dn
    grads[1] = dw if need3[1] else None
    grads[2] = db if need3[2] else None
    return dx


def save(ctx, kept: dict) -> None:
    """ctx.save_for_backward of a dict of tensors/None (names kept on ctx, tensors saved)."""
    ctx.saved_names = tuple(kept)
    like = next((v for v in kept.values() if v is not None), None)
    ctx.save_for_backward(*kept.values(), _autograd.sentinel(like))


def load(ctx) -> dict:
    """The dict `save` kept; raises on a second backward (the sentinel is always saved)."""
    return dict(zip(ctx.saved_names, _autograd.saved(ctx)))


class MLPFunction(torch.autograd.Function):
    """The MLP segment (see the module docstring for the saved/recomputed table and GEMM counts).

    forward(x (M, D) contiguous, norm_weight, norm_bias, w1, b1, wg, bg, w2, b2, post_norm_weight, seed, cfg).
    """

    @staticmethod
    def forward(ctx, x, nw, nb, w1, b1, wg, bg, w2, b2, pw, seed, cfg: MLPConfig):
        p_in = {"x": x, **dict(zip(PARAMS, (nw, nb, w1, b1, wg, bg, w2, b2, pw)))}
        p = _amp.cast_inputs(cfg.amp, p_in)  # autocast: cast here, save the originals (ckpt_ops._amp)
        xc = p.pop("x")
        out, st = segment_forward(cfg, xc, p, seed)
        plan = _plan(cfg, ctx.needs_input_grad)
        ctx.cfg, ctx.plan, ctx.dtypes = cfg, plan, _amp.dtypes(*p_in.values())
        keep = segment_keep(cfg, plan, ctx.needs_input_grad, xc, p, st, seed)
        if cfg.amp is not None:
            keep = _amp.originals(keep, {"x": xc, **p}, p_in)
        save(ctx, keep)
        return out

    @staticmethod
    @_autograd.once_differentiable("MLP")
    def backward(ctx, dout):
        with _amp.off(dout.device.type):  # backward() called inside an autocast region
            grads = segment_backward(ctx.cfg, ctx.plan, ctx.needs_input_grad, dout, _amp.recast(ctx.cfg.amp, load(ctx)))
        return (*_amp.grads_to(grads, ctx.dtypes), None, None)


# ------------------------------------------------------------------------------------------------
# Functional API
# ------------------------------------------------------------------------------------------------
def _check_linear(w: Optional[Tensor], b: Optional[Tensor], name: str, shape, like: Tensor, required=True):
    if w is None:
        if required:
            raise TypeError(f"{name}_weight must be a tensor of shape {tuple(shape)}; got None")
        if b is not None:
            raise ValueError(f"{name}_bias given without {name}_weight")
        return
    _validate.param_like(w, f"{name}_weight", shape, like)
    _validate.param_like(b, f"{name}_bias", (shape[0],), like)


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Optional[Tensor], fc2_weight: Tensor,
        fc2_bias: Optional[Tensor], *, activation: str = "gelu_tanh", gate_weight: Optional[Tensor] = None,
        gate_bias: Optional[Tensor] = None, norm: Optional[str] = None, norm_weight: Optional[Tensor] = None,
        norm_bias: Optional[Tensor] = None, norm_eps: Optional[float] = None, dropout: float = 0.0,
        training: bool = True, residual: bool = False, recompute: str = "full",
        backend: Optional[str] = None, post_norm_weight: Optional[Tensor] = None,
        post_norm_eps: Optional[float] = None) -> Tensor:
    """Fused checkpointed MLP segment ``[x +] dropout(fc2(act(fc1(norm(x)))))``.

    Args:
        x: (..., d_model), float16/bfloat16/float32/float64, any strides.
        fc1_weight, fc1_bias: (d_hidden, d_model), (d_hidden,) or None -- the "up" projection.
        fc2_weight, fc2_bias: (d_model, d_hidden), (d_model,) or None.
        activation: "gelu" | "gelu_tanh" | "relu" | "silu" | "swiglu" | "geglu". The gated ones
            (swiglu = silu(gate(n)) * fc1(n), geglu = gelu_tanh(gate(n)) * fc1(n)) need
            gate_weight (d_hidden, d_model) and optionally gate_bias.
        norm: None | "layernorm" | "rmsnorm", fused into the segment, with norm_weight/norm_bias
            (d_model,) (bias: layernorm only) and norm_eps (default 1e-5 for layernorm, and for
            rmsnorm what ``torch.nn.functional.rms_norm`` uses, see ``ckpt_ops.norm.rms_norm``).
        dropout: probability in [0, 1) applied to the fc2 output when ``training``; the mask comes
            from a Philox seed drawn from the device's torch generator (``torch.manual_seed``
            reproduces it) and is regenerated in backward, never stored.
        residual: add x to the output.
        recompute: "full" | "selective" | "none" (see the module docstring).
        backend: see ``ckpt_ops.backend_info()``.
        post_norm_weight, post_norm_eps: a post-sublayer RMSNorm (weight (d_model,)) of the fc2
            output, before dropout and the residual add (Gemma2/3, OLMo2): ``[x +] dropout(rms(fc2(.)))``.
    """
    cfg = prepare(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation=activation, gate_weight=gate_weight,
                  gate_bias=gate_bias, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
                  dropout=dropout, training=training, residual=residual, recompute=recompute, backend=backend,
                  post_norm_weight=post_norm_weight, post_norm_eps=post_norm_eps)
    d_model = x.shape[-1]
    # torch.autocast: x and the parameters go into the Function in their own dtypes; it casts them
    # itself, so that it saves them and not weight-sized cast copies (see ckpt_ops._amp).
    out_dtype = None if cfg.amp is None else _amp.out_dtype(x.dtype, cfg.amp, cfg.residual)
    x2d = x.reshape(-1, d_model).contiguous()
    # The dropout kernels take a seed tensor always (ignored when p == 0; only saved when p > 0).
    if cfg.p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    else:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    args = (x2d, norm_weight, norm_bias, fc1_weight, fc1_bias, gate_weight, gate_bias, fc2_weight, fc2_bias,
            post_norm_weight)
    with _amp.off(x.device.type):
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args):
            out = MLPFunction.apply(*args, seed, cfg)
        else:
            with torch.no_grad():
                p = _amp.cast_inputs(cfg.amp, {"x": x2d, **dict(zip(PARAMS, args[1:]))})
                out = segment_forward(cfg, p.pop("x"), p, seed)[0]
    out = out.view(x.shape)
    return out if out_dtype is None else out.to(out_dtype)


def prepare(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, activation, gate_weight, gate_bias, norm,
            norm_weight, norm_bias, norm_eps, dropout, training, residual, recompute, backend,
            post_norm_weight=None, post_norm_eps=None) -> MLPConfig:
    """Validate the arguments of :func:`mlp` (raising before any kernel runs); return the config."""
    x = _validate.float_tensor(x, "x", min_dim=1)
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")
    if recompute not in LEVELS:
        raise ValueError(f"recompute must be one of {LEVELS} for the MLP; got {recompute!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")
    code, gated = ACTIVATIONS[activation]
    d_model = x.shape[-1]
    _validate.tensor(fc1_weight, "fc1_weight")
    if fc1_weight.dim() != 2:
        raise ValueError(f"fc1_weight must be 2-D (d_hidden, d_model); got shape {tuple(fc1_weight.shape)}")
    d_hidden = fc1_weight.shape[0]
    _check_linear(fc1_weight, fc1_bias, "fc1", (d_hidden, d_model), x)
    _check_linear(fc2_weight, fc2_bias, "fc2", (d_model, d_hidden), x)
    if gated:
        _check_linear(gate_weight, gate_bias, "gate", (d_hidden, d_model), x)
    elif gate_weight is not None or gate_bias is not None:
        raise ValueError(f"gate_weight/gate_bias are only used by gated activations, not {activation!r}")
    if norm is None:
        if norm_weight is not None or norm_bias is not None:
            raise ValueError("norm_weight/norm_bias given without norm")
        eps = None
    else:
        _validate.param_like(norm_weight, "norm_weight", (d_model,), x)
        if norm == "rmsnorm" and norm_bias is not None:
            raise ValueError("norm_bias: rmsnorm has no bias")
        _validate.param_like(norm_bias, "norm_bias", (d_model,), x)
        if norm_eps is None:
            eps = 1e-5 if norm == "layernorm" else default_rms_eps(x.dtype)
        else:
            eps = _validate.eps(norm_eps, "norm_eps")
    p = float(dropout) if training else 0.0
    be = _backend.resolve("mlp", x.device, backend)
    _validate.backend_dtype(be, x, "x")
    post_eps = post_norm_prepare(post_norm_weight, post_norm_eps, d_model, x)
    return MLPConfig(norm, eps, code, gated, p, bool(residual), recompute, be, _amp.gemm_dtype(x),
                     post_norm_weight is not None, post_eps)


def post_norm_prepare(weight, eps, d_model: int, x: Tensor) -> Optional[float]:
    """Validate a post-sublayer RMSNorm's weight (d_model,) (None: no post-norm; eps then unused);
    returns its eps (default as ``norm_eps``)."""
    if weight is None:
        if eps is not None:
            raise ValueError("post_norm_eps given without post_norm_weight")
        return None
    _validate.param_like(weight, "post_norm_weight", (d_model,), x)
    return default_rms_eps(x.dtype) if eps is None else _validate.eps(eps, "post_norm_eps")
