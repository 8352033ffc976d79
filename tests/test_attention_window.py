"""Sliding-window attention and logit soft-capping (issue 10, item 1) in every backend but Triton
(tests/test_triton_attention_kernels.py has the Triton cases):

* the reference contract (reference.attention_fwd/bwd with window/softcap) against an independent fp64
  naive attention built row by row with explicit mask loops and differentiated by autograd, plus
  torch.autograd.gradcheck of the contract's backward against its forward;
* the C++ CPU kernel against the contract (fp32 by DESIGN §4's fp32 rule vs the fp64 truth, bf16 by the
  2x rule vs eager bf16 attention), with padding, GQA, dropout, window in {1, 3, S-1, S, > S};
  bitwise recompute and thread-count independence; the window makes the kernel faster, not just masked;
* ckpt_ops.attention / nn.Attention at every recompute level vs the non-checkpointed PyTorch computation;
* Mistral / Qwen2 / Phi3 tiny random models with sliding_window < S, right-padded: the converted train
  step equals the unconverted one (sdpa and eager masks), the report says fused;
* bad inputs -> ValueError naming the argument.

The window convention is transformers 5.24's ``sliding_window_overlay``: query i sees key j iff
j <= i and j > i - w; the cap is Gemma2's eager ``softcap * tanh(scores / softcap)``.
"""
import copy
import math
import time

import pytest
import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import _backend
from ckpt_ops import reference as R
from conftest import assert_fp32_close, assert_low_precision_ok

