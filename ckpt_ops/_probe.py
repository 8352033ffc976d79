"""Measured per-layer costs for the planner and the memory report.

A model's *layers* are the entries of its transformer stack: an ``nn.Sequential`` / ``nn.ModuleList``
given directly, else the ``ModuleList``/``Sequential`` inside the model holding the most ckpt_ops
layers (``ckpt_ops.nn.TransformerBlock`` or a block swapped by ``ckpt_ops.convert``). One probe
forward of the whole model records each layer's call (forward pre-hooks); each layer is then
called alone on a detached copy of its recorded input, at each recompute level:

* saved bytes: ``ckpt_ops.saved_bytes`` of the call (saved-tensor hooks, exact; tensors the
  layers share, such as one padding mask, count in every layer: an upper bound);
* time: forward+backward steps and forwards alone (the cost of an outer segment's replay),
  interleaved over the levels, median of `reps` after one warm-up; or, with ``time="flops"``,
  FLOPs from ``torch.utils.flop_counter`` (deterministic; 1 GFLOP counted as 1 ms). Layers of the
  same structure (class, parameter shapes, input shape) share one timing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time as _time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ckpt_ops import block as _block
from ckpt_ops import sequential as _seq
from ckpt_ops.measure import saved_bytes

EAGER = "eager"  # the layer's unconverted forward (for a ckpt_ops.nn.TransformerBlock: level "none")


def levelled(m: torch.nn.Module) -> bool:
    """A layer with recompute levels: a ckpt_ops TransformerBlock or a block converted by convert()."""
    from ckpt_ops._convert_families import _BlockAdapter
    from ckpt_ops.nn import TransformerBlock

    if isinstance(m, TransformerBlock):
        return True
    state = getattr(m, "_ckpt_ops_state", None)
    return state is not None and isinstance(state.adapter, _BlockAdapter)


def get_level(m: torch.nn.Module) -> Optional[str]:
    if not levelled(m):
        return None
    state = getattr(m, "_ckpt_ops_state", None)
    return state.recompute if state is not None else m.recompute


def set_level(m: torch.nn.Module, level: Optional[str]) -> None:
    if level is None or not levelled(m):
        return
    state = getattr(m, "_ckpt_ops_state", None)
    if state is not None:
        state.recompute = level
    else:
        m.recompute = level


def find_layers(model: torch.nn.Module) -> Tuple[List[torch.nn.Module], str]:
    """(layers, dotted name of their container) -- see the module docstring."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(model, (torch.nn.Sequential, torch.nn.ModuleList)):
        return list(model), ""
    best, best_name, best_n = None, "", 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList)):
            n = sum(levelled(c) for c in m)
            if n > best_n:
                best, best_name, best_n = m, name, n
    if best is None:
        raise TypeError(f"{type(model).__name__} holds no stack of ckpt_ops layers (ckpt_ops.nn.TransformerBlock or "
                        "blocks swapped by ckpt_ops.convert) and is not an nn.Sequential / nn.ModuleList")
    return list(best), best_name


@contextlib.contextmanager
def spans_off():
    """Span hooks (ckpt_ops.sequential.checkpoint_spans) stand aside: layers run one by one."""
    _seq._REPLAYING[0] += 1
    try:
        yield
    finally:
        _seq._REPLAYING[0] -= 1


def run_model(model: torch.nn.Module, layers: Sequence[torch.nn.Module], args: tuple, kwargs: dict):
    """model(*args, **kwargs); a bare ModuleList runs its layers in sequence."""
    if isinstance(model, torch.nn.ModuleList):
        x = args[0]
        for m in layers:
            x = _seq._first_tensor(m(x, *args[1:], **kwargs))
        return x
    return model(*args, **kwargs)


@dataclasses.dataclass
class Call:
    """A layer's recorded call: ``layer(*args, **kwargs)`` with the hidden states (first positional
    argument, else the ``hidden_states`` keyword) given separately."""
    args: tuple
    kwargs: dict
    x: torch.Tensor

    def run(self, layer: torch.nn.Module, x: torch.Tensor):
        a, kw = _seq._with_hidden(self.args, self.kwargs, "hidden_states", x)
        return _seq._first_tensor(layer(*a, **kw))


def _is_cache(v) -> bool:
    """A key/value cache object (transformers' Cache classes): replaying a recorded call with it
    would append to it and tie every probe step to the example forward's graph."""
    return any(c.__name__.endswith("Cache") for c in type(v).__mro__[:-1])


