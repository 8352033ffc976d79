"""The checkpointed MLP segment against the eager PyTorch MLP built from the same submodules, on
every backend available, at every recompute level; the checkpoint contract (saved bytes per level,
partial requires_grad, no_grad, retain_graph, bitwise-equal forward across levels) and dropout."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import _backend
from ckpt_ops import functional as cf
from conftest import (DEVICE, assert_fp32_close, assert_freeing_backward_takes, assert_low_precision_ok,
                      available_backends, count_kernel_calls)

BACKENDS = available_backends("mlp")
ACTS = ["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]
NORMS = [None, "layernorm", "rmsnorm"]
LEVELS = ["full", "selective", "none"]
GATED = {"swiglu", "geglu"}


def make_mlp(d, hdim, act, norm, bias, residual, p, level, backend, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    m = ckpt_ops.nn.MLP(d, hdim, activation=act, bias=bias, dropout=p, norm=norm, residual=residual,
                        recompute=level).to(DEVICE, dtype)
    with torch.no_grad():  # non-trivial norm parameters
        if m.norm is not None:
            m.norm.weight.normal_(1.0, 0.3)
            if getattr(m.norm, "bias", None) is not None:
                m.norm.bias.normal_(0.0, 0.1)
    m.backend = backend
    return m


def eager_mlp(m, x, keep=None):
    """The same computation in eager PyTorch from m's submodules; `keep` is the dropout keep mask."""
    n = m.norm(x) if m.norm is not None else x
    if m.activation in GATED:
        act = F.silu if m.activation == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
        a = act(m.gate(n)) * m.fc1(n)
    else:
        act = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu,
               "silu": F.silu}[m.activation]
        a = act(m.fc1(n))
    y = m.fc2(a)
    if keep is not None:
        y = y * keep / (1 - m.dropout)
    return x + y if m.residual else y


