"""Helpers shared by the Triton op families: op registration, interpreter detection, the fp32 -> output
dtype store cast (with the interpreter's bf16 rounding work-around).

Compiled Triton (CUDA): ops are ``torch.library.triton_op`` launching through ``wrap_triton``, so
torch.compile/Inductor see the kernels. Under ``TRITON_INTERPRET=1`` (CPU tensors) ``wrap_triton`` hands back
the raw interpreted kernel, which cannot run on fake tensors, so there the ops are opaque
``torch.library.custom_op``s. Both get the same explicit fake (meta) implementation from ``ckpt_ops._meta``.
"""
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
