"""FLOP counting of a step with ``torch.utils.flop_counter.FlopCounterMode`` (DESIGN §5).

FlopCounterMode only counts ops it has a formula for. Registered here, so recomputation inside
fused kernels shows up in the count:

- ``ckpt_ops::attention_fwd`` / ``attention_bwd`` / ``attention_bwd_`` (C++ / CUDA extension; the
  in-place backward of a freeing CPU backward) and the Triton twins
  ``attention_fwd_triton`` / ``attention_bwd_triton`` (registered once their module is imported);
- ``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``: what eager SDPA runs
  on CPU, for which torch 2.14.1 has no formula (attention would count as 0);
- ``aten::addmm_``, which the fused backwards use to accumulate input gradients (torch counts
  ``addmm`` only).

Forward = ``sdpa_flop_count`` (2 GEMMs, 4·B·H·S²·hd), backward = ``sdpa_backward_flop_count``
(5 GEMMs, 2.5x forward), both halved when causal for every op registered here (the kernels skip
fully masked tiles). torch's own formulas for the CUDA SDPA ops do not halve: compare causal
attention FLOPs across devices with that in mind.
"""
from __future__ import annotations

from typing import Callable, Set

import torch
from torch.utils.flop_counter import (FlopCounterMode, register_flop_formula, sdpa_backward_flop_count,
                                      sdpa_flop_count)

_registered: Set[str] = set()


def _qkv_shapes(qkv_shape, num_heads: int, num_kv_heads: int):
    b, s, width = qkv_shape
    hd = width // (num_heads + 2 * num_kv_heads)
    return (b, num_heads, s, hd), (b, num_kv_heads, s, hd)


def _causal(flops: int, causal: bool) -> int:
    return flops // 2 if causal else flops


def ckpt_attention_fwd_flop(qkv_shape, key_mask_shape, num_heads, num_kv_heads, causal, scale, *args,
                            out_shape=None, **kwargs) -> int:
    q, kv = _qkv_shapes(qkv_shape, num_heads, num_kv_heads)
    return _causal(sdpa_flop_count(q, kv, kv), causal)


def ckpt_attention_bwd_flop(do_shape, qkv_shape, o_shape, lse_shape, key_mask_shape, num_heads, num_kv_heads,
                            causal, scale, *args, out_shape=None, **kwargs) -> int:
    q, kv = _qkv_shapes(qkv_shape, num_heads, num_kv_heads)
    return _causal(sdpa_backward_flop_count(q, q, kv, kv), causal)


def cpu_flash_fwd_flop(q_shape, k_shape, v_shape, dropout_p=0.0, is_causal=False, *args, out_shape=None,
                       **kwargs) -> int:
    return _causal(sdpa_flop_count(q_shape, k_shape, v_shape), is_causal)


def cpu_flash_bwd_flop(grad_out_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, dropout_p, is_causal,
                       *args, out_shape=None, **kwargs) -> int:
    return _causal(sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape), is_causal)


def addmm_inplace_flop(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """self += a @ b: the GEMM's 2*m*k*n, as torch counts addmm (the add is not counted)."""
    m, k = a_shape
    return 2 * m * k * b_shape[1]


_FORMULAS = {
    ("ckpt_ops", "attention_fwd"): ckpt_attention_fwd_flop,
    ("ckpt_ops", "attention_bwd"): ckpt_attention_bwd_flop,
    ("ckpt_ops", "attention_bwd_"): ckpt_attention_bwd_flop,  # the same backward, dqkv over qkv
    ("ckpt_ops", "attention_fwd_triton"): ckpt_attention_fwd_flop,
    ("ckpt_ops", "attention_bwd_triton"): ckpt_attention_bwd_flop,
    ("aten", "_scaled_dot_product_flash_attention_for_cpu"): cpu_flash_fwd_flop,
    ("aten", "addmm_"): addmm_inplace_flop,
    ("aten", "_scaled_dot_product_flash_attention_for_cpu_backward"): cpu_flash_bwd_flop,
}


def register_formulas() -> None:
    """Register every formula whose op exists now (idempotent: ops defined later, such as the
    Triton twins after their first use, are picked up by the next call)."""
    from torch.utils.flop_counter import flop_registry

    for (ns, name), formula in _FORMULAS.items():
        if f"{ns}::{name}" in _registered:
            continue
        try:
            packet = getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError):
            continue  # not defined in this process (extension not loaded, Triton not imported)
        if packet not in flop_registry:
            register_flop_formula(packet)(formula)
        _registered.add(f"{ns}::{name}")


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs of one call of `fn` (a forward, or a full step)."""
    register_formulas()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
