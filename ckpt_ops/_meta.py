"""Fake (meta) implementations of the kernel ops: output shapes and dtypes only.

One function per op contract, shared by the extension's ops (``ckpt_ops::<op>``, registered in
the op-family modules) and the Triton ops (``ckpt_ops::<op>_triton``, registered in
``ckpt_ops.triton_kernels``), so torch.compile traces both without running a kernel.
"""
import torch

from ckpt_ops.reference import acc_dtype


def _maybe(flag, shape, dtype, device):
    return torch.empty(shape if flag else 0, dtype=dtype, device=device)


def layer_norm_fwd(x, weight, bias, eps):
    m, acc = x.shape[0], acc_dtype(x.dtype)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(m, dtype=acc), x.new_empty(m, dtype=acc))


def layer_norm_bwd(dy, x, weight, mean, rstd, need_dx, need_dweight, need_dbias):
    n = x.shape[1]
    dw_dtype = weight.dtype if weight is not None else x.dtype
    return (_maybe(need_dx, x.shape, x.dtype, x.device), _maybe(need_dweight, n, dw_dtype, x.device),
            _maybe(need_dbias, n, x.dtype, x.device))


def rms_norm_fwd(x, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty(x.shape[0], dtype=acc_dtype(x.dtype)))


def rms_norm_bwd(dy, x, weight, rstd, need_dx, need_dweight):
    dx, dweight, _ = layer_norm_bwd(dy, x, weight, None, rstd, need_dx, need_dweight, False)
    return dx, dweight


def act_fwd(h, g, activation):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def act_bwd(da, h, g, activation, need_a):
    # distinct tensors (also the empty ones): outputs of an op must not alias one another
    a = torch.empty_like(h, memory_format=torch.contiguous_format) if need_a else h.new_empty(0)
    dg = torch.empty_like(h, memory_format=torch.contiguous_format) if g is not None else h.new_empty(0)
    return a, torch.empty_like(h, memory_format=torch.contiguous_format), dg


def act_bwd_(da, h, g, activation, need_a):
    a, _, dg = act_bwd(da, h, g, activation, need_a)  # dh is written into da
    return a, dg


def act_bwd_rebuild_(da, h, g, activation):
    return None  # a into h, dh into da, dg into g


def dropout_fwd(y, residual, seed, p):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def dropout_bwd(dout, seed, p):
    return torch.empty_like(dout, memory_format=torch.contiguous_format)


def rope_(qkv, cos, sin, num_heads, num_kv_heads, inverse):
    return None


def attention_fwd(qkv, key_mask, num_heads, num_kv_heads, causal, scale, dropout_p=0.0, seed=None, window=0,
                  softcap=0.0):
    b, s, width = qkv.shape
    hd = width // (num_heads + 2 * num_kv_heads)
    return qkv.new_empty(b, s, num_heads * hd), qkv.new_empty(b, num_heads, s, dtype=acc_dtype(qkv.dtype))


def attention_bwd(do, qkv, o, lse, key_mask, num_heads, num_kv_heads, causal, scale, dropout_p=0.0, seed=None,
                  window=0, softcap=0.0):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def attention_bwd_(do, qkv, o, lse, key_mask, num_heads, num_kv_heads, causal, scale, dropout_p=0.0, seed=None,
                   window=0, softcap=0.0):
    return None  # dqkv written over qkv
