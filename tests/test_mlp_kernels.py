"""The extension's MLP elementwise ops (torch.ops.ckpt_ops.act_fwd / act_bwd / dropout_fwd /
dropout_bwd) on CPU against their contracts, the pure-torch functions of ckpt_ops.reference.

Tolerances, and why:
* fp32 / fp64: the kernels evaluate the reference's expressions in the same order in the same
  accumulation dtype; they differ from it only by the libm erf/tanh/exp (vs torch's vectorised
  ones, each within ~1 ulp), carried through a handful of roundings. So they are held to a few
  ulps of the fp64 truth (the contract evaluated in fp64 on the same inputs): |err| <= 16 eps
  (|truth| + max|truth|); a wrong constant or a missing term is off by orders more.
* fp16 / bf16: the kernels compute in fp32 and round once, as the contract does, so the result is
  the contract's in the same dtype up to one rounding flip (1 ulp of the output dtype); and the
  DESIGN §4 rule: error vs the fp64 truth at most 2x that of eager PyTorch in that dtype.
* dropout: out = residual + where(keep, y * scale, 0) in the accumulation dtype, rounded once --
  the same operations as the contract, so the output is bitwise equal in every dtype (and the
  mask, which is integer Philox arithmetic -- word i mod 4 of Philox4x32-10 at counter i // 4 -- is
  identical by construction).
"""
import pytest
import torch
import torch.nn.functional as F

from ckpt_ops import _backend
from ckpt_ops import reference as R
from conftest import assert_close, assert_low_precision_ok

pytestmark = pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")
ops = torch.ops.ckpt_ops

ACTS = {0: "gelu", 1: "gelu_tanh", 2: "relu", 3: "silu"}
EAGER = {0: F.gelu, 1: lambda x: F.gelu(x, approximate="tanh"), 2: F.relu, 3: F.silu}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(1,), (3,), (127,), (1000,), (4097,), (31, 33), (2, 5, 13)]
PS = [0.0, 0.1, 0.5, 0.9]


