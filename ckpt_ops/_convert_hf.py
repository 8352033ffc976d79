"""How a fused layer honours transformers' activation checkpointing
(``model.activation_checkpointing_enable(every_n_layers=..., offload=...)`` and its deprecated alias
``gradient_checkpointing_enable``), switched on before or after ``ckpt_ops.convert``.

transformers wraps each ``GradientCheckpointingLayer`` subclass's *class* ``forward`` with
``torch.utils.checkpoint`` when the layer's ``gradient_checkpointing`` flag is set. A converted
layer's forward is overridden on the instance, so its fused calls never go through that wrapper
(no double recompute: the fused segment *is* the checkpoint), and its fallbacks call the class
forward, which HF checkpoints as it would unconverted. What the flags mean for a fused call
(training, grad enabled):

- HF checkpointing off in the model (no fused layer of the model has the flag): the convert level.
- This layer checkpointed by HF: the convert level (``"full"`` by default), replacing HF's
  checkpoint; with ``offload=True`` the activations the fused segment saves (not the weights it
  reads) are held in host memory (``torch.autograd.graph.save_on_cpu(pin_memory=True)``, the same
  call), as HF's own offloaded checkpoint does with the layer's inputs.
- This layer not checkpointed by HF (``every_n_layers`` > 1 skips it) while others are: level
  ``"none"`` (fused, nothing recomputed), as HF keeps that layer's activations.
- A checkpoint function ckpt_ops does not know (not HF's plain or offloading one): the original
  forward, reported, so whatever that function does still happens.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from ckpt_ops._convert_guard import Unservable


def _checkpoint_kind(fn) -> Optional[str]:
    """"plain" (torch.utils.checkpoint.checkpoint), "offload" (HF's save_on_cpu wrapper of it) or
    None (unknown)."""
    base = fn.func if isinstance(fn, functools.partial) else fn
    if base is torch.utils.checkpoint.checkpoint:
        return "plain"
    code = getattr(base, "__code__", None)
    if (code is not None and getattr(base, "__module__", "").startswith("transformers.")
            and "save_on_cpu" in code.co_names and "checkpoint" in code.co_names):
        return "offload"
    return None


def call_plan(module: torch.nn.Module, state, blocks) -> tuple:
    """(level, context) of a fused training call of `module` under HF's flags (module docstring);
    raises Unservable for an unknown checkpoint function."""
    if not (module.training and torch.is_grad_enabled()):
        return state.recompute, contextlib.nullcontext()
    if not any(getattr(m, "gradient_checkpointing", False) for m in blocks):
        return state.recompute, contextlib.nullcontext()
    if not getattr(module, "gradient_checkpointing", False):
        return "none", contextlib.nullcontext()
    fn = getattr(module, "_gradient_checkpointing_func", None)
    kind = _checkpoint_kind(fn)
    if kind is None:
        name = getattr(getattr(fn, "func", fn), "__qualname__", type(fn).__name__)
        raise Unservable(f"HF activation checkpointing with a checkpoint function ckpt_ops does not know ({name})")
    if kind == "plain":
        return state.recompute, contextlib.nullcontext()
    return state.recompute, _offload_activations(_accelerator())


def _offload_activations(device_type: str) -> torch.autograd.graph.saved_tensors_hooks:
    """HF's offload -- ``save_on_cpu(pin_memory=True, device_type=...)``, the same call -- for what
    a fused segment saves, except parameters and views of them: HF's offloaded checkpoint saves
    only the layer's inputs (its weights stay on the device), while the fused Function saves the
    weights it reads too, which must not be copied to the host every step."""
    inner = torch.autograd.graph.save_on_cpu(pin_memory=True, device_type=device_type)
    to_host, from_host = inner.pack_hook, inner.unpack_hook

    def pack(t):
        base = t._base if t._base is not None else t
        return (False, t) if isinstance(base, torch.nn.Parameter) else (True, to_host(t))

    def unpack(packed):
        return from_host(packed[1]) if packed[0] else packed[1]

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _accelerator() -> str:
    """The device type HF's offloading checkpoint passes to save_on_cpu (transformers'
    get_current_accelerator, or "cpu")."""
    try:
        acc = torch.accelerator.current_accelerator()
    except RuntimeError:
        acc = None
    return (acc or torch.device("cpu")).type
