"""q/k RMSNorm (per head and over the whole projection) and post-sublayer RMSNorms in the
attention / MLP segments and the fused block, at every level, against plain PyTorch math in fp64
(no checkpointing): outputs and every gradient, the norm weights' included; saved bytes per level."""
import pytest
import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import attention as A
from ckpt_ops import block as B
from ckpt_ops import mlp as M
from ckpt_ops import reference as R
from conftest import DEVICE, assert_fp32_close, available_backends
from test_attention import make_mask

BACKENDS = available_backends("attention")
FP32_BE = "cpu" if DEVICE.type == "cpu" else "triton"  # the fp32 backend of the single-backend tests
LEVELS = ["full", "keep_attn", "selective", "none"]
BS, S, D, H, KV, HD, F_ = 2, 7, 32, 4, 2, 8, 48
# (q/k norm form, pre-norm, post-norm): Qwen3 (head, pre, -), OLMo2 (proj, -, post), Gemma3 (head, pre, post)
CASES = [("head", "rmsnorm", False), ("proj", None, True), ("head", "rmsnorm", True), (None, None, True)]
EPS = 1e-6


def rms(t, w, eps=EPS):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w


def make_params(qk, pre, post, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sc=0.2: torch.nn.Parameter((torch.randn(*s, generator=g) * sc).to(DEVICE, dtype))  # noqa: E731
    one = lambda n: torch.nn.Parameter((1.0 + torch.randn(n, generator=g) * 0.3).to(DEVICE, dtype))  # noqa: E731
    p = {"wqkv": r((H + 2 * KV) * HD, D), "bqkv": r((H + 2 * KV) * HD), "wo": r(D, H * HD), "bo": r(D, sc=0.1)}
    if pre:
        p["nw"] = one(D)
    if qk:
        p["qw"], p["kw"] = (one(HD), one(HD)) if qk == "head" else (one(H * HD), one(KV * HD))
    if post:
        p["pw"] = one(D)
    return p


def ref_attention(x, p, qk, mask, residual=True):
    """Plain PyTorch: [x +] post(o_proj(attn(rope(qk_norm(qkv(pre(x))))))); softmax materialised."""
    b, s, _ = x.shape
    n = rms(x, p["nw"]) if "nw" in p else x
    qkv = F.linear(n, p["wqkv"], p["bqkv"])
    q, k, v = qkv.split([H * HD, KV * HD, KV * HD], -1)
    if qk == "proj":
        q, k = rms(q, p["qw"]), rms(k, p["kw"])
    q, k, v = q.view(b, s, H, HD), k.view(b, s, KV, HD), v.view(b, s, KV, HD)
    if qk == "head":
        q, k = rms(q, p["qw"]), rms(k, p["kw"])
    cos, sin = R.rope_tables(s, HD, 10000.0, x.device, x.dtype)
    cos, sin = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]

    def rot(t):
        t1, t2 = t[..., :HD // 2], t[..., HD // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)
    q, k = rot(q).transpose(1, 2), rot(k).transpose(1, 2).repeat_interleave(H // KV, 1)
    v = v.transpose(1, 2).repeat_interleave(H // KV, 1)
    ok = R.attention_valid(mask, b, s, True, x.device)
    probs = torch.softmax(((q @ k.transpose(-1, -2)) * HD ** -0.5).masked_fill(~ok, float("-inf")), -1).nan_to_num(0)
    o = (probs @ v).transpose(1, 2).reshape(b, s, H * HD)
    y = F.linear(o, p["wo"], p["bo"])
    if "pw" in p:
        y = rms(y, p["pw"])
    return x + y if residual else y


def fused_attention(x, p, qk, mask, level, backend, **kw):
    return A.attention(x, p["wqkv"], p["bqkv"], p["wo"], p["bo"], num_heads=H, num_kv_heads=KV, attention_mask=mask,
                       norm="rmsnorm" if "nw" in p else None, norm_weight=p.get("nw"), norm_eps=EPS, rope=True,
                       residual=True, recompute=level, backend=backend, qk_norm=qk, q_norm_weight=p.get("qw"),
                       k_norm_weight=p.get("kw"), qk_norm_eps=EPS if qk else None, post_norm_weight=p.get("pw"),
                       post_norm_eps=EPS if "pw" in p else None, **kw)


def _check(out, grads, ref, rgrads, names, fp64):
    if fp64:
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for n, g, r in zip(names, grads, rgrads):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=n)
    else:
        assert_fp32_close(out, ref, "out")
        for n, g, r in zip(names, grads, rgrads):
            assert_fp32_close(g, r, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qk,pre,post", CASES)
def test_attention_qk_and_post_norm_match_plain_pytorch(backend, level, qk, pre, post):
    fp64 = backend == "reference"
    dt = torch.float64 if fp64 else torch.float32
    p = make_params(qk, pre, post, dt)
    x = (torch.randn(BS, S, D) * 0.7).to(DEVICE, dt).requires_grad_()
    mask = make_mask(BS, S, "right")
    dy = torch.randn(BS, S, D, device=DEVICE, dtype=dt)
    names = ["x", *p]
    out = fused_attention(x, p, qk, mask, level, backend)
    grads = torch.autograd.grad(out, [x, *p.values()], dy)
    p64 = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    x64 = x.detach().double().requires_grad_()
    ref = ref_attention(x64, p64, qk, mask)
    rgrads = torch.autograd.grad(ref, [x64, *p64.values()], dy.double())
    _check(out, grads, ref, rgrads, names, fp64)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qk", ["head", "proj"])
@pytest.mark.parametrize("train", [("qw", "kw"), ("pw",), ("wo",), ("bo", "pw")])
def test_attention_partial_requires_grad(level, qk, train):
    """Frozen projections and an input without grad: the trained subset (q/k norm weights, the
    post-norm weight, the output projection) still gets exact gradients."""
    p = make_params(qk, "rmsnorm", True)
    for k in p:
        p[k].requires_grad_(k in train)
    x = torch.randn(BS, S, D, device=DEVICE)
    mask = make_mask(BS, S, "right")
    dy = torch.randn(BS, S, D, device=DEVICE)
    grads = torch.autograd.grad(fused_attention(x, p, qk, mask, level, FP32_BE), [p[k] for k in train], dy)
    p64 = {k: v.detach().double().requires_grad_(k in train) for k, v in p.items()}
    rgrads = torch.autograd.grad(ref_attention(x.double(), p64, qk, mask), [p64[k] for k in train], dy.double())
    for n, g, r in zip(train, grads, rgrads):
        assert_fp32_close(g, r, n)


@pytest.mark.parametrize("qk", ["head", "proj"])
def test_attention_levels_agree_with_dropout_and_retain_graph(qk):
    """Residual and attention dropout with the same seed: every level's forward is bitwise the
    same, gradients agree with "none"'s, and a second backward (retain_graph) gives the same
    gradients without touching its inputs (the in-place RoPE only ever rotates fresh buffers)."""
    p = make_params(qk, "rmsnorm", True)
    x0 = torch.randn(BS, S, D, device=DEVICE)
    mask = make_mask(BS, S, "right")
    dy = torch.randn(BS, S, D, device=DEVICE)
    outs, grads = [], []
    for level in LEVELS:
        x = x0.clone().requires_grad_()
        torch.manual_seed(3)
        out = fused_attention(x, p, qk, mask, level, FP32_BE, dropout=0.2, attn_dropout=0.1)
        g1 = torch.autograd.grad(out, [x, *p.values()], dy, retain_graph=True)
        g2 = torch.autograd.grad(out, [x, *p.values()], dy)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2)), level
        assert torch.equal(x.detach(), x0)
        outs.append(out)
        grads.append(g1)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    assert not torch.allclose(outs[0], fused_attention(x0, p, qk, mask, "full", FP32_BE))  # dropout did act
    for g in grads[:-1]:
        for n, a, b in zip(["x", *p], g, grads[-1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def _attn_bytes(level, qk, post, pre, mask_bytes):
    """What the attention segment keeps (fp32, p = 0, x requires grad): module docstring table."""
    f, m = 4, BS * S
    x, qkv, o, lse = m * D * f, m * (H + 2 * KV) * HD * f, m * H * HD * f, BS * H * S * f
    rows_q = m * H if qk == "head" else m
    rows_k = m * KV if qk == "head" else m
    y, prstd = (m * D * f, m * f) if post else (0, 0)
    n = m * D * f if pre else 0
    table = {"full": x,
             "keep_attn": x + o + lse,
             "selective": x + qkv + o + lse + y,
             "none": x + n + (m * f if pre else 0) + 2 * qkv + (rows_q + rows_k) * f + o + lse + y + prstd}
    if qk is None and level == "none":  # no raw projection output, no q/k statistics
        table["none"] -= qkv + (rows_q + rows_k) * f
    return table[level] + mask_bytes


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("qk,pre,post", CASES)
def test_attention_saved_bytes_per_level(level, qk, pre, post):
    p = make_params(qk, pre, post)
    x = torch.randn(BS, S, D, device=DEVICE, requires_grad=True)
    mask = make_mask(BS, S, "right")
    got = ckpt_ops.saved_bytes(lambda: fused_attention(x, p, qk, mask, level, FP32_BE))
    assert got == _attn_bytes(level, qk, post, pre, mask.numel())
    with torch.no_grad():
        assert ckpt_ops.saved_bytes(lambda: fused_attention(x, p, qk, mask, level, FP32_BE)) == 0


# ------------------------------------------------------------------------------------------------
# MLP post-norm
# ------------------------------------------------------------------------------------------------
def make_mlp_params(pre, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.nn.Parameter((torch.randn(*s, generator=g) * 0.2).to(DEVICE, dtype))  # noqa: E731
    one = lambda n: torch.nn.Parameter((1.0 + torch.randn(n, generator=g) * 0.3).to(DEVICE, dtype))  # noqa: E731
    p = {"w1": r(F_, D), "wg": r(F_, D), "w2": r(D, F_), "b2": r(D), "pw": one(D)}
    if pre:
        p["nw"] = one(D)
    return p


def ref_mlp(x, p):
    n = rms(x, p["nw"]) if "nw" in p else x
    return x + rms(F.linear(F.silu(F.linear(n, p["wg"])) * F.linear(n, p["w1"]), p["w2"], p["b2"]), p["pw"])


def fused_mlp(x, p, level, backend):
    return M.mlp(x, p["w1"], None, p["w2"], p["b2"], activation="swiglu", gate_weight=p["wg"],
                        norm="rmsnorm" if "nw" in p else None, norm_weight=p.get("nw"), norm_eps=EPS, residual=True,
                        recompute=level, backend=backend, post_norm_weight=p["pw"], post_norm_eps=EPS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["full", "selective", "none"])
@pytest.mark.parametrize("pre", [None, "rmsnorm"])
def test_mlp_post_norm_matches_plain_pytorch(backend, level, pre):
    fp64 = backend == "reference"
    dt = torch.float64 if fp64 else torch.float32
    p = make_mlp_params(pre, dt)
    x = torch.randn(BS, S, D, device=DEVICE, dtype=dt, requires_grad=True)
    dy = torch.randn(BS, S, D, device=DEVICE, dtype=dt)
    out = fused_mlp(x, p, level, backend)
    grads = torch.autograd.grad(out, [x, *p.values()], dy)
    p64 = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    x64 = x.detach().double().requires_grad_()
    ref = ref_mlp(x64, p64)
    rgrads = torch.autograd.grad(ref, [x64, *p64.values()], dy.double())
    _check(out, grads, ref, rgrads, ["x", *p], fp64)


@pytest.mark.parametrize("level", ["full", "selective", "none"])
def test_mlp_post_norm_saved_bytes_and_frozen_fc2(level):
    p = make_mlp_params(None)
    x = torch.randn(BS, S, D, device=DEVICE, requires_grad=True)
    m, f = BS * S, 4
    expect = {"full": m * D * f, "selective": m * D * f + 2 * m * F_ * f + m * D * f,
              "none": m * D * f + 3 * m * F_ * f + m * D * f + m * f}[level]
    assert ckpt_ops.saved_bytes(lambda: fused_mlp(x, p, level, FP32_BE)) == expect
    # only the post-norm weight trains: its gradient needs y = fc2(a) (replayed at "full")
    for k in p:
        p[k].requires_grad_(k == "pw")
    dy = torch.randn(BS, S, D, device=DEVICE)
    (g,) = torch.autograd.grad(fused_mlp(x.detach(), p, level, FP32_BE), [p["pw"]], dy)
    p64 = {k: v.detach().double().requires_grad_(k == "pw") for k, v in p.items()}
    (r,) = torch.autograd.grad(ref_mlp(x.detach().double(), p64), [p64["pw"]], dy.double())
    assert_fp32_close(g, r, "pw")


# ------------------------------------------------------------------------------------------------
# The fused block
# ------------------------------------------------------------------------------------------------
def fused_block(x, pa, pm, qk, mask, level, backend):
    acfg, amask, cos, sin = A.prepare(
        x, pa["wqkv"], pa["bqkv"], pa["wo"], pa["bo"], num_heads=H, num_kv_heads=KV, attention_mask=mask, causal=True,
        scale=None, norm="rmsnorm" if "nw" in pa else None, norm_weight=pa.get("nw"), norm_bias=None, norm_eps=EPS,
        rope=True, rope_theta=10000.0, rope_cos=None, rope_sin=None, dropout=0.0, training=True, residual=True,
        recompute=B._ATTN_LEVEL[level], backend=backend, qk_norm=qk, q_norm_weight=pa.get("qw"),
        k_norm_weight=pa.get("kw"), qk_norm_eps=EPS if qk else None, post_norm_weight=pa.get("pw"),
        post_norm_eps=EPS if "pw" in pa else None)
    mcfg = M.prepare(x, pm["w1"], None, pm["w2"], pm["b2"], activation="swiglu", gate_weight=pm["wg"], gate_bias=None,
                     norm="rmsnorm" if "nw" in pm else None, norm_weight=pm.get("nw"), norm_bias=None, norm_eps=EPS,
                     dropout=0.0, training=True, residual=True, recompute=B._MLP_LEVEL[level], backend=backend,
                     post_norm_weight=pm["pw"], post_norm_eps=EPS)
    ap = {"nw": pa.get("nw"), "wq": pa["wqkv"], "bq": pa["bqkv"], "wo": pa["wo"], "bo": pa["bo"], "qw": pa.get("qw"),
          "kw": pa.get("kw"), "pw": pa.get("pw")}
    mp = {"nw": pm.get("nw"), "w1": pm["w1"], "wg": pm["wg"], "w2": pm["w2"], "b2": pm["b2"], "pw": pm["pw"]}
    return B.transformer_block(x, ap, mp, acfg, mcfg, level, amask, cos, sin)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", B.LEVELS)
@pytest.mark.parametrize("qk,pre", [("proj", None), ("head", "rmsnorm")])  # OLMo2-like, Gemma3-like
def test_block_with_qk_and_post_norms_matches_plain_pytorch(backend, level, qk, pre):
    fp64 = backend == "reference"
    dt = torch.float64 if fp64 else torch.float32
    pa, pm = make_params(qk, pre, True, dt), make_mlp_params(pre, dt)
    x = torch.randn(BS, S, D, device=DEVICE, dtype=dt, requires_grad=True)
    mask = make_mask(BS, S, "right")
    dy = torch.randn(BS, S, D, device=DEVICE, dtype=dt)
    leaves = [x, *pa.values(), *pm.values()]
    out = fused_block(x, pa, pm, qk, mask, level, backend)
    grads = torch.autograd.grad(out, leaves, dy)
    pa64 = {k: v.detach().double().requires_grad_() for k, v in pa.items()}
    pm64 = {k: v.detach().double().requires_grad_() for k, v in pm.items()}
    x64 = x.detach().double().requires_grad_()
    ref = ref_mlp(ref_attention(x64, pa64, qk, mask), pm64)
    rgrads = torch.autograd.grad(ref, [x64, *pa64.values(), *pm64.values()], dy.double())
    _check(out, grads, ref, rgrads, ["x", *("a_" + k for k in pa), *("m_" + k for k in pm)], fp64)
    if level == "full":  # only x and the padding mask
        got = ckpt_ops.saved_bytes(lambda: fused_block(x, pa, pm, qk, mask, level, backend))
        assert got == x.numel() * x.element_size() + mask.numel()


def test_mlp_bad_post_norm_arguments_raise_naming_them():
    p = make_mlp_params(None)
    x = torch.randn(BS, S, D, device=DEVICE)
    with pytest.raises(ValueError, match="post_norm_weight"):
        M.mlp(x, p["w1"], None, p["w2"], None, activation="swiglu", gate_weight=p["wg"],
              post_norm_weight=p["pw"].new_ones(D, 1))
    with pytest.raises(ValueError, match="post_norm_eps"):
        M.mlp(x, p["w1"], None, p["w2"], None, activation="swiglu", gate_weight=p["wg"], post_norm_eps=1e-6)
    with pytest.raises(TypeError, match="post_norm_weight"):
        M.mlp(x, p["w1"], None, p["w2"], None, activation="swiglu", gate_weight=p["wg"],
              post_norm_weight=p["pw"].double())


@pytest.mark.parametrize("bad", ["form", "q_shape", "k_missing", "post_shape", "eps_alone"])
def test_bad_norm_arguments_raise_naming_them(bad):
    p = make_params("head", None, True)
    x = torch.randn(BS, S, D, device=DEVICE)
    kw = dict(qk_norm="head", q_norm_weight=p["qw"], k_norm_weight=p["kw"], post_norm_weight=p["pw"])
    if bad == "form":
        kw["qk_norm"], err, word = "heads", ValueError, "qk_norm"
    elif bad == "q_shape":
        kw["q_norm_weight"], err, word = p["qw"].new_ones(H * HD), ValueError, "q_norm_weight"
    elif bad == "k_missing":
        kw["k_norm_weight"], err, word = None, TypeError, "k_norm_weight"
    elif bad == "post_shape":
        kw["post_norm_weight"], err, word = p["pw"].new_ones(D + 1), ValueError, "post_norm_weight"
    else:
        kw = dict(qk_norm_eps=1e-6)
        err, word = ValueError, "qk_norm"
    with pytest.raises(err, match=word):
        A.attention(x, p["wqkv"], p["bqkv"], p["wo"], p["bo"], num_heads=H, num_kv_heads=KV, rope=True, **kw)


@pytest.mark.parametrize("level", B.LEVELS)
def test_block_saved_bytes_per_level(level):
    """OLMo2-like block (q/k norm over the projection, post-norms, no pre-norms), fp32, p = 0: the
    block docstring's keep lists, the post-norms' inputs from "keep_mlp"/"selective" on."""
    pa, pm = make_params("proj", None, True), make_mlp_params(None)
    x = torch.randn(BS, S, D, device=DEVICE, requires_grad=True)
    mask = make_mask(BS, S, "right")
    m, f = BS * S, 4
    xb, qkv, o, lse, h, rstd = m * D * f, m * (H + 2 * KV) * HD * f, m * H * HD * f, BS * H * S * f, m * F_ * f, m * f
    mlp_sel = xb + 2 * h + xb                          # h1, fc1/gate outputs, the post-norm's input y
    expect = {"full": xb,
              "keep_attn": xb + o + lse,
              "keep_mlp": xb + o + lse + mlp_sel,
              "selective": xb + qkv + o + lse + xb + mlp_sel,
              "none": xb + 2 * qkv + 2 * rstd + o + lse + xb + rstd + mlp_sel + h + rstd}[level]
    got = ckpt_ops.saved_bytes(lambda: fused_block(x, pa, pm, "proj", mask, level, FP32_BE))
    assert got == expect + mask.numel()
