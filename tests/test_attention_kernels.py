"""The extension's attention ops (torch.ops.ckpt_ops.rope_ / attention_fwd / attention_bwd) on CPU
against their contracts, the pure-torch functions of ckpt_ops.reference ("Attention").

Truth: the contract evaluated in fp64 on fp64 copies of the same inputs.

Tolerances, and why:
* fp32: DESIGN §4 (rtol 1e-4, relative-norm 1e-5 of the fp64 truth) for o, lse and dqkv.
* fp64: the kernels run ATen's flash kernels in fp64, so o and dqkv are held to ~1e-10 of the
  truth; lse is fp32 by contract (rounded once), so it is within 1 fp32 ulp of the truth's. The
  backward's truth takes our fp32 lse (the contract's input), so it sees the same rounding of it.
* bf16: DESIGN §4 2x rule. The peer is eager PyTorch in bf16 as a user writes it:
  F.scaled_dot_product_attention(enable_gqa=True) with the (B, 1, S, S) bool mask, differentiated
  by autograd -- not the reference evaluated on bf16 inputs, which widens to fp32 inside and only
  rounds the output, an error no bf16 attention kernel (ours, eager's, flash's) can match: the
  probabilities are rounded to bf16 before P @ V. Our op runs the same ATen kernel as eager SDPA
  on CPU, so the 2x rule here catches glue errors (mask, layout, GQA mapping, packing).
* rope_: the kernel evaluates the contract's expressions (t1 c - t2 s, t2 c + t1 s, each product
  and sum rounded on its own, in the accumulation dtype, rounded once to the output dtype), so it
  must be bitwise equal to reference.rope_ in every dtype.
Rows with no key (a fully padded sequence, left padding under causal): o exactly 0, lse +inf,
their dq and the dk/dv of masked keys exactly 0, nothing NaN anywhere.

Grid trimming: features are crossed in pairs, not all together (a full cross is > 1000 cases):
heads x causal x mask x dtype is crossed in full (those interact in the glue: GQA mapping, mask
conversion, empty rows, dtype of lse); the (S, head_dim) shape is paired with them through a short
list covering S in {1, 7, 64, 129} (one row, odd, a block, one past a block) and head_dim in
{16, 64, 80} (80: not a power of two), since the shape only reaches ATen's tiling, which does not
depend on the mask or on GQA.
"""
import pytest
import torch
import torch.nn.functional as F

from ckpt_ops import _backend
from ckpt_ops import reference as R
from conftest import assert_close, assert_fp32_close, assert_low_precision_ok

pytestmark = pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")
ops = torch.ops.ckpt_ops


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The problems here are tiny (<= 129 x 129 per head): OpenMP fork/join dominates them, and on
    a shared, oversubscribed host its spinning barriers make a 2-thread run ~20x slower than a
    1-thread one. Results do not depend on the thread count (test_thread_count_invariance, which
    runs with the default count, checks that bitwise)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

