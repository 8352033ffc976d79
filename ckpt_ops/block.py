"""A pre-norm transformer block as ONE checkpointed segment:

    h1  = x  + dropout(attn(norm1(x)))          (ckpt_ops.attention segment)
    out = h1 + dropout(mlp(norm2(h1)))          (ckpt_ops.mlp segment)

=============  ============================================  =====================================
level          keeps for backward                            recomputes in backward
=============  ============================================  =====================================
``"full"``     x (+ padding mask, dropout seeds): exactly    norm1, QKV, RoPE, the attention forward,
               what torch.utils.checkpoint around the        the output projection (h1 is the MLP's
               block keeps                                   input), norm2, fc1/gate, activation --
                                                             never fc2
``"keep_attn"``+ attention output O and its LSE              as "full" but never the attention
                                                             forward (cost ~ S^2)
``"keep_mlp"`` + h1 (the MLP's input) and the fc1/gate       norm1, QKV, RoPE (one GEMM: the QKV
               outputs                                       projection), norm2, activation
``"selective"``+ qkv (after RoPE), h1, fc1/gate outputs      norms, activation: elementwise only
``"none"``     what the un-checkpointed fused block needs    nothing but the dropout masks
=============  ============================================  =====================================

The backward of "full" replays the attention half once and reuses that replay both to rebuild h1
and for the attention backward (qkv, O, LSE), so no work is done twice.

Post-sublayer norms and q/k norms (ckpt_ops.attention / ckpt_ops.mlp docstrings):

    h1  = x  + dropout(post1(attn(qk_norm, pre1(x))))      (pre1 optional: OLMo2 has none)
    out = h1 + dropout(post2(mlp(pre2(h1))))

The rebuild of h1 at "full"/"keep_attn" runs post1 on the replayed output projection, whose input
and rstd the attention backward then reuses (no GEMM added there); the MLP at "full" replays fc2
for post2's backward (one GEMM more, "full"/"keep_attn" only); "keep_mlp" replays the output
projection for post1 (one GEMM); "selective"/"none" keep the post-norms' inputs (+ rstd at
"none"). Each level's keep list is otherwise the table's: "full" still keeps x (+ mask, seeds).

LoRA (``lora=`` of :func:`transformer_block`; PEFT wrappers through ckpt_ops.convert): adapters on
any of the block's projections are computed inside the segment, in forward, in every replay and in
backward (ckpt_ops.lora: ``y = x W^T + b + (drop(x) A^T) B^T * scale``). Every level keeps what it
keeps without adapters plus one 8-byte LoRA dropout seed (only when lora_dropout > 0): the rank-r
intermediates and the dropout masks are replayed, never saved. The adapter weights enter the
Function as inputs (after ``cfg``), so autograd hands them their gradients; frozen base weights
get no gradient GEMM, and a block input without grad (no ``enable_input_require_grads()``) still
gives the adapters theirs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ckpt_ops import _amp, _autograd
from ckpt_ops import attention as _attn
from ckpt_ops import lora as _lora
from ckpt_ops import mlp as _mlp
from ckpt_ops.mlp import load, save

Tensor = torch.Tensor

LEVELS = ("full", "keep_attn", "keep_mlp", "selective", "none")
# Each block level as a level of its two segments. "keep_mlp" is the attention segment at
# "keep_attn" (x, O, LSE) and the MLP segment at "selective" (its input h1, the fc1/gate outputs):
# between keep_attn and selective, it replays the QKV projection but no other GEMM.
_ATTN_LEVEL = {"full": "full", "keep_attn": "keep_attn", "keep_mlp": "keep_attn", "selective": "selective",
               "none": "none"}
_MLP_LEVEL = {"full": "full", "keep_attn": "full", "keep_mlp": "selective", "selective": "selective",
              "none": "none"}
N_ATTN, N_MLP = len(_attn.PARAMS), len(_mlp.PARAMS)
N_FIXED = N_ATTN + N_MLP + 7  # args after x up to and including the LoRA seed
_MLP_IDX = {k: i + 1 for i, k in enumerate(_mlp.PARAMS)}  # position in the MLP's need (x is 0)


class BlockConfig(NamedTuple):
    attn: _attn.AttnConfig
    mlp: _mlp.MLPConfig
    level: str
    lora: tuple = ()  # ckpt_ops.lora.LoraSpec per adapter-projection, in the order of the LoRA tensors


def _replay_plan(cfg: BlockConfig, aplan: _attn._Plan) -> _attn._Plan:
    """The attention plan widened by what rebuilding h1 = x + attn(x) needs at full/keep_attn:
    O (kept at keep_attn, replayed at full, which needs qkv and hence n)."""
    if cfg.level == "full":
        return aplan._replace(o=True, qkv=True, n=True)
    if cfg.level == "keep_attn":
        return aplan._replace(o=True)
    return aplan


class BlockFunction(torch.autograd.Function):
    """forward(x (B, S, D), *attention params (ckpt_ops.attention.PARAMS), *MLP params
    (ckpt_ops.mlp.PARAMS), key_mask, cos, sin, seed_attn, seed_mlp, cfg, seed_lora,
    *LoRA tensors (A_0, B_0, A_1, B_1, ... in the order of cfg.lora)).

    With LoRA adapters every level keeps what it keeps without them (+ the 8-byte LoRA seed when
    lora_dropout > 0): no rank-r intermediate, no mask; GEMMs per adapter-projection and step 8 on
    replayed projections, 7 on fc2/down and at "selective"/"none" (eager + PEFT: 6, PEFT +
    torch.utils.checkpoint: 8). ckpt_ops.lora's docstring has the table."""

    @staticmethod
    def forward(ctx, x, *args):
        ap = dict(zip(_attn.PARAMS, args[:N_ATTN]))
        mp = dict(zip(_mlp.PARAMS, args[N_ATTN:N_ATTN + N_MLP]))
        key_mask, cos, sin, seed_a, seed_m, cfg, seed_l = args[N_ATTN + N_MLP:N_FIXED]
        lt = args[N_FIXED:]
        lneed = tuple(ctx.needs_input_grad[1 + N_FIXED:])
        # autocast: the adapters' GEMMs in the autocast dtype as well (cast here, originals saved)
        lc = _lora.LoraCall(cfg.lora, _lora_cast(cfg, lt), seed_l, lneed, cfg.mlp.backend) if cfg.lora else None
        b, s, d = x.shape
        # autocast: x and the parameters arrive in their own dtypes and are cast here; the
        # originals are what gets saved (ckpt_ops._amp). No-op outside autocast.
        x_in, ap_in, mp_in = x, ap, mp
        x = _amp.cast_inputs(cfg.attn.amp, {"x": x})["x"]
        ap, mp = _amp.cast_inputs(cfg.attn.amp, ap), _amp.cast_inputs(cfg.mlp.amp, mp)
        h1, ast = _attn.segment_forward(cfg.attn, x, ap, key_mask, cos, sin, seed_a, lc)
        out, mst = _mlp.segment_forward(cfg.mlp, h1, mp, seed_m, lc)

        need = ctx.needs_input_grad
        aneed = tuple(need[:1 + N_ATTN])
        aneed_v = _lora.widen(aneed, lc, _attn._IDX)      # + the attention adapters that train
        need_h1 = any(aneed_v)                            # a gradient must flow into h1
        mneed = (need_h1,) + tuple(need[1 + N_ATTN:1 + N_ATTN + N_MLP])
        mneed_v = _lora.widen(mneed, lc, _MLP_IDX)
        aplan, mplan = _attn._plan(cfg.attn, aneed_v), _mlp._plan(cfg.mlp, mneed_v)
        akeep = _attn.segment_keep(cfg.attn, _replay_plan(cfg, aplan), x, ap, ast, key_mask, cos, sin, seed_a)
        mkeep = _mlp.segment_keep(cfg.mlp, mplan, mneed_v, h1, mp, mst, seed_m)
        rebuild_h1 = cfg.level in ("full", "keep_attn") and mkeep["x"] is not None
        if rebuild_h1:  # h1 = x + dropout(out_proj(O)): keep what that takes instead of h1
            mkeep["x"] = None
            akeep.update(x=x, wo=ap["wo"], bo=ap["bo"], pw=ap["pw"],
                         seed=seed_a if (cfg.attn.p > 0.0 or cfg.attn.attn_p > 0.0) else None)
        if cfg.attn.amp is not None:  # keep the inputs themselves, never their cast copies
            akeep = _amp.originals(akeep, {"x": x, **ap}, {"x": x_in, **ap_in})
            mkeep = _amp.originals(mkeep, mp, mp_in)
        ctx.dtypes = _amp.dtypes(x_in, *args[:N_ATTN + N_MLP])
        ctx.cfg, ctx.plans, ctx.shape, ctx.rebuild_h1 = cfg, (aplan, mplan), (b, s, d), rebuild_h1
        ctx.needs, ctx.lneed = (aneed, mneed, need_h1), lneed
        lkeep = {f"l_{i}": t for i, t in enumerate(lt)}
        lkeep["l_seed"] = seed_l if any(sp.p > 0.0 for sp in cfg.lora) else None
        save(ctx, {**{"a_" + k: v for k, v in akeep.items()}, **{"m_" + k: v for k, v in mkeep.items()}, **lkeep})
        return out.view(b, s, d)

    @staticmethod
    @_autograd.once_differentiable("TransformerBlock")
    def backward(ctx, dout):
        with _amp.off(dout.device.type):  # backward() called inside an autocast region
            return BlockFunction._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        cfg: BlockConfig = ctx.cfg
        aplan, mplan = ctx.plans
        aneed, mneed, need_h1 = ctx.needs
        b, s, d = ctx.shape
        saved = _amp.recast(cfg.attn.amp, load(ctx))  # autocast: cast the kept inputs again
        ta = {k[2:]: v for k, v in saved.items() if k.startswith("a_")}
        tm = {k[2:]: v for k, v in saved.items() if k.startswith("m_")}
        nl = len(ctx.lneed)
        lt = tuple(saved[f"l_{i}"] for i in range(nl))
        lc = _lora.LoraCall(cfg.lora, _lora_cast(cfg, lt), saved["l_seed"], ctx.lneed, cfg.mlp.backend, [None] * nl,
                            {}) if cfg.lora else None
        if ctx.rebuild_h1:
            ta = _attn.segment_replay(cfg.attn, _replay_plan(cfg, aplan), ta, ctx.shape, lc)
            # (with a post-norm its input y and statistics land in ta: the attention backward reuses them)
            tm["x"] = _attn.output_projection(cfg.attn, ta["x"], ta["o"], ta["wo"], ta["bo"], ta["seed"], lc,
                                              ta["pw"], ta)
        mgrads = _mlp.segment_backward(cfg.mlp, mplan, mneed, dout.reshape(b * s, d), tm, lc)
        # h1 (the MLP's input: kept or rebuilt) is the block's own intermediate: free it now
        _autograd.release(_autograd.can_release(), tm["x"])
        if need_h1:
            agrads = _attn.segment_backward(cfg.attn, aplan, aneed, mgrads[0], ta, ctx.shape, lc)
        else:
            agrads = [None] * (1 + N_ATTN)
        dx = agrads[0].view(b, s, d) if agrads[0] is not None else None
        grads = _amp.grads_to([dx, *agrads[1:], *mgrads[1:]], ctx.dtypes)  # each in its input's dtype
        lgrads = _amp.grads_to(lc.grads, _amp.dtypes(*lt)) if lc is not None else ()  # in each adapter's dtype
        return (*grads, None, None, None, None, None, None, None, *lgrads)


