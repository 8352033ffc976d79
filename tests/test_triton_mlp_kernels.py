"""Triton MLP elementwise kernels (activation fwd/bwd, dropout + residual) and their ckpt_ops::*_triton ops
against the contracts in ckpt_ops.reference.

Runs on CUDA when Triton compiles there, otherwise on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set below before Triton is imported). Grid: every activation x gated/not x dtype x shape
(each case runs act_fwd, act_bwd with need_a=True and with need_a=False); the shapes cover 1, 3, 127, 1000
and 4097 elements (one element, a ragged first block, exactly one block minus a tail, more than four blocks)
in 1-D, 2-D and 3-D. Dropout: p in {0, 0.1, 0.5, 0.9} x residual or not x dtype on 4097- and 1000-element
tensors, plus a direct check of the Philox bits for counters >= 2**32.
"""
import os
import sys
import warnings

import pytest

if os.environ.get("CKPT_OPS_TEST_TRITON", "1") != "0":  # the package conftest's opt-out of the slow interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`

import torch  # noqa: E402

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton_kernels.mlp as tm  # noqa: E402
from ckpt_ops import reference as ref  # noqa: E402

if not tm._interpreted() and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)
DEVICE = "cpu" if tm._interpreted() else "cuda"
OPS = torch.ops.ckpt_ops
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = {0: "gelu", 1: "gelu_tanh", 2: "relu", 3: "silu"}
SHAPES = [(1,), (3,), (127,), (8, 125), (17, 241), (2, 4, 125)]  # 1, 3, 127, 1000, 4097, 1000 elements

# numpy (the interpreter) warns when exp overflows to inf; the kernels are written so that inf is harmless
# (sigmoid = 1 / (1 + inf) = 0) and the tests check the results, so the warning is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _randn(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype)


def _act_inputs(shape, dtype, gated, seed=0):
    g = torch.Generator().manual_seed(seed)
    # scale 3: most mass in the curved part of every activation, tails reach the saturated regions (|x| ~ 12)
    h = _randn(shape, dtype, g, 3.0)
    gate = _randn(shape, dtype, g, 3.0) if gated else None
    da = _randn(shape, dtype, g)
    return h, gate, da


def _fail_msg(name, out, truth, tol):
    err = (out.double() - truth.double()).abs()
    bad = (err > tol).nonzero()
    return (f"{name}: {bad.shape[0]}/{truth.numel()} elements beyond tolerance, max err {err.max().item():.3g}, "
            f"first bad indices {bad[:5].tolist()}")


def _max_err(x, truth):
    return (x.double() - truth).abs().max().item() if truth.numel() else 0.0


def _assert_2x(name, out, peer, truth):
    """Max error vs the fp64 truth at most 2x the peer's, plus a floor: the DESIGN low-precision rule.

    16-bit: the peer is eager PyTorch in the output dtype (every op rounds to it), floor a quarter ulp of the
    largest value. fp32: the peer is the reference contract evaluated in fp32 (on the test's device: on a GPU,
    eager PyTorch's CUDA math), and the floor 4 ulps of the largest value under the interpreter (each output
    is 5-10 fp32 roundings; on a tensor of 1-3 elements the peer's error can be far below its typical ulp),
    16 on a GPU, where the compiled kernel's tl.exp is ex2.approx (2 ulp) and fp32 `/` div.full (2 ulp):
    2 x (up to 4 such operations x 2 ulp). ~2e-6 relative to the largest value, 50x tighter than DESIGN's
    rtol 1e-4."""
    scale = max(truth.abs().max().item(), 1.0) if truth.numel() else 1.0
    floor = (4.0 if tm._interpreted() else 16.0) if out.dtype == torch.float32 else 0.25
    tol = 2 * _max_err(peer, truth) + floor * torch.finfo(out.dtype).eps * scale
    err = _max_err(out, truth)
    assert err <= tol, _fail_msg(name, out, truth, tol) + f" (peer max err {_max_err(peer, truth):.3g})"


