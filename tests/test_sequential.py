"""Segment checkpointing: ckpt_ops.checkpoint_sequential, ckpt_ops.nn.Sequential and span hooks.

References: the same layers run eagerly without checkpointing (fp64), and
torch.utils.checkpoint.checkpoint_sequential on the same layers under the same seed."""
import pytest
import torch
import torch.utils.checkpoint as tuc

import ckpt_ops
from bench import eager
from ckpt_ops.sequential import checkpoint_spans, remove_spans

B, S, D, H = 2, 16, 32, 2


def user_layers(dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D, 2 * D), torch.nn.GELU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(2 * D, D), torch.nn.LayerNorm(D), torch.nn.Tanh(),
                               torch.nn.Linear(D, D), torch.nn.Dropout(dropout)).to(dtype)


def blocks(n, dropout=0.0, dtype=torch.float64, style="gpt2", level="full"):
    torch.manual_seed(1)
    return torch.nn.ModuleList(ckpt_ops.nn.TransformerBlock(D, H, style=style, dropout=dropout, recompute=level,
                                                            num_kv_heads=1 if style == "llama" else None,
                                                            dtype=dtype) for _ in range(n))


def step(fn, params, x, seed=123):
    """Output and gradients (input, then every parameter) of sum(fn(x) * w) under `seed`."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    out = fn(x)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    params = list(params)
    for p in params:
        p.grad = None
    (out * w).sum().backward()  # not autograd.grad: reentrant checkpoint supports .backward() only
    grads = [x.grad] + [p.grad for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


def assert_close(a, b, exact=False, rel=1e-12):
    """Equal (bitwise with `exact`), else within a relative-norm error `rel` per tensor."""
    (oa, ga), (ob, gb) = a, b
    pairs = [(oa, ob)] + list(zip(ga, gb))
    for i, (u, v) in enumerate(pairs):
        if exact:
            assert torch.equal(u, v), f"tensor {i} differs: max |diff| {(u - v).abs().max().item()}"
        else:
            err = ((u - v).norm() / v.norm().clamp_min(1e-300)).item()
            assert err <= rel, f"tensor {i}: relative-norm error {err:.3g} > {rel}"


@pytest.mark.parametrize("segments", [1, 2, 3, 4, [3, 1, 4]])
def test_user_layers_equal_eager_fp64(segments):
    seq = user_layers()
    x = torch.randn(B, S, D, dtype=torch.float64)
    ref = step(seq, seq.parameters(), x)
    got = step(lambda t: ckpt_ops.checkpoint_sequential(seq, segments, t), seq.parameters(), x)
    assert_close(got, ref)


@pytest.mark.parametrize("segments", [2, 3])
def test_user_layers_with_dropout_equal_torch_checkpoint_sequential(segments):
    seq = user_layers(dropout=0.3)
    x = torch.randn(B, S, D, dtype=torch.float64)
    theirs = step(lambda t: tuc.checkpoint_sequential(seq, segments, t, use_reentrant=False), seq.parameters(), x)
    ours = step(lambda t: ckpt_ops.checkpoint_sequential(seq, segments, t), seq.parameters(), x)
    assert_close(ours, theirs, exact=True)
    # and the masks are eager's under the same seed (the replay restored the RNG state)
    assert_close(ours, step(seq, seq.parameters(), x))


def test_list_of_callables_and_reentrant():
    seq = user_layers()
    fns = [lambda t, m=m: m(t) for m in seq]
    x = torch.randn(B, S, D, dtype=torch.float64)
    ref = step(seq, seq.parameters(), x)
    assert_close(step(lambda t: ckpt_ops.checkpoint_sequential(fns, 2, t), seq.parameters(), x), ref)
    assert_close(step(lambda t: ckpt_ops.checkpoint_sequential(seq, 2, t, use_reentrant=True), seq.parameters(), x),
                 ref)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_fused_blocks_in_outer_segments_equal_eager_fp64(style):
    blks = blocks(4, style=style)
    x = torch.randn(B, S, D, dtype=torch.float64)
    ref = step(lambda t: eager.block_forward(blks[3], eager.block_forward(blks[2], eager.block_forward(
        blks[1], eager.block_forward(blks[0], t)))), blks.parameters(), x)
    plain = step(lambda t: ckpt_ops.checkpoint_sequential(blks, 1, t), blks.parameters(), x)
    outer = step(lambda t: ckpt_ops.checkpoint_sequential(blks, 2, t), blks.parameters(), x)
    # the fused kernels' own fp64 accuracy against eager (~1e-8 here: some reductions accumulate
    # in fp32); the outer segment adds no error of its own
    assert_close(outer, ref, rel=1e-6)
    assert_close(outer, plain, exact=True)


@pytest.mark.parametrize("level", ["full", "keep_mlp", "none"])
def test_outer_replay_of_fused_dropout_is_bitwise(level):
    """The outer replay redraws each block's dropout seeds from the restored RNG state: outputs and
    gradients are bitwise those of the same blocks without the outer checkpoint."""
    blks = blocks(4, dropout=0.2, dtype=torch.float32, level=level)
    x = torch.randn(B, S, D)
    plain = step(lambda t: ckpt_ops.checkpoint_sequential(blks, 1, t), blks.parameters(), x)
    for segments in (2, 4, [3, 1]):
        outer = step(lambda t: ckpt_ops.checkpoint_sequential(blks, segments, t), blks.parameters(), x)
        assert_close(outer, plain, exact=True)
    # a different seed gives different masks (the test would notice a replay with fresh seeds)
    other = step(lambda t: ckpt_ops.checkpoint_sequential(blks, 1, t), blks.parameters(), x, seed=7)
    assert not torch.equal(other[0], plain[0])


@pytest.mark.parametrize("n,segments", [(6, 3), (8, 4), (8, 2), (9, 3)])
def test_outer_segments_keep_segment_inputs_plus_last_segment(n, segments):
    """Saved bytes (saved-tensor hooks) = one block input per checkpointed segment + what the last
    segment's blocks keep at "full": their inputs and dropout seeds (the 'stats')."""
    blks = blocks(n, dropout=0.1, dtype=torch.float32)
    x = torch.randn(B, S, D, requires_grad=True)
    xb = x.numel() * x.element_size()
    k = n // segments
    last = n - k * (segments - 1)
    got = ckpt_ops.saved_bytes(lambda t: ckpt_ops.checkpoint_sequential(blks, segments, t), x)
    per_block = ckpt_ops.saved_bytes(blks[0], x)
    stats = per_block - xb
    assert 0 < stats <= 64  # two int64 dropout seeds
    assert got == (segments - 1) * xb + last * (xb + stats)
    assert got < ckpt_ops.saved_bytes(lambda t: ckpt_ops.checkpoint_sequential(blks, 1, t), x)