HEADS = [(4, 4), (8, 2), (4, 1)]                       # MHA, GQA, MQA
HEAD_IDS = ["mha", "gqa", "mqa"]
SHAPES = [(1, 64), (7, 80), (64, 16), (129, 80)]   # (S, head_dim)
MASKS = ["none", "right_bool", "left_int64", "full_bool", "full_int32"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
B = 2


def make_mask(kind, b, s):
    """(B, S) padding mask; sequence 1 carries the padding (sequence 0 is full, except for the
    fully padded kinds where it is right padded)."""
    if kind == "none":
        return None
    m = torch.ones(b, s, dtype=torch.bool)
    if kind == "right_bool":
        m[1, max(1, s - s // 3):] = False
    elif kind == "left_int64":
        m[1, :s // 3] = False                   # under causal, rows 0 .. s//3-1 have no key
        m = m.to(torch.int64) * 3               # nonzero (not only 1) = attend
    else:
        m[0, max(1, s - s // 2):] = False
        m[1, :] = False                         # one fully padded sequence
        if kind == "full_int32":
            m = m.to(torch.int32)
    return m


def make_inputs(s, hd, h, kv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, s, (h + 2 * kv) * hd, generator=g).to(dtype)
    do = torch.randn(B, s, h * hd, generator=g).to(dtype)
    return qkv, do


def empty_rows(mask, s, causal):
    """(B, S) bool: query rows with no key to attend."""
    return ~R.attention_valid(mask, B, s, causal, "cpu").any(-1)[:, 0] if mask is not None else \
        torch.zeros(B, s, dtype=torch.bool)


def eager_sdpa(qkv, do, mask, h, kv, causal, scale):
    """Plain PyTorch attention in qkv's dtype, differentiated by autograd: (o, dqkv)."""
    b, s, _ = qkv.shape
    x = qkv.detach().clone().requires_grad_()
    q, k, v, hd = R._split_heads(x, h, kv)
    valid = R.attention_valid(mask, b, s, causal, "cpu").expand(b, 1, s, s)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=scale, enable_gqa=True)
    o = o.transpose(1, 2).reshape(b, s, h * hd)
    (dqkv,) = torch.autograd.grad(o, x, do)
    return o.detach(), dqkv


def check_empty_rows(o, lse, dqkv, mask, s, h, kv, hd, causal):
    assert not o.isnan().any() and not lse.isnan().any() and not dqkv.isnan().any()
    empty = empty_rows(mask, s, causal)
    assert torch.equal(torch.isinf(lse), empty[:, None, :].expand(B, h, s)), "lse must be +inf exactly on empty rows"
    assert (lse[torch.isinf(lse)] > 0).all()
    assert (o[empty] == 0).all(), "o must be exactly 0 on rows with no key"
    assert (dqkv[..., :h * hd][empty] == 0).all(), "dq must be exactly 0 on rows with no key"
    if mask is not None:
        masked_keys = ~mask.to(torch.bool)
        assert (dqkv[..., h * hd:][masked_keys] == 0).all(), "dk/dv must be exactly 0 for masked keys"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("shape_idx", range(len(SHAPES)), ids=[f"s{s}_hd{d}" for s, d in SHAPES])
def test_attention_matches_contract(shape_idx, heads, causal, mask_kind, dtype):
    (s, hd), (h, kv) = SHAPES[shape_idx], heads
    scale = hd ** -0.5
    qkv, do = make_inputs(s, hd, h, kv, dtype, seed=17 * shape_idx + 5 * h + kv + causal)
    mask = make_mask(mask_kind, B, s)
    before = [t.clone() for t in (qkv, do) + ((mask,) if mask is not None else ())]

    o, lse = ops.attention_fwd(qkv, mask, h, kv, causal, scale)
    assert o.shape == (B, s, h * hd) and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == (B, h, s) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.is_contiguous()
    dqkv = ops.attention_bwd(do, qkv, o, lse, mask, h, kv, causal, scale)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dtype and dqkv.is_contiguous()
    # inputs untouched
    for t, t0 in zip((qkv, do) + ((mask,) if mask is not None else ()), before):
        assert torch.equal(t, t0)
    check_empty_rows(o, lse, dqkv, mask, s, h, kv, hd, causal)

    q64, do64 = qkv.double(), do.double()
    o_t, lse_t = R.attention_fwd(q64, mask, h, kv, causal, scale)
    fin = torch.isfinite(lse_t)
    if dtype == torch.float64:
        assert_close(o, o_t, rtol=1e-10, atol=1e-12, name="o")
        assert_close(lse[fin], lse_t[fin], rtol=2 ** -23, atol=2 ** -23, name="lse")
        d_t = R.attention_bwd(do64, q64, o, lse, mask, h, kv, causal, scale)
        assert_close(dqkv, d_t, rtol=1e-10, atol=1e-11, name="dqkv")
    elif dtype == torch.float32:
        assert_fp32_close(o, o_t, "o")
        assert_fp32_close(lse[fin], lse_t[fin], "lse")
        d_t = R.attention_bwd(do64, q64, o_t, lse_t, mask, h, kv, causal, scale)
        assert_fp32_close(dqkv, d_t, "dqkv")
    else:
        d_t = R.attention_bwd(do64, q64, o_t, lse_t, mask, h, kv, causal, scale)
        o_e, d_e = eager_sdpa(qkv, do, mask, h, kv, causal, scale)
        assert_low_precision_ok(o, o_e, o_t, "o")
        assert_low_precision_ok(dqkv, d_e, d_t, "dqkv")
        # lse (fp32 out of bf16 tiles; ~5e-5 off the truth on the same rounded inputs): an
        # absolute lse error e is a relative error e in every rebuilt probability, so it must stay
        # well under bf16's unit roundoff 2**-9 (the probabilities are bf16 in P @ V anyway); a
        # wrong scale, mask or head mapping is off by orders more.
        assert_close(lse[fin], lse_t[fin], rtol=0, atol=2 ** -11, name="lse")


def test_attention_no_mask_equals_all_true_mask():
    qkv, do = make_inputs(33, 16, 8, 2, torch.float32, seed=3)
    ones = torch.ones(B, 33, dtype=torch.bool)
    for causal in (False, True):
        o1, l1 = ops.attention_fwd(qkv, None, 8, 2, causal, 0.3)
        o2, l2 = ops.attention_fwd(qkv, ones, 8, 2, causal, 0.3)
        assert_close(o1, o2, rtol=1e-6, atol=1e-6, name="o")
        assert_close(l1, l2, rtol=1e-6, atol=1e-6, name="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("own", [None, "window", "softcap", "dropout"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_attention_bwd_in_place_equals_attention_bwd(heads, own, dtype):
    """attention_bwd_ (the CPU backward that frees qkv) writes attention_bwd's dqkv over qkv,
    bitwise, in qkv's own pages; on ATen's flash kernels and on ours (window / softcap /
    dropout, whose fp32 accumulators are copied back)."""
    h, kv = heads
    s, hd = 37, 16
    qkv, do = make_inputs(s, hd, h, kv, dtype, seed=7)
    mask = make_mask("right_bool", B, s)
    extra = {None: (), "window": (0.0, None, 5), "softcap": (0.0, None, 0, 3.0),
             "dropout": (0.25, torch.tensor([123], dtype=torch.int64))}[own]
    o, lse = ops.attention_fwd(qkv, mask, h, kv, True, 0.3, *extra)
    want = ops.attention_bwd(do, qkv, o, lse, mask, h, kv, True, 0.3, *extra)
    buf = qkv.clone()
    ptr = buf.data_ptr()
    assert ops.attention_bwd_(do, buf, o, lse, mask, h, kv, True, 0.3, *extra) is None
    assert buf.data_ptr() == ptr and torch.equal(buf, want)


def test_attention_bwd_in_place_rejects_aliased_outputs():
    """dqkv over a tensor the backward still reads would be silently wrong: a clear error."""
    h, kv, s, hd = 4, 4, 8, 16
    qkv, do = make_inputs(s, hd, h, kv, torch.float32, seed=1)
    o, lse = ops.attention_fwd(qkv, None, h, kv, True, 0.3)
    on_qkv = qkv.view(-1)[: do.numel()].view(do.shape)  # a contiguous do lying inside qkv
    with pytest.raises(RuntimeError, match="memory location"):
        ops.attention_bwd_(on_qkv, qkv, o, lse, None, h, kv, True, 0.3)


# ---- rope_ -----------------------------------------------------------------------------------
def rope_tables_fp64(s, hd, theta=10000.0):
    """reference.rope_tables computed in fp64 (its are fp32: cos^2 + sin^2 = 1 only to fp32)."""
    inv_freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos(), ang.sin()


def rope_tables(b, s, hd, kind, table_dtype):
    """(cos, sin) as (S, hd/2), (B, S, hd/2) with per-sequence position offsets, or (1, S, hd/2)."""
    make = rope_tables_fp64 if table_dtype == torch.float64 else lambda n, d: R.rope_tables(n, d, 10000.0, "cpu")
    if kind == "2d":
        cos, sin = make(s, hd)
    else:
        cos, sin = make(s + 5 * b, hd)
        nb = b if kind == "3d" else 1
        cos = torch.stack([cos[5 * i:5 * i + s] for i in range(nb)])
        sin = torch.stack([sin[5 * i:5 * i + s] for i in range(nb)])
    return cos.to(table_dtype), sin.to(table_dtype)


# The shape and the head counts only move offsets around (paired: MHA/GQA/MQA each with one
# shape); the table form, table dtype, qkv dtype and direction select code paths (crossed).
ROPE_SHAPES = [(1, 16, 4, 4), (7, 80, 8, 2), (129, 64, 4, 1)]   # (S, head_dim, H, KV)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["2d", "3d", "3d_bcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("s,hd,h,kv", ROPE_SHAPES)
def test_rope_matches_contract(s, hd, h, kv, dtype, kind, table_dtype, inverse):
    qkv, _ = make_inputs(s, hd, h, kv, dtype, seed=s + hd + h)
    cos, sin = rope_tables(B, s, hd, kind, table_dtype)
    tables0 = (cos.clone(), sin.clone())
    ours, contract = qkv.clone(), qkv.clone()
    ops.rope_(ours, cos, sin, h, kv, inverse)
    R.rope_(contract, cos, sin, h, kv, inverse)
    assert torch.equal(cos, tables0[0]) and torch.equal(sin, tables0[1]), "tables modified"
    assert torch.equal(ours, contract), f"not bitwise equal to the contract: max diff {(ours - contract).abs().max()}"
    assert torch.equal(ours[..., (h + kv) * hd:], qkv[..., (h + kv) * hd:]), "v heads modified"
    if dtype == torch.float32:  # and close to the fp64 truth (same tables)
        truth = qkv.double()
        R.rope_(truth, cos, sin, h, kv, inverse)
        assert_fp32_close(ours, truth, "rope")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_rope_inverse_undoes_forward(dtype, tol, kind):
    h, kv, s, hd = 8, 2, 37, 64
    qkv, _ = make_inputs(s, hd, h, kv, dtype, seed=11)
    cos, sin = rope_tables(B, s, hd, kind, torch.float64)
    cos, sin = cos.to(dtype), sin.to(dtype)   # fp64 tables for fp64: cos^2 + sin^2 = 1 to fp64
    x = qkv.clone()
    ops.rope_(x, cos, sin, h, kv, False)
    assert not torch.equal(x, qkv)
    ops.rope_(x, cos, sin, h, kv, True)
    assert_close(x, qkv, rtol=tol, atol=tol * 4, name="inverse(forward(x))")


@pytest.mark.parametrize("kv,hd,r", [(1, 16, 16), (4, 32, 8)], ids=["full-rotary", "partial-r8"])
def test_rope_is_the_backward_of_rope(kv, hd, r):
    """<rope(x), g> == <x, rope_inverse(g)>: the inverse is the transpose (adjoint), also with r < hd
    (partial rotary: the pass-through block is the identity); and it undoes the forward."""
    h, s = 4, 9
    x, _ = make_inputs(s, hd, h, kv, torch.float64, seed=1)
    g, _ = make_inputs(s, hd, h, kv, torch.float64, seed=2)
    cos, sin = rope_tables(B, s, r, "3d", torch.float32)
    rx, rg = x.clone(), g.clone()
    ops.rope_(rx, cos, sin, h, kv, False)
    ops.rope_(rg, cos, sin, h, kv, True)
    assert abs(float((rx * g).sum() - (x * rg).sum())) < 1e-10 * float(x.abs().sum())
    ops.rope_(rx, cos, sin, h, kv, True)
    assert_close(rx, x, rtol=1e-6, atol=1e-6, name="inverse(forward(x))")


# ---- partial rotary (GPT-NeoX rotary_pct: r = 2 * cos.shape[-1] < head_dim) ------------------
def hf_partial_rope_fp64(qkv, cos, sin, h, kv, inverse):
    """An independent fp64 evaluation: Hugging Face's apply_rotary_pos_emb form (GPT-NeoX) on the
    first r dims of each q/k head -- x_rot * cat(cos, cos) + rotate_half(x_rot) * cat(sin, sin) --
    and the rest passed through; inverse: the same with -sin. Returns a new (fp64) tensor."""
    b, s, width = qkv.shape
    hd = width // (h + 2 * kv)
    r = 2 * cos.shape[-1]
    x = qkv.double().view(b, s, h + 2 * kv, hd)
    c = torch.cat([cos, cos], -1).double().unsqueeze(-2)       # (B or 1, S, 1, r)
    sn = torch.cat([sin, sin], -1).double().unsqueeze(-2) * (-1 if inverse else 1)
    c = c if c.dim() == 4 else c.unsqueeze(0)
    sn = sn if sn.dim() == 4 else sn.unsqueeze(0)
    rot = x[:, :, :h + kv, :r]
    half = r // 2
    rotate_half = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    out = x.clone()
    out[:, :, :h + kv, :r] = rot * c + rotate_half * sn
    return out.view(b, s, width)


PARTIAL = [(7, 16, 4, 4, 4), (5, 64, 4, 4, 16), (9, 80, 8, 2, 20), (3, 32, 4, 1, 30)]  # (S, hd, H, KV, r)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("kind", ["2d", "3d"])
@pytest.mark.parametrize("s,hd,h,kv,r", PARTIAL)
def test_partial_rope_reference_matches_hf_form_fp64(s, hd, h, kv, r, kind, inverse):
    qkv, _ = make_inputs(s, hd, h, kv, torch.float64, seed=s + r)
    cos, sin = rope_tables(B, s, r, kind, torch.float64)
    ours = qkv.clone()
    R.rope_(ours, cos, sin, h, kv, inverse)
    truth = hf_partial_rope_fp64(qkv, cos, sin, h, kv, inverse)
    assert_close(ours, truth, rtol=1e-13, atol=1e-13, name="partial rope")
    heads = qkv.view(B, s, h + 2 * kv, hd)
    assert torch.equal(ours.view_as(heads)[..., r:], heads[..., r:]), "pass-through dims modified"
    assert not torch.equal(ours.view_as(heads)[:, 1:, :h + kv, :r], heads[:, 1:, :h + kv, :r])


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["2d", "3d", "3d_bcast"])
@pytest.mark.parametrize("s,hd,h,kv,r", PARTIAL)
def test_partial_rope_kernel_matches_contract(s, hd, h, kv, r, kind, dtype, inverse):
    qkv, _ = make_inputs(s, hd, h, kv, dtype, seed=s + hd + r)
    cos, sin = rope_tables(B, s, r, kind, torch.float32)
    ours, contract = qkv.clone(), qkv.clone()
    ops.rope_(ours, cos, sin, h, kv, inverse)
    R.rope_(contract, cos, sin, h, kv, inverse)
    assert torch.equal(ours, contract), f"not bitwise equal to the contract: max diff {(ours - contract).abs().max()}"
    heads = qkv.view(B, s, h + 2 * kv, hd)
    assert torch.equal(ours.view_as(heads)[..., r:], heads[..., r:]), "pass-through dims modified"
    assert torch.equal(ours[..., (h + kv) * hd:], qkv[..., (h + kv) * hd:]), "v heads modified"
    if dtype == torch.float32:
        assert_fp32_close(ours, hf_partial_rope_fp64(qkv, cos, sin, h, kv, inverse), "partial rope")


def test_partial_rope_bad_width():
    qkv, _ = make_inputs(5, 8, 4, 2, torch.float32, seed=0)
    cos, sin = rope_tables(B, 5, 10, "2d", torch.float32)   # r = 10 > head_dim 8
    with pytest.raises(RuntimeError, match="rotary width"):
        ops.rope_(qkv.clone(), cos, sin, 4, 2, False)
    with pytest.raises(RuntimeError, match="rotary width"):
        ops.rope_(qkv.clone(), cos[:, :0], sin[:, :0], 4, 2, False)


# ---- opcheck and argument checks -----------------------------------------------------------
@pytest.mark.parametrize("mask_kind", ["none", "full_int32"])
def test_opcheck(mask_kind):
    h, kv, s, hd = 4, 2, 6, 8
    qkv, do = make_inputs(s, hd, h, kv, torch.float32, seed=0)
    mask = make_mask(mask_kind, B, s)
    cos, sin = rope_tables(B, s, hd, "2d", torch.float32)
    torch.library.opcheck(ops.rope_.default, (qkv.clone(), cos, sin, h, kv, False))
    torch.library.opcheck(ops.rope_.default, (qkv.clone(), cos[None].expand(B, s, hd // 2).contiguous(), sin[None]
                                              .expand(B, s, hd // 2).contiguous(), h, kv, True))
    torch.library.opcheck(ops.attention_fwd.default, (qkv, mask, h, kv, True, 0.35))
    o, lse = ops.attention_fwd(qkv, mask, h, kv, True, 0.35)
    torch.library.opcheck(ops.attention_bwd.default, (do, qkv, o, lse, mask, h, kv, True, 0.35))
    torch.library.opcheck(ops.attention_bwd_.default, (do, qkv.clone(), o, lse, mask, h, kv, True, 0.35))


def test_bad_arguments():
    qkv, do = make_inputs(5, 8, 4, 2, torch.float32, seed=0)
    cos, sin = rope_tables(B, 5, 8, "2d", torch.float32)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        ops.attention_fwd(qkv, None, 4, 3, False, 1.0)
    with pytest.raises(RuntimeError, match="positive multiple of num_heads"):
        ops.attention_fwd(qkv[..., :-1].contiguous(), None, 4, 2, False, 1.0)
    with pytest.raises(RuntimeError, match="qkv must be contiguous"):
        ops.rope_(qkv.transpose(0, 1), cos, sin, 4, 2, False)
    with pytest.raises(RuntimeError, match="even head_dim"):
        ops.rope_(torch.zeros(B, 5, 8 * 3), cos, sin, 4, 2, False)   # hd 3
    with pytest.raises(RuntimeError, match="cos must have shape"):
        ops.rope_(qkv.clone(), cos[:4], sin[:4], 4, 2, False)
    with pytest.raises(RuntimeError, match="sin must have cos's shape"):
        ops.rope_(qkv.clone(), cos, sin[:4], 4, 2, False)
    with pytest.raises(RuntimeError, match="key_mask must be bool or an integer"):
        ops.attention_fwd(qkv, torch.ones(B, 5), 4, 2, False, 1.0)
    with pytest.raises(RuntimeError, match="key_mask must have shape"):
        ops.attention_fwd(qkv, torch.ones(B, 4, dtype=torch.bool), 4, 2, False, 1.0)
    o, lse = ops.attention_fwd(qkv, None, 4, 2, False, 1.0)
    with pytest.raises(RuntimeError, match="lse must be Float"):
        ops.attention_bwd(do, qkv, o, lse.double(), None, 4, 2, False, 1.0)
    with pytest.raises(RuntimeError, match="do must have shape"):
        ops.attention_bwd(do[:, :4].contiguous(), qkv, o, lse, None, 4, 2, False, 1.0)


def test_thread_count_invariance():
    """Bitwise-equal results with 1 thread and with several (races, per-thread partial sums)."""
    h, kv, s, hd = 8, 2, 200, 64
    qkv, do = make_inputs(s, hd, h, kv, torch.float32, seed=9)
    mask = make_mask("left_int64", B, s)
    cos, sin = rope_tables(B, s, hd, "3d", torch.float32)

    def run():
        x = qkv.clone()
        ops.rope_(x, cos, sin, h, kv, False)
        o, lse = ops.attention_fwd(x, mask, h, kv, True, 0.125)
        return x, o, lse, ops.attention_bwd(do, x, o, lse, mask, h, kv, True, 0.125)

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, n))
        many = run()
    finally:
        torch.set_num_threads(n)
    for a, b, name in zip(one, many, ("rope", "o", "lse", "dqkv")):
        assert torch.equal(a, b), name