def _check_act_outputs(h, gate, da, act, a_fwd, bwd, need_a):
    a, dh, dg = bwd
    dtype = h.dtype
    for name, t, wanted in (("a", a, need_a), ("dh", dh, True), ("dg", dg, gate is not None)):
        assert t.dtype == dtype, f"{name}: dtype {t.dtype} != {dtype}"
        assert t.shape == (h.shape if wanted else (0,)), f"{name}: shape {tuple(t.shape)}"
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = ref.act_bwd(f64(da), f64(h), f64(gate), act, True)  # on the (already rounded) inputs
    if dtype == torch.float32:
        peer = ref.act_bwd(da, h, gate, act, True)  # the kernels' contract, fp32 math
    else:  # eager PyTorch in the low dtype: every op rounds to it
        a_, d_ = ref.act_and_grad(h if gate is None else gate, act)
        peer = (a_, da * d_, None) if gate is None else (a_ * h, da * a_, da * h * d_)
    outs = [("a_fwd", a_fwd, 0), ("dh", dh, 1)] + ([("a", a, 0)] if need_a else [])
    outs += [("dg", dg, 2)] if gate is not None else []
    for name, out, i in outs:
        _assert_2x(name, out, peer[i], truth[i])


# ----------------------------------------------------------------------------------------------------------
# activations
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", list(ACTS), ids=list(ACTS.values()))
def test_act(act, gated, dtype, shape):
    h, gate, da = _act_inputs(shape, dtype, gated)
    before = [t.clone() for t in (h, gate, da) if t is not None]
    a_fwd = OPS.act_fwd_triton(h, gate, act)
    assert a_fwd.shape == h.shape and a_fwd.dtype == dtype
    full = OPS.act_bwd_triton(da, h, gate, act, True)
    part = OPS.act_bwd_triton(da, h, gate, act, False)
    # the recomputed activation is the stored one, bit for bit (same helper, same launch options)
    assert torch.equal(full[0], a_fwd), "act_bwd's recomputed a differs from act_fwd's a"
    # need_a only decides whether a is written
    assert torch.equal(part[1], full[1]) and torch.equal(part[2], full[2])
    _check_act_outputs(h, gate, da, act, a_fwd, full, True)
    _check_act_outputs(h, gate, da, act, a_fwd, part, False)
    after = [t for t in (h, gate, da) if t is not None]
    assert all(torch.equal(u, v) for u, v in zip(before, after)), "an input was modified"


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("act", list(ACTS), ids=list(ACTS.values()))
def test_act_extremes(act, gated):
    # saturated tails (exp overflows to inf inside the sigmoids), signed zeros and tiny values: finite, and as
    # accurate as the reference in fp32
    x = torch.tensor([-1e4, -100.0, -30.0, -12.0, -5.0, -1e-30, -0.0, 0.0, 1e-30, 5.0, 12.0, 30.0, 100.0, 1e4],
                     device=DEVICE)
    h, gate = (x.flip(0).contiguous(), x) if gated else (x, None)
    da = torch.ones_like(x)
    a_fwd = OPS.act_fwd_triton(h, gate, act)
    bwd = OPS.act_bwd_triton(da, h, gate, act, True)
    for t in (a_fwd,) + tuple(bwd):
        assert bool(torch.isfinite(t).all()), t
    _check_act_outputs(h, gate, da, act, a_fwd, bwd, True)


def test_relu_nan_propagates():
    h = torch.tensor([float("nan"), -1.0, 2.0], device=DEVICE)
    assert torch.equal(OPS.act_fwd_triton(h, None, 2).isnan(), torch.tensor([True, False, False], device=DEVICE))


# ----------------------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------------------
SEED = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)  # a high word that matters


def _seed(value=None):
    return (SEED if value is None else torch.tensor([value], dtype=torch.int64)).to(DEVICE)


def _mask(shape, dtype, seed, p):
    """The keep mask as the kernels see it: dropout of all-ones, no residual (kept -> scale > 0, dropped -> 0)."""
    return OPS.dropout_fwd_triton(torch.ones(shape, dtype=dtype, device=DEVICE), None, seed, p) != 0


