"""Segment checkpointing (Chen et al. 2016): divide a stack of layers into segments, keep only each
segment's input for backward and replay the segment in backward.

``checkpoint_sequential`` has ``torch.utils.checkpoint.checkpoint_sequential``'s signature and
semantics -- the same split (``len // segments`` layers per segment, the remainder in the last
one), the last segment run without checkpoint, the RNG state restored for every replay (dropout
identical), torch's early stop -- and is built on ``torch.utils.checkpoint.checkpoint``
(non-reentrant by default). What it adds is the composition with ckpt_ops layers: a segment may
span several ckpt_ops ``TransformerBlock``s or converted Hugging Face layers (an outer segment over
fused inner ones).

Outer segment over fused blocks, step by step (non-reentrant):

* forward: the outer checkpoint's saved-tensor hooks receive what each inner fused Function saves
  (at its own level: for ``"full"`` its input and the dropout seeds) and drop it, keeping a handle;
  the outer checkpoint itself saves only the segment input. Saved bytes for L blocks in segments
  of k: (L/k - 1) segment inputs + the last segment's k blocks at their level.
* backward of a segment: the first unpack replays the segment's forward from its input with the RNG
  state of the first forward restored, so each inner block draws the same dropout seeds
  (``torch.randint`` inside ``ckpt_ops.block.transformer_block``) and its Philox masks, outputs
  and saved tensors are bitwise those of the first forward (tested); then each inner Function's
  backward runs as usual at its level -- a ``"full"`` block replays its own interior once more,
  in fused kernels. While a segment's backward runs, its k replayed blocks keep their saved
  tensors: about (L/k + k) block inputs live at the peak for k-block segments of ``"full"`` blocks,
  minimal at k ~ sqrt(L).
* early stop: torch stops the replay once the last saved tensor is repacked. Eager ops pack their
  inputs before computing, so the tail of the last eager layer is not replayed; a fused Function
  packs after its forward, so the last fused block of a segment is replayed in full (its fc2
  included: at ``"full"`` that is one block forward more than the inner level needs).

``checkpoint_spans`` gives the same segments to layers that a parent module calls one by one (the
``for layer in self.layers`` loop of a Hugging Face model): hooks open one non-reentrant
checkpoint before the first layer of a span and close it after the last one; the replay calls the
span's layers again with the arguments of their original call. ``ckpt_ops.plan(...).apply`` uses
it.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint as tuc

__all__ = ["checkpoint_sequential", "Sequential", "checkpoint_spans", "remove_spans", "segment_bounds"]


def _layer_list(functions) -> List[Callable]:
    if isinstance(functions, torch.nn.Sequential):
        return list(functions.children())
    if isinstance(functions, (list, tuple, torch.nn.ModuleList)):
        layers = list(functions)
        bad = [i for i, f in enumerate(layers) if not callable(f)]
        if bad:
            raise TypeError(f"functions[{bad[0]}] is not callable ({type(layers[bad[0]]).__name__})")
        return layers
    raise TypeError(f"functions must be a torch.nn.Sequential or a list of modules/callables; "
                    f"got {type(functions).__name__}")


def segment_bounds(n: int, segments: Union[int, Sequence[int]]) -> List[Tuple[int, int]]:
    """[start, end) of each segment of `n` layers. An int splits as torch does (``n // segments``
    layers per segment, the remainder in the last); a sequence gives the segment lengths."""
    if isinstance(segments, bool) or not isinstance(segments, (int, list, tuple)):
        raise TypeError(f"segments must be an int or a sequence of segment lengths; got {type(segments).__name__}")
    if isinstance(segments, int):
        if not 1 <= segments <= max(n, 1):
            raise ValueError(f"segments must be in [1, {n}] for {n} layers; got {segments}")
        size = n // segments
        bounds = [(i * size, (i + 1) * size) for i in range(segments - 1)]
        return bounds + [((segments - 1) * size, n)]
    lengths = list(segments)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in lengths) or sum(lengths) != n:
        raise ValueError(f"segment lengths must be positive ints summing to the {n} layers; got {lengths}")
    out, start = [], 0
    for k in lengths:
        out.append((start, start + k))
        start += k
    return out


def _run(layers: Sequence[Callable], start: int, end: int) -> Callable:
    def forward(x):
        for j in range(start, end):
            x = layers[j](x)
        return x
    return forward


def checkpoint_sequential(functions, segments: Union[int, Sequence[int]], input: torch.Tensor,
                          use_reentrant: bool = False, **kwargs: Any) -> torch.Tensor:
    """``torch.utils.checkpoint.checkpoint_sequential`` for stacks that may hold ckpt_ops layers.

    functions: a ``torch.nn.Sequential`` or a list of modules/callables, each taking one input.
    segments: number of segments (torch's split), or a list of segment lengths.
    Every segment but the last runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=...,
    **kwargs)`` (``preserve_rng_state=True`` by default: dropout replays identically; other
    keywords such as ``context_fn`` or ``determinism_check`` go to ``checkpoint`` too); the last
    segment runs as is, as torch's does. See the module docstring for fused layers inside.
    """
    layers = _layer_list(functions)
    if not layers:
        raise ValueError("functions is empty")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor; got {type(input).__name__}")
    bounds = segment_bounds(len(layers), segments)
    for start, end in bounds[:-1]:
        input = tuc.checkpoint(_run(layers, start, end), input, use_reentrant=use_reentrant, **kwargs)
    start, end = bounds[-1]
    return _run(layers, start, end)(input)


class Sequential(torch.nn.Sequential):
    """``torch.nn.Sequential`` whose forward runs ``checkpoint_sequential(self, segments, x)`` when
    a gradient is being recorded (``segments=None``: no outer checkpoint). The modules, their
    names and the ``state_dict`` are ``torch.nn.Sequential``'s."""

    def __init__(self, *modules: torch.nn.Module, segments: Union[None, int, Sequence[int]] = None,
                 use_reentrant: bool = False):
        super().__init__(*modules)
        if segments is not None:
            segment_bounds(len(self), segments)  # validates
        self.segments = segments
        self.use_reentrant = use_reentrant

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.segments is None or not torch.is_grad_enabled():
            return super().forward(input)
        return checkpoint_sequential(self, self.segments, input, use_reentrant=self.use_reentrant)

    def extra_repr(self) -> str:
        return f"segments={self.segments!r}"


