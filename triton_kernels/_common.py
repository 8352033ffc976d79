"""Helpers shared by the Triton op families: op registration, interpreter detection, the fp32 -> output
dtype store cast (with the interpreter's bf16 rounding work-around).

Compiled Triton (CUDA): ops are ``torch.library.triton_op`` launching through ``wrap_triton``, so
torch.compile/Inductor see the kernels. Under ``TRITON_INTERPRET=1`` (CPU tensors) ``wrap_triton`` hands back
the raw interpreted kernel, which cannot run on fake tensors, so there the ops are opaque
``torch.library.custom_op``s. Both get the same explicit fake (meta) implementation from ``ckpt_ops._meta``.

Launch plumbing shared by every launcher: ``launch`` (one kernel launch, or its record under ``recording()``:
that is how ``._aot`` compiles each kernel for real GPUs through its launcher's own config choice, on meta
tensors, without a GPU), ``device_limits`` (the shared memory, SM count and register file the configs are
sized against: read from the CUDA device, or the AOT target's table entry) and ``check_grid``.
"""
import contextlib
import contextvars
import dataclasses
import functools
import sys
import types

import torch
import triton
import triton.language as tl

_NS = "ckpt_ops"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _cast_out(v, dtype: tl.constexpr, RTNE_BF16: tl.constexpr):
    """fp32 -> output dtype. The Triton 3.8 interpreter truncates fp32 -> bf16 where GPUs round to nearest
    even; RTNE_BF16 (set only under the interpreter, for bf16) rounds with integer arithmetic instead."""
    if RTNE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


def _interpreted():
    """Whether the kernels run under Triton's interpreter (fixed by TRITON_INTERPRET at the first import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_cast_out, InterpretedFunction)


def _emulate_rtne(x):
    """bf16 outputs under the interpreter need the rounding work-around in ``_cast_out``."""
    return x.dtype == torch.bfloat16 and _interpreted()


def _register(name, schema, impl, fake, mutates_args=()):
    """Defines ``ckpt_ops::<name>`` once per process and returns its OpOverloadPacket.

    ``mutates_args`` names the arguments an in-place op writes (they must carry ``(a!)`` in the schema).

    If the op already exists (an op module imported a second time under another module name, e.g. both as
    ``triton_kernels.norm`` and ``ckpt_ops.triton_kernels.norm``), the existing definition is reused."""
    packet = getattr(torch.ops, _NS)
    if hasattr(packet, name):
        return getattr(packet, name)
    qualname = f"{_NS}::{name}"
    if _interpreted():
        op = torch.library.custom_op(qualname, impl, mutates_args=mutates_args, schema=schema)
    else:
        op = torch.library.triton_op(qualname, impl, mutates_args=mutates_args, schema=schema)
    # triton_op would use `impl` itself as the fake; an explicit one is equivalent, cheaper, and the only
    # option under the interpreter. The FunctionalTensorMode decomposition that lets Inductor see the
    # kernels is registered by triton_op separately and is unaffected.
    op.register_fake(fake)
    return getattr(packet, name)


# ----------------------------------------------------------------------------------------------------------
# device limits, grid checks, launch recording
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Limits:
    """What launch configs are sized against. ``smem``: opt-in shared memory per block (bytes, what Triton
    checks before raising OutOfResources); ``regs_per_sm``: 32-bit registers per SM."""
    arch: int
    smem: int
    sm_count: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048


# CUDA programming guide, "Technical Specifications per Compute Capability" (opt-in shared memory per block).
ARCH_LIMITS = {
    80: Limits(80, 166912, 108),                           # A100: 163 KB
    86: Limits(86, 101376, 84, max_threads_per_sm=1536),   # RTX 30xx / A10 / A40: 99 KB
    89: Limits(89, 101376, 128, max_threads_per_sm=1536),  # L4 / L40 / RTX 40xx: 99 KB
    90: Limits(90, 232448, 132),                           # H100 / H200: 227 KB
    100: Limits(100, 232448, 148),                         # B200: 227 KB
    120: Limits(120, 101376, 170, max_threads_per_sm=1536),  # RTX 50xx: 99 KB
}
CUDA_GRID_MAX = (2**31 - 1, 65535, 65535)

# One pair of context variables per process, even when this folder is imported twice (as
# ``ckpt_ops.triton_kernels`` and, by tests, as top-level ``triton_kernels``): the registered ops run whichever
# copy imported first, and ``sized_for`` / ``recording`` entered through the other copy must reach them.
_STATE = sys.modules.setdefault("_ckpt_ops_triton_launch_state", types.ModuleType("_ckpt_ops_triton_launch_state"))
if not hasattr(_STATE, "target"):
    _STATE.target = contextvars.ContextVar("ckpt_ops_triton_target", default=None)
    _STATE.recorder = contextvars.ContextVar("ckpt_ops_triton_recorder", default=None)
_TARGET, _RECORDER = _STATE.target, _STATE.recorder


@functools.lru_cache(maxsize=None)
def _cuda_limits(index):
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0)
    if not smem:  # older torch: ask Triton's driver
        smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Limits(p.major * 10 + p.minor, int(smem), p.multi_processor_count,
                  getattr(p, "regs_per_multiprocessor", 65536) or 65536,
                  getattr(p, "max_threads_per_multi_processor", 2048) or 2048)


def device_limits(device):
    """The Limits configs are sized against: a CUDA device's own; else the one set by ``sized_for`` (the AOT
    target, on meta tensors; or GPU configs run under the interpreter by tests); else None (CPU tensors under
    the interpreter: launchers then use their small interpreter configs)."""
    if device.type == "cuda":
        return _cuda_limits(device.index if device.index is not None else torch.cuda.current_device())
    return _TARGET.get()  # meta tensors (AOT), or CPU tensors under ``sized_for`` (GPU configs, interpreted)


def check_grid(grid):
    """A grid within CUDA's limits (x < 2^31, y and z <= 65535), else a ValueError naming the axis."""
    for axis, (n, cap) in enumerate(zip(grid, CUDA_GRID_MAX)):
        if n > cap:
            raise ValueError(f"launch grid {tuple(grid)}: axis {'xyz'[axis]} = {n} exceeds CUDA's limit {cap}")
    return tuple(grid)


@dataclasses.dataclass
class Launch:
    kernel: object  # the @triton.jit JITFunction
    grid: tuple
    args: tuple
    meta: dict


def launch(wrapped, grid, *args, **meta):
    """``wrapped[grid](*args, **meta)`` (``wrapped`` = ``wrap_triton(kernel)``), or, under ``recording``, a
    Launch record instead (nothing runs: the arguments may be meta tensors)."""
    grid = check_grid(grid)
    rec = _RECORDER.get()
    if rec is not None:
        rec.append(Launch(getattr(wrapped, "kernel", wrapped), grid, args, meta))
        return
    wrapped[grid](*args, **meta)


@contextlib.contextmanager
def sized_for(limits):
    """Within: launchers on non-CUDA tensors choose the configs they would choose on a GPU with ``limits``."""
    token = _TARGET.set(limits)
    try:
        yield
    finally:
        _TARGET.reset(token)


@contextlib.contextmanager
def recording(limits):
    """Within: launchers called on meta tensors size their configs for ``limits`` and record their launches
    into the yielded list instead of running them."""
    rec = []
    token = _RECORDER.set(rec)
    try:
        with sized_for(limits):
            yield rec
    finally:
        _RECORDER.reset(token)