@pytest.mark.parametrize("shape", [(17, 241), (2, 4, 125)], ids=["17x241", "2x4x125"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout(p, residual, dtype, shape):
    g = torch.Generator().manual_seed(1)
    y, dout = _randn(shape, dtype, g), _randn(shape, dtype, g)
    r = _randn(shape, dtype, g) if residual else None
    seed = _seed()
    before = [t.clone() for t in (y, dout, r, seed) if t is not None]
    out = OPS.dropout_fwd_triton(y, r, seed, p)
    dy = OPS.dropout_bwd_triton(dout, seed, p)
    assert out.shape == dy.shape == y.shape and out.dtype == dy.dtype == dtype
    # both kernels compute in fp32 and round once, exactly like the reference: bitwise equal in every dtype
    assert torch.equal(out, ref.dropout_fwd(y, r, seed, p)), "dropout_fwd differs from the reference"
    assert torch.equal(dy, ref.dropout_bwd(dout, seed, p)), "dropout_bwd differs from the reference"
    keep = (ref.dropout_keep_mask(seed, y.numel(), p, DEVICE).view(shape) if p > 0
            else torch.ones_like(y, dtype=torch.bool))
    assert torch.equal(_mask(shape, dtype, seed, p), keep), "forward mask differs from the reference's"
    # the backward rebuilds the forward's mask from the seed
    assert torch.equal(OPS.dropout_bwd_triton(torch.ones_like(dout), seed, p) != 0, keep)
    if p > 0:  # keep rate 1 - p within 5 binomial standard deviations
        n = keep.numel()
        assert abs(keep.sum().item() - (1 - p) * n) <= 5 * (p * (1 - p) * n) ** 0.5
    after = [t for t in (y, dout, r, seed) if t is not None]
    assert all(torch.equal(u, v) for u, v in zip(before, after)), "an input was modified"


@pytest.mark.parametrize("numel", [1, 3, 127, 1000])
def test_dropout_small_sizes(numel):
    y = torch.randn(numel, device=DEVICE)
    r = torch.randn(numel, device=DEVICE)
    assert torch.equal(OPS.dropout_fwd_triton(y, r, _seed(), 0.5), ref.dropout_fwd(y, r, _seed(), 0.5))


@pytest.mark.parametrize("seed", [0, 1, -1, -(2 ** 63), 2 ** 63 - 1, 2 ** 32, 0xFFFF_FFFF])
def test_dropout_seeds(seed):
    # negative seeds and seeds differing only in the high word: the key is (seed lo, seed hi) of the int64
    y = torch.randn(1000, device=DEVICE)
    s = _seed(seed)
    assert torch.equal(OPS.dropout_fwd_triton(y, None, s, 0.5), ref.dropout_fwd(y, None, s, 0.5))


def test_dropout_seed_changes_mask():
    shape, dtype = (1000,), torch.float32
    assert not torch.equal(_mask(shape, dtype, _seed(1), 0.5), _mask(shape, dtype, _seed(2), 0.5))
    assert not torch.equal(_mask(shape, dtype, _seed(1), 0.5), _mask(shape, dtype, _seed(1 + 2 ** 32), 0.5))


@triton.jit
def _philox_bits_kernel(SEED, OUT, base, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bits = tm._dropout_bits(tl.load(SEED), offs + base)
    tl.store(OUT + offs, bits.to(tl.int64), mask=offs < n)  # uint32 -> int64 zero-extends


@pytest.mark.parametrize("base", [0, 2 ** 34 - 702, 2 ** 40 + 12345, 2 ** 62 + 1])
def test_philox_bits_large_index(base):
    # all 32 bits of the kernel's dropout bits against reference.dropout_bits, for Philox counters whose
    # high word is 0, crosses 2**32 inside the block, and is large; bases not a multiple of 4 included
    n = 1500
    out = torch.empty(n, dtype=torch.int64, device=DEVICE)
    _philox_bits_kernel[(triton.cdiv(n, 1024),)](_seed(), out, base, n, BLOCK=1024)
    idx = torch.arange(base, base + n, dtype=torch.int64, device=DEVICE)
    assert torch.equal(out, ref.dropout_bits(int(SEED.item()), idx))


@pytest.mark.parametrize("base", [2 ** 34 - 700, 2 ** 40 + 12345])
def test_dropout_large_index(base):
    # the dropout kernel itself past 2**32: the launcher's index_base shifts the Philox counter (not memory)
    y = torch.ones(1500, device=DEVICE)
    keep = tm._dropout(y, None, _seed(), 0.3, index_base=base) != 0
    idx = torch.arange(base, base + y.numel(), dtype=torch.int64, device=DEVICE)
    assert torch.equal(keep, ref.dropout_bits(int(SEED.item()), idx) >= ref.dropout_threshold(0.3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_scale_and_threshold(dtype):
    for p in (0.0, 1e-12, 0.1, 0.3, 1 / 3, 0.5, 0.9, 0.999, 1 - 2 ** -30):
        assert tm._dropout_scale(p) == ref.dropout_scale(p, dtype), p
        assert tm._dropout_threshold(p) == ref.dropout_threshold(p), p


# ----------------------------------------------------------------------------------------------------------
# argument checks, empty tensors, registration
# ----------------------------------------------------------------------------------------------------------
def test_bad_arguments():
    x = torch.randn(8, device=DEVICE)
    with pytest.raises(ValueError, match="activation"):
        OPS.act_fwd_triton(x, None, 4)
    with pytest.raises(ValueError, match="g must match"):
        OPS.act_fwd_triton(x, torch.randn(9, device=DEVICE), 0)
    with pytest.raises(ValueError, match="da must match"):
        OPS.act_bwd_triton(x.half(), x, None, 0, True)
    with pytest.raises(TypeError, match="float16"):
        OPS.act_fwd_triton(x.double(), None, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        OPS.dropout_fwd_triton(x, None, _seed(), 1.0)
    with pytest.raises(ValueError, match="seed"):
        OPS.dropout_bwd_triton(x, _seed().int(), 0.5)


def test_empty():
    x = torch.empty(0, 5, device=DEVICE)
    assert OPS.act_fwd_triton(x, x, 3).shape == (0, 5)
    a, dh, dg = OPS.act_bwd_triton(x, x, None, 1, True)
    assert a.shape == dh.shape == (0, 5) and dg.shape == (0,)
    assert OPS.dropout_fwd_triton(x, x, _seed(), 0.5).shape == (0, 5)
    assert OPS.dropout_bwd_triton(x, _seed(), 0.5).shape == (0, 5)


def test_schemas():
    expected = {
        "act_fwd_triton": "ckpt_ops::act_fwd_triton(Tensor h, Tensor? g, int activation) -> Tensor",
        "act_bwd_triton": "ckpt_ops::act_bwd_triton(Tensor da, Tensor h, Tensor? g, int activation, bool need_a) "
                          "-> (Tensor a, Tensor dh, Tensor dg)",
        "dropout_fwd_triton": "ckpt_ops::dropout_fwd_triton(Tensor y, Tensor? residual, Tensor seed, float p) "
                              "-> Tensor",
        "dropout_bwd_triton": "ckpt_ops::dropout_bwd_triton(Tensor dout, Tensor seed, float p) -> Tensor",
    }
    for name, schema in expected.items():
        assert str(getattr(OPS, name).default._schema) == schema


def test_opcheck():
    # fake-tensor, schema, autograd-registration and AOT-dispatch checks of every op and every optional input
    g = torch.Generator().manual_seed(2)
    h, gate, da = (_randn((3, 33), torch.float32, g) for _ in range(3))
    seed = _seed()
    cases = [
        (OPS.act_fwd_triton, (h, None, 1)),
        (OPS.act_fwd_triton, (h, gate, 3)),
        (OPS.act_bwd_triton, (da, h, None, 0, True)),
        (OPS.act_bwd_triton, (da, h, gate, 1, False)),
        (OPS.dropout_fwd_triton, (h, None, seed, 0.5)),
        (OPS.dropout_fwd_triton, (h, gate, seed, 0.0)),
        (OPS.dropout_bwd_triton, (da, seed, 0.1)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for op, args in cases:
            torch.library.opcheck(op, args)
