"""The checkpointed attention segment against eager attention in fp64 built from the same
submodules (probabilities materialised), on every backend available, at every recompute level;
GQA/MQA, causal, padding masks with fully padded rows, RoPE; the checkpoint contract."""
import pytest
import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import _backend
from ckpt_ops import reference as R
from conftest import (DEVICE, assert_fp32_close, assert_freeing_backward_takes, assert_low_precision_ok,
                      available_backends, count_kernel_calls)

BACKENDS = available_backends("attention")
LEVELS = ["full", "keep_attn", "selective", "none"]


def make_attn(d, h, kv, *, causal=True, norm=None, rope=False, bias=True, residual=True, p=0.0,
              level="full", backend="reference", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = ckpt_ops.nn.Attention(d, h, kv, causal=causal, bias=bias, dropout=p, norm=norm, rope=rope,
                              residual=residual, recompute=level).to(DEVICE, dtype)
    with torch.no_grad():
        if m.norm is not None:
            m.norm.weight.normal_(1.0, 0.3)
        if bias:
            m.qkv.bias.normal_(0.0, 0.2)
    m.backend = backend
    return m


def make_mask(b, s, kind):
    if kind is None:
        return None
    mask = torch.ones(b, s, dtype=torch.bool)
    if kind in ("right", "fully"):
        mask[0, s - max(1, s // 3):] = False          # right padding
    if kind == "left":
        mask[-1, :max(1, s // 2)] = False             # left padding: causal rows with no key
    if kind == "fully":
        mask[-1] = False                              # one all-padding sequence
    return mask.to(DEVICE)


def eager_attention(m, x, mask=None, keep=None):
    """Eager attention from m's submodules with the softmax materialised (no fused kernel)."""
    b, s, d = x.shape
    h, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    n = x
    if m.norm is not None:
        if isinstance(m.norm, torch.nn.LayerNorm):
            n = F.layer_norm(x, (d,), m.norm.weight, m.norm.bias, m.norm.eps)
        else:
            n = F.rms_norm(x, (d,), m.norm.weight, m.norm.eps)
    qkv = F.linear(n, m.qkv.weight, m.qkv.bias)
    q = qkv[..., :h * hd].view(b, s, h, hd)
    k = qkv[..., h * hd:(h + kv) * hd].view(b, s, kv, hd)
    v = qkv[..., (h + kv) * hd:].view(b, s, kv, hd)
    if m.rope:
        cos, sin = R.rope_tables(s, hd, m.rope_theta, x.device)
        cos, sin = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]

        def rot(t):
            t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
            return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)
        q, k = rot(q), rot(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(h // kv, 1), v.transpose(1, 2).repeat_interleave(h // kv, 1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    ok = R.attention_valid(mask, b, s, m.causal, x.device)
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    o = (probs @ v).transpose(1, 2).reshape(b, s, h * hd)
    y = F.linear(o, m.out.weight, m.out.bias)
    if keep is not None:
        y = y * keep / (1 - m.dropout)
    return x + y if m.residual else y


def compare(m, x, mask, dy, low_precision=False):
    out = m(x, mask)
    keep = None
    if m.dropout > 0:
        keep = (out != x) if m.residual else (out != 0)
    leaves = ([x] if x.requires_grad else []) + [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, leaves, dy)
    import copy
    e = copy.deepcopy(m).double()
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    ref = eager_attention(e, x64, mask, None if keep is None else keep.double())
    eleaves = ([x64] if x.requires_grad else []) + [p for p in e.parameters() if p.requires_grad]
    rgrads = torch.autograd.grad(ref, eleaves, dy.double())
    names = (["dx"] if x.requires_grad else []) + [f"d{n}" for n, p in m.named_parameters() if p.requires_grad]
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    if not low_precision:
        assert_fp32_close(out, ref, "out")
        for name, g, r in zip(names, grads, rgrads):
            assert_fp32_close(g, r, name)
    else:
        el = copy.deepcopy(m)
        xl = x.detach().clone().requires_grad_(x.requires_grad)
        low = eager_attention(el, xl, mask)
        lgrads = torch.autograd.grad(low, ([xl] if x.requires_grad else []) +
                                     [p for p in el.parameters() if p.requires_grad], dy)
        assert_low_precision_ok(out, low, ref, "out")
        for name, g, lo, r in zip(names, grads, lgrads, rgrads):
            assert_low_precision_ok(g, lo, r, name, floor=1e-3)
    return out


# Configurations pair features instead of crossing them all (each feature lives in its own part of
# the kernels: GQA in the head indexing, masks in the key loop, RoPE in its own pass), so every
# level x backend sees each feature at least once while the Triton interpreter run stays short.
CONFIGS = {
    "mha_causal": dict(h=4, kv=4, causal=True, mask=None),
    "gqa_rope_rms_padded": dict(h=8, kv=2, causal=True, mask="right", norm="rmsnorm", rope=True),
    "mqa_bidir_ln_fully_padded": dict(h=4, kv=1, causal=False, mask="fully", norm="layernorm"),
    "gqa_left_padded_dropout": dict(h=4, kv=2, causal=True, mask="left", rope=True, p=0.2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_matches_eager(backend, level, name):
    c = dict(CONFIGS[name])
    mask_kind = c.pop("mask")
    h = c.pop("h")
    kv = c.pop("kv")
    m = make_attn(h * 8, h, kv, level=level, backend=backend, **c)
    x = torch.randn(2, 7, h * 8, device=DEVICE, requires_grad=True)
    compare(m, x, make_mask(2, 7, mask_kind), torch.randn(2, 7, h * 8, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s,hd", [(1, 16), (64, 16), (129, 16), (7, 64), (7, 80)])
def test_sequence_lengths_and_head_dims(backend, s, hd):
    m = make_attn(2 * hd, 2, 1, rope=True, norm="layernorm", level="full", backend=backend)
    x = torch.randn(2, s, 2 * hd, device=DEVICE, requires_grad=True)
    compare(m, x, make_mask(2, s, "right" if s > 1 else None), torch.randn(2, s, 2 * hd, device=DEVICE))


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "triton"])
def test_bf16_2x_rule(backend):
    m = make_attn(64, 4, 2, rope=True, norm="rmsnorm", backend=backend, dtype=torch.bfloat16)
    x = torch.randn(2, 16, 64, device=DEVICE).bfloat16().requires_grad_()
    compare(m, x, make_mask(2, 16, "right"), torch.randn(2, 16, 64, device=DEVICE).bfloat16(), low_precision=True)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "triton"])
def test_fp16_2x_rule(backend):
    """fp16 for Triton: the interpreter's tl.dot is wrong on bf16 operands."""
    m = make_attn(64, 4, 2, rope=True, norm="rmsnorm", backend=backend, dtype=torch.float16)
    x = torch.randn(2, 16, 64, device=DEVICE).half().requires_grad_()
    compare(m, x, make_mask(2, 16, "right"), torch.randn(2, 16, 64, device=DEVICE).half(), low_precision=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_forward_bitwise_equal_across_levels(backend, p):
    outs = []
    for level in LEVELS:
        m = make_attn(32, 4, 2, rope=True, norm="layernorm", p=p, level=level, backend=backend, seed=3)
        x = torch.linspace(-2, 2, 2 * 9 * 32, device=DEVICE).reshape(2, 9, 32).requires_grad_()
        torch.manual_seed(5)
        outs.append(m(x, make_mask(2, 9, "right")))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def analytic_bytes(level, b, s, d, h, kv, hd, norm, p, mask_bytes, e=4):
    x = b * s * d * e
    seed = 8 if p > 0 else 0
    o_lse = b * s * h * hd * e + b * h * s * 4
    qkv = b * s * (h + 2 * kv) * hd * e
    if level == "full":
        return x + mask_bytes + seed
    if level == "keep_attn":
        return x + mask_bytes + seed + o_lse
    if level == "selective":
        return x + mask_bytes + seed + o_lse + qkv
    stats = {None: 0, "layernorm": 8, "rmsnorm": 4}[norm] * b * s
    n = b * s * d * e if norm else 0
    return x + mask_bytes + seed + o_lse + qkv + stats + n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("norm", [None, "layernorm"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_match_the_analytic_budget(backend, level, norm, p):
    m = make_attn(32, 4, 2, rope=True, norm=norm, p=p, level=level, backend=backend)
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    mask = make_mask(2, 9, "right")
    assert ckpt_ops.saved_bytes(m, x, mask) == analytic_bytes(level, 2, 9, 32, 4, 2, 8, norm, p, mask.numel())
    with torch.no_grad():
        assert ckpt_ops.saved_bytes(m, x, mask) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", ["frozen_weights", "input_without_grad", "only_out"])
def test_partial_requires_grad(backend, level, case):
    m = make_attn(32, 4, 2, rope=True, norm="rmsnorm", level=level, backend=backend, seed=6)
    x = torch.randn(2, 7, 32, device=DEVICE, requires_grad=case == "frozen_weights")
    for name, prm in m.named_parameters():
        prm.requires_grad_(case == "input_without_grad" or (case == "only_out" and name.startswith("out.")))
    compare(m, x, make_mask(2, 7, "right"), torch.randn(2, 7, 32, device=DEVICE))
    if case == "only_out" and level == "full":  # dWo needs o: replayed from x (+ mask)
        assert ckpt_ops.saved_bytes(m, x, make_mask(2, 7, "right")) == 2 * 7 * 32 * 4 + 14


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_padded_rows_give_the_out_bias_and_finite_grads(backend):
    m = make_attn(32, 4, 2, causal=False, residual=True, backend=backend)
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.int64, device=DEVICE)
    mask[1] = 0
    out = m(x, mask)
    torch.testing.assert_close(out[1], x[1] + m.out.bias, rtol=0, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    torch.testing.assert_close(x.grad[1], torch.ones_like(x.grad[1]))  # only the residual path


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["full", "selective"])
def test_retain_graph_twice_and_inputs_untouched(backend, level):
    m = make_attn(32, 4, 2, rope=True, norm="layernorm", p=0.2, level=level, backend=backend)
    x = torch.randn(2, 6, 32, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 6, 32, device=DEVICE)
    snap = (x.detach().clone(), dy.clone())
    out = m(x)
    g1 = torch.autograd.grad(out, [x, *m.parameters()], dy, retain_graph=True)
    g2 = torch.autograd.grad(out, [x, *m.parameters()], dy)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert torch.equal(x.detach(), snap[0]) and torch.equal(dy, snap[1])


@pytest.mark.skipif(_backend._unavailable_reason("attention", "cpu", "cpu") is not None,
                    reason="the cpu backend (extension) is not built")
@pytest.mark.parametrize("level", ["full", "selective", "none"])
def test_freeing_backward_writes_dqkv_over_qkv(monkeypatch, level):
    """A backward that frees the graph (CPU) packs dqkv into the dead qkv (attention_bwd_: no
    fresh qkv-sized buffer); bitwise the retain_graph path, which keeps qkv and allocates dqkv."""
    calls = count_kernel_calls(monkeypatch, "attention_bwd_")
    m = make_attn(32, 4, 2, rope=True, norm="rmsnorm", p=0.2, level=level, backend="cpu")
    x = torch.randn(2, 6, 32, requires_grad=True)
    assert_freeing_backward_takes(calls, "attention_bwd_", m(x), [x, *m.parameters()], torch.randn(2, 6, 32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["full", "keep_attn"])
def test_compile_fullgraph(backend, level):
    torch._dynamo.reset()
    m = make_attn(32, 4, 2, rope=True, norm="rmsnorm", level=level, backend=backend)
    compiler = "aot_eager" if (backend == "triton" and DEVICE.type == "cpu") else "inductor"
    cm = torch.compile(m, fullgraph=True, backend=compiler)
    x = torch.randn(2, 8, 32, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    mask = make_mask(2, 8, "right")
    y = cm(x, mask)
    y.sum().backward()
    y2 = m(x2, mask)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(d_model=30, num_heads=4), ValueError, "divisible by num_heads"),
    (dict(d_model=32, num_heads=4, num_kv_heads=3), ValueError, "num_kv_heads"),
    (dict(d_model=36, num_heads=4, rope=True), ValueError, "even head_dim"),
    (dict(d_model=32, num_heads=4, recompute="partial"), ValueError, "recompute"),
    (dict(d_model=32, num_heads=0), ValueError, "num_heads"),
])
def test_bad_module_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        ckpt_ops.nn.Attention(**kwargs)


def test_bad_masks_raise_before_kernels(monkeypatch):
    m = ckpt_ops.nn.Attention(32, 4)
    monkeypatch.setattr(_backend, "kernel", lambda *a, **k: (_ for _ in ()).throw(AssertionError("kernel ran")))
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be a bool or integer"):
        m(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match="x must be 3-D"):
        m(torch.randn(5, 32))
    with pytest.raises(TypeError, match="x"):
        m(x.to(torch.int32))


def test_module_structure():
    m = ckpt_ops.nn.Attention(64, 8, 2, bias=False, norm="rmsnorm", rope=True)
    assert [n for n, _ in m.named_parameters()] == ["norm.weight", "qkv.weight", "out.weight"]
    assert m.qkv.weight.shape == ((8 + 2 * 2) * 8, 64) and m.out.weight.shape == (64, 64)


def test_standalone_rope_tables_are_built_once_per_shape():
    """A stack of standalone RoPE blocks builds the tables once and reuses them in every layer's
    forward and backward; they equal freshly built ones bit for bit; inference mode (whose
    tensors must not reach a training step) bypasses the cache, and a training step after it works."""
    from ckpt_ops import attention as A

    A._cached_tables.cache_clear()
    torch.manual_seed(0)
    blocks = [ckpt_ops.nn.TransformerBlock(64, 4, style="llama", num_kv_heads=2, dropout=0.0) for _ in range(3)]
    x = torch.randn(2, 12, 64)
    with torch.inference_mode():
        for b in blocks:
            b(x)
    assert A._cached_tables.cache_info().currsize == 0
    t = x.clone().requires_grad_()
    out = t
    for b in blocks:
        b.recompute = "full"
        out = b(out)
    out.sum().backward()
    info = A._cached_tables.cache_info()
    assert info.misses == 1 and info.hits >= 5  # 3 forwards + 3 backward replays, one build
    cos, sin = A._cached_tables(12, 16, 10000.0, torch.device("cpu"), torch.float32)
    fresh = R.rope_tables(12, 16, 10000.0, torch.device("cpu"))
    assert torch.equal(cos, fresh[0]) and torch.equal(sin, fresh[1]) and not cos.is_inference()
