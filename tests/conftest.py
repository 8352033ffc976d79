"""Shared test set-up.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be
switched on before Triton is first imported: done here, before anything imports ckpt_ops.
Set CKPT_OPS_TEST_TRITON=0 to skip the (slow) interpreter tests.
"""
import os

import torch

if not torch.cuda.is_available() and os.environ.get("CKPT_OPS_TEST_TRITON", "1") != "0":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import ckpt_ops  # noqa: E402
from ckpt_ops import _backend  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def available_backends(family: str, device: torch.device = DEVICE):
    """pytest params for every backend that can run `family` on `device`; Triton ones marked."""
    params = []
    for be in ("cpu", "cuda", "triton", "reference"):
        if _backend._unavailable_reason(family, be, device.type) is None:
            marks = [pytest.mark.triton] if be == "triton" else []
            params.append(pytest.param(be, id=be, marks=marks))
    return params


def count_kernel_calls(monkeypatch, name: str) -> list:
    """A list that gets `name` appended each time a segment calls that kernel op (through
    ckpt_ops._backend.kernel, which every segment resolves its kernels with)."""
    calls = []
    kernel = _backend.kernel

    def counting(family, backend, op):
        f = kernel(family, backend, op)
        return f if op != name else (lambda *a: (calls.append(op), f(*a))[1])

    monkeypatch.setattr(_backend, "kernel", counting)
    return calls


def assert_freeing_backward_takes(calls, name, out, inputs, dy):
    """The first-order backward that frees the graph calls `name` once (the retain_graph one
    never) and gives the retain_graph path's gradients bit for bit."""
    kept = torch.autograd.grad(out, inputs, dy, retain_graph=True)
    assert calls == []
    freed = torch.autograd.grad(out, inputs, dy)
    assert calls == [name]
    assert all(torch.equal(a, b) for a, b in zip(kept, freed))


def report_mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str) -> str:
    """A message with the mismatch count and the first bad indices (Liger-style)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=False)
    idx = bad.nonzero()[:5].tolist()
    firsts = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
    return f"{name}: {int(bad.sum())}/{bad.numel()} mismatched (rtol={rtol}, atol={atol}); first {firsts}"


def assert_close(actual, expected, rtol, atol, name="tensor"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.allclose(a, e, rtol=rtol, atol=atol):
        raise AssertionError(report_mismatch(a, e, rtol, atol, name))


def rel_err(actual, truth) -> float:
    """Relative norm error ||a - t|| / ||t|| (fp64). A truth that is zero up to rounding (e.g. the
    input gradient of a width-1 LayerNorm) is measured against a floor of 1e-6 per element."""
    a, t = actual.detach().double().cpu(), truth.detach().double().cpu()
    floor = 1e-6 * max(t.numel(), 1) ** 0.5
    return float((a - t).norm() / t.norm().clamp_min(floor))


def assert_fp32_close(actual, truth, name, rtol=1e-4, relnorm=1e-5, atol=None, eager_fp32=None):
    """DESIGN §4 fp32 rule: within rtol 1e-4 elementwise (atol scaled to the tensor's magnitude)
    and relative-norm error 1e-5 of the fp64 truth.

    Where the quantity is ill-conditioned in fp32 itself (e.g. the input gradient of a width-1
    RMSNorm, a difference of nearly equal terms) eager PyTorch in fp32 misses that bar too; pass
    `eager_fp32` and the bar becomes "no worse than 2x eager fp32's error" for such tensors."""
    try:
        scale = float(truth.detach().abs().max()) if truth.numel() else 1.0
        atol_ = atol if atol is not None else 1e-5 * max(scale, 1e-6)
        assert_close(actual, truth, rtol=rtol, atol=atol_, name=name)
        err = rel_err(actual, truth)
        assert err <= relnorm, f"{name}: relative-norm error {err:.3g} > {relnorm:g}"
    except AssertionError as e:
        if eager_fp32 is None or rel_err(eager_fp32, truth) <= relnorm:
            raise
        assert_low_precision_ok(actual, eager_fp32, truth, name + f" (ill-conditioned: {e})")


def assert_low_precision_ok(actual, eager_same_dtype, truth, name, factor=2.0, floor=1e-6):
    """DESIGN §4 low-precision rule: error vs the fp32/fp64 truth at most `factor` x the error of
    eager PyTorch in the same dtype, plus a tiny floor."""
    ours, theirs = rel_err(actual, truth), rel_err(eager_same_dtype, truth)
    assert ours <= factor * theirs + floor, (
        f"{name}: relative error {ours:.3g} > {factor} x eager's {theirs:.3g} + {floor:g}")
