"""What every ckpt_ops autograd Function's backward shares.

``once_differentiable(name)``: the backward runs under ``torch.no_grad()`` (its kernels have no
autograd formulas of their own), and when it was called with ``create_graph=True`` its gradients
pass through a node whose backward raises a RuntimeError naming the layer -- a second derivative
is never silently wrong. Unlike ``torch.autograd.function.once_differentiable`` (whose error node
hangs off detached copies, so grad-of-grad w.r.t. the input reports "not used in the graph", or
None with allow_unused, or silently skips ``.backward()``), the node's inputs are the saved tensors
and incoming gradients, so every path from a gradient back to an input meets it.

``saved(ctx)``: ``ctx.saved_tensors``, always read, so a second ``backward()`` without
``retain_graph=True`` raises as eager does even for a layer that kept nothing but the sentinel
that ``sentinel(like)`` returns (a zero-size tensor: 0 bytes in ``ckpt_ops.saved_bytes``).
"""
from __future__ import annotations

import functools

import torch

__all__ = ["once_differentiable", "sentinel", "saved", "can_release", "release"]


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the first-order gradients whose own backward raises: its inputs include the
    tensors the gradients depend on (the saved ones and the incoming gradients), so the error
    node sits on every path from a gradient back to the inputs and parameters."""

    @staticmethod
    def forward(ctx, msg, n, *tensors):
        ctx.msg = msg
        return tuple(t.view_as(t) for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.msg)


def once_differentiable(name: str):
    msg = (f"ckpt_ops.{name} does not support double backward (differentiating a gradient computed with "
           f"create_graph=True): its backward runs fused kernels without autograd formulas. Use the eager "
           f"PyTorch layer (torch.nn / ckpt_ops.unconvert) for higher-order gradients.")

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(ctx, *args):
            with torch.no_grad():
                outputs = fn(ctx, *args)
            if not torch.is_grad_enabled():  # the usual first-order backward
                return outputs
            anchors = [t for t in (*ctx.saved_tensors, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not anchors:  # nothing the gradients could be differentiated with respect to
                return outputs
            outs = list(outputs) if isinstance(outputs, tuple) else [outputs]
            idx = [i for i, v in enumerate(outs) if isinstance(v, torch.Tensor)]
            wrapped = _NoDoubleBackward.apply(msg, len(idx), *[outs[i] for i in idx], *anchors)
            for i, w in zip(idx, wrapped):
                outs[i] = w
            return tuple(outs) if isinstance(outputs, tuple) else outs[0]
        return wrapper
    return deco


def sentinel(like=None) -> torch.Tensor:
    """A zero-size tensor (on like's device when given), saved so that ctx.saved_tensors always
    has something to free."""
    return like.new_empty(0) if like is not None else torch.empty(0)


def saved(ctx) -> tuple:
    """ctx.saved_tensors without the trailing sentinel (raises after the graph was freed)."""
    return ctx.saved_tensors[:-1]


def can_release() -> bool:
    """Whether a backward may free the storage of its own saved intermediates after their last use
    (:func:`release`): only in an eager first-order backward that frees the graph
    (``retain_graph=False``, no ``create_graph``) -- then nothing can read them again, exactly as
    autograd frees an eager node's saved tensors once that node's backward has run. Never under
    torch.compile (Inductor plans the memory of its graph itself)."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return False
    try:
        return not torch._C._autograd._get_current_graph_task_keep_graph()
    except (AttributeError, RuntimeError):  # no such API, or not inside a backward
        return False


def release(ok: bool, *tensors) -> None:
    """Free the storage of saved *intermediates* (tensors a ckpt_ops forward created and kept,
    never a user's input, parameter or output) after their last use in backward, when `ok`
    (:func:`can_release`). Eager autograd releases a node's saved tensors after its backward; a
    fused segment's node would hold all of them until the whole segment's backward returns, so
    its peak would be above eager's by the activations already consumed. Views of a tensor share
    its storage: pass only tensors whose every view is internal too."""
    if not ok:
        return
    for t in tensors:
        if t is not None and t.numel() and not torch._C._functorch.is_functorch_wrapped_tensor(t):
            t.untyped_storage().resize_(0)
