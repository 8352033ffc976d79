"""Triton LayerNorm/RMSNorm kernels and their ckpt_ops::*_triton ops against an fp64 autograd reference.

Runs on CUDA when Triton compiles there, otherwise on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set below before Triton is imported). The interpreter is slow, so the grid is trimmed:
every width in {1, 3, 127, 768, 1000} and every row count in {1, 5, 33} appears in the main sweep without a
full cross product, flag/affine variants run on one small shape, and the column-block loop is forced both by
a width above the real block cap (8193) and by lowering the cap (many ragged blocks on a narrow row).
"""
import os
import sys

import pytest

if os.environ.get("CKPT_OPS_TEST_TRITON", "1") != "0":  # the package conftest's opt-out of the slow interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton_kernels.norm as tn  # noqa: E402

# whether the kernels are interpreted is fixed by the environment at the first `import triton` in the process
if not tn._interpreted() and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)
DEVICE = "cpu" if tn._interpreted() else "cuda"
OPS = torch.ops.ckpt_ops
EPS = {"ln": 1e-5, "rms": 1e-6}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _inputs(m, n, dtype, weight=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a non-zero row mean makes a one-pass E[x^2] - E[x]^2 variance visibly worse than the two-pass one
    x = (torch.randn(m, n, generator=g) * 2 + 3).to(DEVICE, dtype)
    w = (torch.randn(n, generator=g) + 1).to(DEVICE, dtype) if weight else None
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    dy = torch.randn(m, n, generator=g).to(DEVICE, dtype)
    return x, w, b, dy


def _reference(kind, x, w, b, dy, eps, dtype=torch.float64):
    """Plain autograd in `dtype` (fp64 truth, or the input dtype for eager PyTorch's own error)."""
    leaf = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    xr, wr, br = leaf
    n = x.shape[1]
    y = F.layer_norm(xr, (n,), wr, br, eps) if kind == "ln" else F.rms_norm(xr, (n,), wr, eps)
    y.backward(dy.to(dtype))
    x64 = x.double()
    if kind == "ln":
        mean = x64.mean(-1)
        rstd = (x64.var(-1, unbiased=False) + eps).rsqrt()
    else:
        mean, rstd = None, (x64.pow(2).mean(-1) + eps).rsqrt()
    grads = [None if t is None else t.grad for t in leaf]
    return dict(y=y.detach(), mean=mean, rstd=rstd, dx=grads[0], dw=grads[1], db=grads[2])


def _run(kind, x, w, b, dy, need=(True, True, True), via_ops=True):
    """Forward + backward through the registered ops (or the module's plain launchers)."""
    if kind == "ln":
        fwd, bwd = (OPS.layer_norm_fwd_triton, OPS.layer_norm_bwd_triton) if via_ops else (tn.layer_norm_fwd, tn.layer_norm_bwd)
        y, mean, rstd = fwd(x, w, b, EPS[kind])
        dx, dw, db = bwd(dy, x, w, mean, rstd, *need)
    else:
        fwd, bwd = (OPS.rms_norm_fwd_triton, OPS.rms_norm_bwd_triton) if via_ops else (tn.rms_norm_fwd, tn.rms_norm_bwd)
        y, rstd = fwd(x, w, EPS[kind])
        mean, db = None, None
        dx, dw = bwd(dy, x, w, rstd, need[0], need[1])
    return dict(y=y, mean=mean, rstd=rstd, dx=dx, dw=dw, db=db)


def _fail_msg(name, out, truth, tol):
    bad = ((out - truth).abs() > tol).nonzero()
    return (f"{name}: {bad.shape[0]}/{truth.numel()} elements beyond {tol:.3g}, "
            f"max err {(out - truth).abs().max().item():.3g}, first bad indices {bad[:5].tolist()}")


def _assert_accurate(name, out, truth, eager=None):
    """fp32 (eager None): |out - truth| <= 1e-5 * (|truth| + max|truth|) elementwise.
    16-bit: max error vs fp64 truth <= 2x eager PyTorch's max error in that dtype + a quarter-ulp floor."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out = out.double()
    scale = max(truth.abs().max().item(), 1.0) if truth.numel() else 1.0
    if eager is None:
        tol = 1e-5 * (truth.abs() + scale)
        assert bool(((out - truth).abs() <= tol).all()), _fail_msg(name, out, truth, 1e-5 * scale)
    else:
        eager_err = (eager.double() - truth).abs().max().item()
        tol = 2 * eager_err + 0.25 * torch.finfo(eager.dtype).eps * scale
        err = (out - truth).abs().max().item()
        assert err <= tol, _fail_msg(name, out, truth, tol) + f" (eager max err {eager_err:.3g})"


def _check_all(kind, x, w, b, dy, got, need=(True, True, True)):
    dtype = x.dtype
    truth = _reference(kind, x, w, b, dy, EPS[kind])
    eager = None if dtype == torch.float32 else _reference(kind, x, w, b, dy, EPS[kind], dtype)
    assert got["y"].dtype == dtype and got["rstd"].dtype == torch.float32
    _assert_accurate("y", got["y"], truth["y"], eager and eager["y"])
    # statistics are fp32 reductions of the (exactly upcast) inputs: fp32-tight for every input dtype
    _assert_accurate("rstd", got["rstd"], truth["rstd"])
    if kind == "ln":
        assert got["mean"].dtype == torch.float32
        _assert_accurate("mean", got["mean"], truth["mean"])
    expected = [("dx", need[0], dtype, x.shape), ("dw", need[1], w.dtype if w is not None else dtype, (x.shape[1],))]
    if kind == "ln":
        expected.append(("db", need[2], dtype, (x.shape[1],)))
    for name, wanted, out_dtype, shape in expected:
        out = got[name]
        assert out.dtype == out_dtype, f"{name}: dtype {out.dtype}, expected {out_dtype}"
        if not wanted:
            assert out.numel() == 0, f"{name} not requested but has shape {tuple(out.shape)}"
            continue
        assert out.shape == shape
        _assert_accurate(name, out, truth[name], eager and eager[name])


# ----------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------
# each width once, each row count at least once; (33, *) gives 4 backward programs with 9 rows each (interpreter)
SHAPES = [(1, 1), (5, 3), (33, 127), (5, 768), (33, 1000)]


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n", SHAPES)
def test_forward_backward(kind, dtype, m, n):
    x, w, b, dy = _inputs(m, n, dtype, bias=kind == "ln")
    before = [t.clone() for t in (x, w, b, dy) if t is not None]
    got = _run(kind, x, w, b, dy)
    _check_all(kind, x, w, b, dy, got)
    after = [t for t in (x, w, b, dy) if t is not None]
    assert all(torch.equal(u, v) for u, v in zip(before, after)), "an input was modified"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,weight,bias", [("ln", False, False), ("ln", True, False), ("ln", False, True),
                                              ("rms", False, False)])
def test_affine_variants(kind, weight, bias, dtype):
    x, w, b, dy = _inputs(5, 127, dtype, weight=weight, bias=bias)
    need = (True, weight, bias)
    _check_all(kind, x, w, b, dy, _run(kind, x, w, b, dy, need), need)


@pytest.mark.parametrize("need", [(dx, dw, db) for dx in (0, 1) for dw in (0, 1) for db in (0, 1)], ids=str)
def test_layer_norm_partial_grads(need):
    need = tuple(bool(f) for f in need)
    x, w, b, dy = _inputs(5, 127, torch.float32)
    _check_all("ln", x, w, b, dy, _run("ln", x, w, b, dy, need), need)


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)], ids=str)
def test_rms_norm_partial_grads(need):
    x, w, _, dy = _inputs(5, 127, torch.float32, bias=False)
    _check_all("rms", x, w, None, dy, _run("rms", x, w, None, dy, need + (False,)), need + (False,))


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_width_above_block_cap(kind, dtype):
    # 8193 = one full 8192-column block plus a one-column tail: the column loop with the real cap
    x, w, b, dy = _inputs(3, tn._MAX_BLOCK_N + 1, dtype, bias=kind == "ln")
    _check_all(kind, x, w, b, dy, _run(kind, x, w, b, dy))


@pytest.mark.parametrize("kind", ["ln", "rms"])
@pytest.mark.parametrize("need", [(True, True, True), (False, True, True), (True, False, False)], ids=str)
def test_column_loop_small_cap(kind, need, monkeypatch):
    # 200 columns: forward blocks of 64 (three and an 8-column tail), backward blocks of 16 (a quarter of the
    # cap: twelve and an 8-column tail), 5 rows over 3 programs.
    # The plain launchers are called so the patched cap is certainly the one in effect.
    monkeypatch.setattr(tn, "_MAX_BLOCK_N", 64)
    need = need if kind == "ln" else need[:2] + (False,)
    x, w, b, dy = _inputs(5, 200, torch.float32, bias=kind == "ln")
    got = _run(kind, x, w, b, dy, need, via_ops=False)
    _check_all(kind, x, w, b, dy, got, need)
    monkeypatch.undo()  # the column loop's statistics are as accurate as the one-block path's
    one = _run(kind, x, w, b, dy, need, via_ops=False)
    # 2x-eager rule, not an ulp bound between the two paths (their fp32 sums run in different orders, and on
    # a GPU in a third one): each within 2x eager fp32's relative error (+ one fp32 rounding) of the fp64 truth
    truth = _reference(kind, x, w, b, dy, EPS[kind])["rstd"]
    x32 = x.float()
    eager = ((x32.var(-1, unbiased=False) if kind == "ln" else x32.pow(2).mean(-1)) + EPS[kind]).rsqrt()
    rel = lambda r: ((r.double() - truth) / truth).abs().max().item()  # noqa: E731
    for name, r in (("column loop", got["rstd"]), ("one block", one["rstd"])):
        assert rel(r) <= 2 * rel(eager) + torch.finfo(torch.float32).eps, (name, rel(r), rel(eager))


def test_empty_rows():
    x, w, b, dy = _inputs(0, 16, torch.float32)
    y, mean, rstd = OPS.layer_norm_fwd_triton(x, w, b, 1e-5)
    assert y.shape == (0, 16) and mean.shape == rstd.shape == (0,)
    dx, dw, db = OPS.layer_norm_bwd_triton(dy, x, w, mean, rstd, True, True, True)
    assert dx.shape == (0, 16) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros_like(b))


def test_schemas():
    expected = {
        "layer_norm_fwd_triton": "ckpt_ops::layer_norm_fwd_triton(Tensor x, Tensor? weight, Tensor? bias, "
                                 "float eps) -> (Tensor y, Tensor mean, Tensor rstd)",
        "layer_norm_bwd_triton": "ckpt_ops::layer_norm_bwd_triton(Tensor dy, Tensor x, Tensor? weight, "
                                 "Tensor mean, Tensor rstd, bool need_dx, bool need_dweight, bool need_dbias) "
                                 "-> (Tensor dx, Tensor dweight, Tensor dbias)",
        "rms_norm_fwd_triton": "ckpt_ops::rms_norm_fwd_triton(Tensor x, Tensor? weight, float eps) "
                               "-> (Tensor y, Tensor rstd)",
        "rms_norm_bwd_triton": "ckpt_ops::rms_norm_bwd_triton(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, "
                               "bool need_dx, bool need_dweight) -> (Tensor dx, Tensor dweight)",
    }
    for name, schema in expected.items():
        assert str(getattr(OPS, name).default._schema) == schema


@pytest.mark.parametrize("affine", [True, False])
def test_opcheck(affine):
    # fake-tensor, schema, autograd-registration and AOT-dispatch checks, on inputs without requires_grad
    x, w, b, dy = _inputs(5, 33, torch.float32, weight=affine, bias=affine)
    _, mean, rstd = OPS.layer_norm_fwd_triton(x, w, b, 1e-5)
    _, rms_rstd = OPS.rms_norm_fwd_triton(x, w, 1e-6)
    cases = [
        (OPS.layer_norm_fwd_triton, (x, w, b, 1e-5)),
        (OPS.layer_norm_bwd_triton, (dy, x, w, mean, rstd, True, affine, True)),
        (OPS.rms_norm_fwd_triton, (x, w, 1e-6)),
        (OPS.rms_norm_bwd_triton, (dy, x, w, rms_rstd, True, affine)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
