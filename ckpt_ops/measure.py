"""Measuring helpers (DESIGN §5)."""
from __future__ import annotations

from typing import Any, Callable, Dict, Set, Tuple

import torch

__all__ = ["saved_bytes"]


def _param_storages(fn: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Set[Tuple[str, int]]:
    """(device, data_ptr) of the storages of every parameter reachable from `fn` and its arguments."""
    modules = []
    if isinstance(fn, torch.nn.Module):
        modules.append(fn)
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        modules.append(owner)
    params = [p for m in modules for p in m.parameters()]
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.nn.Module):
            params.extend(a.parameters())
        elif isinstance(a, torch.nn.Parameter):
            params.append(a)
    return {(str(p.device), p.untyped_storage().data_ptr()) for p in params}


def saved_bytes(fn: Callable, *args: Any, **kwargs: Any) -> int:
    """Bytes that ``fn(*args, **kwargs)`` keeps for backward.

    Counts the distinct storages of the tensors packed by
    ``torch.autograd.graph.saved_tensors_hooks`` while ``fn`` runs (a view counts its whole
    storage), excluding parameters (``nn.Parameter`` objects, and any tensor sharing storage with
    a parameter of ``fn`` -- a module or a bound method of one -- or of a module/parameter passed
    as an argument). Device-independent; 0 under ``torch.no_grad()``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable (a module or function); got {type(fn).__name__}")
    exclude = _param_storages(fn, args, kwargs)
    storages: Dict[Tuple[str, int], int] = {}
    keep = []  # hold the packed tensors so no storage is freed and its address reused meanwhile

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, torch.nn.Parameter):
            return t
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in exclude:
            if st.data_ptr() == 0:  # zero-byte storages all share address 0
                key = (str(t.device), -id(st) - 1)
            storages[key] = st.nbytes()
        keep.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    del out, keep
    return int(sum(storages.values()))