def _without_cache(args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
    """The recorded call as a training step makes it: no cache object, ``use_cache=False``."""
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: (None if _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def record_calls(model: torch.nn.Module, layers: Sequence[torch.nn.Module], args: tuple,
                 kwargs: dict) -> List[Call]:
    calls: Dict[int, Call] = {}

    def hook(i):
        def pre(module, a, kw):
            if i not in calls:
                x = _seq._hidden(a, kw, "hidden_states")
                if isinstance(x, torch.Tensor):
                    sa, skw = _seq._with_hidden(a, kw, "hidden_states", None)
                    calls[i] = Call(*_without_cache(sa, skw), x.detach().clone())
        return pre

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        with spans_off(), torch.enable_grad():
            out = run_model(model, layers, args, kwargs)
        del out
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in range(len(layers)) if i not in calls]
    if missing:
        raise ValueError(f"layers {missing} were not called with a tensor by the example forward")
    return [calls[i] for i in range(len(layers))]


def _eager_call(layer: torch.nn.Module) -> Callable:
    """The layer's unconverted forward (converted blocks); a TransformerBlock at level "none"."""
    if hasattr(layer, "_ckpt_ops_state"):
        return lambda *a, **kw: type(layer).forward(layer, *a, **kw)
    return layer


@contextlib.contextmanager
def at_level(layer: torch.nn.Module, level: Optional[str]):
    old = get_level(layer)
    set_level(layer, _block.LEVELS[-1] if level == EAGER else level)
    try:
        yield
    finally:
        set_level(layer, old)


def _fn(layer, call: Call, level: Optional[str], checkpoint: bool = False) -> Callable:
    fwd = _eager_call(layer) if level == EAGER else layer

    def run_at_level(x):
        with at_level(layer, level):
            return call.run(fwd, x)

    def run(x):  # the level is set inside the checkpointed function: its replay runs at it too
        if checkpoint:
            return torch.utils.checkpoint.checkpoint(run_at_level, x, use_reentrant=False)
        return run_at_level(x)
    return run


def layer_saved_bytes(layer, call: Call, level: Optional[str], checkpoint: bool = False) -> int:
    x = call.x.detach().requires_grad_(call.x.is_floating_point())
    f = _fn(layer, call, level, checkpoint)
    with spans_off():
        return saved_bytes(lambda t, _layer: f(t), x, layer)  # the layer: its parameters are excluded


class _Step:
    """Forward (+ backward with a fixed upstream gradient) of one layer call; parameter gradients
    are restored to what they were afterwards."""

    def __init__(self, layer, call: Call, level, checkpoint=False):
        self.layer, self.f = layer, _fn(layer, call, level, checkpoint)
        self.x = call.x.detach().requires_grad_(call.x.is_floating_point())
        self.dy = None

    def forward(self):
        with spans_off(), torch.enable_grad():
            return self.f(self.x)

    def step(self):
        out = self.forward()
        if self.dy is None:
            g = torch.Generator(device="cpu").manual_seed(0)
            self.dy = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device, out.dtype)
        params = [p for p in self.layer.parameters() if p.requires_grad]
        old = [p.grad for p in params]
        torch.autograd.backward(out, self.dy, inputs=[self.x] + params)
        for p, g in zip(params, old):
            p.grad = g
        self.x.grad = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_levels(layer, call: Call, levels: Sequence, reps: int, mode: str = "measure",
                checkpoint: Sequence[bool] = ()) -> Dict[Any, Tuple[float, float]]:
    """{level: (step ms, forward ms)}: measured interleaved (median of `reps`), or FLOPs/1e9
    (``mode="flops"``). `checkpoint[i]` wraps level i in torch.utils.checkpoint."""
    flags = list(checkpoint) + [False] * (len(levels) - len(checkpoint))
    steps = [_Step(layer, call, lv, ck) for lv, ck in zip(levels, flags)]
    keys = [(lv, ck) if ck else lv for lv, ck in zip(levels, flags)]
    if mode == "flops":
        from torch.utils.flop_counter import FlopCounterMode

        out = {}
        for k, s in zip(keys, steps):
            with FlopCounterMode(display=False) as c:
                s.step()
            with FlopCounterMode(display=False) as f:
                s.forward()
            out[k] = (c.get_total_flops() / 1e9, f.get_total_flops() / 1e9)
        return out
    device = call.x.device
    st = {k: [] for k in keys}
    fw = {k: [] for k in keys}
    for s in steps:  # warm-up
        s.step()
    for r in range(reps):
        order = list(range(len(steps)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            _sync(device)
            t0 = _time.perf_counter()
            steps[i].step()
            _sync(device)
            t1 = _time.perf_counter()
            out = steps[i].forward()
            _sync(device)
            t2 = _time.perf_counter()
            del out
            st[keys[i]].append((t1 - t0) * 1e3)
            fw[keys[i]].append((t2 - t1) * 1e3)
    return {k: (statistics.median(st[k]), statistics.median(fw[k])) for k in keys}


def signature(layer: torch.nn.Module, call: Call) -> tuple:
    """Layers with equal signatures cost the same time (they share one timing probe)."""
    return (type(layer), tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters()),
            tuple(call.x.shape), call.x.dtype, tuple(sorted(call.kwargs)), len(call.args),
            getattr(layer, "style", None))
