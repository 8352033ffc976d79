"""LayerNorm / RMSNorm on every backend available here, against the eager PyTorch computation in
fp64 (the "truth"), plus the checkpoint contract: saved bytes, partial requires_grad, no_grad,
retain_graph, untouched inputs, compile, opcheck, gradcheck, bad input."""
import pytest
import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import _backend
from ckpt_ops import functional as cf
from conftest import (DEVICE, assert_fp32_close, assert_low_precision_ok, available_backends)

KINDS = ["layer_norm", "rms_norm"]
BACKENDS = available_backends("layer_norm")
WIDTHS = [1, 3, 127, 768, 1000, 4097]
EPS = 1e-5


def make(shape, dtype=torch.float32, seed=0, affine=(True, True), requires=(True, True, True)):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 3).to(DEVICE, dtype)  # offset: centering matters
    w = (torch.randn(n, generator=g) * 0.5 + 1).to(DEVICE, dtype) if affine[0] else None
    b = (torch.randn(n, generator=g) * 0.1).to(DEVICE, dtype) if affine[1] else None
    dy = torch.randn(shape, generator=g).to(DEVICE, dtype)
    for t, r in zip((x, w, b), requires):
        if t is not None:
            t.requires_grad_(r)
    return x, w, b, dy


def ours(kind, x, w, b, backend, eps=EPS):
    if kind == "layer_norm":
        return cf.layer_norm(x, x.shape[-1:], w, b, eps, backend=backend)
    return cf.rms_norm(x, x.shape[-1:], w, eps, backend=backend)


def eager(kind, x, w, b, eps=EPS):
    if kind == "layer_norm":
        return F.layer_norm(x, x.shape[-1:], w, b, eps)
    return F.rms_norm(x, x.shape[-1:], w, eps)


def grads_of(fn, tensors, x, w, b, dy):
    """Run fn(x, w, b), backprop dy, return (out, [grad or None for x, w, b])."""
    out = fn(x, w, b)
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    gs = torch.autograd.grad(out, leaves, dy) if leaves else []
    it = iter(gs)
    return out, [next(it) if (t is not None and t.requires_grad) else None for t in tensors]


def detached_like(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def check_vs_truth(kind, backend, x, w, b, dy):
    b = b if kind == "layer_norm" else None
    tensors = (x, w, b)
    out, g = grads_of(lambda *a: ours(kind, *a, backend), tensors, x, w, b, dy)
    t64 = [detached_like(t, torch.float64) for t in tensors]
    ref, gref = grads_of(lambda *a: eager(kind, *a), t64, *t64, dy.double())
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.dtype in (torch.float32, torch.float64):
        t32 = [detached_like(t, x.dtype) for t in tensors]
        e32, ge32 = grads_of(lambda *a: eager(kind, *a), t32, *t32, dy)
        assert_fp32_close(out, ref, "y", eager_fp32=e32)
        for name, a, r, e in zip(("dx", "dweight", "dbias"), g, gref, ge32):
            assert (a is None) == (r is None), name
            if a is not None:
                assert_fp32_close(a, r, name, eager_fp32=e)
    else:
        tl = [detached_like(t, x.dtype) for t in tensors]
        low, glow = grads_of(lambda *a: eager(kind, *a), tl, *tl, dy)
        assert_low_precision_ok(out, low, ref, "y")
        for name, a, lo, r in zip(("dx", "dweight", "dbias"), g, glow, gref):
            if a is not None:
                assert_low_precision_ok(a, lo, r, name, floor=1e-3 * 2 ** -8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)], ids=["wb", "w", "none"])
def test_fp32_matches_truth(backend, kind, n, affine):
    check_vs_truth(kind, backend, *make((3, n), affine=affine))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 127), (2, 3, 768), (4, 2, 3, 5)], ids=["one_row", "3d", "4d"])
