"""LoRA inside the fused checkpointed block: PEFT ``peft.tuners.lora.Linear`` wrappers on the
projections a block reads (q/k/v/o, gate/up/down, GPT-2's c_attn/c_proj/c_fc) run fused.

Per projection with weight W (target ``"wq" | "wk" | "wv" | "wo" | "w1" | "wg" | "w2"``, the
segment's parameter names) and active adapters i (PEFT's order), the block computes what PEFT's
``Linear.forward`` computes::

    y = x W^T + b                       (the base layer: Linear, or Conv1D used transposed)
    y = y + (drop_i(x) A_i^T) B_i^T * scale_i      for each active adapter i, in order

``scale_i`` is PEFT's ``scaling[adapter]`` (``lora_alpha / r``, or ``/ sqrt(r)`` with
``use_rslora``). ``drop_i`` is ``lora_dropout`` (0 in eval): keep bits from Philox under the block's
LoRA seed + i + 1 (one 8-byte tensor kept for backward, the same dropout kernel as the residual
dropout), regenerated in backward and at every recompute, never stored; equal to torch's
``nn.Dropout`` in distribution, not in bits.

What is kept, at every level: nothing per adapter beyond the block's own keep set and the 8-byte
seed (saved bytes at "full" = the block input + per-row stats, as without adapters, which is at most
what PEFT + torch.utils.checkpoint keeps; eager PEFT keeps per adapter-projection drop(x) (M x in,
or x itself without dropout), its mask and u (M x r)). The rank-r intermediate
``u = drop(x) A^T`` (M x r) is not kept: where the level replays the projection (q/k/v, o, gate/up
at "full"), dB reuses the replay's u; elsewhere (down/fc2, and every projection at "selective" /
"none") it is recomputed from the projection input, one skinny GEMM (2 M in r FLOPs, r/out of the
base GEMM), instead of keeping M x r per adapter.

GEMMs per adapter-projection and step (LoRA trains, base frozen, the input needs a gradient):

============================================  ======================================================
eager + PEFT                                  6: forward u, u B^T; backward dB, du, dA, dx
PEFT + torch.utils.checkpoint                 8: + the forward replay (u, u B^T)
ckpt_ops "full", replayed projections         8: forward 2, replay 2, dB (with the replay's u), du,
                                              dA, dx
ckpt_ops "full", down/fc2 (never replayed)    7: forward 2, u again, dB, du, dA, dx
ckpt_ops "selective" / "none"                 7: forward 2, u again, dB, du, dA, dx
============================================  ======================================================

The base projection: 2 GEMMs per step when frozen (forward, dgrad; + 1 replay where replayed): a
frozen base weight (PEFT's default) gets no weight-gradient GEMM. docs/lora.md has the whole table.

PEFT states: ``merged`` (``merge()``: the base weight already holds the adapters, PEFT then runs
the base layer alone) and disabled adapters (``disable_adapter()``) serve the base projection
alone; a merged layer with adapters disabled (PEFT unmerges inside forward), LoRA variants (DoRA,
aLoRA, ...), ``lora_bias``, A and B in different dtypes or on another device, dropout modules
other than ``nn.Dropout``/``nn.Identity`` are Unservable: the original forward runs and the report
says why. Adapters in another dtype than the model (PEFT's default ``autocast_adapter_dtype=True``
keeps fp32 adapters on a bf16/fp16 model) are served as PEFT computes them: x cast to the adapter
dtype, the LoRA sum in the promoted dtype, the output cast back; in backward the adapters' input
gradient is cast back to the input's dtype before it joins the base projection's. Under
torch.autocast the block casts the adapters to the autocast dtype with its other GEMM operands
(ckpt_ops.block; originals saved, gradients returned in the adapters' dtype).
"""
from __future__ import annotations

import sys
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from ckpt_ops import _backend
from ckpt_ops._convert_guard import Unservable, read_reason

Tensor = torch.Tensor


class LoraSpec(NamedTuple):
    """The Python constants of one adapter on one projection (part of the block config)."""
    target: str   # the segment parameter the projection's weight is: "wq", "wo", "w1", ...
    scale: float
    p: float      # lora_dropout probability (0 when the dropout module is in eval)
    name: str     # "<projection>/<adapter>", for reports and tests; specs of one name (the halves of a
    #               packed projection's adapter) share one dropout mask


