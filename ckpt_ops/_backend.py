"""Backend selection: which kernels serve which op family on which device.

Backends (DESIGN §2):

``"triton"``     Triton kernels (``ckpt_ops.triton_kernels``): CUDA tensors, and CPU tensors when
                 ``TRITON_INTERPRET=1`` was set before Triton was imported (slow; for testing).
``"cuda"``       the CUDA kernels of the extension ``ckpt_ops._C`` (CUDA tensors).
``"cpu"``        the C++ kernels of the extension ``ckpt_ops._C`` (CPU tensors).
``"reference"``  pure PyTorch (``ckpt_ops.reference``): any device, always available.
``"auto"``       CUDA tensors: triton, else cuda, else reference; CPU tensors: cpu, else reference.

The request comes from a ``backend=`` argument, else the ``CKPT_OPS_BACKEND`` environment
variable, else ``"auto"``. An explicit request for a backend that cannot serve the call raises
``RuntimeError``; ``"auto"`` may fall back, and then logs a warning once and records it, so
``ckpt_ops.backend_info()`` always says who serves what.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["BACKENDS", "ENV_VAR", "backend_info", "resolve", "kernel", "register_family"]

log = logging.getLogger("ckpt_ops")

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
ENV_VAR = "CKPT_OPS_BACKEND"
_AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}

# ---------------------------------------------------------------------------------------------
# The extension
# ---------------------------------------------------------------------------------------------
_ext_error: Optional[str] = None
try:
    from ckpt_ops import _C  # noqa: F401  (registers torch.ops.ckpt_ops.*)

    _ext_info = dict(_C.build_info())
except ImportError as e:  # not built, or built against another torch
    _C = None
    _ext_info = {"with_cuda": False, "cuda_archs": "", "torch_version": ""}
    _ext_error = f"{type(e).__name__}: {e}"


def extension_loaded() -> bool:
    return _C is not None


def extension_ops() -> list:
    """Names of the ops the extension defines (``ckpt_ops::<name>``, Triton ops excluded)."""
    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("ckpt_ops::") and "_triton" not in n)


def _register_extension_fakes() -> None:
    """Every extension op gets its fake (meta) implementation from ckpt_ops._meta (same name), so
    torch.compile traces it without running it. A missing one fails test_build."""
    from ckpt_ops import _meta

    for name in extension_ops():
        fake = getattr(_meta, name, None)
        if fake is not None:
            torch.library.register_fake(f"ckpt_ops::{name}")(fake)


if _C is not None:
    _register_extension_fakes()


# ---------------------------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------------------------
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run under the interpreter (set TRITON_INTERPRET=1 before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Op families: the kernels each backend provides
# ---------------------------------------------------------------------------------------------
# family -> backend -> {kernel name -> "module:attr" or "torch.ops:name" or callable}
_FAMILIES: Dict[str, Dict[str, Dict[str, object]]] = {}
_resolved_kernels: Dict[Tuple[str, str, str], Callable] = {}
_fallbacks: Dict[Tuple[str, str], Dict[str, str]] = {}
_lock = threading.Lock()


_TRITON_MODULES: Dict[str, str] = {}
_DEPENDS: Dict[str, Tuple[str, ...]] = {}
# (family, "cpu" | "cuda") -> extension ops of that family with no kernel for the device's dispatch
# key in the loaded ckpt_ops._C (a schema alone is not a kernel: an op declared in csrc/ops.cpp but
# not implemented for that device, or a stale build). Filled at registration, so resolve() stays a
# pure lookup (torch.compile traces it).
_MISSING_EXT: Dict[Tuple[str, str], Tuple[str, ...]] = {}


def _ext_missing(kernels: Dict[str, object], dispatch_key: str) -> Tuple[str, ...]:
    missing = []
    for spec in kernels.values():
        if isinstance(spec, str) and spec.startswith("torch.ops.ckpt_ops."):
            op = spec.rsplit(".", 1)[1]
            try:
                ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"ckpt_ops::{op}", dispatch_key)
            except RuntimeError:  # the op is not even declared by this build
                ok = False
            if not ok:
                missing.append(op)
    return tuple(missing)


def register_family(family: str, kernels: Dict[str, Dict[str, object]], triton_module: Optional[str] = None,
                    depends: Tuple[str, ...] = ()) -> None:
    """Declare the kernels of an op family. ``kernels[backend][name]`` is a callable, a
    ``"torch.ops.ckpt_ops.<op>"`` string, or ``"<module>:<attr>"``. `triton_module` is imported
    (registering its ``triton_op``s) the first time a Triton kernel of the family is used, so
    ``import ckpt_ops`` never imports Triton."""
    _FAMILIES[family] = kernels
    _DEPENDS[family] = tuple(depends)  # families whose kernels this one calls on the same backend
    if triton_module is not None:
        _TRITON_MODULES[family] = triton_module
    if _C is not None:
        for backend, key in (("cpu", "CPU"), ("cuda", "CUDA")):
            if backend in kernels:
                _MISSING_EXT[(family, backend)] = _ext_missing(kernels[backend], key)


def _load(spec: object) -> Callable:
    if callable(spec):
        return spec
    assert isinstance(spec, str)
    if spec.startswith("torch.ops.ckpt_ops."):
        return getattr(torch.ops.ckpt_ops, spec.rsplit(".", 1)[1])
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def _unavailable_reason(family: str, backend: str, device_type: str) -> Optional[str]:
    """None when `backend` can serve `family` on `device_type`, else why not."""
    if family not in _FAMILIES:
        raise KeyError(f"unknown op family {family!r}")
    if backend not in _FAMILIES[family]:
        return f"no {backend} kernels exist for {family}"
    for dep in _DEPENDS.get(family, ()):
        if backend not in _FAMILIES[dep]:
            return f"no {backend} kernels exist for {dep} (used by {family})"
    reason = _base_reason(backend, device_type)
    if reason is None and backend in ("cpu", "cuda") and _C is not None:
        for fam in (family,) + _DEPENDS.get(family, ()):
            missing = _MISSING_EXT.get((fam, backend), ())
            if missing:
                return (f"ckpt_ops._C has no {device_type.upper()} kernel for "
                        f"{', '.join('ckpt_ops::' + m for m in missing)} (used by {family})")
    return reason


def _base_reason(backend: str, device_type: str) -> Optional[str]:
    """Why `backend` cannot run on `device_type` at all (None: it can)."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' serves CPU tensors, got {device_type} tensors"
        return None if _C is not None else f"the extension ckpt_ops._C is not loaded ({_ext_error})"
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' serves CUDA tensors, got {device_type} tensors"
        if _C is None:
            return f"the extension ckpt_ops._C is not loaded ({_ext_error})"
        return None if _ext_info["with_cuda"] else "ckpt_ops._C was built without CUDA kernels"
    if backend == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if device_type == "cuda":
            return None
        if device_type == "cpu":
            return None if triton_interpret() else "Triton runs CPU tensors only with TRITON_INTERPRET=1"
        return f"Triton does not serve {device_type} tensors"
    raise AssertionError(backend)


