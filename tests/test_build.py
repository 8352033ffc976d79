"""The extension's build: what it registers, and (in CI) proof that the CUDA half compiled,
linked and loaded. The README's test command sets CKPT_OPS_EXPECT_EXTENSION=1 and
CKPT_OPS_EXPECT_CUDA_BUILD=1 so a silently CPU-only or missing build fails here."""
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from ckpt_ops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECT_EXT = os.environ.get("CKPT_OPS_EXPECT_EXTENSION") == "1"
EXPECT_CUDA = os.environ.get("CKPT_OPS_EXPECT_CUDA_BUILD") == "1"

# Every op the extension defines; a new schema in csrc/ops.cpp must be added here (and so gets
# the per-device registration check below).
EXTENSION_OPS = {"layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd",
                 "act_fwd", "act_bwd", "act_bwd_", "act_bwd_rebuild_", "dropout_fwd", "dropout_bwd",
                 "rope_", "attention_fwd", "attention_bwd", "attention_bwd_"}
# Ops the extension implements on CPU only, on purpose: the CUDA attention core is the Triton
# flash kernel (triton_kernels/), so the extension registers no CUDA attention_fwd/bwd. Every
# other op must have a CUDA kernel in a CUDA build. act_bwd_ (dh written into da) and
# act_bwd_rebuild_ (every output over its input) exist for the CPU's allocator: each saves
# activation-sized allocations (and their page faults) per backward; the CUDA caching allocator
# has no such cost, so CUDA runs act_bwd.
CPU_ONLY_OPS = {"attention_fwd", "attention_bwd", "attention_bwd_", "act_bwd_", "act_bwd_rebuild_"}


def ckpt_op_names():
    return set(_backend.extension_ops())


def test_extension_loaded_when_expected():
    if EXPECT_EXT:
        assert _backend.extension_loaded(), _backend._ext_error
    elif not _backend.extension_loaded():
        pytest.skip(f"extension not built: {_backend._ext_error}")


@pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")
def test_every_op_has_cpu_kernel_and_fake():
    assert ckpt_op_names() == EXTENSION_OPS
    from ckpt_ops import _meta

    for op in EXTENSION_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ckpt_ops::{op}", "CPU"), op
        assert callable(getattr(_meta, op, None)), f"no fake implementation for {op} in ckpt_ops._meta"
        assert torch._library.simple_registry.singleton.find(f"ckpt_ops::{op}").fake_impl.kernel is not None, op


@pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")
def test_cuda_build_registered_cuda_kernels_for_every_op():
    info = _backend._ext_info
    if EXPECT_CUDA:
        assert info["with_cuda"], "CKPT_OPS_EXPECT_CUDA_BUILD=1 but ckpt_ops._C was built without CUDA"
    if not info["with_cuda"]:
        pytest.skip("CPU-only build")
    assert info["cuda_archs"], info
    missing = [op for op in EXTENSION_OPS - CPU_ONLY_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"ckpt_ops::{op}", "CUDA")]
    assert not missing, f"CUDA kernels missing for {missing}"


def test_triton_kernels_install_under_the_package_namespace(tmp_path):
    """`triton_kernels/` must install as `ckpt_ops.triton_kernels` (not a top-level package that
    would clash with Triton's own `triton_kernels`). Builds a pure-Python wheel (no extension,
    seconds) and inspects it."""
    env = dict(os.environ, CKPT_OPS_SKIP_EXTENSION="1")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                          "-w", str(tmp_path), ROOT], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("ckpt_ops-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ckpt_ops/triton_kernels/norm.py" in names
    assert "ckpt_ops/triton_kernels/__init__.py" in names
    assert not any(n.startswith("triton_kernels/") for n in names)


def test_editable_install_resolves_triton_kernels():
    import importlib.util

    spec = importlib.util.find_spec("ckpt_ops.triton_kernels")
    assert spec is not None and spec.origin is not None
    assert os.path.basename(os.path.dirname(spec.origin)) in ("triton_kernels",)