def _lora_cast(cfg: BlockConfig, lt: tuple) -> tuple:
    """The LoRA tensors as the block's GEMMs take them: cast to the autocast dtype under autocast."""
    return lt if cfg.attn.amp is None else tuple(_amp.to(t, cfg.attn.amp) for t in lt)


def transformer_block(x: Tensor, attn_params: dict, mlp_params: dict, attn_cfg: _attn.AttnConfig,
                      mlp_cfg: _mlp.MLPConfig, level: str, key_mask: Optional[Tensor] = None,
                      cos: Optional[Tensor] = None, sin: Optional[Tensor] = None, lora=()) -> Tensor:
    """The block as one segment. Configs and parameters come from ``ckpt_ops.nn.TransformerBlock``
    (which validates them); `attn_params`/`mlp_params` are keyed by ckpt_ops.attention.PARAMS /
    ckpt_ops.mlp.PARAMS. Under torch.autocast (configs prepared inside the region: ``amp`` set)
    the block follows ckpt_ops._amp: GEMMs and attention in the autocast dtype, norms and the
    residual stream in fp32, parameter gradients in the parameters' dtype. `lora`: a sequence of
    (ckpt_ops.lora.LoraSpec, A weight (r, in), B weight (out, r)) adapters on the block's
    projections; under autocast their GEMMs run in the autocast dtype too (gradients in the
    adapters' dtype)."""
    if level not in LEVELS:
        raise ValueError(f"recompute must be one of {LEVELS}; got {level!r}")
    specs = tuple(sp for sp, _, _ in lora)
    lt = tuple(t for _, a, b in lora for t in (a, b))
    cfg = BlockConfig(attn_cfg._replace(level=_ATTN_LEVEL[level]), mlp_cfg._replace(level=_MLP_LEVEL[level]), level,
                      specs)
    seed_l = (torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device) if any(sp.p > 0.0 for sp in specs)
              else torch.zeros(1, dtype=torch.int64, device=x.device))
    seeds = [torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
             if c.p > 0.0 or getattr(c, "attn_p", 0.0) > 0.0 else torch.zeros(1, dtype=torch.int64, device=x.device) for c in (cfg.attn, cfg.mlp)]
    if attn_cfg.amp != mlp_cfg.amp:
        raise ValueError("attn_cfg and mlp_cfg were prepared under different autocast states")
    # torch.autocast: x and the parameters go into BlockFunction in their own dtypes; it casts them
    # itself, so that it saves them and not weight-sized cast copies (see ckpt_ops._amp).
    out_dtype = None if cfg.attn.amp is None else _amp.out_dtype(x.dtype, cfg.attn.amp, True)
    x = x.contiguous()
    attn_params = {k: attn_params.get(k) for k in _attn.PARAMS}  # the q/k/post-norm weights may be absent
    mlp_params = {k: mlp_params.get(k) for k in _mlp.PARAMS}
    args = ([attn_params[k] for k in _attn.PARAMS] + [mlp_params[k] for k in _mlp.PARAMS])
    with _amp.off(x.device.type):
        if torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad
                                                               for t in (*args, *lt))):
            out = BlockFunction.apply(x, *args, key_mask, cos, sin, *seeds, cfg, seed_l, *lt)
        else:
            with torch.no_grad():
                lc = _lora.LoraCall(specs, _lora_cast(cfg, lt), seed_l, (False,) * len(lt), cfg.mlp.backend) \
                    if specs else None
                xc = _amp.cast_inputs(cfg.attn.amp, {"x": x})["x"]
                ap, mp = _amp.cast_inputs(cfg.attn.amp, attn_params), _amp.cast_inputs(cfg.mlp.amp, mlp_params)
                h1, _ = _attn.segment_forward(cfg.attn, xc, ap, key_mask, cos, sin, seeds[0], lc)
                out = _mlp.segment_forward(cfg.mlp, h1, mp, seeds[1], lc)[0].view(x.shape)
    return out if out_dtype is None else out.to(out_dtype)