# ------------------------------------------------------------------------------------------------
# Spans of layers called one by one by their parent
# ------------------------------------------------------------------------------------------------
_REPLAYING = [0]  # > 0 while a span replays its layers (their span hooks must then stand aside)


def _open_checkpoint(fn: Callable, args: tuple, kwargs: dict):
    impl = getattr(tuc, "_checkpoint_without_reentrant_generator_impl", None)
    if impl is not None:
        gen = impl(fn, args, kwargs, preserve_rng_state=True)
    else:  # older torch: positional shim (fn, preserve_rng_state, context_fn, determinism_check, debug, *args)
        gen = tuc._checkpoint_without_reentrant_generator(fn, True, tuc.noop_context_fn, "default", False,
                                                          *args, **kwargs)
    next(gen)
    return gen


def _hidden(args: tuple, kwargs: dict, name: str) -> Optional[torch.Tensor]:
    if args:
        return args[0]
    return kwargs.get(name)


def _with_hidden(args: tuple, kwargs: dict, name: str, x) -> Tuple[tuple, dict]:
    if args:
        return (x,) + tuple(args[1:]), kwargs
    return args, {**kwargs, name: x}


def _first_tensor(out):
    return out if isinstance(out, torch.Tensor) else out[0]


class _Span:
    """One outer checkpoint over ``layers[start:end]``, opened by a forward pre-hook of the first
    layer and closed by a forward hook of the last. The replay calls each layer with the
    arguments of its original call, its hidden-states argument (first positional, else
    `hidden_name`) replaced by the previous layer's output (the first element of a tuple output);
    the captured calls hold no hidden states."""

    def __init__(self, layers: Sequence[torch.nn.Module], start: int, end: int, hidden_name: str):
        self.layers, self.start, self.end, self.hidden_name = list(layers), start, end, hidden_name
        self.gen, self.calls = None, []
        first, last = self.layers[start], self.layers[end - 1]
        self.handles = [first.register_forward_pre_hook(self._open, with_kwargs=True)]
        for j in range(start + 1, end):
            self.handles.append(self.layers[j].register_forward_pre_hook(self._capture(j), with_kwargs=True))
        self.handles.append(last.register_forward_hook(self._close, always_call=True))

    def _strip(self, args, kwargs):
        return _with_hidden(args, kwargs, self.hidden_name, None)

    def _open(self, module, args, kwargs):
        if _REPLAYING[0] or self.gen is not None or not torch.is_grad_enabled():
            return None
        x = _hidden(args, kwargs, self.hidden_name)
        if not isinstance(x, torch.Tensor):
            return None
        calls = [self._strip(args, kwargs)] + [None] * (self.end - self.start - 1)
        self.calls = calls

        def replay(x):
            _REPLAYING[0] += 1
            try:
                for j, (a, kw) in enumerate(calls):
                    if a is None and kw is None:
                        raise RuntimeError("ckpt_ops span replay: a layer of the span was not called in forward")
                    a, kw = _with_hidden(a, kw, self.hidden_name, x)
                    x = _first_tensor(self.layers[self.start + j](*a, **kw))
            finally:
                _REPLAYING[0] -= 1
            return x

        self.gen = _open_checkpoint(replay, (x,), {})
        return None

    def _capture(self, j):
        def hook(module, args, kwargs):
            if not _REPLAYING[0] and self.gen is not None:
                a, kw = self._strip(args, kwargs)
                self.calls[j - self.start] = (a, kw)
            return None
        return hook

    def _close(self, module, args, output):
        if _REPLAYING[0] or self.gen is None:
            return None
        gen, self.gen, self.calls = self.gen, None, []
        next(gen, None)
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def checkpoint_spans(layers: Sequence[torch.nn.Module], spans: Sequence[Tuple[int, int]],
                     hidden_name: str = "hidden_states") -> List[_Span]:
    """Run each span [start, end) of `layers` -- modules their parent calls one after another,
    each feeding the next -- as one non-reentrant outer checkpoint (module docstring). Returns the
    span objects; ``remove_spans(layers)`` undoes it. Spans must not overlap; a span of one layer
    is plain ``torch.utils.checkpoint`` of that layer."""
    layers = list(layers)
    last = 0
    for start, end in sorted(spans):
        if not (0 <= start < end <= len(layers)) or start < last:
            raise ValueError(f"spans must be disjoint [start, end) ranges within {len(layers)} layers; got {list(spans)}")
        last = end
    remove_spans(layers)
    out = [_Span(layers, s, e, hidden_name) for s, e in sorted(spans)]
    for m in layers:
        m._ckpt_ops_spans = out
    return out


def remove_spans(layers: Sequence[torch.nn.Module]) -> None:
    """Remove the span hooks `checkpoint_spans` installed on `layers`."""
    for m in layers:
        for span in m.__dict__.pop("_ckpt_ops_spans", []):
            span.remove()