def _requested(backend: Optional[str]) -> str:
    req = backend if backend is not None else (os.environ.get(ENV_VAR) or "auto")
    if not isinstance(req, str):
        raise TypeError(f"backend must be a str, one of {BACKENDS}; got {type(req).__name__}")
    req = req.strip().lower()
    if req not in BACKENDS:
        src = "backend" if backend is not None else f"the environment variable {ENV_VAR}"
        raise ValueError(f"{src} must be one of {BACKENDS}; got {req!r}")
    return req


@torch.compiler.assume_constant_result
def resolve(family: str, device: torch.device, backend: Optional[str] = None, *, record: bool = True) -> str:
    """The backend that serves `family` for tensors on `device` (see the module docstring).
    An "auto" fall-back is logged once and recorded (unless `record` is False: a mere query).

    Under torch.compile it runs once at trace time and its answer is a constant of the graph
    (it imports kernel modules lazily, which Dynamo must not trace); changing CKPT_OPS_BACKEND
    afterwards does not recompile."""
    req = _requested(backend)
    device_type = device.type
    if req != "auto":
        reason = _unavailable_reason(family, req, device_type)
        if reason is not None:
            raise RuntimeError(f"ckpt_ops: backend {req!r} cannot run {family}: {reason}")
        _ensure_kernels(family, req)
        return req
    order = _AUTO_ORDER.get(device_type, ("reference",))
    reasons = []
    for cand in order:
        reason = _unavailable_reason(family, cand, device_type)
        if reason is None:
            if cand != order[0] and record:
                _record_fallback(family, device_type, order[0], cand, "; ".join(reasons))
            if record:
                _ensure_kernels(family, cand)
            return cand
        reasons.append(f"{cand}: {reason}")
    raise AssertionError("the reference backend is always available")


