"""``ckpt_ops.convert(model)``: swap supported modules of an existing model for fused checkpointed
ones, in place, keeping every ``Parameter`` object and every ``state_dict`` key.

One generic mechanism: an *adapter* per supported module type (ckpt_ops._convert_families) knows
(1) whether a module can be converted at all, and (2) at call time, whether this particular call
can be served exactly. A converted module keeps its class, parameters and children; only its
``forward`` is overridden *on the instance* (other models of the same class are untouched). A call
the fused path cannot serve exactly -- a KV cache being filled for generation, attention weights
requested, cross-attention, masks that are not causal + padding, a sliding window shorter than the
sequence, mixed dtypes, or a submodule that is
not what the adapter reads (a hook, a parametrization, a quantised Linear, a PEFT method other than plain
LoRA: ckpt_ops._convert_guard; plain PEFT LoRA wrappers are fused, ckpt_ops.lora)
-- runs the module's original forward, and the reason is counted in the report. Inside such a
fallback every converted module (the norms) runs torch's own forward too, so a fallback is exactly
the unconverted computation. Never a wrong answer.

Fused, as ONE checkpointed segment per layer (``ckpt_ops.block``): Hugging Face ``transformers``
``GPT2Block`` (Conv1D weights used transposed, as views) and the Llama-like decoder layers of Llama,
Mistral, Qwen2, Phi3 and Gemma (the model's own rotary tables; Phi3's packed projections as row
views; Gemma's (1 + w) RMSNorm in fp32), also under torch.autocast (ckpt_ops._amp: GEMMs in the
autocast dtype, norms in fp32, the residual stream as the model makes it; docs/convert.md, "Autocast"),
under torch.compile(fullgraph=True) (docs/convert.md, "torch.compile") and with PEFT LoRA adapters on
their projections (docs/lora.md).
Attention-probability dropout (GPT-2's ``attn_pdrop``, the Llama-like ``attention_dropout``) is fused
in training: dropout inside the attention kernels with Philox bits (docs/convert.md "Attention
dropout": equal in distribution to torch's, not in bits). ``torch.nn.LayerNorm``, ``torch.nn.RMSNorm``
and those families' RMSNorms are swapped anywhere else. Every decoder layer seen (by class or by
structure) that is not fused is reported with why.

As Hugging Face's own gradient checkpointing does, a training call (module in train mode, grad
enabled) does not fill an empty KV cache the model created by default (``use_cache=True``); the
cache stays empty. An eval call with grad fills the empty cache (Llama-like families: HF's own modules
compute the keys/values it stores); without grad, or when the cache already holds tokens, the
original forward runs.

transformers' activation checkpointing (before or after convert) is honoured per fused call, never
doubled (ckpt_ops._convert_hf). Under ``torch.compile(fullgraph=True)`` the per-call checks trace
without graph breaks: static ones decide at trace time (a fallback is then part of the graph),
value checks are asserted in the graph, and the report counts executed calls (docs/convert.md,
"torch.compile").
"""
from __future__ import annotations

import contextlib
import logging
import re
import types
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import torch

from ckpt_ops import block as _block
from ckpt_ops._convert_families import KNOWN_LEFT, Adapter, adapters, key_mask_from_hf  # noqa: F401
from ckpt_ops._convert_guard import Unservable, fallback_context, in_fallback
from ckpt_ops._convert_hf import call_plan

log = logging.getLogger("ckpt_ops")

__all__ = ["convert", "conversion_report", "unconvert"]

_REPORTS: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, Any]]" = weakref.WeakKeyDictionary()
NO_SAVED_BYTES = "no saved-bytes effect (a norm's input is saved either way)"


# ------------------------------------------------------------------------------------------------
# The swap mechanism
# ------------------------------------------------------------------------------------------------
class _State:
    __slots__ = ("adapter", "recompute", "backend", "report", "guard", "call_level", "__weakref__")

    def __init__(self, adapter, recompute, backend, report, guard):
        self.adapter, self.recompute, self.backend, self.report = adapter, recompute, backend, report
        self.guard = guard
        self.call_level = None  # the level of the current fused call (HF's flags may change it)


def _converted_forward(self, *args, **kwargs):
    state: _State = self._ckpt_ops_state
    if in_fallback():  # inside a block running its original forward: torch's own code
        return type(self).forward(self, *args, **kwargs)
    try:
        if state.guard is not None:
            state.guard.check(self)
        if state.adapter.is_block:  # transformers' activation checkpointing flags (ckpt_ops._convert_hf)
            state.call_level, ctx = call_plan(self, state, state.report["blocks"])
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            out = state.adapter.fused(self, state, args, kwargs)
        _count(state.report, "fused_calls", state.adapter.kind)
        return out
    except Unservable as e:
        key = f"{state.adapter.kind}: {e}"
        if key not in state.report["fallbacks"] and not torch.compiler.is_compiling():
            log.info("ckpt_ops.convert: %s runs its original forward (%s)", state.adapter.kind, e)
        _count(state.report, "fallbacks", key)
    with fallback_context():
        return type(self).forward(self, *args, **kwargs)


