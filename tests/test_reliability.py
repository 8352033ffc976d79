"""Issue 14 reliability classes, each against what eager PyTorch does: double backward raises a
clear ckpt_ops error (never a number), a second backward() without retain_graph raises even when
a layer kept nothing, fp64 at fp64 accuracy, and the drop-in edge cases."""
import copy

import pytest
import torch

import ckpt_ops
import eager_ref
from conftest import DEVICE, available_backends

BACKENDS = available_backends("attention")
D, H = 8, 2


def dt(backend):
    """fp64 where the backend computes it (Triton's kernels take fp16/bf16/fp32 only)."""
    return torch.float32 if backend == "triton" else torch.float64


def make(kind, level, backend, dtype=None, **kw):
    dtype = dt(backend) if dtype is None else dtype
    torch.manual_seed(0)
    if kind == "layernorm":
        m = ckpt_ops.nn.LayerNorm(D)
    elif kind == "rmsnorm":
        m = ckpt_ops.nn.RMSNorm(D)
    elif kind == "mlp":
        m = ckpt_ops.nn.MLP(D, 16, norm="layernorm", residual=True, recompute=level, **kw)
    elif kind == "attention":
        m = ckpt_ops.nn.Attention(D, H, norm="rmsnorm", residual=True, recompute=level, **kw)
    else:
        m = ckpt_ops.nn.TransformerBlock(D, H, style=kind, recompute=level, **kw)
    m = m.to(DEVICE, dtype)
    m.backend = backend
    return m


CASES = ([("layernorm", None), ("rmsnorm", None)] + [("mlp", lv) for lv in ckpt_ops.mlp.LEVELS]
         + [("attention", lv) for lv in ckpt_ops.attention.LEVELS]
         + [(st, lv) for st in ("gpt2", "llama") for lv in ckpt_ops.block.LEVELS])
CASE_IDS = [f"{k}-{lv}" if lv else k for k, lv in CASES]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,level", CASES, ids=CASE_IDS)
def test_double_backward_raises_naming_ckpt_ops(backend, kind, level):
    m = make(kind, level, backend)
    x = torch.randn(2, 3, D, device=DEVICE, dtype=dt(backend), requires_grad=True)
    params = list(m.parameters())
    grads = torch.autograd.grad(m(x).pow(3).sum(), [x, *params], create_graph=True)
    for target in ([x], params):  # grad-of-grad w.r.t. the input and w.r.t. the parameters
        with pytest.raises(RuntimeError, match=r"ckpt_ops\.\w+ does not support double backward"):
            torch.autograd.grad(sum(g.square().sum() for g in grads), target, allow_unused=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        sum(g.square().sum() for g in grads).backward()
    # a constant upstream gradient (no grad_fn on dout) still raises rather than reporting "unused"
    gx, = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(gx.square().sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,level", CASES, ids=CASE_IDS)
def test_create_graph_first_order_gradients_unchanged(backend, kind, level):
    """create_graph=True (e.g. a gradient penalty's first step) still gives the right gradients."""
    m = make(kind, level, backend)
    x = torch.randn(2, 3, D, device=DEVICE, dtype=dt(backend), requires_grad=True)
    g1 = torch.autograd.grad(m(x).pow(3).sum(), [x, *m.parameters()], create_graph=True)
    g0 = torch.autograd.grad(m(x).pow(3).sum(), [x, *m.parameters()])
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)


def _only_bias_trains(m):
    """Freeze all but the last bias (the one whose gradient is a plain sum of dy: nothing kept);
    RMSNorm, which has no bias, trains its weight."""
    names = [n for n, _ in m.named_parameters()]
    keep = ([n for n in names if n.endswith("bias")] or names)[-1]
    for name, p in m.named_parameters():
        p.requires_grad_(name == keep)
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,level", [c for c in CASES if c[0] != "llama"],
                         ids=[i for c, i in zip(CASES, CASE_IDS) if c[0] != "llama"])
