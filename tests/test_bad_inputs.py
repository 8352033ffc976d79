"""Bad-input catalogue: every public entry point (ckpt_ops.nn.*, ckpt_ops.functional.*, convert,
conversion_report, unconvert, saved_bytes, backend selection) with malformed arguments. Each case
asserts the exception type and that the message names the argument; with the kernel lookup
patched to fail, so every check is shown to run before any kernel."""
import pytest
import torch

import ckpt_ops
from ckpt_ops import _backend
from ckpt_ops import functional as cf

nn = ckpt_ops.nn
X3 = lambda: torch.randn(2, 3, 8)  # noqa: E731
X2 = lambda: torch.randn(3, 8)  # noqa: E731
W1, W2 = torch.randn(16, 8), torch.randn(8, 16)
QKV, WO = torch.randn(24, 8), torch.randn(8, 8)


def attn(x=None, **kw):
    kw.setdefault("num_heads", 2)
    return cf.attention(X3() if x is None else x, kw.pop("qkv_weight", QKV), kw.pop("qkv_bias", None),
                        kw.pop("out_weight", WO), kw.pop("out_bias", None), **kw)


def mlp(x=None, **kw):
    return cf.mlp(X2() if x is None else x, kw.pop("fc1_weight", W1), kw.pop("fc1_bias", None),
                  kw.pop("fc2_weight", W2), kw.pop("fc2_bias", None), **kw)


def module_call(make, x):
    return lambda: make()(x)