class LoraCall(NamedTuple):
    """One call's LoRA tensors: tensors = (A_0, B_0, A_1, B_1, ...) in spec order; need = their
    requires_grad; grads: the gradient list backward fills (None in forward); u: backward's
    scratch {i: u_i} of the replays (dB then reuses the replay's u; never kept across calls)."""
    specs: Tuple[LoraSpec, ...]
    tensors: tuple
    seed: Optional[Tensor]
    need: tuple
    backend: str
    grads: Optional[list] = None
    u: Optional[dict] = None


def _mine(lc: Optional[LoraCall], target: str):
    if lc is None:
        return ()
    return [i for i, s in enumerate(lc.specs) if s.target == target]


def has(lc: Optional[LoraCall], target: str) -> bool:
    return bool(_mine(lc, target))


def trains(lc: Optional[LoraCall], target: str) -> bool:
    """Some adapter on `target` needs a gradient (so its projection input is needed in backward)."""
    return any(lc.need[2 * i] or lc.need[2 * i + 1] for i in _mine(lc, target))


def widen(need: tuple, lc: Optional[LoraCall], index: dict) -> tuple:
    """`need` (needs_input_grad of a segment) with the slot of every projection whose adapters
    train set: the plan then keeps/replays that projection's input and runs the backward down to
    it, as it would for the base weight (whose own gradient still follows the real `need`)."""
    if lc is None:
        return tuple(need)
    out = list(need)
    for t, i in index.items():
        if trains(lc, t):
            out[i] = True
    return tuple(out)


def drop(lc: LoraCall, i: int, x: Tensor) -> Tensor:
    """Adapter i's dropout on x (x * keep / (1 - p)); the same bits in forward, replay, backward."""
    p = lc.specs[i].p
    if p == 0.0:
        return x
    stream = next(j for j, s in enumerate(lc.specs) if s.name == lc.specs[i].name)  # packed halves: one mask
    return _backend.kernel("mlp", lc.backend, "dropout_fwd")(x.contiguous(), None, lc.seed + (stream + 1), p)


def add(lc: Optional[LoraCall], target: str, x: Tensor, y: Tensor) -> Tensor:
    """y + sum_i (drop_i(x) A_i^T) B_i^T * scale_i over the adapters on `target` (PEFT's order).
    Adapters in another dtype than x (PEFT's fp32 adapters on a bf16 model): x is cast to theirs,
    the sum runs in the promoted dtype and is cast back to y's, as PEFT does."""
    out_dtype = y.dtype
    for i in _mine(lc, target):
        a, b = lc.tensors[2 * i], lc.tensors[2 * i + 1]
        u = F.linear(drop(lc, i, x.to(a.dtype)), a)
        if lc.u is not None:  # a replay inside backward: dB reuses u
            lc.u[i] = u
        y = y + F.linear(u, b) * lc.specs[i].scale
    return y.to(out_dtype)


def dus(lc: Optional[LoraCall], target: str, dy: Tensor) -> dict:
    """{i: du_i = dy B_i * scale_i} for the adapters on `target` (the gradient of u_i)."""
    return {i: (dy.to(lc.tensors[2 * i + 1].dtype) @ lc.tensors[2 * i + 1]) * lc.specs[i].scale
            for i in _mine(lc, target)}


def input_grad(lc: Optional[LoraCall], target: str, du: dict, dtype: torch.dtype) -> Optional[Tensor]:
    """The adapters' part of the projection input's gradient, sum_i drop_i(du_i A_i), summed in
    the adapters' dtype and returned in `dtype` (the input's: PEFT's cast of x, transposed)."""
    dx = None
    for i, d in du.items():
        g = drop(lc, i, d @ lc.tensors[2 * i])
        dx = g if dx is None else dx + g
    return dx if dx is None else dx.to(dtype)


def weight_grads(lc: Optional[LoraCall], target: str, dy: Tensor, du: dict, x: Tensor) -> None:
    """dB_i = dy^T u_i * scale_i and dA_i = du_i^T drop_i(x) into lc.grads (only those needed)."""
    for i, d in du.items():
        need_a, need_b = lc.need[2 * i], lc.need[2 * i + 1]
        if not (need_a or need_b):
            continue
        xd = drop(lc, i, x.to(lc.tensors[2 * i].dtype))
        if need_b:
            u = lc.u.pop(i, None) if lc.u is not None else None
            if u is None:
                u = F.linear(xd, lc.tensors[2 * i])
            lc.grads[2 * i + 1] = (dy.to(u.dtype).t() @ u) * lc.specs[i].scale
        if need_a:
            lc.grads[2 * i] = d.t() @ xd