def rand(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def make_act(shape, dtype, gated, seed=0):
    h = rand(shape, dtype, seed)
    g = rand(shape, dtype, seed + 1) if gated else None
    da = rand(shape, dtype, seed + 2, scale=1.0)
    return h, g, da


def eager_act(h, g, da, act):
    """Plain PyTorch in h's dtype, differentiated by autograd: (a, dh, dg or None)."""
    h = h.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_() if g is not None else None
    a = EAGER[act](h) if g is None else EAGER[act](g) * h
    grads = torch.autograd.grad(a, [h] + ([g] if g is not None else []), da)
    return a.detach(), grads[0], grads[1] if g is not None else None


def assert_few_ulps(actual, truth, dtype, name):
    eps = torch.finfo(dtype).eps
    scale = float(truth.abs().max()) if truth.numel() else 1.0
    assert_close(actual, truth, rtol=16 * eps, atol=16 * eps * max(scale, 1.0), name=name)


def assert_one_rounding(actual, contract, dtype, name):
    # one rounding flip of the output dtype; the atol covers fp32-level cancellation (a derivative
    # near its zero) and fp16 subnormals
    scale = float(contract.float().abs().max()) if contract.numel() else 1.0
    atol = max(torch.finfo(dtype).tiny, 8 * torch.finfo(torch.float32).eps * scale)
    assert_close(actual, contract, rtol=torch.finfo(dtype).eps, atol=atol, name=name)


# ---- activations -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", list(ACTS), ids=ACTS.get)
def test_act_matches_contract(act, gated, dtype, shape):
    h, g, da = make_act(shape, dtype, gated, seed=len(shape) * 7 + shape[-1])
    before = [t.clone() for t in (h, g, da) if t is not None]
    a = ops.act_fwd(h, g, act)
    a2, dh, dg = ops.act_bwd(da, h, g, act, True)
    a_none, dh_none, dg_none = ops.act_bwd(da, h, g, act, False)

    # outputs not requested are empty tensors of h's dtype; the rest has h's shape and dtype
    assert a_none.numel() == 0 and a_none.dtype == dtype
    assert (dg.numel() == 0) == (not gated) and dg.dtype == dtype
    for t in (a, a2, dh) + ((dg,) if gated else ()):
        assert t.shape == h.shape and t.dtype == dtype and t.is_contiguous()
    # the backward's recompute of `a` is the forward's, bit for bit; need_a changes nothing else
    assert torch.equal(a, a2), "act_bwd recomputed a differently from act_fwd"
    assert torch.equal(dh, dh_none) and torch.equal(dg, dg_none)
    for t, b in zip([t for t in (h, g, da) if t is not None], before):
        assert torch.equal(t, b), "an input was modified"

    names = ("a", "dh", "dg")
    ours = (a, dh, dg) if gated else (a, dh)
    wide = torch.float64
    truth = R.act_bwd(da.to(wide), h.to(wide), g.to(wide) if gated else None, act, True)
    if dtype in (torch.float32, torch.float64):
        for name, o, t in zip(names, ours, truth):
            assert_few_ulps(o, t, dtype, f"{ACTS[act]} {name}")
        return
    contract = R.act_bwd(da, h, g, act, True)
    eager = eager_act(h, g, da, act)
    for name, o, c, e, t in zip(names, ours, contract, eager, truth):
        assert_one_rounding(o, c, dtype, f"{ACTS[act]} {name} vs contract")
        assert_low_precision_ok(o, e, t, f"{ACTS[act]} {name} vs eager {dtype}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", list(ACTS), ids=ACTS.get)
@pytest.mark.parametrize("need_a", [False, True], ids=["no_a", "a"])
def test_act_bwd_in_place_equals_act_bwd(act, gated, dtype, shape, need_a):
    """act_bwd_ writes dh into da (the CPU backward's allocation saver): bitwise act_bwd's
    results, h and g untouched, da's storage reused."""
    h, g, da = make_act(shape, dtype, gated, seed=len(shape) * 11 + shape[-1])
    a, dh, dg = ops.act_bwd(da, h, g, act, need_a)
    h0, g0 = h.clone(), None if g is None else g.clone()
    buf = da.clone()
    ptr = buf.data_ptr()
    a2, dg2 = ops.act_bwd_(buf, h, g, act, need_a)
    assert buf.data_ptr() == ptr
    assert torch.equal(buf, dh) and torch.equal(a2, a) and torch.equal(dg2, dg)
    assert torch.equal(h, h0) and (g is None or torch.equal(g, g0))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", list(ACTS), ids=ACTS.get)
def test_act_bwd_rebuild_in_place_equals_act_bwd(act, gated, dtype, shape):
    """act_bwd_rebuild_ (the CPU backward that may free h and g) leaves every output on its
    input: a in h, dh in da, dg in g -- bitwise act_bwd's results, no storage moved."""
    h, g, da = make_act(shape, dtype, gated, seed=len(shape) * 13 + shape[-1])
    a, dh, dg = ops.act_bwd(da, h, g, act, True)
    hb, db, gb = h.clone(), da.clone(), None if g is None else g.clone()
    ptrs = [t.data_ptr() for t in (hb, db, gb) if t is not None]
    assert ops.act_bwd_rebuild_(db, hb, gb, act) is None
    assert [t.data_ptr() for t in (hb, db, gb) if t is not None] == ptrs
    assert torch.equal(hb, a) and torch.equal(db, dh)
    assert gb is None or torch.equal(gb, dg)


def test_act_bwd_rebuild_rejects_overlapping_buffers():
    """Two outputs on one buffer would be silently wrong: a clear error instead."""
    h, g, da = make_act((4, 64), torch.float32, True, seed=3)
    with pytest.raises(RuntimeError, match="memory location"):
        ops.act_bwd_rebuild_(h, h, None, 0)
    with pytest.raises(RuntimeError, match="memory location"):
        ops.act_bwd_rebuild_(da, h, da, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.act_bwd_rebuild_(da.t(), h.t(), None, 0)


@pytest.mark.parametrize("act", list(ACTS), ids=ACTS.get)
def test_act_special_values(act):
    """Large |x| (saturated tanh / exp overflow in the sigmoid) and exact zeros stay finite and
    match the fp64 truth."""
    h = torch.tensor([-100.0, -30.0, -10.0, -1e-3, 0.0, 1e-3, 10.0, 30.0, 100.0])
    da = torch.ones_like(h)
    a, dh, _ = ops.act_bwd(da, h, None, act, True)
    ta, tdh, _ = R.act_bwd(da.double(), h.double(), None, act, True)
    assert torch.isfinite(a).all() and torch.isfinite(dh).all()
    assert_few_ulps(a, ta, torch.float32, "a")
    assert_few_ulps(dh, tdh, torch.float32, "dh")


def test_act_empty_and_thread_count_independent():
    for gated in (False, True):
        h, g, da = make_act((0, 5), torch.float32, gated)
        assert ops.act_fwd(h, g, 1).shape == (0, 5)
        assert ops.act_bwd(da, h, g, 1, True)[1].shape == (0, 5)
    h, g, da = make_act((300, 1000), torch.float32, True)
    threads = torch.get_num_threads()
    many = ops.act_bwd(da, h, g, 0, True)
    torch.set_num_threads(1)
    try:
        one = ops.act_bwd(da, h, g, 0, True)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(many, one))


# ---- dropout ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1,), (127,), (4097,), (3, 1000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("residual", [False, True], ids=["noresid", "resid"])
@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_fwd_bitwise_equal_to_contract(dtype, p, residual, shape):
    y = rand(shape, dtype, 1)
    res = rand(shape, dtype, 2) if residual else None
    seed = torch.tensor([1234567], dtype=torch.int64)
    before = [y.clone(), res.clone() if residual else None, seed.clone()]
    out = ops.dropout_fwd(y, res, seed, p)
    ref = R.dropout_fwd(y, res, seed, p)
    assert out.dtype == dtype and out.shape == y.shape
    assert torch.equal(out, ref), f"{int((out != ref).sum())} of {out.numel()} elements differ"
    # the mask itself, independent of the values: dropout of ones
    ones = torch.ones(shape, dtype=dtype)
    mask = ops.dropout_fwd(ones, None, seed, p) != 0
    assert torch.equal(mask.reshape(-1), R.dropout_keep_mask(seed, y.numel(), p, y.device))
    assert torch.equal(y, before[0]) and torch.equal(seed, before[2])
    if residual:
        assert torch.equal(res, before[1])


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_bwd_rebuilds_forward_mask(dtype, p):
    shape = (7, 331)
    y = torch.rand(shape, generator=torch.Generator().manual_seed(3)).add(0.5).to(dtype)  # no zeros
    dout = torch.rand(shape, generator=torch.Generator().manual_seed(4)).add(0.5).to(dtype)
    dout_before = dout.clone()
    seed = torch.tensor([987654321987], dtype=torch.int64)
    out = ops.dropout_fwd(y, None, seed, p)
    dy = ops.dropout_bwd(dout, seed, p)
    assert torch.equal(out != 0, dy != 0)
    assert torch.equal(dy, R.dropout_bwd(dout, seed, p))
    assert torch.equal(dout, dout_before)
    if p == 0.0:
        assert torch.equal(dy, dout) and torch.equal(out, y)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_unbiased(p):
    n = 1 << 20
    y = torch.ones(n)
    seed = torch.tensor([42], dtype=torch.int64)
    out = ops.dropout_fwd(y, None, seed, p)
    kept = (out != 0).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 6 * sigma, (kept, 1 - p)
    assert abs(out.double().mean().item() - 1.0) < 6 * sigma / (1 - p)
    assert torch.all((out == 0) | (out == R.dropout_scale(p, torch.float32)))


def test_dropout_seeds():
    shape = (4096,)
    y = torch.ones(shape)
    masks = {}
    for s in (0, 1, 2, 2**32, 2**32 + 1, 2**40 + 3, -5, 2**63 - 1):
        seed = torch.tensor([s], dtype=torch.int64)
        out = ops.dropout_fwd(y, None, seed, 0.5)
        assert torch.equal(out, R.dropout_fwd(y, None, seed, 0.5)), s
        masks[s] = out != 0
        # the same seed gives the same mask
        assert torch.equal(masks[s], ops.dropout_fwd(y, None, seed, 0.5) != 0)
    vals = list(masks.values())
    for i in range(len(vals)):
        for j in range(i + 1, len(vals)):
            assert not torch.equal(vals[i], vals[j]), "two seeds gave the same mask"


def test_philox_reference_known_answer():
    """The reference generator is Philox4x32-10 itself: Random123's known-answer vector for counter 0,
    key 0 (kat_vectors: philox4x32 10 00000000 ... -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8), and each
    element draws word (i mod 4) of counter i // 4."""
    words = [int(w[0]) for w in R.philox4x32_10(0, torch.zeros(1, dtype=torch.int64))]
    assert words == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    seed = 2**40 + 77
    idx = torch.arange(4 * 5, 4 * 9, dtype=torch.int64)
    per_counter = torch.stack(R.philox4x32_10(seed, torch.arange(5, 9, dtype=torch.int64)), dim=1)
    assert torch.equal(R.dropout_bits(seed, idx), per_counter.reshape(-1))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [2 * 32768 + 7, 3 * 32768 + 2])
