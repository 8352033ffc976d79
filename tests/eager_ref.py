"""An eager PyTorch re-implementation of every ckpt_ops.nn module, written for the tests: torch's
own ops only (F.layer_norm, F.rms_norm, F.linear, a materialised softmax), never ckpt_ops or
ckpt_ops.reference (a backend under test). RoPE tables are built here in the input's dtype, so
fp64 runs are an fp64 truth. `keep` arguments are dropout keep masks (1 = kept)."""
import torch
import torch.nn.functional as F

ACTS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu, "silu": F.silu,
        "swiglu": F.silu, "geglu": lambda t: F.gelu(t, approximate="tanh")}


def norm(m, x):
    """m is a LayerNorm / RMSNorm module (ckpt_ops' or torch's) or None."""
    if m is None:
        return x
    if isinstance(m, torch.nn.LayerNorm):
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    eps = m.eps if m.eps is not None else torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return F.rms_norm(x, m.normalized_shape, m.weight, eps)


def _dropout(y, keep, p):
    return y if keep is None else y * keep.to(y.dtype) / (1 - p)


def mlp(m, x, keep=None):
    n = norm(m.norm, x)
    a = ACTS[m.activation](F.linear(n, m.gate.weight, m.gate.bias)) * F.linear(n, m.fc1.weight, m.fc1.bias) \
        if m.gate is not None else ACTS[m.activation](F.linear(n, m.fc1.weight, m.fc1.bias))
    y = _dropout(F.linear(a, m.fc2.weight, m.fc2.bias), keep, m.dropout)
    return x + y if m.residual else y


def rope_tables(s, hd, theta, dtype, device):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=device, dtype=dtype) / hd)
    ang = torch.arange(s, device=device, dtype=dtype)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def rotate_half(t, cos, sin):
    """RoPE, "rotate half" convention: (t1, t2) -> (t1 cos - t2 sin, t2 cos + t1 sin)."""
    half = t.shape[-1] // 2
    t1, t2 = t[..., :half], t[..., half:]
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)


def attention(m, x, mask=None, keep=None):
    b, s, d = x.shape
    h, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    qkv = F.linear(norm(m.norm, x), m.qkv.weight, m.qkv.bias)
    q = qkv[..., :h * hd].view(b, s, h, hd)
    k = qkv[..., h * hd:(h + kv) * hd].view(b, s, kv, hd)
    v = qkv[..., (h + kv) * hd:].view(b, s, kv, hd)
    if m.rope:
        cos, sin = rope_tables(s, hd, m.rope_theta, x.dtype, x.device)
        cos, sin = cos[None, :, None], sin[None, :, None]
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
    q = q.transpose(1, 2)
    k = k.transpose(1, 2).repeat_interleave(h // kv, 1)
    v = v.transpose(1, 2).repeat_interleave(h // kv, 1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    ok = torch.ones(s, s, dtype=torch.bool, device=x.device)
    if m.causal:
        ok = ok.tril()
    ok = ok[None, None]
    if mask is not None:
        ok = ok & mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~ok, float("-inf"))
    # a row with no key to attend gives zero output (and zero gradients), as the contract says
    probs = torch.softmax(scores.masked_fill(~ok.any(-1, keepdim=True), 0.0), -1) * ok.any(-1, keepdim=True)
    o = (probs @ v).transpose(1, 2).reshape(b, s, h * hd)
    y = _dropout(F.linear(o, m.out.weight, m.out.bias), keep, m.dropout)
    return x + y if m.residual else y


def block(m, x, mask=None, keep_attn=None, keep_mlp=None):
    return mlp(m.mlp, attention(m.attn, x, mask, keep_attn), keep_mlp)


def run(m, x, mask=None):
    """Dispatch on the ckpt_ops.nn module type (no dropout)."""
    name = type(m).__name__
    if name in ("LayerNorm", "RMSNorm"):
        return norm(m, x)
    if name == "MLP":
        return mlp(m, x)
    if name == "Attention":
        return attention(m, x, mask)
    return block(m, x, mask)
