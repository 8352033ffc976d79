"""The transformer block as one checkpointed segment, against the block built from the same
submodules in eager PyTorch (fp64 truth), for both styles, every level and backend."""
import copy

import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_ops
from conftest import DEVICE, assert_fp32_close, available_backends
from test_attention import eager_attention, make_mask
from test_mlp import eager_mlp

BACKENDS = available_backends("attention")
LEVELS = ["full", "keep_attn", "keep_mlp", "selective", "none"]


def make_block(style, level, backend, p=0.0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    blk = ckpt_ops.nn.TransformerBlock(32, 4, style=style, num_kv_heads=2 if style == "llama" else None,
                                       recompute=level, dropout=p).to(DEVICE, dtype)
    with torch.no_grad():
        for m in (blk.attn.norm, blk.mlp.norm):
            m.weight.normal_(1.0, 0.2)
    blk.backend = backend
    return blk


def eager_block(blk, x, mask):
    return eager_mlp(blk.mlp, eager_attention(blk.attn, x, mask))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("level", LEVELS)
def test_block_matches_eager(backend, style, level):
    blk = make_block(style, level, backend)
    x = torch.randn(2, 9, 32, device=DEVICE, requires_grad=True)
    mask = make_mask(2, 9, "right")
    dy = torch.randn(2, 9, 32, device=DEVICE)
    out = blk(x, mask)
    grads = torch.autograd.grad(out, [x, *blk.parameters()], dy)
    ref_blk = copy.deepcopy(blk).double()
    x64 = x.detach().double().requires_grad_()
    ref = eager_block(ref_blk, x64, mask)
    rgrads = torch.autograd.grad(ref, [x64, *ref_blk.parameters()], dy.double())
    assert_fp32_close(out, ref, "out")
    for (name, _), g, r in zip([("x", None), *blk.named_parameters()], grads, rgrads):
        assert_fp32_close(g, r, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_block_equals_its_two_segments_and_levels_agree_bitwise(backend, style):
    """Forward bitwise equal across levels (and to attn -> mlp run separately); gradients of every
    level equal to the separately checkpointed sub-layers."""
    x0 = torch.linspace(-2, 2, 2 * 9 * 32, device=DEVICE).reshape(2, 9, 32)
    mask = make_mask(2, 9, "left")
    outs, grads = [], []
    for level in LEVELS:
        blk = make_block(style, level, backend, p=0.1, seed=1)
        x = x0.clone().requires_grad_()
        torch.manual_seed(3)
        out = blk(x, mask)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), [x, *blk.parameters()]))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_full_block_saves_what_checkpoint_saves(backend, style):
    blk = make_block(style, "full", backend, p=0.1)
    x = torch.randn(2, 16, 32, device=DEVICE, requires_grad=True)
    mask = make_mask(2, 16, "right")
    ours = ckpt_ops.saved_bytes(blk, x, mask)
    assert ours == x.numel() * 4 + mask.numel() + 2 * 8  # input, mask, two dropout seeds
    eager_ref = copy.deepcopy(blk)
    theirs = ckpt_ops.saved_bytes(lambda: tuc.checkpoint(eager_block, eager_ref, x, mask, use_reentrant=False))
    assert ours <= theirs + 16
    plain = ckpt_ops.saved_bytes(eager_block, eager_ref, x, mask)
    assert ours * 5 <= plain
    with torch.no_grad():
        assert ckpt_ops.saved_bytes(blk, x, mask) == 0


def block_bytes(level, b, s, d, h, kv, hd, d_ff, gated, mask_bytes, e=4):
    """What each level keeps, counted by hand (module docstring of ckpt_ops.block)."""
    x = b * s * d * e
    o_lse = b * s * h * hd * e + b * h * s * 4
    h1 = b * s * d * e
    pre = b * s * d_ff * e * (2 if gated else 1)
    qkv = b * s * (h + 2 * kv) * hd * e
    seeds = 2 * 8
    return x + mask_bytes + seeds + {"full": 0, "keep_attn": o_lse, "keep_mlp": o_lse + h1 + pre,
                                     "selective": o_lse + h1 + pre + qkv}[level]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_saved_bytes_of_every_level(backend, style):
    """Each level keeps exactly what its docstring says, and the levels are ordered by memory."""
    x = torch.randn(2, 16, 32, device=DEVICE, requires_grad=True)
    mask = make_mask(2, 16, "right")
    got = []
    for level in ("full", "keep_attn", "keep_mlp", "selective"):
        blk = make_block(style, level, backend, p=0.1)
        kv = blk.attn.num_kv_heads
        d_ff = blk.mlp.fc1.out_features
        want = block_bytes(level, 2, 16, 32, 4, kv, 8, d_ff, style == "llama", mask.numel())
        got.append(ckpt_ops.saved_bytes(blk, x, mask))
        assert got[-1] == want, level
    assert got == sorted(got)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["frozen_all", "only_mlp", "input_without_grad"])
def test_partial_requires_grad(backend, case):
    blk = make_block("llama", "full", backend, seed=2)
    x = torch.randn(2, 7, 32, device=DEVICE, requires_grad=case == "frozen_all")
    for name, p in blk.named_parameters():
        p.requires_grad_(case == "input_without_grad" or (case == "only_mlp" and name.startswith("mlp.")))
    leaves = ([x] if x.requires_grad else []) + [p for p in blk.parameters() if p.requires_grad]
    dy = torch.randn(2, 7, 32, device=DEVICE)
    grads = torch.autograd.grad(blk(x), leaves, dy)
    ref_blk = copy.deepcopy(blk).double()
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    rleaves = ([x64] if x.requires_grad else []) + [p for p in ref_blk.parameters() if p.requires_grad]
    rgrads = torch.autograd.grad(eager_block(ref_blk, x64, None), rleaves, dy.double())
    for g, r in zip(grads, rgrads):
        assert_fp32_close(g, r, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    blk = make_block("llama", "full", backend)
    compiler = "aot_eager" if (backend == "triton" and DEVICE.type == "cpu") else "inductor"
    cb = torch.compile(blk, fullgraph=True, backend=compiler)
    x = torch.randn(2, 8, 32, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    mask = make_mask(2, 8, "right")
    y = cb(x, mask)
    y.sum().backward()
    y2 = blk(x2, mask)
    y2.sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="style"):
        ckpt_ops.nn.TransformerBlock(32, 4, style="bert")
    with pytest.raises(ValueError, match="recompute"):
        ckpt_ops.nn.TransformerBlock(32, 4, recompute="some")
    blk = ckpt_ops.nn.TransformerBlock(32, 4)
    assert [n for n, _ in blk.named_children()] == ["attn", "mlp"]