ops = torch.ops.ckpt_ops
needs_ext = pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: one thread (test_thread_count_invariance checks results do not depend on it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def window_mask(b, s, causal, window, key_mask):
    """(B, S, S) bool by explicit loops: may query i attend key j (independent of attention_valid)."""
    ok = torch.zeros(b, s, s, dtype=torch.bool)
    for bi in range(b):
        for i in range(s):
            for j in range(s):
                seen = (not causal or j <= i) and (window == 0 or j > i - window)
                ok[bi, i, j] = seen and (key_mask is None or bool(key_mask[bi, j]))
    return ok


def naive_attention(qkv, key_mask, h, kv, causal, scale, window=0, softcap=0.0, keep=None, p=0.0):
    """fp64 attention one query row at a time: the visible keys gathered explicitly, softmax over
    them only (a row with no key gives 0); softcap: c * tanh(scores / c) as Gemma2's eager attention;
    keep (B, H, S, S): dropout on the probabilities, scaled by 1 / (1 - p). Differentiable."""
    b, s, width = qkv.shape
    hd = width // (h + 2 * kv)
    ok = window_mask(b, s, causal, window, key_mask)
    rows = []
    for bi in range(b):
        heads = []
        for hi in range(h):
            kvh = hi // (h // kv)
            q = qkv[bi, :, hi * hd:(hi + 1) * hd]
            k = qkv[bi, :, (h + kvh) * hd:(h + kvh + 1) * hd]
            v = qkv[bi, :, (h + kv + kvh) * hd:(h + kv + kvh + 1) * hd]
            outs = []
            for i in range(s):
                js = ok[bi, i].nonzero().flatten()
                if js.numel() == 0:
                    outs.append(torch.zeros(hd, dtype=qkv.dtype))
                    continue
                sc = (k[js] @ q[i]) * scale
                if softcap:
                    sc = softcap * torch.tanh(sc / softcap)
                pr = torch.softmax(sc, 0)
                if keep is not None:
                    pr = pr * keep[bi, hi, i, js].to(pr.dtype) / (1.0 - p)
                outs.append(pr @ v[js])
            heads.append(torch.stack(outs))
        rows.append(torch.cat(heads, -1))
    return torch.stack(rows)


def make_mask(kind, b, s):
    if kind is None:
        return None
    m = torch.ones(b, s, dtype=torch.bool)
    if kind == "right":
        m[1, s - max(1, s // 3):] = False
    elif kind == "left":
        m[1, :max(1, s // 3)] = False          # under causal: leading rows with no key
    elif kind == "full":
        m[1] = False                           # a fully padded sequence
    return m


def inputs(b, s, h, kv, hd, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, s, (h + 2 * kv) * hd, generator=g).to(dtype),
            torch.randn(b, s, h * hd, generator=g).to(dtype))


# ------------------------------------------------------------------------------------------------
# the reference contract vs naive fp64 attention
# ------------------------------------------------------------------------------------------------
REF_CASES = [  # (S, H, KV, window, softcap, mask, dropout)
    (6, 2, 1, 1, 0.0, None, 0.0),
    (6, 2, 2, 3, 0.0, "right", 0.0),
    (6, 2, 1, 0, 2.0, "left", 0.0),
    (7, 4, 2, 3, 1.5, "right", 0.0),
    (7, 2, 1, 6, 3.0, "full", 0.0),
    (5, 2, 1, 2, 1.0, "left", 0.3),
]


@pytest.mark.parametrize("case", REF_CASES, ids=[f"s{c[0]}_h{c[1]}kv{c[2]}_w{c[3]}_c{c[4]}_{c[5]}_p{c[6]}"
                                                  for c in REF_CASES])
def test_reference_matches_naive_fp64(case):
    s, h, kv, window, cap, mk, p = case
    b, hd, scale = 2, 4, 0.7
    qkv, do = inputs(b, s, h, kv, hd, torch.float64, seed=s + window)
    mask = make_mask(mk, b, s)
    seed = torch.tensor([4321]) if p else None
    keep = R.attention_dropout_keep(seed, b, h, s, p, "cpu") if p else None
    x = qkv.clone().requires_grad_()
    o_t = naive_attention(x, mask, h, kv, True, scale, window, cap, keep, p)
    (dqkv_t,) = torch.autograd.grad(o_t, x, do)
    o, lse = R.attention_fwd(qkv, mask, h, kv, True, scale, p, seed, window, cap)
    torch.testing.assert_close(o, o_t.detach(), rtol=1e-12, atol=1e-12)
    # lse of the capped scores over the visible keys, +inf on rows with none
    ok = window_mask(b, s, True, window, mask)
    q, k, _, _ = R._split_heads(qkv, h, kv)
    sc = (q @ k.repeat_interleave(h // kv, 1).transpose(-1, -2)) * scale
    if cap:
        sc = cap * torch.tanh(sc / cap)
    lse_t = sc.masked_fill(~ok[:, None], float("-inf")).logsumexp(-1)
    lse_t = torch.where(torch.isneginf(lse_t), torch.full_like(lse_t, float("inf")), lse_t)
    torch.testing.assert_close(lse, lse_t, rtol=1e-12, atol=1e-12)
    dqkv = R.attention_bwd(do, qkv, o, lse, mask, h, kv, True, scale, p, seed, window, cap)
    torch.testing.assert_close(dqkv, dqkv_t, rtol=1e-10, atol=1e-12)


class _RefAttn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, mask, h, kv, scale, window, cap):
        o, lse = R.attention_fwd(qkv, mask, h, kv, True, scale, 0.0, None, window, cap)
        ctx.save_for_backward(qkv, o, lse)
        ctx.args = (mask, h, kv, scale, window, cap)
        return o

    @staticmethod
    def backward(ctx, do):
        qkv, o, lse = ctx.saved_tensors
        mask, h, kv, scale, window, cap = ctx.args
        return R.attention_bwd(do.contiguous(), qkv, o, lse, mask, h, kv, True, scale, 0.0, None, window,
                               cap), None, None, None, None, None, None


@pytest.mark.parametrize("window,cap", [(2, 0.0), (0, 1.5), (3, 0.8)])
def test_reference_backward_gradcheck(window, cap):
    qkv, _ = inputs(1, 5, 2, 1, 3, torch.float64, seed=3)
    mask = torch.tensor([[True, True, False, True, True]])
    x = qkv.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _RefAttn.apply(t, mask, 2, 1, 0.9, window, cap), (x,))


def test_window_is_not_a_noop_and_matches_hf_convention():
    """The window changes the result (w = 2 vs none), and attention_valid's window is exactly
    transformers' sliding_window_causal_mask_function (kv_idx > q_idx - w and kv_idx <= q_idx)."""
    T = pytest.importorskip("transformers")
    from transformers import masking_utils as mu
    s = 9
    for w in (1, 2, 5, 9, 12):
        fn = mu.sliding_window_causal_mask_function(w)
        t = lambda v: torch.tensor(v)  # noqa: E731
        hf = torch.tensor([[bool(fn(t(0), t(0), t(i), t(j))) for j in range(s)] for i in range(s)])
        assert torch.equal(R.attention_valid(None, 1, s, True, "cpu", w)[0, 0], hf), w
    assert T is not None
    qkv, _ = inputs(1, 6, 2, 1, 4, torch.float64, seed=0)
    a = R.attention_fwd(qkv, None, 2, 1, True, 0.5, window=2)[0]
    b = R.attention_fwd(qkv, None, 2, 1, True, 0.5)[0]
    assert not torch.allclose(a, b)
    c = R.attention_fwd(qkv, None, 2, 1, True, 0.5, softcap=0.5)[0]
    assert not torch.allclose(c, b)


# ------------------------------------------------------------------------------------------------
# C++ CPU kernel vs the contract
# ------------------------------------------------------------------------------------------------
def _windows(s):
    return sorted({1, 3, max(1, s - 1), s, s + 5})


CPU_CASES = [(s, hk, w, cap, mk, p)
             for s in (7, 70)
             for w in _windows(s)
             for hk, cap, mk, p in (((4, 2), 0.0, "right", 0.0), ((2, 2), 2.5, "left", 0.0),
                                    ((4, 1), 4.0, "full", 0.25))]
CPU_CASES += [(70, (4, 2), 0, 3.0, "right", 0.0), (70, (4, 4), 0, 1.0, None, 0.2)]  # cap alone


def _cpu_case_id(c):
    s, (h, kv), w, cap, mk, p = c
    return f"s{s}_h{h}kv{kv}_w{w}_c{cap}_{mk}_p{p}"


@needs_ext
@pytest.mark.parametrize("case", CPU_CASES, ids=[_cpu_case_id(c) for c in CPU_CASES])
def test_cpu_kernel_fp32_matches_contract(case):
    s, (h, kv), w, cap, mk, p = case
    b, hd = 2, 16
    scale = hd ** -0.5
    qkv, do = inputs(b, s, h, kv, hd, torch.float32, seed=s * 7 + w)
    mask = make_mask(mk, b, s)
    seed = torch.tensor([99]) if p else None
    o, lse = ops.attention_fwd(qkv, mask, h, kv, True, scale, p, seed, w, cap)
    dqkv = ops.attention_bwd(do, qkv, o, lse, mask, h, kv, True, scale, p, seed, w, cap)
    o_t, lse_t = R.attention_fwd(qkv.double(), mask, h, kv, True, scale, p, seed, w, cap)
    d_t = R.attention_bwd(do.double(), qkv.double(), o_t, lse.double(), mask, h, kv, True, scale, p, seed, w, cap)
    assert not o.isnan().any() and not dqkv.isnan().any()
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_t))
    fin = torch.isfinite(lse_t)
    assert_fp32_close(o, o_t, "o")
    assert_fp32_close(lse[fin], lse_t[fin], "lse")
    assert_fp32_close(dqkv, d_t, "dqkv")


def eager_bf16(qkv, do, mask, h, kv, scale, window, cap):
    """Plain PyTorch attention in bf16 as a user writes it (scores, cap, mask, softmax, P V in bf16),
    differentiated by autograd: (o, dqkv)."""
    b, s, _ = qkv.shape
    x = qkv.detach().clone().requires_grad_()
    q, k, v, hd = R._split_heads(x, h, kv)
    k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
    sc = (q @ k.transpose(-1, -2)) * scale
    if cap:
        sc = torch.tanh(sc / cap) * cap
    ok = window_mask(b, s, True, window, mask)[:, None]
    pr = torch.softmax(sc.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    o = (pr @ v).transpose(1, 2).reshape(b, s, h * hd)
    (dqkv,) = torch.autograd.grad(o, x, do)
    return o.detach(), dqkv


@needs_ext
@pytest.mark.parametrize("w,cap,mk", [(1, 0.0, "right"), (3, 2.0, "right"), (69, 0.0, None), (0, 3.0, "right"),
                                      (5, 1.0, None)])
def test_cpu_kernel_bf16_within_2x_of_eager(w, cap, mk):
    b, s, h, kv, hd = 2, 70, 4, 2, 16
    scale = hd ** -0.5
    qkv, do = inputs(b, s, h, kv, hd, torch.bfloat16, seed=w + 11)
    mask = make_mask(mk, b, s)
    o, lse = ops.attention_fwd(qkv, mask, h, kv, True, scale, 0.0, None, w, cap)
    dqkv = ops.attention_bwd(do, qkv, o, lse, mask, h, kv, True, scale, 0.0, None, w, cap)
    o_t, lse_t = R.attention_fwd(qkv.double(), mask, h, kv, True, scale, 0.0, None, w, cap)
    d_t = R.attention_bwd(do.double(), qkv.double(), o_t, lse_t, mask, h, kv, True, scale, 0.0, None, w, cap)
    o_e, d_e = eager_bf16(qkv, do, mask, h, kv, scale, w, cap)
    assert o.dtype == torch.bfloat16 and dqkv.dtype == torch.bfloat16
    assert_low_precision_ok(o, o_e, o_t, "o")
    assert_low_precision_ok(dqkv, d_e, d_t, "dqkv")


@needs_ext
def test_cpu_recompute_bitwise_and_thread_count_invariant():
    b, s, h, kv, hd = 2, 150, 4, 2, 16
    qkv, do = inputs(b, s, h, kv, hd, torch.float32, seed=5)
    mask = make_mask("right", b, s)
    seed = torch.tensor([7])
    args = (mask, h, kv, True, 0.25, 0.1, seed, 37, 2.0)
    n = torch.get_num_threads()
    outs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        o, lse = ops.attention_fwd(qkv, *args)
        outs.append((o, lse, ops.attention_bwd(do, qkv, o, lse, *args)))
    torch.set_num_threads(n)
    for other in outs[1:]:
        for a, c in zip(outs[0], other):
            assert torch.equal(a, c)


@needs_ext
def test_cpu_window_skips_key_blocks():
    """A window of 16 over S = 2048 does ~1/30 of the work of the own kernel without a window (same
    code path: softcap on in both); it must be clearly faster, not a masked full computation."""
    b, s, h, kv, hd = 1, 2048, 2, 1, 32
    qkv, do = inputs(b, s, h, kv, hd, torch.float32, seed=1)

    def best(window):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            o, lse = ops.attention_fwd(qkv, None, h, kv, True, 0.2, 0.0, None, window, 5.0)
            ops.attention_bwd(do, qkv, o, lse, None, h, kv, True, 0.2, 0.0, None, window, 5.0)
            ts.append(time.perf_counter() - t0)
        return min(ts)

    assert best(16) < 0.35 * best(0)


# ------------------------------------------------------------------------------------------------
# the segment (ckpt_ops.attention / nn.Attention) at every level vs plain PyTorch
# ------------------------------------------------------------------------------------------------
def eager_segment(m, x, mask, window, cap):
    """Non-checkpointed PyTorch from m's submodules: x + out(attn(rope(qkv(rmsnorm(x)))))."""
    b, s, d = x.shape
    h, kv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    n = F.rms_norm(x, (d,), m.norm.weight, m.norm.eps)
    qkv = F.linear(n, m.qkv.weight, m.qkv.bias)
    q = qkv[..., :h * hd].view(b, s, h, hd)
    k = qkv[..., h * hd:(h + kv) * hd].view(b, s, kv, hd)
    v = qkv[..., (h + kv) * hd:].view(b, s, kv, hd)
    cos, sin = R.rope_tables(s, hd, m.rope_theta, x.device, x.dtype)
    cos, sin = cos[None, :, None], sin[None, :, None]

    def rot(t):
        t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)
    q, k = rot(q).transpose(1, 2), rot(k).transpose(1, 2).repeat_interleave(h // kv, 1)
    v = v.transpose(1, 2).repeat_interleave(h // kv, 1)
    sc = (q @ k.transpose(-1, -2)) * hd ** -0.5
    if cap:
        sc = cap * torch.tanh(sc / cap)
    ok = window_mask(b, s, True, window or 0, mask)[:, None]
    pr = torch.softmax(sc.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    o = (pr @ v).transpose(1, 2).reshape(b, s, h * hd)
    return x + F.linear(o, m.out.weight, m.out.bias)


def _seg_backends():
    out = ["reference"]
    if _backend.extension_loaded():
        out.append("cpu")
    return out


@pytest.mark.parametrize("backend", _seg_backends())
@pytest.mark.parametrize("level", ["full", "keep_attn", "selective", "none"])
@pytest.mark.parametrize("window,cap", [(3, None), (None, 2.0), (4, 1.5)])
def test_segment_levels_match_plain_pytorch(backend, level, window, cap):
    b, s, d, h, kv = 2, 9, 32, 4, 2
    torch.manual_seed(0)
    m = ckpt_ops.nn.Attention(d, h, kv, causal=True, bias=True, norm="rmsnorm", rope=True, residual=True,
                              recompute=level, sliding_window=window, softcap=cap).double()
    m.backend = backend
    with torch.no_grad():
        m.qkv.weight.mul_(3.0)  # scores large enough for the cap to bite
    x = torch.randn(b, s, d, dtype=torch.float64, requires_grad=True)
    mask = make_mask("right", b, s)
    dy = torch.randn(b, s, d, dtype=torch.float64)
    out = m(x, mask)
    grads = torch.autograd.grad(out, [x, *m.parameters()], dy)
    ref = eager_segment(m, x, mask, window, cap)
    grads_t = torch.autograd.grad(ref, [x, *m.parameters()], dy)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, gt in zip(grads, grads_t):
        torch.testing.assert_close(g, gt, rtol=1e-9, atol=1e-10)
    # the functional form with the same arguments, fp32, vs the fp64 truth
    x32 = x.detach().float().requires_grad_()
    m32 = copy.deepcopy(m).float()
    o32 = ckpt_ops.functional.attention(
        x32, m32.qkv.weight, m32.qkv.bias, m32.out.weight, m32.out.bias, num_heads=h, num_kv_heads=kv,
        attention_mask=mask, norm="rmsnorm", norm_weight=m32.norm.weight, norm_eps=m32.norm.eps, rope=True,
        residual=True, recompute=level, backend=backend, sliding_window=window, softcap=cap)
    assert_fp32_close(o32, ref, "functional out")
    (gx,) = torch.autograd.grad(o32, x32, dy.float())
    assert_fp32_close(gx, grads_t[0], "functional dx")


@pytest.mark.parametrize("backend", _seg_backends())
def test_transformer_block_window_softcap_vs_blockless(backend):
    """TransformerBlock passes sliding_window/softcap to its attention: its output equals its attention
    + MLP run as separate modules (which test_segment_levels_match_plain_pytorch checks)."""
    torch.manual_seed(1)
    blk = ckpt_ops.nn.TransformerBlock(32, 4, style="llama", num_kv_heads=2, sliding_window=3, softcap=2.0,
                                       recompute="selective").double()
    blk.backend = backend
    assert blk.attn.sliding_window == 3 and blk.attn.softcap == 2.0
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    with torch.no_grad():
        blk.attn.backend = blk.mlp.backend = backend
        split = blk.mlp(blk.attn(x))
        plain = copy.deepcopy(blk)
        plain.attn.sliding_window, plain.attn.softcap = None, None
        torch.testing.assert_close(blk(x), split, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(plain(x), split)


# ------------------------------------------------------------------------------------------------
# HF conversion with sliding windows
# ------------------------------------------------------------------------------------------------
DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
WINDOWED = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    # Qwen2: use_sliding_window + max_window_layers=2 -> layer_types [full, full, sliding, sliding]
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=5, pad_token_id=0, resid_pdrop=0.0,
                                                   embd_pdrop=0.0)),
}


def _hf(family, impl, **over):
    T = pytest.importorskip("transformers")
    T.logging.set_verbosity_error()
    cfg, cls, extra = WINDOWED[family]
    torch.manual_seed(0)
    return getattr(T, cls)(getattr(T, cfg)(**{**DECODER, **extra, **over}, attn_implementation=impl)).train()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(WINDOWED))
def test_windowed_family_trains_fused(family, impl):
    from test_convert import assert_same_step, batch, train_step
    ref = _hf(family, impl)
    if family == "qwen2":
        assert ref.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    conv = ckpt_ops.convert(copy.deepcopy(ref), strict=True)
    ids, am, labels = batch(b=2, s=10)  # right padding: 3 tokens of sequence 1
    loss = assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    kind = type(ref.model.layers[0]).__name__
    assert rep["fused_calls"].get(kind) == 4 and not rep["fallbacks"], rep
    assert [st for _, _, st in rep["layers"]] == ["fused"] * 4
    # the window matters for this batch: without it the step differs
    nowin = _hf(family, impl, sliding_window=None)
    assert not torch.allclose(train_step(nowin, ids, am, labels)[0], loss)


def test_window_mask_check_rejects_a_different_window():
    """A 4-D mask built with another window than the layer's is not served (Unservable), and the
    sliding mask is accepted exactly with the layer's own window."""
    from ckpt_ops._convert_families import key_mask_from_hf
    from ckpt_ops._convert_guard import Unservable
    b, s = 2, 8
    km = make_mask("right", b, s)
    for w in (2, 5):
        m4 = window_mask(b, s, True, w, km)[:, None]
        got = key_mask_from_hf(m4.clone(), b, s, causal=True, window=w)
        assert torch.equal(got, km)
        with pytest.raises(Unservable, match="sliding-window"):
            key_mask_from_hf(m4.clone(), b, s, causal=True, window=w + 1)
        with pytest.raises(Unservable):
            key_mask_from_hf(m4.clone(), b, s, causal=True, window=0)
        add = torch.zeros(b, 1, s, s).masked_fill(~m4, torch.finfo(torch.float32).min)
        if w == 2:  # padded rows 6, 7 see only padded keys 5..7 in a window of 2: eager averages them
            with pytest.raises(Unservable, match="no key"):
                key_mask_from_hf(add, b, s, causal=True, window=w)
        else:
            assert torch.equal(key_mask_from_hf(add, b, s, causal=True, window=w), km)


def test_window_mask_check_under_compile():
    """The traced path (torch.compile) asserts the same sliding-window causal & padding form."""
    from ckpt_ops._convert_families import _traced_mask
    b, s, w = 2, 8, 3
    km = make_mask("right", b, s)
    m4 = window_mask(b, s, True, w, km)[:, None]
    f = torch.compile(lambda m: _traced_mask(m, b, s, True, w).to(torch.int64), backend="eager", fullgraph=True)
    assert torch.equal(f(m4).bool(), km)
    bad = window_mask(b, s, True, w + 1, km)[:, None]
    with pytest.raises(RuntimeError, match="sliding-window"):
        f(bad)


def test_short_window_without_4d_mask_falls_back():
    """A short window with no 4-D mask (e.g. an implementation that applies it itself) is never fused."""
    from ckpt_ops._convert_families import LlamaLikeAdapter, FAMILIES
    from ckpt_ops._convert_guard import Unservable
    ref = _hf("mistral", "sdpa")
    ad = LlamaLikeAdapter(next(f for f in FAMILIES if f.name == "mistral"))
    x = torch.zeros(1, 10, 64)
    with pytest.raises(Unservable, match="no 4-D mask"):
        ad._window(ref.model.layers[0].self_attn, x, None)
    assert ad._window(ref.model.layers[0].self_attn, torch.zeros(1, 4, 64), None) == 0  # w >= S: no window


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(sliding_window=0), "sliding_window"), (dict(sliding_window=-2), "sliding_window"),
    (dict(sliding_window=2.0), "sliding_window"), (dict(sliding_window=True), "sliding_window"),
    (dict(softcap=0.0), "softcap"), (dict(softcap=-1.0), "softcap"), (dict(softcap=math.inf), "softcap"),
    (dict(softcap="1"), "softcap"), (dict(sliding_window=3, causal=False), "sliding_window"),
])
def test_bad_window_softcap(kw, match):
    x = torch.randn(1, 4, 16)
    w = torch.randn(48, 16)
    wo = torch.randn(16, 16)
    with pytest.raises(ValueError, match=match):
        ckpt_ops.functional.attention(x, w, None, wo, None, num_heads=2, **kw)
    with pytest.raises(ValueError, match=match):
        ckpt_ops.nn.Attention(16, 2, **kw)
    with pytest.raises(ValueError, match=match):
        ckpt_ops.nn.TransformerBlock(16, 2, **kw)


