"""What ``ckpt_ops.convert`` checks before a fused call, so that a converted model never answers
differently from the unconverted one ("never wrong"), and the fallback context.

A fused block reads its submodules' weights and never calls them, so anything that changes what a
submodule computes would be silently dropped. Before each fused call the block's guard verifies
that every submodule it reads is exactly the class the adapter assumes (``torch.nn.Linear``, HF
``Conv1D``, the family's norm class, or on the projections the adapter lists, a plain PEFT LoRA
wrapper of one -- a quantised or parametrized Linear, DoRA or another PEFT layer is not;
``torch.nn.utils.parametrize`` swaps the class), that no module of the block carries a
forward/pre/backward hook, that no global module hook is registered, that nothing is
parametrized, and that the weights read are plain Parameters/tensors. Anything else raises
:class:`Unservable` and the original forward serves that call (reported with the reason).

Cost: a clean verdict is cached per block, keyed on ``torch.utils.hooks.RemovableHandle.next_id``
(every hook registration, module-level or global, takes a new id) and the (identity, class) of the
block's modules (a replaced submodule or a parametrization changes it). A verdict with a reason is
not cached: it is re-checked at the next call, so removing the hook re-enables the fused path.

PEFT LoRA: a projection the adapter lists in ``lora`` may be a ``peft.tuners.lora.Linear`` wrapping
exactly the expected class; its structure (base layer, ``lora_A``/``lora_B`` plain bias-free
Linears, ``nn.Dropout``/``nn.Identity`` dropouts, no DoRA magnitude, no embedding adapters) is
checked here and cached with the verdict; its state (merged, disabled, active adapters, scaling,
LoRA variants) is read per call by the block adapter (ckpt_ops.lora.read).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Optional, Tuple

import torch
from torch.nn.modules import module as _nn_module
from torch.utils.hooks import RemovableHandle


class Unservable(Exception):
    """Raised inside an adapter when a call cannot be served exactly by the fused path."""


# ------------------------------------------------------------------------------------------------
# Fallback context: inside a block that runs its original forward, converted modules (norms) run
# torch's own code too, so a fallback is exactly the unconverted computation on every CPU.
# ------------------------------------------------------------------------------------------------
_FALLBACK = [0]


def in_fallback() -> bool:
    return _FALLBACK[0] > 0


@contextlib.contextmanager
def fallback_context():
    _FALLBACK[0] += 1
    try:
        yield
    finally:
        _FALLBACK[0] -= 1


# ------------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------------
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_PLAIN = (torch.nn.Parameter, torch.Tensor)


def _observer(hook) -> bool:
    """A global hook of torch's ModuleTracker (installed by FlopCounterMode and the memory
    trackers): it records which module runs, for attribution, and never changes an output. Fusing
    under it keeps FLOP counts of the fused path instead of measuring the fallback's."""
    from torch.utils.module_tracker import ModuleTracker

    return isinstance(getattr(hook, "__self__", None), ModuleTracker)


def global_hook_reason() -> Optional[str]:
    for name in _GLOBAL_HOOKS:
        hooks = getattr(_nn_module, name)
        if hooks and not all(_observer(h) for h in hooks.values()):
            return f"a global module hook is registered (torch.nn.modules.module.{name})"
    return None


def _describe(module: torch.nn.Module) -> str:
    cls = type(module)
    if cls.__module__.startswith("peft.") and ".lora" in cls.__module__:
        return "a peft LoRA layer"
    if cls.__module__.startswith("peft."):
        return f"a peft {cls.__name__} layer"
    return f"a {cls.__module__}.{cls.__name__}"


def _recorder_key(hook) -> Optional[str]:
    """The output key of a transformers output-capturing hook (installed on attention/layer modules
    the first time an output such as ``output_attentions`` is requested, inert unless the current
    call collects that key), else None."""
    code = getattr(hook, "__code__", None)
    if (code is None or code.co_name != "output_capturing_hook" or "key" not in code.co_freevars
            or not getattr(hook, "__module__", "").startswith("transformers.")):
        return None
    return hook.__closure__[code.co_freevars.index("key")].cell_contents