# ------------------------------------------------------------------------------------------------
# Reading PEFT's wrappers
# ------------------------------------------------------------------------------------------------
def lora_linear_class():
    """peft.tuners.lora.layer.Linear if peft is imported (a model holding its layers imported it)."""
    mod = sys.modules.get("peft.tuners.lora.layer")
    return getattr(mod, "Linear", None)


def is_lora(module) -> bool:
    cls = lora_linear_class()
    return cls is not None and type(module) is cls


_DROPOUTS = (torch.nn.Dropout, torch.nn.Identity)


def structure_reason(module, name: str, classes: tuple) -> Optional[str]:
    """Why the structure of a PEFT LoRA Linear `module` is not served (None: served). Checked by
    the block's guard and cached with its verdict (a new adapter adds modules: re-checked)."""
    why = read_reason(module._modules.get("base_layer"), f"{name}.base_layer", classes)
    if why:
        return why
    if len(getattr(module, "lora_magnitude_vector", ())):
        return f"{name} is a peft DoRA layer (use_dora=True): not fused"
    if len(getattr(module, "lora_embedding_A", ())):
        return f"{name} has embedding adapters: not fused"
    for d in ("lora_A", "lora_B"):
        for k, c in module._modules[d].items():
            why = read_reason(c, f"{name}.{d}.{k}", (torch.nn.Linear,))
            if why:
                return why
            if c.bias is not None:
                return f"{name}: adapter {k!r} has lora_bias=True: not fused"
    for k, c in module._modules["lora_dropout"].items():
        if type(c) not in _DROPOUTS or getattr(c, "inplace", False):
            return f"{name}: lora_dropout of adapter {k!r} is a {type(c).__name__}: not fused"
    return None


def split_packed(found: List[tuple], targets: Tuple[str, ...], rows: int) -> List[tuple]:
    """The adapters of a packed projection (Phi3's gate_up_proj, rows [gate | up]) as one spec per
    half: the same A (autograd sums its two gradients), B's row blocks (views), one name so both
    halves draw the same dropout mask, as PEFT's one dropout on x."""
    return [(spec._replace(target=t), a, b[k * rows:(k + 1) * rows]) for spec, a, b in found
            for k, t in enumerate(targets)]


def read(module, target: str, name: str, x: Tensor) -> Tuple[torch.nn.Module, List[tuple]]:
    """(base layer, [(LoraSpec, A weight, B weight)] of the adapters this call applies) for a PEFT
    LoRA Linear, following ``peft.tuners.lora.layer.Linear.forward``; Unservable otherwise."""
    base = module.base_layer
    if module.disable_adapters:
        if module.merged:
            raise Unservable(f"{name}: adapters disabled while merged (peft unmerges them in forward)")
        return base, []
    if module.merged:  # the base weight holds the merged adapters: peft runs the base layer alone
        return base, []
    out = []
    for a in module.active_adapters:
        if a not in module.lora_A:
            continue
        if a in module.lora_variant:
            raise Unservable(f"{name}: adapter {a!r} is a LoRA variant ({type(module.lora_variant[a]).__name__}): "
                             "not fused")
        if module.lora_bias.get(a):
            raise Unservable(f"{name}: adapter {a!r} has lora_bias=True: not fused")
        la, lb, dr = module.lora_A[a], module.lora_B[a], module.lora_dropout[a]
        if la.weight.dtype != lb.weight.dtype or la.weight.device != x.device or lb.weight.device != x.device \
                or (la.weight.dtype != x.dtype and not getattr(module, "cast_input_dtype_enabled", True)):
            raise Unservable(f"{name}: adapter {a!r} weights in {la.weight.dtype}/{lb.weight.dtype} on "
                             f"{la.weight.device} for a {x.dtype} input on {x.device} without peft's input cast "
                             "(mixed adapter dtypes/devices): not fused")
        scale = module.scaling[a]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise Unservable(f"{name}: scaling of adapter {a!r} is a {type(scale).__name__}: not fused")
        p = float(dr.p) if isinstance(dr, torch.nn.Dropout) and dr.training else 0.0
        out.append((LoraSpec(target, float(scale), p, f"{name}/{a}"), la.weight, lb.weight))
    return base, out