def test_shapes(backend, kind, shape):
    check_vs_truth(kind, backend, *make(shape, seed=1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n", [127, 1000])
def test_low_precision_2x_rule(backend, kind, dtype, n):
    check_vs_truth(kind, backend, *make((16, n), dtype=dtype, seed=2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["transposed", "strided_last_dim"])
def test_non_contiguous(backend, kind, layout):
    x, w, b, _ = make((3, 5, 40), seed=3)
    base = x.detach()
    if layout == "transposed":
        x = base.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous rows
        x = base.transpose(0, 1)
        dy = torch.randn(x.shape).to(DEVICE)
    else:
        x = torch.cat([base, base], -1)[..., ::2]  # last-dim stride 2
        dy = torch.randn(x.shape).to(DEVICE)
    assert not x.is_contiguous()
    x.requires_grad_()
    check_vs_truth(kind, backend, x, w, b, dy)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("requires", [(True, False, False), (False, True, True), (False, True, False),
                                      (False, False, True), (True, True, False)],
                         ids=["input_only", "frozen_input", "weight_only", "bias_only", "frozen_bias"])
def test_partial_requires_grad_grads_and_saved_bytes(backend, kind, requires):
    if kind == "rms_norm" and requires == (False, False, True):
        pytest.skip("RMSNorm has no bias")
    x, w, b, dy = make((6, 33), requires=requires, seed=4)
    check_vs_truth(kind, backend, x, w, b, dy)
    # Budget: x + per-row stats when dx or dweight is needed, nothing when only the bias trains.
    bb = b if kind == "layer_norm" else None
    saved = ckpt_ops.saved_bytes(ours, kind, x, w, bb, backend)
    need_x_or_w = requires[0] or requires[1]
    rows = 6
    stats = rows * 4 * (2 if kind == "layer_norm" else 1)
    expected = x.numel() * x.element_size() + stats if need_x_or_w else 0
    # w is a plain tensor here (not an nn.Parameter): it is saved with x and counted too.
    if need_x_or_w:
        expected += w.numel() * w.element_size()
    assert saved == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_module_saved_bytes_exact_and_no_grad(backend, kind):
    mod = (ckpt_ops.nn.LayerNorm(96) if kind == "layer_norm" else ckpt_ops.nn.RMSNorm(96)).to(DEVICE)
    mod.backend = backend
    x = torch.randn(4, 7, 96, device=DEVICE, requires_grad=True)
    stats_per_row = 8 if kind == "layer_norm" else 4
    assert ckpt_ops.saved_bytes(mod, x) == x.numel() * 4 + 28 * stats_per_row
    with torch.no_grad():
        assert ckpt_ops.saved_bytes(mod, x) == 0
    # Eager saves at least as much (x, stats; and RMSNorm's composite saves more).
    ref = (torch.nn.LayerNorm(96) if kind == "layer_norm" else torch.nn.RMSNorm(96)).to(DEVICE)
    assert ckpt_ops.saved_bytes(ref, x) >= ckpt_ops.saved_bytes(mod, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_retain_graph_twice_and_inputs_untouched(backend, kind):
    x, w, b, dy = make((5, 64), seed=5)
    b = b if kind == "layer_norm" else None
    snapshots = [t.detach().clone() for t in (x, w, dy)]
    out = ours(kind, x, w, b, backend)
    leaves = [t for t in (x, w, b) if t is not None]
    g1 = torch.autograd.grad(out, leaves, dy, retain_graph=True)
    g2 = torch.autograd.grad(out, leaves, dy)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)
    for t, s in zip((x, w, dy), snapshots):
        assert torch.equal(t.detach(), s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_sum_backward_zero_stride_grad(backend, kind):
    x, w, b, _ = make((4, 50), seed=6)
    b = b if kind == "layer_norm" else None
    ours(kind, x, w, b, backend).sum().backward()  # grad_output is an expanded (stride 0) tensor
    t64 = [detached_like(t, torch.float64) for t in (x, w, b)]
    eager(kind, *t64).sum().backward()
    for a, r, name in zip((x, w, b), t64, ("dx", "dweight", "dbias")):
        if a is not None:
            assert_fp32_close(a.grad, r.grad, name, atol=1e-5)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(backend, kind):
    x, w, b, _ = make((3, 5), dtype=torch.float64, seed=7)
    if kind == "layer_norm":
        fn = lambda x, w, b: cf.layer_norm(x, (5,), w, b, 1e-5, backend=backend)  # noqa: E731
        inputs = (x, w, b)
    else:
        fn = lambda x, w: cf.rms_norm(x, (5,), w, 1e-5, backend=backend)  # noqa: E731
        inputs = (x, w)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_extension_ops(kind, dtype):
    x, w, b, dy = make((7, 19), dtype=dtype, requires=(False, False, False), seed=8)
    if kind == "layer_norm":
        y, mean, rstd = torch.ops.ckpt_ops.layer_norm_fwd(x, w, b, EPS)
        torch.library.opcheck(torch.ops.ckpt_ops.layer_norm_fwd, (x, w, b, EPS))
        torch.library.opcheck(torch.ops.ckpt_ops.layer_norm_fwd, (x, None, None, EPS))
        for flags in [(True, True, True), (False, True, False), (True, False, False)]:
            torch.library.opcheck(torch.ops.ckpt_ops.layer_norm_bwd, (dy, x, w, mean, rstd, *flags))
    else:
        y, rstd = torch.ops.ckpt_ops.rms_norm_fwd(x, w, EPS)
        torch.library.opcheck(torch.ops.ckpt_ops.rms_norm_fwd, (x, w, EPS))
        for flags in [(True, True), (False, True), (True, False)]:
            torch.library.opcheck(torch.ops.ckpt_ops.rms_norm_bwd, (dy, x, w, rstd, *flags))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_compile_fullgraph(backend, kind):
    torch._dynamo.reset()
    mod = (ckpt_ops.nn.LayerNorm(32) if kind == "layer_norm" else ckpt_ops.nn.RMSNorm(32)).to(DEVICE)
    mod.backend = backend
    # Inductor cannot generate code for user Triton kernels on CPU tensors (interpreter mode);
    # aot_eager still traces the whole graph (fullgraph) through the fake implementations.
    compiler = "aot_eager" if (backend == "triton" and DEVICE.type == "cpu") else "inductor"
    compiled = torch.compile(mod, fullgraph=True, backend=compiler)
    x = torch.randn(2, 5, 32, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = compiled(x)
    y.backward(torch.ones_like(y))
    yr = mod(x2)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Drop-in modules
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(elementwise_affine=True, bias=True), dict(elementwise_affine=True, bias=False),
                                 dict(elementwise_affine=False)])
def test_layer_norm_module_is_drop_in(cfg):
    ref = torch.nn.LayerNorm((4, 6), eps=1e-6, **cfg)
    mod = ckpt_ops.nn.LayerNorm((4, 6), eps=1e-6, **cfg)
    assert isinstance(mod, torch.nn.LayerNorm)
    assert [k for k, _ in mod.named_parameters()] == [k for k, _ in ref.named_parameters()]
    assert mod.state_dict().keys() == ref.state_dict().keys()
    assert repr(mod) == repr(ref)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    mod.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 6)
    assert_fp32_close(mod(x), ref(x), "y")


@pytest.mark.parametrize("eps", [None, 1e-6])
def test_rms_norm_module_is_drop_in(eps):
    ref = torch.nn.RMSNorm(48, eps=eps)
    mod = ckpt_ops.nn.RMSNorm(48, eps=eps)
    assert isinstance(mod, torch.nn.RMSNorm) and repr(mod) == repr(ref)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    assert [k for k, _ in ckpt_ops.nn.RMSNorm(48, elementwise_affine=False).named_parameters()] == []
    x = torch.randn(3, 48) * 5
    assert_fp32_close(mod(x), ref(x), "y")


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, raised before any kernel runs
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel was looked up before the arguments were validated")

    monkeypatch.setattr(_backend, "kernel", boom)


BAD = [
    ("integer input", lambda: (torch.ones(2, 4, dtype=torch.int64), None, None), TypeError, "input"),
    ("not a tensor", lambda: ([[1.0] * 4], None, None), TypeError, "input"),
    ("0-d input", lambda: (torch.tensor(1.0), None, None), ValueError, "input"),  # empty ones are fine
    ("shape mismatch", lambda: (torch.randn(2, 5), None, None), ValueError, "normalized_shape"),
    ("weight shape", lambda: (torch.randn(2, 4), torch.ones(5), None), ValueError, "weight"),
    ("weight dtype", lambda: (torch.randn(2, 4), torch.ones(4, dtype=torch.float64), None), TypeError, "weight"),
    ("weight device", lambda: (torch.randn(2, 4), torch.ones(4, device="meta"), None), ValueError, "weight"),
    ("bias dtype", lambda: (torch.randn(2, 4), torch.ones(4), torch.ones(4, dtype=torch.float16)), TypeError, "bias"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case,make_args,exc,word", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_before_kernels(no_kernels, kind, case, make_args, exc, word):
    x, w, b = make_args()
    if kind == "rms_norm" and word == "bias":
        pytest.skip("RMSNorm has no bias")
    with pytest.raises(exc, match=word):
        if kind == "layer_norm":
            cf.layer_norm(x, (4,), w, b)
        else:
            cf.rms_norm(x, (4,), w)


@pytest.mark.parametrize("eps,exc", [(-1.0, ValueError), (float("nan"), ValueError), ("1e-5", TypeError)])
def test_bad_eps(no_kernels, eps, exc):
    with pytest.raises(exc, match="eps"):
        cf.layer_norm(torch.randn(2, 4), (4,), eps=eps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_default_eps_follows_torch(backend, dtype):
    """eps=None: torch's kernels use the epsilon of the computation dtype (fp32 for half types),
    not finfo(input.dtype); with small inputs the difference is large, so this pins it."""
    x = (torch.randn(4, 64) * 0.01).to(DEVICE, dtype)
    ours_ = cf.rms_norm(x, (64,), backend=backend).float()
    ref = F.rms_norm(x.float(), (64,), None, torch.finfo(torch.float32).eps)
    assert (ours_ - ref).abs().max() <= 2 * (F.rms_norm(x, (64,)).float() - ref).abs().max() + 1e-6
