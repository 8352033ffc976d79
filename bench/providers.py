"""The peer strategies every benchmark compares against (DESIGN §5): eager without checkpointing,
torch.utils.checkpoint (non-reentrant), PyTorch selective activation checkpointing with a
save-the-matmuls policy, and torch.compile with an activation memory budget; and the ckpt_ops
points (recompute level x kernel backend)."""
from __future__ import annotations

import functools
import importlib.util
import os
import types
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint as tuc

Tensor = torch.Tensor

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten.linear.default}
# SDPA ops are matmul-heavy too; saving their outputs is what "save the matmuls" means for attention.
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(torch.ops.aten, _name):
        _MATMULS.add(getattr(torch.ops.aten, _name).default)


def _save_matmuls(ctx, op, *args, **kwargs):
    return tuc.CheckpointPolicy.MUST_SAVE if op in _MATMULS else tuc.CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed(fn: Callable) -> Callable:
    """torch.utils.checkpoint(use_reentrant=False) around `fn`."""
    return lambda *a, **kw: tuc.checkpoint(fn, *a, use_reentrant=False, **kw)


def selective(fn: Callable) -> Callable:
    """PyTorch selective activation checkpointing: save matmul outputs, recompute the rest."""
    ctx = functools.partial(tuc.create_selective_checkpoint_contexts, _save_matmuls)
    return lambda *a, **kw: tuc.checkpoint(fn, *a, use_reentrant=False, context_fn=ctx, **kw)


def compiled_with_budget(fn: Callable, budget: float) -> Callable:
    """torch.compile(fn) with torch._functorch.config.activation_memory_budget = budget (the
    min-cut partitioner then recomputes to fit). The budget is read at compile time, so each
    provider compiles its own copy on first call under the patched config. Below budget 1.0 the
    returned function carries ``reference``: the same `fn` compiled at budget 1.0, which
    ``bench.common.check_rng_gradients`` compares its gradients with (torch 2.14's partitioner
    can replay dropout in backward with fresh randomness below 1.0: pytorch#190758)."""
    # Dynamo caches compiled code per code object: give each budget its own, or the second
    # provider would silently reuse the first one's partition.
    orig = fn
    fn = types.FunctionType(fn.__code__.replace(co_name=f"{fn.__code__.co_name}_budget_{budget}".replace(".", "_")),
                            fn.__globals__, None, fn.__defaults__, fn.__closure__)
    compiled = torch.compile(fn)
    first = [True]

    def run(*a):
        if first[0]:
            first[0] = False
            with torch._functorch.config.patch(activation_memory_budget=budget):
                return compiled(*a)
        return compiled(*a)

    if budget < 1.0:  # what bench.common.check_rng_gradients compares this peer's gradients with
        run.reference = _budget_one(orig)
    return run


_REFERENCES: Dict[Callable, Callable] = {}  # fn -> fn compiled at budget 1.0 (functions hash by identity)


def _budget_one(fn: Callable) -> Callable:
    """torch.compile(fn) at activation_memory_budget 1.0 (the partitioner keeps what it cannot
    replay exactly, RNG outputs included), one per `fn` however many budgets are compiled."""
    if fn not in _REFERENCES:
        _REFERENCES[fn] = compiled_with_budget(fn, 1.0)
    return _REFERENCES[fn]


COMPILE_BUDGETS = (0.5, 0.1)
PEERS = ("torch.utils.checkpoint", "selective AC (matmuls)") + tuple(f"compile budget {b}" for b in COMPILE_BUDGETS)


def compile_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why torch.compile (Inductor) cannot run on `device` here, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 (Inductor's generated kernels would run interpreted)"
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Inductor on CUDA needs triton"
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as e:  # noqa: BLE001  (no compiler found: any error means "cannot compile")
        return f"Inductor on CPU needs a C++ compiler ({type(e).__name__}: {e})"
    return None


def sequential(layers: Sequence[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    def run(x):
        for f in layers:
            x = f(x)
        return x
    return run


def peer_forwards(layers: Sequence[Callable[[Tensor], Tensor]], device: torch.device, with_compile: bool = True,
                  skip_reason: Optional[str] = None) -> List[Tuple[str, Callable[[Tensor], Tensor]]]:
    """(name, forward(x)) of eager and every peer strategy for a model made of `layers` applied in
    sequence (one layer for a sublayer benchmark, N blocks for a stack): checkpointing and
    selective AC wrap each layer (per-block checkpointing, as users do), torch.compile the whole
    model. Providers that cannot run are left out with the reason printed."""
    out = [("eager", sequential(layers)),
           ("torch.utils.checkpoint", sequential([checkpointed(f) for f in layers])),
           ("selective AC (matmuls)", sequential([selective(f) for f in layers]))]
    reason = skip_reason or (None if with_compile else "--no-compile") or compile_unavailable_reason(device)
    whole = sequential(layers)  # one function for every budget: one budget-1.0 reference for all
    for budget in COMPILE_BUDGETS:
        if reason is None:
            out.append((f"compile budget {budget}", compiled_with_budget(whole, budget)))
        else:
            print(f"  skipped compile budget {budget}: {reason}")
    return out


def ckpt_backends(family: str, device: torch.device, requested: Optional[Sequence[str]] = None) -> List[str]:
    """ckpt_ops kernel backends to time on `device`: the requested ones, else every available
    compiled one (C++ CPU, CUDA extension, Triton), else the reference. The Triton interpreter
    (TRITON_INTERPRET=1 on CPU) is for correctness only: it is used only when asked for."""
    from ckpt_ops import _backend

    if requested:
        out = []
        for be in requested:
            why = _backend._unavailable_reason(family, be, device.type) or _missing_kernels(family, be)
            if why is None:
                out.append(be)
            else:
                print(f"  skipped ckpt_ops [{be}] for {family}: {why}")
        return out
    out = []
    for be in ("cpu", "cuda", "triton"):
        if be == "triton" and device.type == "cpu":
            continue
        why = _backend._unavailable_reason(family, be, device.type) or _missing_kernels(family, be)
        if why is None:
            out.append(be)
        elif be == device.type or (be == "triton" and device.type == "cuda"):
            print(f"  ckpt_ops [{be}] not timed for {family}: {why}")
    return out or ["reference"]


def _missing_kernels(family: str, backend: str) -> Optional[str]:
    """The extension may define an op's schema without a kernel for this device (an older build):
    backend_info() then still lists it; check the dispatcher."""
    from ckpt_ops import _backend

    if backend not in ("cpu", "cuda"):
        return None
    key = "CPU" if backend == "cpu" else "CUDA"
    for fam in (family,) + _backend._DEPENDS.get(family, ()):
        for spec in _backend._FAMILIES[fam][backend].values():
            if isinstance(spec, str) and spec.startswith("torch.ops.ckpt_ops."):
                name = "ckpt_ops::" + spec.rsplit(".", 1)[1]
                if not torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                    return f"the loaded extension has no {key} kernel for {name} (older build?)"
    return None


def ckpt_forwards(modules: Sequence[torch.nn.Module], levels: Sequence[str], backends: Sequence[str],
                  run: Callable[[Tensor], Tensor]) -> List[Tuple[str, Callable[[Tensor], Tensor]]]:
    """(name, forward(x)) of ckpt_ops at each recompute level and backend: sets ``recompute`` and
    ``backend`` on every module, then calls `run`."""
    out = []
    for be in backends:
        for level in levels:
            def fwd(x, level=level, be=be):
                for m in modules:
                    m.recompute, m.backend = level, be
                return run(x)
            out.append((f"ckpt_ops {level} [{be}]", fwd))
    return out