@pytest.mark.parametrize("kw,match", [(dict(window=-1), "window"), (dict(window=2, causal=False), "window"),
                                      (dict(softcap=-0.5), "softcap"), (dict(window=1.5), "window")])
def test_bad_window_softcap_kernels(kw, match):
    qkv = torch.randn(1, 4, 3 * 8)
    causal = kw.pop("causal", True)
    with pytest.raises(ValueError, match=match):
        R.attention_fwd(qkv, None, 1, 1, causal, 0.5, **kw)
    if _backend.extension_loaded() and not isinstance(kw.get("window", 0), float):
        with pytest.raises(RuntimeError, match=match):
            ops.attention_fwd(qkv, None, 1, 1, causal, 0.5, 0.0, None, kw.get("window", 0), kw.get("softcap", 0.0))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_windowed_prefill_fills_the_sliding_cache_like_hf(family):
    """eval + use_cache with a window shorter than S: the prefill runs fused, the (sliding-window) cache
    holds what the unconverted model stores, and the decode step (cache not empty: original forward)
    answers the same."""
    from test_convert import batch
    from conftest import assert_fp32_close as close
    ref = _hf(family, "sdpa", num_hidden_layers=2, **({"max_window_layers": 1} if family == "qwen2" else {})).eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch(b=2, s=10)
    a = ref(input_ids=ids, attention_mask=am, use_cache=True)
    b = conv(input_ids=ids, attention_mask=am, use_cache=True)
    close(b.logits, a.logits, "prefill logits")
    for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
        assert type(la) is type(lb) and la.keys.shape == lb.keys.shape
        close(lb.keys, la.keys, "cached keys")
        close(lb.values, la.values, "cached values")
    assert any(type(la).__name__ == "DynamicSlidingWindowLayer" for la in a.past_key_values.layers)
    nid = torch.randint(0, 97, (2, 1), generator=torch.Generator().manual_seed(0))
    am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
    a2 = ref(input_ids=nid, attention_mask=am2, cache=a.past_key_values, use_cache=True)
    b2 = conv(input_ids=nid, attention_mask=am2, cache=b.past_key_values, use_cache=True)
    close(b2.logits, a2.logits, "decode logits")
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"][type(ref.model.layers[0]).__name__] == 2