def test_second_backward_without_retain_graph_raises(backend, kind, level):
    """Even a layer that kept nothing but its sentinel (only a bias trains, x frozen) raises as eager
    does, instead of accumulating the gradient twice."""
    m = make(kind, level, backend)
    trainable = _only_bias_trains(m)
    assert trainable
    x = torch.randn(2, 3, D, device=DEVICE, dtype=dt(backend))
    loss = m(x).sum()
    loss.backward()
    first = [p.grad.clone() for p in trainable]
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    for p, g in zip(trainable, first):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    eager = torch.nn.LayerNorm(D).to(x.dtype)
    eager.weight.requires_grad_(False)
    loss = eager(x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize("kind,level", [("layernorm", None), ("mlp", "full"), ("attention", "full")])
def test_sentinel_costs_no_saved_bytes(kind, level):
    m = make(kind, level, "reference")
    _only_bias_trains(m)
    x = torch.randn(2, 3, D, device=DEVICE, dtype=torch.float64)
    assert ckpt_ops.saved_bytes(m, x) == 0


# ------------------------------------------------------------------------------------------------
# fp64 at fp64 accuracy (LSE, RoPE tables and intermediates in fp64 for fp64 inputs)
# ------------------------------------------------------------------------------------------------
FP64_CASES = ([("attention", lv) for lv in ckpt_ops.attention.LEVELS]
              + [(st, lv) for st in ("gpt2", "llama") for lv in ckpt_ops.block.LEVELS])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
@pytest.mark.parametrize("kind,level", FP64_CASES, ids=[f"{k}-{lv}" for k, lv in FP64_CASES])
def test_fp64_attention_and_blocks_at_fp64_accuracy(backend, kind, level):
    kw = {"rope": True, "num_kv_heads": 1} if kind == "attention" else {}
    m = make(kind, level, backend, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 5, D, device=DEVICE, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 1]], device=DEVICE)
    out = m(x, mask)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], dy)
    ref = eager_ref.run(m, x, mask)
    rgrads = torch.autograd.grad(ref, [x, *m.parameters()], dy)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, r in zip(["out"] + names, [out, *grads], [ref, *rgrads]):
        err = float((a - r).detach().norm() / r.detach().norm().clamp_min(1e-300))
        assert err < 1e-10, f"{name}: relative error {err:.3g} (fp64 must be fp64-accurate)"


# ------------------------------------------------------------------------------------------------
# Drop-in edge cases
# ------------------------------------------------------------------------------------------------
EMPTY_KINDS = ["layernorm", "rmsnorm", "mlp", "attention", "gpt2", "llama"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 3, D), (2, 0, D)], ids=["batch0", "seq0"])
@pytest.mark.parametrize("kind", EMPTY_KINDS)
def test_empty_inputs_give_empty_results_and_zero_grads(backend, shape, kind):
    m = make(kind, "full", backend, dtype=torch.float32)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    out = m(x)
    ref = eager_ref.run(m, x)
    assert out.shape == ref.shape == x.shape
    grads = torch.autograd.grad(out.sum(), [x, *m.parameters()], allow_unused=True)
    rgrads = torch.autograd.grad(ref.sum(), [x, *m.parameters()], allow_unused=True)
    for g, r in zip(grads, rgrads):
        r = torch.zeros_like(r) if r is not None else None
        assert g is not None and r is not None and g.shape == r.shape and torch.equal(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "mlp", "attention"])
def test_strided_norm_weight(backend, kind):
    m = make(kind, "full", backend)
    norm = m if kind in ("layernorm", "rmsnorm") else m.norm
    norm.weight = torch.nn.Parameter(torch.randn(D, 3, dtype=dt(backend), device=DEVICE)[:, 1])
    assert not norm.weight.is_contiguous()
    x = torch.randn(2, 3, D, dtype=dt(backend), device=DEVICE, requires_grad=True)
    grads = torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()])
    rgrads = torch.autograd.grad(eager_ref.run(m, x).square().sum(), [x, *m.parameters()])
    tol = 1e-10 if backend != "triton" else 1e-4
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", available_backends("layer_norm"))
@pytest.mark.parametrize("n,column_loop", [(64, False), (100, False), (100, True)],
                         ids=["n64", "n100", "n100-column-loop"])