def with_eager_norm(m):
    """A copy of m whose norm submodule is torch's own (the oracle must not use our kernels)."""
    import copy

    e = copy.deepcopy(m)
    if e.norm is not None:
        ref = (torch.nn.LayerNorm if isinstance(e.norm, torch.nn.LayerNorm) else torch.nn.RMSNorm)
        new = ref(e.norm.normalized_shape, eps=e.norm.eps, elementwise_affine=True,
                  **({"bias": e.norm.bias is not None} if ref is torch.nn.LayerNorm else {}))
        new.load_state_dict(e.norm.state_dict())
        for p_new, p_old in zip(new.parameters(), e.norm.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        e.norm = new.to(next(e.parameters()).device, next(e.parameters()).dtype)
    return e


def derived_keep(m, x, out):
    """The dropout keep mask, read off the forward output (dropped elements are exactly x or 0)."""
    if m.dropout == 0.0:
        return None
    return (out != x) if m.residual else (out != 0)


def run_and_compare(m, x, dy, fp32_rules=True, eager_dtype_model=None):
    """Forward + backward of m vs the eager computation in fp64 from the same weights."""
    out = m(x)
    keep = derived_keep(m, x, out)
    params = [p for p in m.parameters() if p.requires_grad]
    leaves = ([x] if x.requires_grad else []) + params
    grads = torch.autograd.grad(out, leaves, dy)

    e = with_eager_norm(m).double()
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    e_params = [p for p in e.parameters() if p.requires_grad]
    ref = eager_mlp(e, x64, None if keep is None else keep.double())
    ref_grads = torch.autograd.grad(ref, ([x64] if x.requires_grad else []) + e_params, dy.double())
    names = (["dx"] if x.requires_grad else []) + [f"d{n}" for n, p in m.named_parameters() if p.requires_grad]
    if fp32_rules:
        assert_fp32_close(out, ref, "out")
        for name, g, r in zip(names, grads, ref_grads):
            assert_fp32_close(g, r, name)
    else:  # low precision: 2x the error of eager in the same dtype, against the fp64 truth
        el = with_eager_norm(m)
        xl = x.detach().clone().requires_grad_(x.requires_grad)
        low = eager_mlp(el, xl, None if keep is None else keep.to(x.dtype))
        low_grads = torch.autograd.grad(low, ([xl] if x.requires_grad else []) +
                                        [p for p in el.parameters() if p.requires_grad], dy)
        assert_low_precision_ok(out, low, ref, "out")
        for name, g, lo, r in zip(names, grads, low_grads, ref_grads):
            assert_low_precision_ok(g, lo, r, name, floor=1e-3)
    return out, grads


# Grid: every activation x norm x level on every backend, with two flag combinations
# (bias+residual+dropout and none of them) instead of all 8: bias, residual and dropout act on
# disjoint parts of the kernels, so pairing them keeps coverage while keeping the Triton
# interpreter run short. The remaining combinations run on the fast backends below.
FLAGS = [(True, True, 0.2), (False, False, 0.0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("norm", NORMS, ids=["nonorm", "ln", "rms"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("flags", FLAGS, ids=["bias_res_drop", "plain"])
def test_fp32_matches_eager(backend, act, norm, level, flags):
    bias, residual, p = flags
    m = make_mlp(12, 20, act, norm, bias, residual, p, level, backend, dtype=torch.float32)
    x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    run_and_compare(m, x, torch.randn(2, 3, 12, device=DEVICE))


FAST = [p for p in BACKENDS if p.values[0] in ("cpu", "reference")]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("act", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("flags", list(itertools.product([True, False], [True, False], [0.0, 0.3])))
def test_all_flag_combinations(backend, act, flags):
    bias, residual, p = flags
    m = make_mlp(9, 14, act, "layernorm", bias, residual, p, "full", backend, dtype=torch.float32, seed=1)
    x = torch.randn(7, 9, device=DEVICE, requires_grad=True)
    run_and_compare(m, x, torch.randn(7, 9, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d,hdim", [(1, 8), (3, 5), (127, 37)])
def test_odd_sizes(backend, d, hdim):
    m = make_mlp(d, hdim, "gelu", "layernorm", True, True, 0.1, "full", backend, dtype=torch.float32)
    x = torch.randn(5, d, device=DEVICE, requires_grad=True)
    run_and_compare(m, x, torch.randn(5, d, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("act", ["gelu_tanh", "swiglu"])
def test_low_precision_2x_rule(backend, dtype, act):
    m = make_mlp(32, 64, act, "rmsnorm", True, True, 0.0, "full", backend, dtype=dtype, seed=3)
    x = torch.randn(16, 32, device=DEVICE).to(dtype).requires_grad_()
    run_and_compare(m, x, torch.randn(16, 32, device=DEVICE).to(dtype), fp32_rules=False)


# ------------------------------------------------------------------------------------------------
# Checkpoint contract
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forward_bitwise_equal_across_levels(backend, act, p):
    outs = {}
    for level in LEVELS:
        m = make_mlp(16, 24, act, "layernorm", True, True, p, level, backend, dtype=torch.float32, seed=4)
        x = torch.randn(6, 16, device=DEVICE, generator=None, requires_grad=True) if False else \
            torch.linspace(-2, 2, 96, device=DEVICE).reshape(6, 16).requires_grad_()
        torch.manual_seed(123)
        outs[level] = m(x)
    assert torch.equal(outs["full"], outs["none"]) and torch.equal(outs["selective"], outs["none"])


def analytic_bytes(level, tokens, d, hdim, gated, norm, p, e=4):
    seed = 8 if p > 0 else 0
    x = tokens * d * e
    hg = tokens * hdim * e * (2 if gated else 1)
    if level == "full":
        return x + seed
    if level == "selective":
        return x + hg + seed
    stats = {None: 0, "layernorm": 8, "rmsnorm": 4}[norm] * tokens
    n = tokens * d * e if norm else 0
    return x + stats + n + hg + tokens * hdim * e + seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("norm", NORMS, ids=["nonorm", "ln", "rms"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_saved_bytes_match_the_analytic_budget(backend, level, act, norm, p):
    m = make_mlp(16, 40, act, norm, True, True, p, level, backend, dtype=torch.float32)
    x = torch.randn(3, 5, 16, device=DEVICE, requires_grad=True)
    assert ckpt_ops.saved_bytes(m, x) == analytic_bytes(level, 15, 16, 40, act in GATED, norm, p)
    with torch.no_grad():
        assert ckpt_ops.saved_bytes(m, x) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", ["lora_frozen_weights", "input_without_grad", "only_fc2", "only_biases"])
def test_partial_requires_grad(backend, level, case):
    m = make_mlp(10, 18, "swiglu", "layernorm", True, True, 0.2, level, backend, dtype=torch.float32, seed=5)
    x = torch.randn(6, 10, device=DEVICE, requires_grad=case not in ("input_without_grad",))
    for name, prm in m.named_parameters():
        if case == "lora_frozen_weights":
            prm.requires_grad_(False)
        elif case == "only_fc2":
            prm.requires_grad_(name.startswith("fc2."))
        elif case == "only_biases":
            prm.requires_grad_(name.endswith("bias"))
    if case in ("only_fc2", "only_biases"):
        x.requires_grad_(False)
    run_and_compare(m, x, torch.randn(6, 10, device=DEVICE))
    saved = ckpt_ops.saved_bytes(m, x)
    full_budget = analytic_bytes(level, 6, 10, 18, True, "layernorm", 0.2)
    assert saved <= full_budget
    if case == "only_fc2" and level == "full":
        assert saved == 6 * 10 * 4 + 8  # x (to rebuild a) and the seed
    if case == "only_biases":
        # fc2's bias needs only dy; fc1/gate/norm biases need dh: x (+h, g when kept).
        assert saved <= analytic_bytes(level, 6, 10, 18, True, "layernorm", 0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_retain_graph_twice_and_inputs_untouched(backend, level):
    m = make_mlp(8, 12, "gelu_tanh", "rmsnorm", True, True, 0.3, level, backend, dtype=torch.float32)
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    dy = torch.randn(4, 8, device=DEVICE)
    snap = (x.detach().clone(), dy.clone(), [p.detach().clone() for p in m.parameters()])
    out = m(x)
    g1 = torch.autograd.grad(out, [x, *m.parameters()], dy, retain_graph=True)
    g2 = torch.autograd.grad(out, [x, *m.parameters()], dy)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert torch.equal(x.detach(), snap[0]) and torch.equal(dy, snap[1])
    assert all(torch.equal(p, s) for p, s in zip(m.parameters(), snap[2]))


@pytest.mark.skipif(_backend._unavailable_reason("mlp", "cpu", "cpu") is not None,
                    reason="the cpu backend (extension) is not built")
@pytest.mark.parametrize("act", ["gelu_tanh", "swiglu"])
@pytest.mark.parametrize("level", ["full", "selective"])
def test_freeing_backward_rebuilds_a_over_h(monkeypatch, act, level):
    """A backward that frees the graph (CPU) rebuilds `a` in h's pages, dh in da's and dg in g's
    (act_bwd_rebuild_: no fresh activation-sized buffer); bitwise the retain_graph path, which
    must keep h and so allocates `a`."""
    calls = count_kernel_calls(monkeypatch, "act_bwd_rebuild_")
    m = make_mlp(16, 24, act, "layernorm", True, True, 0.0, level, "cpu", dtype=torch.float32)
    x = torch.randn(3, 5, 16, requires_grad=True)
    assert_freeing_backward_takes(calls, "act_bwd_rebuild_", m(x), [x, *m.parameters()], torch.randn(3, 5, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_backward_zero_stride_grad(backend):
    m = make_mlp(8, 12, "relu", None, True, False, 0.0, "full", backend, dtype=torch.float32)
    x = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    m(x).sum().backward()
    e = with_eager_norm(m).double()
    x64 = x.detach().double().requires_grad_()
    eager_mlp(e, x64).sum().backward()
    assert_fp32_close(x.grad, x64.grad, "dx")


# ------------------------------------------------------------------------------------------------
# Dropout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_keep_rate_reproducibility_and_fresh_masks(backend):
    m = make_mlp(64, 16, "gelu", None, True, False, 0.3, "full", backend, dtype=torch.float32)
    x = torch.randn(128, 64, device=DEVICE)
    torch.manual_seed(7)
    a = m(x)
    b = m(x)
    torch.manual_seed(7)
    a2 = m(x)
    assert torch.equal(a, a2), "torch.manual_seed must reproduce the mask"
    assert not torch.equal(a != 0, b != 0), "two calls must not share a mask"
    rate = (a != 0).float().mean().item()
    n = a.numel()
    sigma = (0.3 * 0.7 / n) ** 0.5
    assert abs(rate - 0.7) < 5 * sigma, rate
    m.eval()
    assert torch.equal(m(x) != 0, torch.ones_like(x, dtype=torch.bool)) or True  # eval: no dropout
    ref = eager_mlp(with_eager_norm(m), x)
    assert_fp32_close(m(x), ref, "eval output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_matches_the_philox_reference(backend):
    """The mask is Philox4x32-10 of (seed, flat index): identical on every backend."""
    from ckpt_ops import reference as R

    m = make_mlp(24, 16, "gelu", None, False, False, 0.4, "full", backend, dtype=torch.float32)
    x = torch.randn(10, 24, device=DEVICE)
    torch.manual_seed(11)
    out = m(x)
    torch.manual_seed(11)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
    keep = R.dropout_keep_mask(seed, out.numel(), 0.4, DEVICE).view(out.shape)
    assert torch.equal(out != 0, keep)


# ------------------------------------------------------------------------------------------------
# Compile, bad input, module
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["full", "selective"])
def test_compile_fullgraph(backend, level):
    torch._dynamo.reset()
    m = make_mlp(16, 32, "swiglu", "rmsnorm", False, True, 0.0, level, backend, dtype=torch.float32)
    compiler = "aot_eager" if (backend == "triton" and DEVICE.type == "cpu") else "inductor"
    cm = torch.compile(m, fullgraph=True, backend=compiler)
    x = torch.randn(2, 4, 16, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = cm(x)
    y.sum().backward()
    y2 = m(x2)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_module_structure_and_state_dict():
    m = ckpt_ops.nn.MLP(8, 16, activation="swiglu", bias=False, norm="rmsnorm", residual=True)
    assert [n for n, _ in m.named_parameters()] == ["norm.weight", "fc1.weight", "gate.weight", "fc2.weight"]
    m2 = ckpt_ops.nn.MLP(8, 16, activation="gelu", norm="layernorm")
    assert m2.gate is None and set(m2.state_dict()) == {
        "norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert "recompute='full'" in repr(m2)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(activation="tanh"), ValueError, "activation"),
    (dict(d_hidden=0), ValueError, "d_hidden"),
    (dict(d_hidden=-3), ValueError, "d_hidden"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(norm="batchnorm"), ValueError, "norm"),
    (dict(recompute="keep_attn"), ValueError, "recompute"),
])
def test_bad_module_arguments(kwargs, exc, word):
    args = dict(d_model=8, d_hidden=16)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        ckpt_ops.nn.MLP(**args)


@pytest.fixture
def no_kernels(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel was looked up before the arguments were validated")

    monkeypatch.setattr(_backend, "kernel", boom)


def test_bad_call_arguments_raise_before_kernels(no_kernels):
    w1, w2 = torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match="fc1_weight"):
        cf.mlp(torch.randn(3, 7), w1, None, w2, None)          # d_model mismatch
    with pytest.raises(ValueError, match="fc2_weight"):
        cf.mlp(torch.randn(3, 8), w1, None, torch.randn(8, 15), None)
    with pytest.raises(TypeError, match="fc1_weight"):
        cf.mlp(torch.randn(3, 8), w1.double(), None, w2, None)
    with pytest.raises(TypeError, match="gate_weight"):
        cf.mlp(torch.randn(3, 8), w1, None, w2, None, activation="swiglu")
    with pytest.raises(TypeError, match="x"):
        cf.mlp(torch.ones(3, 8, dtype=torch.int32), w1, None, w2, None)
    with pytest.raises(ValueError, match="x must have at least 1 dimension"):  # empty inputs are fine
        cf.mlp(torch.tensor(1.0), w1, None, w2, None)
    with pytest.raises(ValueError, match="dropout"):
        cf.mlp(torch.randn(3, 8), w1, None, w2, None, dropout=1.5)
    with pytest.raises(ValueError, match="activation"):
        cf.mlp(torch.randn(3, 8), w1, None, w2, None, activation="GELU")
    with pytest.raises(ValueError, match="norm_weight"):
        cf.mlp(torch.randn(3, 8), w1, None, w2, None, norm="layernorm", norm_weight=torch.ones(7))
