"""The peer strategies every benchmark compares against (DESIGN §5): eager without checkpointing,
torch.utils.checkpoint (non-reentrant), PyTorch selective activation checkpointing with a
save-the-matmuls policy, and torch.compile with an activation memory budget."""
from __future__ import annotations

import functools
import types
from typing import Callable

import torch
import torch.utils.checkpoint as tuc

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
    return lambda *a: tuc.checkpoint(fn, *a, use_reentrant=False)


def selective(fn: Callable) -> Callable:
    """PyTorch selective activation checkpointing: save matmul outputs, recompute the rest."""
    ctx = functools.partial(tuc.create_selective_checkpoint_contexts, _save_matmuls)
    return lambda *a: tuc.checkpoint(fn, *a, use_reentrant=False, context_fn=ctx)


def compiled_with_budget(fn: Callable, budget: float) -> Callable:
    """torch.compile(fn) with torch._functorch.config.activation_memory_budget = budget (the
    min-cut partitioner then recomputes to fit). The budget is read at compile time, so each
    provider compiles its own copy on first call under the patched config."""
    # Dynamo caches compiled code per code object: give each budget its own, or the second
    # provider would silently reuse the first one's partition.
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

    return run