def test_layernorm_overflowed_variance_is_nan(backend, n, column_loop, monkeypatch):
    """fp32 rows at |x| ~ 1e25 / 1e30: the sum of squared deviations overflows, and rsqrt(inf) = 0
    would return the finite bias: a silently wrong row. ckpt_ops returns NaN for such rows on every
    backend. Eager's layer_norm is NaN there too for some widths (n 64 here) and returns the bias for
    others (n 100: its Welford chunking follows the vector width), so the check is: ckpt_ops is NaN
    on every overflowed row (a superset of eager's NaN rows), ordinary rows of the same call match
    eager, and RMSNorm keeps eager's 1/sqrt(inf) = 0 rows. column-loop: Triton's kernel for rows
    wider than one block (its cap lowered so the interpreter reaches it)."""
    if column_loop:
        if backend != "triton":
            pytest.skip("the column loop is the Triton kernel's")
        from ckpt_ops.triton_kernels import norm as tnorm
        monkeypatch.setattr(tnorm, "_MAX_BLOCK_N", 32)
    torch.manual_seed(0)
    x = torch.randn(4, n, device=DEVICE)
    x[1] *= 1e25
    x[3] *= 1e30
    ln = ckpt_ops.nn.LayerNorm(n, device=DEVICE)
    ln.backend = backend
    rms = ckpt_ops.nn.RMSNorm(n, device=DEVICE)
    rms.backend = backend
    with torch.no_grad():
        ln.bias.uniform_()
        out, ref = ln(x), torch.nn.functional.layer_norm(x, (n,), ln.weight, ln.bias)
        rout, rref = rms(x), torch.nn.functional.rms_norm(x, (n,), rms.weight, rms.eps)
    assert out[[1, 3]].isnan().all(), "an overflowed variance must not give a finite row"
    assert not (ref.isnan() & ~out.isnan()).any()  # every NaN of eager's is one of ours
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=1e-4, atol=1e-5)
    assert not rout.isnan().any() and not rref.isnan().any()
    torch.testing.assert_close(rout, rref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_one(backend, causal):
    torch.manual_seed(1)
    m = ckpt_ops.nn.Attention(4, 4, causal=causal, num_kv_heads=2).to(DEVICE, dt(backend))
    m.backend = backend
    x = torch.randn(2, 3, 4, dtype=dt(backend), device=DEVICE, requires_grad=True)
    grads = torch.autograd.grad(m(x).square().sum(), [x, *m.parameters()])
    rgrads = torch.autograd.grad(eager_ref.run(m, x).square().sum(), [x, *m.parameters()])
    tol = 1e-10 if backend != "triton" else 1e-5
    for g, r in zip(grads, rgrads):
        torch.testing.assert_close(g, r.to(g.dtype), rtol=tol, atol=tol)


def test_zero_dim_input_to_mlp_is_a_clear_error():
    m = ckpt_ops.nn.MLP(1, 4)
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        m(torch.tensor(1.0))


@pytest.mark.parametrize("make_module", [lambda: ckpt_ops.nn.MLP(8, 16), lambda: ckpt_ops.nn.Attention(8, 2),
                                         lambda: ckpt_ops.nn.TransformerBlock(8, 2)], ids=["mlp", "attn", "block"])
def test_invalid_recompute_assigned_later_raises_at_assignment(make_module):
    m = make_module()
    m.recompute = "none"
    assert m.recompute == "none"
    with pytest.raises(ValueError, match="recompute must be one of"):
        m.recompute = "bogus"
    assert m.recompute == "none"
    with pytest.raises(ValueError, match="recompute must be one of"):
        type(m)(8, 2, recompute="bogus") if not isinstance(m, ckpt_ops.nn.MLP) else ckpt_ops.nn.MLP(8, 2, recompute="x")


@pytest.mark.parametrize("kind", EMPTY_KINDS)
def test_triton_rejects_fp64_before_any_kernel(kind, monkeypatch):
    from ckpt_ops import _backend
    if _backend._unavailable_reason("attention", "triton", DEVICE.type) is not None:
        pytest.skip("triton backend unavailable")
    m = make(kind, "full", "triton", dtype=torch.float64)  # a consistent fp64 module: only the backend rule fails
    x = torch.randn(2, 3, D, dtype=torch.float64, device=DEVICE)
    _backend.resolve("attention", DEVICE, "triton")  # kernels loaded; now no kernel may run
    monkeypatch.setattr(_backend, "kernel", lambda *a, **k: pytest.fail("a kernel ran before validation"))
    with pytest.raises(TypeError, match=r"(x|input) is float64, which the triton backend does not support"):
        m(x)
