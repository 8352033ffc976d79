"""Backend selection (DESIGN §2): explicit requests, the environment variable, visible fall-back,
and the package working without the extension."""
import logging
import os
import subprocess
import sys

import pytest
import torch

import ckpt_ops
from ckpt_ops import _backend
from ckpt_ops import functional as cf

CPU = torch.device("cpu")


def test_unknown_backend_name_raises_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        cf.layer_norm(torch.randn(2, 4), (4,), backend="tpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        cf.layer_norm(torch.randn(2, 4), (4,), backend=3)


def test_explicit_unavailable_backend_raises():
    with pytest.raises(RuntimeError, match="'cuda' serves CUDA tensors"):
        cf.layer_norm(torch.randn(2, 4), (4,), backend="cuda")


def test_env_var_selects_and_is_validated(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert _backend.resolve("layer_norm", CPU) == "reference"
    assert _backend.resolve("layer_norm", CPU, "auto") != "reference" or not _backend.extension_loaded()
    monkeypatch.setenv(_backend.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=_backend.ENV_VAR):
        _backend.resolve("layer_norm", CPU)


@pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")
def test_auto_prefers_the_extension_on_cpu():
    assert _backend.resolve("layer_norm", CPU) == "cpu"
    assert ckpt_ops.backend_info()["ops"]["layer_norm"]["cpu"] == "cpu"


def test_auto_fallback_is_logged_once_and_queryable(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "_C", None)
    monkeypatch.setattr(_backend, "_fallbacks", {})
    with caplog.at_level(logging.WARNING, logger="ckpt_ops"):
        x = torch.randn(3, 8, requires_grad=True)
        cf.layer_norm(x, (8,)).sum().backward()
        cf.layer_norm(x, (8,))
    warnings = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(warnings) == 1
    fb = ckpt_ops.backend_info()["fallbacks"]
    assert fb == [{"op": "layer_norm", "device": "cpu", "wanted": "cpu", "using": "reference",
                   "why": fb[0]["why"]}] and "not loaded" in fb[0]["why"]
    with pytest.raises(RuntimeError, match="not loaded"):
        cf.layer_norm(x, (8,), backend="cpu")


def test_backend_info_shape():
    info = ckpt_ops.backend_info()
    assert set(info) >= {"extension", "triton", "ops", "fallbacks", "cuda_available", "requested"}
    assert {"loaded", "with_cuda", "cuda_archs", "error"} <= set(info["extension"])
    for fam in ("layer_norm", "rms_norm"):
        assert set(info["ops"][fam]) == {"cpu", "cuda"}


def test_package_imports_and_runs_without_extension_or_triton(tmp_path):
    """A fresh interpreter where ckpt_ops._C and triton cannot be imported still serves the
    reference path and says so."""
    code = r"""
import sys
sys.modules["ckpt_ops._C"] = None  # `import` raises ImportError, as for a missing module
sys.modules["triton"] = None
import torch, ckpt_ops
info = ckpt_ops.backend_info()
assert not info["extension"]["loaded"], info
assert info["ops"]["layer_norm"]["cpu"] == "reference", info
x = torch.randn(4, 16, requires_grad=True)
y = ckpt_ops.nn.LayerNorm(16)(x)
y.sum().backward()
ref = torch.nn.functional.layer_norm(x.detach(), (16,))
assert torch.allclose(y, ref, atol=1e-5)
assert sys.modules.get("triton") is None
print("OK", ckpt_ops.backend_info()["fallbacks"][0]["using"])
"""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK reference" in out.stdout