def module_reason(module: torch.nn.Module, name: str, recorders: list) -> Optional[str]:
    """Why `module` (a submodule of a fused block) changes what the fused path would compute:
    hooks or a parametrization. None when clean; transformers' output recorders are appended to
    `recorders` as (name, key) instead (whether they are active is a per-call question)."""
    for attr in _MODULE_HOOKS:
        hooks = getattr(module, attr, None)
        if not hooks:
            continue
        keys = [_recorder_key(h) for h in hooks.values()] if attr == "_forward_hooks" else [None]
        if None in keys:
            return f"{name} has {attr.strip('_').replace('_', ' ')}"
        recorders.extend((name, k) for k in keys)
    if torch.nn.utils.parametrize.is_parametrized(module):
        return f"{name} is parametrized (torch.nn.utils.parametrize)"
    return None


def recording_reason(recorders: list) -> Optional[str]:
    """Why this call must run the original forward because transformers records an inner output."""
    mod = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(mod, "_active_collector", None)
    collected = collector.get() if collector is not None else None
    if collected:
        for name, key in recorders:
            if key in collected:
                return f"transformers records {key!r} from {name} (output_{key}=True): original forward"
    return None


def read_reason(module: Optional[torch.nn.Module], name: str, classes: Tuple[type, ...],
                tensors: Iterable[str] = ("weight", "bias")) -> Optional[str]:
    """Why the fused path cannot read `module` (expected exactly one of `classes`): another class
    (a wrapper), or a weight that is not a plain Parameter/tensor. None when clean."""
    if module is None:
        return f"{name} is missing"
    if type(module) not in classes:
        expected = " / ".join(c.__name__ for c in classes)
        return f"{name} is {_describe(module)}: not fused (expected exactly {expected})"
    for t in tensors:
        v = module._parameters[t] if t in module._parameters else module._buffers.get(t)
        if v is not None and type(v) not in _PLAIN:
            return f"{name}.{t} is a {type(v).__name__}, not a plain Parameter/tensor"
    return None


class Guard:
    """The per-block verdict cache described in the module docstring. `reads` maps the dotted
    names of the submodules the adapter reads to the classes it accepts."""

    __slots__ = ("reads", "key", "recorders", "lora")

    def __init__(self, reads: dict, lora: Iterable[str] = ()):
        self.reads = reads
        self.lora = frozenset(lora)  # names of `reads` that may be PEFT LoRA wrappers (served fused)
        self.key = None
        self.recorders: list = []

    def check(self, block: torch.nn.Module) -> None:
        mods = _walk(block)
        key = (RemovableHandle.next_id, tuple(map(id, mods)), tuple(map(type, mods)))
        if key != self.key:
            self.key = None
            why = self._reason(block, tuple(block.named_modules()))
            if why is not None:
                raise Unservable(why)
            self.key = key
        why = recording_reason(self.recorders)
        if why is not None:
            raise Unservable(why)

    def _reason(self, block: torch.nn.Module, mods: tuple) -> Optional[str]:
        why = global_hook_reason()
        if why is not None:
            return why
        self.recorders = []
        for name, m in mods:
            # hooks on the block itself run around the converted forward: fine
            why = module_reason(m, name, self.recorders) if name else (
                "the block is parametrized (torch.nn.utils.parametrize)"
                if torch.nn.utils.parametrize.is_parametrized(m) else None)
            if why:
                return why
        from ckpt_ops import lora as _lora

        for name, classes in self.reads.items():
            m = _get(block, name)
            if name in self.lora and _lora.is_lora(m):
                why = _lora.structure_reason(m, name, classes)
            else:
                why = read_reason(m, name, classes)
            if why:
                return why
        return None


def _walk(block: torch.nn.Module) -> list:
    """The block's modules, breadth first (cheaper than Module.modules(): no names, no memo)."""
    out, i = [block], 0
    while i < len(out):
        out.extend(c for c in out[i]._modules.values() if c is not None)
        i += 1
    return out


def _get(block: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    m = block
    for part in name.split("."):
        m = m._modules.get(part) if isinstance(m, torch.nn.Module) else None
        if m is None:
            return None
    return m
