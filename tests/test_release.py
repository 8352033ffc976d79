"""Segments free their own saved intermediates during backward (ckpt_ops._autograd.release), as
eager autograd frees each node's saved tensors once that node has run -- and never anything else.

Checked by saved-tensor hooks that keep a reference to every packed tensor: after a backward that
frees the graph, the segment's intermediates (norm outputs, h/g/a, qkv, O, LSE, h1) have no storage
left, while the inputs, parameters, masks and rotary tables the segment saved are untouched; with
retain_graph=True nothing is freed and a second backward gives the same gradients; gradients are
those of a run without hooks."""
import pytest
import torch

import ckpt_ops
from conftest import DEVICE, available_backends
from test_attention import make_mask
from test_block import make_block

BACKENDS = available_backends("attention")
LEVELS = ["full", "keep_attn", "keep_mlp", "selective", "none"]


def _block(level, backend, style):
    return make_block(style, level, backend, p=0.1)


def _run(blk, x, mask, retain=False):
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(1)
        out = blk(x, attention_mask=mask)
    dy = torch.ones_like(out)
    params = [p for p in blk.parameters()]
    g = torch.autograd.grad(out, [x, *params], dy, retain_graph=retain)
    return packed, g, (out, dy, params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("level", LEVELS)
def test_backward_frees_only_its_own_intermediates(backend, style, level):
    blk = _block(level, backend, style)
    x = torch.randn(2, 7, 32, device=DEVICE, requires_grad=True)
    mask = make_mask(2, 7, "right")
    x0, mask0 = x.detach().clone(), mask.clone()
    packed, g, _ = _run(blk, x, mask)
    user = {t.untyped_storage().data_ptr() for t in (x, mask, *blk.parameters())}
    inner = [t for t in packed if t.untyped_storage().data_ptr() not in user and t.dim() >= 2]
    if level != "full":
        assert inner, "the level keeps intermediates"
    # everything else the block saved: seeds and per-row statistics (1-D, kept to the end)
    for t in inner:
        assert t.untyped_storage().nbytes() == 0, f"an intermediate of shape {tuple(t.shape)} was not freed"
    # the user's tensors are intact, and the gradients equal a run without hooks
    assert torch.equal(x.detach(), x0) and torch.equal(mask, mask0)
    assert all(p.untyped_storage().nbytes() > 0 for p in blk.parameters())
    torch.manual_seed(1)
    out = blk(x, attention_mask=mask)
    ref = torch.autograd.grad(out, [x, *blk.parameters()], torch.ones_like(out))
    for a, b in zip(g, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", LEVELS)
def test_retain_graph_keeps_everything(backend, level):
    blk = _block(level, backend, "llama")
    x = torch.randn(2, 7, 32, device=DEVICE, requires_grad=True)
    packed, g1, (out, dy, params) = _run(blk, x, None, retain=True)
    assert all(t.untyped_storage().nbytes() >= t.numel() * t.element_size() for t in packed)
    g2 = torch.autograd.grad(out, [x, *params], dy)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", ["full", "selective", "none"])
def test_mlp_backward_frees_h_and_a(backend, level):
    torch.manual_seed(0)
    m = ckpt_ops.nn.MLP(16, 40, norm="layernorm", residual=True, recompute=level).to(DEVICE)
    m.backend = backend
    x = torch.randn(5, 16, device=DEVICE, requires_grad=True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        out = m(x)
    params = {q.untyped_storage().data_ptr() for q in m.parameters()}
    big = [t for t in packed if t.shape == (5, 40) and t.untyped_storage().data_ptr() not in params]  # h, a
    assert len(big) == {"full": 0, "selective": 1, "none": 2}[level]
    out.sum().backward()
    assert all(t.untyped_storage().nbytes() == 0 for t in big)
    assert x.untyped_storage().nbytes() == 5 * 16 * 4