def _record_fallback(family: str, device_type: str, wanted: str, got: str, why: str) -> None:
    key = (family, device_type)
    if key in _fallbacks:
        return
    with _lock:
        if key not in _fallbacks:
            _fallbacks[key] = {"wanted": wanted, "using": got, "why": why}
            log.warning("ckpt_ops: %s on %s tensors falls back from %r to %r (%s)", family, device_type, wanted,
                        got, why)


def _ensure_kernels(family: str, backend: str) -> None:
    """Load (once) every kernel of `family` on `backend`. Called by resolve(), i.e. outside the
    autograd Functions: torch.compile does not allow a Function's forward/backward to mutate state
    from outside it, so the lazy imports and the cache fill must happen before."""
    for fam in (family,) + _DEPENDS.get(family, ()):
        for name in _FAMILIES[fam][backend]:
            if (fam, backend, name) not in _resolved_kernels:
                kernel(fam, backend, name)


def kernel(family: str, backend: str, name: str) -> Callable:
    """The callable implementing kernel `name` (e.g. "fwd") of `family` on `backend`."""
    key = (family, backend, name)
    fn = _resolved_kernels.get(key)
    if fn is None:
        if backend == "triton" and family in _TRITON_MODULES:
            importlib.import_module(_TRITON_MODULES[family])
        fn = _load(_FAMILIES[family][backend][name])
        _resolved_kernels[key] = fn
    return fn


def backend_info() -> dict:
    """Which backend serves which op family on which device, and how the extension was built.

    Returns a dict::

        {"requested": "auto" | ... (CKPT_OPS_BACKEND),
         "extension": {"loaded", "with_cuda", "cuda_archs", "torch_version", "error"},
         "triton": {"installed", "interpret", "version"},
         "cuda_available": bool,
         "ops": {family: {"cpu": backend or error, "cuda": backend or error}},
         "fallbacks": [{"op", "device", "wanted", "using", "why"}, ...],   # auto fall-backs so far
         "cpu_isa": {"isa", "requested", "supported", "avx512_bf16", "error", "cpu"}}
    """
    try:
        requested = _requested(None)
    except ValueError as e:
        requested = f"invalid: {e}"
    ops = {}
    for family in sorted(_FAMILIES):
        ops[family] = {}
        for device_type in ("cpu", "cuda"):
            try:
                ops[family][device_type] = resolve(family, torch.device(device_type), record=False)
            except (RuntimeError, ValueError) as e:
                ops[family][device_type] = f"unavailable: {e}"
    triton_version = None
    if _triton_installed():
        try:
            from importlib.metadata import version

            triton_version = version("triton")
        except Exception:  # pragma: no cover - metadata missing
            triton_version = "unknown"
    return {
        "requested": requested,
        "extension": {"loaded": _C is not None, "error": _ext_error, **_ext_info},
        "triton": {"installed": _triton_installed(), "interpret": triton_interpret(), "version": triton_version},
        "cuda_available": torch.cuda.is_available(),
        "ops": ops,
        "fallbacks": [{"op": f, "device": d, **v} for (f, d), v in sorted(_fallbacks.items())],
        "cpu_isa": cpu_isa(),
    }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_isa() -> dict:
    """The instruction set the C++ CPU kernels run (chosen once: the CPU's widest, or the one the
    CKPT_OPS_CPU_ISA environment variable forces: avx512 | avx2 | scalar | auto). "error" is set
    when the request cannot be served; the CPU kernels then raise it."""
    info = dict(_C.cpu_isa()) if _C is not None else {
        "isa": None, "requested": os.environ.get("CKPT_OPS_CPU_ISA", "auto"), "supported": "",
        "avx512_bf16": False, "error": "ckpt_ops._C is not built"}
    info["cpu"] = cpu_model()
    return info