def test_dropout_chunks_starting_mid_tile(n, threads):
    """The CPU kernel evaluates Philox once per four elements in tiles aligned to 4; OpenMP chunks can
    start anywhere (n / threads is not a multiple of 4 here): bits stay those of the reference."""
    y, res = rand((n,), torch.float32, 7), rand((n,), torch.float32, 8)
    seed = torch.tensor([2**33 + 5], dtype=torch.int64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = ops.dropout_fwd(y, res, seed, 0.3)
        dy = ops.dropout_bwd(y, seed, 0.3)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out, R.dropout_fwd(y, res, seed, 0.3))
    assert torch.equal(dy, R.dropout_bwd(y, seed, 0.3))


def test_dropout_neighbours_independent():
    """Four neighbouring elements share one Philox evaluation (different words): their keep decisions
    must still be independent -- joint keep rate of each neighbour pair (i, i+1..3) ~ (1 - p)^2."""
    n, p = 1 << 20, 0.5
    keep = ops.dropout_fwd(torch.ones(n), None, torch.tensor([99], dtype=torch.int64), p) != 0
    for lag in (1, 2, 3, 4):
        joint = (keep[:-lag] & keep[lag:]).double().mean().item()
        sigma = ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5
        assert abs(joint - (1 - p) ** 2) < 6 * sigma, (lag, joint)