# (id, thunk, exception type, word the message must contain)
CASES = [
    # --- functional.layer_norm / rms_norm
    ("ln-input-list", lambda: cf.layer_norm([[1.0] * 8], 8), TypeError, "input"),
    ("ln-input-int", lambda: cf.layer_norm(torch.ones(2, 8, dtype=torch.int32), 8), TypeError, "input"),
    ("ln-input-complex", lambda: cf.layer_norm(torch.ones(2, 8, dtype=torch.complex64), 8), TypeError, "input"),
    ("ln-input-0d", lambda: cf.layer_norm(torch.tensor(1.0), 8), ValueError, "input"),
    ("ln-shape-mismatch", lambda: cf.layer_norm(X2(), 7), ValueError, "normalized_shape"),
    ("ln-shape-str", lambda: cf.layer_norm(X2(), "8"), TypeError, "normalized_shape"),
    ("ln-shape-zero", lambda: cf.layer_norm(X2(), 0), ValueError, "normalized_shape"),
    ("ln-shape-empty", lambda: cf.layer_norm(X2(), ()), ValueError, "normalized_shape"),
    ("ln-weight-shape", lambda: cf.layer_norm(X2(), 8, torch.ones(7)), ValueError, "weight"),
    ("ln-weight-dtype", lambda: cf.layer_norm(X2(), 8, torch.ones(8, dtype=torch.float64)), TypeError, "weight"),
    ("ln-weight-device", lambda: cf.layer_norm(X2(), 8, torch.ones(8, device="meta")), ValueError, "weight"),
    ("ln-weight-list", lambda: cf.layer_norm(X2(), 8, [1.0] * 8), TypeError, "weight"),
    ("ln-bias-shape", lambda: cf.layer_norm(X2(), 8, None, torch.ones(9)), ValueError, "bias"),
    ("ln-eps-str", lambda: cf.layer_norm(X2(), 8, eps="1e-5"), TypeError, "eps"),
    ("ln-eps-negative", lambda: cf.layer_norm(X2(), 8, eps=-1.0), ValueError, "eps"),
    ("ln-eps-nan", lambda: cf.layer_norm(X2(), 8, eps=float("nan")), ValueError, "eps"),
    ("ln-eps-bool", lambda: cf.layer_norm(X2(), 8, eps=True), TypeError, "eps"),
    ("ln-backend-bogus", lambda: cf.layer_norm(X2(), 8, backend="gpu"), ValueError, "backend"),
    ("ln-backend-int", lambda: cf.layer_norm(X2(), 8, backend=3), TypeError, "backend"),
    ("rms-input-int", lambda: cf.rms_norm(torch.ones(2, 8, dtype=torch.int64), 8), TypeError, "input"),
    ("rms-weight-shape", lambda: cf.rms_norm(X2(), 8, torch.ones(4)), ValueError, "weight"),
    ("rms-eps-inf", lambda: cf.rms_norm(X2(), 8, eps=float("inf")), ValueError, "eps"),
    # --- functional.mlp
    ("mlp-x-list", lambda: mlp([1.0] * 8), TypeError, "x"),
    ("mlp-x-int", lambda: mlp(torch.ones(3, 8, dtype=torch.int32)), TypeError, "x"),
    ("mlp-x-0d", lambda: mlp(torch.tensor(1.0)), ValueError, "x"),
    ("mlp-activation", lambda: mlp(activation="GELU"), ValueError, "activation"),
    ("mlp-activation-none", lambda: mlp(activation=None), ValueError, "activation"),
    ("mlp-recompute", lambda: mlp(recompute="keep_attn"), ValueError, "recompute"),
    ("mlp-norm", lambda: mlp(norm="batchnorm"), ValueError, "norm"),
    ("mlp-dropout-1", lambda: mlp(dropout=1.0), ValueError, "dropout"),
    ("mlp-dropout-neg", lambda: mlp(dropout=-0.1), ValueError, "dropout"),
    ("mlp-dropout-str", lambda: mlp(dropout="0.1"), ValueError, "dropout"),
    ("mlp-fc1-1d", lambda: mlp(fc1_weight=torch.randn(16)), ValueError, "fc1_weight"),
    ("mlp-fc1-none", lambda: mlp(fc1_weight=None), TypeError, "fc1_weight"),
    ("mlp-fc1-width", lambda: mlp(fc1_weight=torch.randn(16, 7)), ValueError, "fc1_weight"),
    ("mlp-fc1-dtype", lambda: mlp(fc1_weight=W1.double()), TypeError, "fc1_weight"),
    ("mlp-fc1-bias", lambda: mlp(fc1_bias=torch.randn(15)), ValueError, "fc1_bias"),
    ("mlp-fc2-shape", lambda: mlp(fc2_weight=torch.randn(8, 15)), ValueError, "fc2_weight"),
    ("mlp-fc2-none", lambda: mlp(fc2_weight=None), TypeError, "fc2_weight"),
    ("mlp-gate-missing", lambda: mlp(activation="swiglu"), TypeError, "gate_weight"),
    ("mlp-gate-unused", lambda: mlp(gate_weight=W1), ValueError, "gate_weight"),
    ("mlp-norm-weight-unused", lambda: mlp(norm_weight=torch.ones(8)), ValueError, "norm_weight"),
    ("mlp-norm-weight-shape", lambda: mlp(norm="layernorm", norm_weight=torch.ones(7)), ValueError, "norm_weight"),
    ("mlp-rms-bias", lambda: mlp(norm="rmsnorm", norm_bias=torch.ones(8)), ValueError, "norm_bias"),
    ("mlp-norm-eps", lambda: mlp(norm="layernorm", norm_eps=-1.0), ValueError, "norm_eps"),
    ("mlp-backend", lambda: mlp(backend="tpu"), ValueError, "backend"),
    # --- functional.attention
    ("attn-x-2d", lambda: attn(X2()), ValueError, "x"),
    ("attn-x-int", lambda: attn(torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, "x"),
    ("attn-heads-zero", lambda: attn(num_heads=0), ValueError, "num_heads"),
    ("attn-heads-float", lambda: attn(num_heads=2.0), ValueError, "num_heads"),
    ("attn-kv-nondivisor", lambda: attn(num_heads=2, num_kv_heads=3), ValueError, "num_kv_heads"),
    ("attn-qkv-shape", lambda: attn(qkv_weight=torch.randn(25, 8)), ValueError, "qkv_weight"),
    ("attn-qkv-list", lambda: attn(qkv_weight="w"), TypeError, "qkv_weight"),
    ("attn-qkv-bias", lambda: attn(qkv_bias=torch.randn(23)), ValueError, "qkv_bias"),
    ("attn-out-shape", lambda: attn(out_weight=torch.randn(8, 9)), ValueError, "out_weight"),
    ("attn-out-none", lambda: attn(out_weight=None), TypeError, "out_weight"),
    ("attn-mask-float", lambda: attn(attention_mask=torch.ones(2, 3)), TypeError, "attention_mask"),
    ("attn-mask-shape", lambda: attn(attention_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     "attention_mask"),
    ("attn-mask-list", lambda: attn(attention_mask=[[1, 1, 1]] * 2), TypeError, "attention_mask"),
    ("attn-rope-odd", lambda: attn(qkv_weight=torch.randn(12, 8), out_weight=torch.randn(8, 4), num_heads=4,
                                   rope=True), ValueError, "rope"),
    ("attn-rope-cos-alone", lambda: attn(rope=True, rope_cos=torch.ones(3, 2)), ValueError, "rope_cos"),
    ("attn-rope-cos-shape", lambda: attn(rope=True, rope_cos=torch.ones(3, 3), rope_sin=torch.ones(3, 3)),
     ValueError, "rope_cos"),
    ("attn-recompute", lambda: attn(recompute="keep_mlp"), ValueError, "recompute"),
    ("attn-dropout", lambda: attn(dropout=2), ValueError, "dropout"),
    ("attn-norm", lambda: attn(norm="layer_norm"), ValueError, "norm"),
    ("attn-norm-weight", lambda: attn(norm="rmsnorm", norm_weight=torch.ones(8, 1)), ValueError, "norm_weight"),
    ("attn-backend", lambda: attn(backend="cudnn"), ValueError, "backend"),
    # --- nn constructors and attribute assignment
    ("nn-mlp-d_model", lambda: nn.MLP(0, 8), ValueError, "d_model"),
    ("nn-mlp-d_hidden", lambda: nn.MLP(8, 2.5), ValueError, "d_hidden"),
    ("nn-mlp-activation", lambda: nn.MLP(8, 8, activation="tanh"), ValueError, "activation"),
    ("nn-mlp-dropout", lambda: nn.MLP(8, 8, dropout=1.5), ValueError, "dropout"),
    ("nn-mlp-norm", lambda: nn.MLP(8, 8, norm="ln"), ValueError, "norm"),
    ("nn-mlp-recompute", lambda: nn.MLP(8, 8, recompute="keep_attn"), ValueError, "recompute"),
    ("nn-mlp-recompute-later", lambda: setattr(nn.MLP(8, 8), "recompute", "fast"), ValueError, "recompute"),
    ("nn-attn-heads", lambda: nn.Attention(8, 3), ValueError, "num_heads"),
    ("nn-attn-kv", lambda: nn.Attention(8, 4, num_kv_heads=3), ValueError, "num_kv_heads"),
    ("nn-attn-rope-odd", lambda: nn.Attention(8, 8, rope=True), ValueError, "rope"),
    ("nn-attn-recompute-later", lambda: setattr(nn.Attention(8, 2), "recompute", None), ValueError, "recompute"),
    ("nn-block-style", lambda: nn.TransformerBlock(8, 2, style="bert"), ValueError, "style"),
    ("nn-block-recompute", lambda: nn.TransformerBlock(8, 2, recompute="half"), ValueError, "recompute"),
    ("nn-block-recompute-later", lambda: setattr(nn.TransformerBlock(8, 2), "recompute", 1), ValueError,
     "recompute"),
    ("nn-block-d_hidden", lambda: nn.TransformerBlock(8, 2, d_hidden=0), ValueError, "d_hidden"),
    # --- nn forwards
    ("nn-ln-fwd-int", module_call(lambda: nn.LayerNorm(8), torch.ones(2, 8, dtype=torch.int64)), TypeError,
     "input"),
    ("nn-rms-fwd-shape", module_call(lambda: nn.RMSNorm(8), torch.randn(2, 7)), ValueError, "normalized_shape"),
    ("nn-mlp-fwd-width", module_call(lambda: nn.MLP(8, 8), torch.randn(2, 7)), ValueError, "fc1_weight"),
    ("nn-mlp-fwd-dtype", module_call(lambda: nn.MLP(8, 8), torch.randn(2, 8, dtype=torch.float64)), TypeError,
     "fc1_weight"),
    ("nn-attn-fwd-2d", module_call(lambda: nn.Attention(8, 2), torch.randn(3, 8)), ValueError, "x"),
    ("nn-block-fwd-mask", lambda: nn.TransformerBlock(8, 2)(X3(), torch.ones(2, 5, dtype=torch.bool)), ValueError,
     "attention_mask"),
    ("nn-block-fwd-str", module_call(lambda: nn.TransformerBlock(8, 2), "x"), TypeError, "x"),
    # --- convert / conversion_report / unconvert / saved_bytes
    ("convert-model", lambda: ckpt_ops.convert("model"), TypeError, "model"),
    ("convert-recompute", lambda: ckpt_ops.convert(torch.nn.Linear(2, 2), recompute="fast"), ValueError,
     "recompute"),
    ("report-unconverted", lambda: ckpt_ops.conversion_report(torch.nn.Linear(2, 2)), ValueError, "convert"),
    ("saved_bytes-fn", lambda: ckpt_ops.saved_bytes("f", torch.ones(1)), TypeError, "fn"),
]


@pytest.fixture
def no_kernels(monkeypatch):
    for fam in ("layer_norm", "rms_norm", "mlp", "attention"):  # warm the caches, then forbid kernels
        _backend.resolve(fam, torch.device("cpu"), "reference")
        _backend.resolve(fam, torch.device("cpu"))

    def boom(*a, **k):
        raise AssertionError("a kernel was looked up before the arguments were validated")

    monkeypatch.setattr(_backend, "kernel", boom)


@pytest.mark.parametrize("case,thunk,exc,word", CASES, ids=[c[0] for c in CASES])
def test_bad_input(no_kernels, case, thunk, exc, word):
    with pytest.raises(exc) as info:
        thunk()
    assert word in str(info.value), f"{case}: message does not name {word!r}: {info.value}"


def test_bad_environment_backend(no_kernels, monkeypatch):
    monkeypatch.setenv("CKPT_OPS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="CKPT_OPS_BACKEND"):
        cf.layer_norm(X2(), 8)


def test_catalogue_size():
    assert len(CASES) + 1 >= 40