# ------------------------------------------------------------------------------------------------
# Call counts that count executed calls, also inside torch.compile graphs
# ------------------------------------------------------------------------------------------------
# In eager a call adds 1 to the report's Counter. Traced by torch.compile, that Python increment
# would run once per *trace*; instead the traced call records a tiny op whose kernel adds the 1
# each time the compiled graph runs. The op mutates a one-element token (ops with no output and
# no mutation are dead code to the compilers), which is all it touches on the device. Its own
# namespace: ``ckpt_ops::`` holds the extension's kernel ops only (tests/test_build.py).
_COUNTERS: "weakref.WeakValueDictionary[int, Counter]" = weakref.WeakValueDictionary()
_TOKEN = torch.zeros(1, dtype=torch.int64)


@torch.library.custom_op("ckpt_ops_convert::count_call_", mutates_args=("token",))
def _count_call_(token: torch.Tensor, counter: int, key: str) -> None:
    c = _COUNTERS.get(counter)
    if c is not None:
        c[key] += 1


@_count_call_.register_fake
def _(token, counter, key):
    return None


def _register_counters(report: Dict[str, Any]) -> None:
    """Called by convert (eagerly): the ids under which the compiled op finds the report's Counters."""
    report["counter_ids"] = {}
    for name in ("fused_calls", "fallbacks"):
        _COUNTERS[id(report[name])] = report[name]
        report["counter_ids"][name] = id(report[name])


def _count(report: Dict[str, Any], name: str, key: str) -> None:
    if torch.compiler.is_compiling():
        _count_call_(_TOKEN, report["counter_ids"][name], key)
    else:
        report[name][key] += 1


_LAYER_NAME = re.compile(r"(DecoderLayer|EncoderLayer|Block|Layer)$")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "intermediate")