def test_dropout_empty_and_thread_count_independent():
    seed = torch.tensor([7], dtype=torch.int64)
    assert ops.dropout_fwd(torch.empty(0, 3), None, seed, 0.5).shape == (0, 3)
    assert ops.dropout_bwd(torch.empty(0), seed, 0.5).shape == (0,)
    y, res = rand((200, 1000), torch.float32, 5), rand((200, 1000), torch.float32, 6)
    threads = torch.get_num_threads()
    many = ops.dropout_fwd(y, res, seed, 0.3)
    torch.set_num_threads(1)
    try:
        one = ops.dropout_fwd(y, res, seed, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many, one)


# ---- op registration and argument checks ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    h, g, da = make_act((5, 17), dtype, True)
    seed = torch.tensor([11], dtype=torch.int64)
    for act in ACTS:
        for gate in (None, g):
            torch.library.opcheck(ops.act_fwd, (h, gate, act))
            for need_a in (True, False):
                torch.library.opcheck(ops.act_bwd, (da, h, gate, act, need_a))
    for p in (0.0, 0.25):
        torch.library.opcheck(ops.dropout_fwd, (h, g, seed, p))
        torch.library.opcheck(ops.dropout_fwd, (h, None, seed, p))
        torch.library.opcheck(ops.dropout_bwd, (da, seed, p))


def test_bad_arguments():
    h = torch.randn(4, 6)
    seed = torch.tensor([1], dtype=torch.int64)
    bad = [
        (lambda: ops.act_fwd(h, None, 4), "activation"),
        (lambda: ops.act_fwd(h, None, -1), "activation"),
        (lambda: ops.act_fwd(h.t(), None, 0), "contiguous"),
        (lambda: ops.act_fwd(h.long(), None, 0), "float16"),
        (lambda: ops.act_fwd(h, torch.randn(4, 5), 0), "g must have shape"),
        (lambda: ops.act_fwd(h, h.double(), 0), "g must have dtype"),
        (lambda: ops.act_bwd(torch.randn(6, 4), h, None, 0, True), "da must have shape"),
        (lambda: ops.dropout_fwd(h, None, seed, 1.0), "0 <= p < 1"),
        (lambda: ops.dropout_fwd(h, None, seed, -0.1), "0 <= p < 1"),
        (lambda: ops.dropout_fwd(h, None, seed, float("nan")), "0 <= p < 1"),
        (lambda: ops.dropout_fwd(h, None, torch.tensor([1, 2]), 0.5), "seed"),
        (lambda: ops.dropout_fwd(h, None, torch.tensor([1.0]), 0.5), "seed"),
        (lambda: ops.dropout_fwd(h, torch.randn(4, 5), seed, 0.5), "residual must have shape"),
        (lambda: ops.dropout_bwd(h.t(), seed, 0.5), "contiguous"),
    ]
    for fn, msg in bad:
        with pytest.raises(RuntimeError, match=msg):
            fn()