def test_sequential_module_form():
    seq = user_layers(dropout=0.2)
    ours = ckpt_ops.nn.Sequential(*seq, segments=2)
    assert list(ours.state_dict()) == list(seq.state_dict())
    assert "segments=2" in repr(ours)
    x = torch.randn(B, S, D, dtype=torch.float64)
    assert_close(step(ours, ours.parameters(), x), step(seq, seq.parameters(), x), exact=True)
    assert ckpt_ops.saved_bytes(ours, x.requires_grad_()) < ckpt_ops.saved_bytes(seq, x)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), seq.eval()(x))


class Loop(torch.nn.Module):
    """A parent that calls its layers one by one with an extra keyword (as HF models do)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, attention_mask=mask)
        return x


def test_spans_equal_checkpoint_sequential_and_keep_only_span_inputs():
    blks = blocks(6, dropout=0.2, dtype=torch.float32)
    model = Loop(blks)
    x = torch.randn(B, S, D, requires_grad=True)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, -3:] = False
    plain = step(lambda t: model(t, mask), blks.parameters(), x)
    plain_bytes = ckpt_ops.saved_bytes(model, x, mask)
    checkpoint_spans(blks, [(0, 3), (3, 5)])
    spans = step(lambda t: model(t, mask), blks.parameters(), x)
    assert_close(spans, plain, exact=True)
    xb = x.numel() * 4
    per_block = ckpt_ops.saved_bytes(blks[5], x, mask)
    # two span inputs + block 5 at "full" (the mask is shared by every block: one storage)
    got = ckpt_ops.saved_bytes(model, x, mask)
    assert got == 2 * xb + per_block
    assert plain_bytes == 6 * (per_block - mask.numel()) + mask.numel()
    remove_spans(blks)
    assert ckpt_ops.saved_bytes(model, x, mask) == plain_bytes


def test_bad_arguments():
    seq = user_layers()
    x = torch.randn(B, S, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="segments must be in"):
        ckpt_ops.checkpoint_sequential(seq, 0, x)
    with pytest.raises(ValueError, match="segments must be in"):
        ckpt_ops.checkpoint_sequential(seq, 9, x)
    with pytest.raises(ValueError, match="summing"):
        ckpt_ops.checkpoint_sequential(seq, [3, 3], x)
    with pytest.raises(TypeError, match="functions"):
        ckpt_ops.checkpoint_sequential(seq[0], 1, x)
    with pytest.raises(TypeError, match=r"functions\[1\]"):
        ckpt_ops.checkpoint_sequential([seq[0], 3], 1, x)
    with pytest.raises(TypeError, match="input"):
        ckpt_ops.checkpoint_sequential(seq, 1, [x])
    with pytest.raises(ValueError, match="disjoint"):
        checkpoint_spans(list(seq), [(0, 3), (2, 4)])