def _layer_entries(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The model's layers, recognised by structure: entries of a ModuleList whose class is named
    *DecoderLayer / *EncoderLayer / *Block / *Layer, or that hold an attention and an MLP
    submodule. Layers nested in another layer (T5's sublayers) are not counted twice."""
    found: Dict[str, torch.nn.Module] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList):
            continue
        for i, entry in mod._modules.items():
            if entry is None:
                continue
            kids = set(entry._modules)
            if _LAYER_NAME.search(type(entry).__name__) or (kids & set(_ATTN_NAMES) and kids & set(_MLP_NAMES)):
                full = f"{name}.{i}" if name else i
                if not any(full.startswith(f + ".") for f in found):
                    found[full] = entry
    return found


def _plan(model: torch.nn.Module) -> Tuple[List[Tuple[str, torch.nn.Module, Optional[Adapter]]], list]:
    """What convert would do: [(name, module, adapter or None if already converted)] to convert,
    and [(name, class, why)] left alone."""
    todo, left, done = [], [], []
    for name, module in model.named_modules():
        if any(d == "" or name.startswith(d + ".") for d in done):
            continue
        if hasattr(module, "_ckpt_ops_state"):  # converted before: update the level
            todo.append((name, module, None))
            done.append(name)
            continue
        for adapter in adapters():
            if adapter.matches(module):
                why = adapter.static_reason(module)
                if why is not None:
                    left.append((name, type(module).__name__, why))
                    break
                todo.append((name, module, adapter))
                done.append(name)
                break
    return todo, left


def _layer_lines(model, todo, left) -> Tuple[list, list]:
    """Every layer of the model: ("fused" lines, "left" lines with the reason)."""
    blocks = {n for n, m, a in todo if (a.is_block if a is not None else m._ckpt_ops_state.adapter.is_block)}
    norms = [n for n, m, a in todo if n not in blocks]
    why_left = {n: why for n, _, why in left}
    fused, not_fused = [], []
    for name, layer in _layer_entries(model).items():
        cls = type(layer).__name__
        if name in blocks:
            fused.append((name, cls))
            continue
        why = why_left.get(name) or KNOWN_LEFT.get(cls) or f"unknown structure: no fused adapter for {cls}"
        inner = sum(1 for n in norms if n.startswith(name + "."))
        if inner:
            why += f"; only its {inner} norm(s) are swapped: {NO_SAVED_BYTES}"
        not_fused.append((name, cls, why))
    return fused, not_fused


def convert(model: torch.nn.Module, recompute: str = "full", inplace: bool = True, *,
            backend: Optional[str] = None, strict: bool = False, memory_budget=None,
            example_inputs=None) -> torch.nn.Module:
    """Swap the supported modules of `model` for fused checkpointed equivalents (see the module
    docstring) and return the model (a deep copy when ``inplace=False``).

    recompute: "full" | "keep_attn" | "keep_mlp" | "selective" | "none" for transformer blocks (norms have no
    levels). strict: raise ValueError (before anything is swapped) when a layer of the model would
    not be fused. ``conversion_report(model)`` says what was swapped, every layer fused or left and
    why, and how many calls ran fused or fell back (and why).

    memory_budget (with example_inputs: a tuple of positional arguments or a dict of keyword
    arguments of one training forward): then apply ``ckpt_ops.plan(model, ..., budget=memory_budget)``
    (per-layer levels and outer segments; see ckpt_ops.planner) instead of one level everywhere."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if recompute not in _block.LEVELS:
        raise ValueError(f"recompute must be one of {_block.LEVELS}; got {recompute!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool; got {type(strict).__name__}")
    todo, left = _plan(model)
    fused_layers, left_layers = _layer_lines(model, todo, left)
    if strict and left_layers:
        raise ValueError("convert(strict=True): these layers would not be fused: " +
                         "; ".join(f"{n} ({c}): {w}" for n, c, w in left_layers))
    if not inplace:
        import copy

        model = copy.deepcopy(model)
        todo, left = _plan(model)
    report = _REPORTS.get(model) or {"swapped": [], "left": [], "fused_calls": Counter(), "fallbacks": Counter()}
    _register_counters(report)
    for name, module, adapter in todo:
        if adapter is None:
            module._ckpt_ops_state.recompute, module._ckpt_ops_state.backend = recompute, backend
            continue
        module._ckpt_ops_state = _State(adapter, recompute, backend, report, adapter.guard(module))
        module.forward = types.MethodType(_converted_forward, module)
        report["swapped"].append((name, type(module).__name__))
    report["blocks"] = [m for m in model.modules()  # whose HF checkpointing flags a fused call reads
                        if hasattr(m, "_ckpt_ops_state") and m._ckpt_ops_state.adapter.is_block]
    fused_layers = [(n, c, _guard_now(model.get_submodule(n))) for n, c in fused_layers]
    left_names = {n for n, _, _ in left_layers}
    report["left"] = [t for t in left if t[0] not in left_names] + left_layers
    report["layers_fused"] = fused_layers
    report["layers_left"] = left_layers
    _REPORTS[model] = report
    if memory_budget is not None:
        from ckpt_ops.planner import plan_with_inputs

        plan_with_inputs(model, memory_budget, example_inputs).apply(model)
    return model


def _guard_now(layer: torch.nn.Module) -> str:
    """"fused", or what makes its calls run the original forward as the model stands now (a
    PEFT LoRA wrapper applied before convert, a hook): the guard re-checks at every call."""
    guard = layer._ckpt_ops_state.guard
    try:
        if guard is not None:
            guard.check(layer)
    except Unservable as e:
        return f"converted, but its calls run the original forward while {e}"
    return "fused"


def _find_report(model: torch.nn.Module) -> Optional[Dict[str, Any]]:
    r = _REPORTS.get(model)
    if r is None:  # a wrapper of a converted model (e.g. peft.get_peft_model after convert)
        for m in model.modules():
            if m in _REPORTS:
                return _REPORTS[m]
        for m in model.modules():  # a part of one (e.g. peft's merge_and_unload() of a converted PeftModel)
            state = m.__dict__.get("_ckpt_ops_state")
            if state is not None:
                return state.report
    return r


def conversion_report(model: torch.nn.Module) -> Dict[str, Any]:
    """What convert() did to `model` (or to the converted model it wraps): {"swapped": [(name,
    class)], "left": [(name, class, why)] (modules and layers not fused, with the reason; a layer
    whose norms alone are swapped says so, and that this has no saved-bytes effect),
    "layers": [(name, class, "fused" | why)] for every layer seen (as it stood at convert time), "fused_calls": {kind: n},
    "fallbacks": {"kind: reason": n}}."""
    r = _find_report(model)
    if r is None:
        raise ValueError("this model was not converted by ckpt_ops.convert")
    layers = list(r.get("layers_fused", [])) + list(r.get("layers_left", []))
    return {"swapped": list(r["swapped"]), "left": list(r["left"]), "layers": layers,
            "fused_calls": dict(r["fused_calls"]), "fallbacks": dict(r["fallbacks"])}


def unconvert(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the original forwards (parameters were never touched)."""
    for module in model.modules():
        if hasattr(module, "_ckpt_ops_state"):
            del module._ckpt_ops_state
            module.__dict__.pop("forward", None)
    _REPORTS.pop(model, None)
    return model
