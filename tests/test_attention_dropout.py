"""Attention-probability dropout (``attn_dropout``), per backend (cpu = the C++ kernel of ours, reference,
triton under the interpreter): the mask recovered from outputs (V = identity, so O reveals P * mask / (1-p))
has the right keep rate and the documented Philox bits; the backward uses the forward's mask (gradients equal
an independent fp64 autograd computation applying that recovered mask); a fresh mask per call, reproduced by
torch.manual_seed; every recompute level bitwise the "none" level; causal + key mask + GQA; eval = no dropout;
a converted Llama with attention_dropout trains fused (GPT-2: tests/test_convert.py)."""
import copy
import math

import pytest
import torch

import ckpt_ops
from ckpt_ops import _backend
from ckpt_ops import reference as R
from conftest import DEVICE, assert_fp32_close, assert_low_precision_ok, available_backends

BACKENDS = available_backends("attention")
P = 0.3


def _ops(be):
    _backend.resolve("attention", DEVICE, be)
    return _backend.kernel("attention", be, "attention_fwd"), _backend.kernel("attention", be, "attention_bwd")


def _dtype(be):  # the Triton interpreter has no fp64 kernels; the others are checked at fp64 accuracy
    return torch.float32 if be == "triton" else torch.float64


def _valid(b, h, s, causal, km):
    return R.attention_valid(km, b, s, causal, DEVICE).expand(b, h, s, s)


def _identity_v(qkv, h, kv, hd):
    """qkv with every V head = the identity (hd == S): O[b, q, head] = (P * Z)[b, head, q, :]."""
    b, s, _ = qkv.shape
    x = qkv.clone().view(b, s, h + 2 * kv, hd)
    x[:, :, h + kv:] = torch.eye(s, hd, dtype=qkv.dtype)[None, :, None, :]
    return x.view(b, s, -1)


def _recover_mask(fwd, qkv, km, h, kv, hd, causal, scale, seed):
    """(B, H, S, S) keep mask read off O with V = I (valid entries only; P > 0 there)."""
    b, s, _ = qkv.shape
    o, _ = fwd(_identity_v(qkv, h, kv, hd), km, h, kv, causal, scale, P, seed)
    return o.view(b, s, h, hd).transpose(1, 2) != 0, o


def _inputs(b, s, h, kv, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, (h + 2 * kv) * hd, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def _eager_with_mask(qkv, do, keep, km, h, kv, causal, scale):
    """fp64 autograd of O = (softmax(scale q k^T, masked) * keep / (1 - p)) V: (o, dqkv)."""
    b, s, _ = qkv.shape
    hd = qkv.shape[-1] // (h + 2 * kv)
    x = qkv.detach().double().requires_grad_(True)
    q = x[..., :h * hd].view(b, s, h, hd).transpose(1, 2)
    k = x[..., h * hd:(h + kv) * hd].view(b, s, kv, hd).transpose(1, 2).repeat_interleave(h // kv, 1)
    v = x[..., (h + kv) * hd:].view(b, s, kv, hd).transpose(1, 2).repeat_interleave(h // kv, 1)
    ok = _valid(b, h, s, causal, km)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~ok, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no key: 0
    o = ((p * keep.double() / (1 - P)) @ v).transpose(1, 2).reshape(b, s, h * hd)
    o.backward(do.double())
    return o.detach(), x.grad


@pytest.mark.parametrize("be", BACKENDS)
def test_recovered_mask_keep_rate_and_bits(be):
    """V = I: O is P * keep / (1 - p) itself. Keep rate within 5 binomial sigmas of 1 - p, kept values =
    the undropped softmax (fp64 eager) / (1 - p), dropped exactly 0, and the mask is the documented Philox
    mapping (reference.attention_dropout_keep: the same bits on every backend)."""
    b, s, h, kv, hd = 2, 16, 4, 2, 16
    qkv = _inputs(b, s, h, kv, hd, _dtype(be))
    seed = torch.tensor([123456789012345], dtype=torch.int64, device=DEVICE)
    fwd, _ = _ops(be)
    keep, o = _recover_mask(fwd, qkv, None, h, kv, hd, False, 0.4, seed)
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - P)) <= 5 * math.sqrt(P * (1 - P) / n), rate
    assert torch.equal(keep, R.attention_dropout_keep(seed, b, h, s, P, DEVICE))
    x = _identity_v(qkv, h, kv, hd).double()
    q = x[..., :h * hd].view(b, s, h, hd).transpose(1, 2)
    k = x[..., h * hd:(h + kv) * hd].view(b, s, kv, hd).transpose(1, 2).repeat_interleave(h // kv, 1)
    p_true = torch.softmax(q @ k.transpose(-1, -2) * 0.4, -1)
    pd = o.view(b, s, h, hd).transpose(1, 2).double()
    assert_fp32_close(pd[keep], p_true[keep] / (1 - P), "kept probabilities")
    # another seed, another mask
    keep2, _ = _recover_mask(fwd, qkv, None, h, kv, hd, False, 0.4, seed + 1)
    assert not torch.equal(keep, keep2)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("causal,mask_kind", [(False, None), (True, "pad")], ids=["plain", "causal-pad"])
def test_backward_uses_the_forward_mask(be, causal, mask_kind):
    """The mask recovered from the forward (V = I; the mask depends on the seed and positions only) applied
    in an independent fp64 autograd computation gives the op's o and dqkv: the backward regenerated exactly
    the forward's bits. GQA (H 4, KV 2); causal with right padding and a left-padded sequence (rows with no
    key: o = 0, zero gradients)."""
    b, s, h, kv, hd = 2, 16, 4, 2, 16
    dtype = _dtype(be)
    qkv = _inputs(b, s, h, kv, hd, dtype, seed=1)
    do = _inputs(b, s, h, 0, hd, dtype, seed=2)
    km = None
    if mask_kind == "pad":
        km = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
        km[0, -5:] = False
        km[1, :3] = False
    seed = torch.tensor([2**40 + 7], dtype=torch.int64, device=DEVICE)
    fwd, bwd = _ops(be)
    keep, _ = _recover_mask(fwd, qkv, km, h, kv, hd, causal, 0.3, seed)
    keep = keep & _valid(b, h, s, causal, km)
    o, lse = fwd(qkv, km, h, kv, causal, 0.3, P, seed)
    dqkv = bwd(do, qkv, o, lse, km, h, kv, causal, 0.3, P, seed)
    o_t, d_t = _eager_with_mask(qkv, do, keep, km, h, kv, causal, 0.3)
    assert_fp32_close(o.double(), o_t, "o")
    assert_fp32_close(dqkv.double(), d_t, "dqkv")
    if km is not None and causal:
        assert torch.equal(o[1, :3], torch.zeros_like(o[1, :3])) and torch.isfinite(dqkv).all()


@pytest.mark.parametrize("be", [b for b in BACKENDS if b.values[0] == "triton"])
def test_triton_fp16_same_bits_2x_rule(be):
    """fp16 under the interpreter: error vs the fp64 truth with the same seed at most 2x the contract's
    (reference in fp32, one rounding per output) on the same fp16 inputs."""
    b, s, h, kv, hd = 1, 19, 2, 1, 16
    qkv = _inputs(b, s, h, kv, hd, torch.float16, seed=3)
    do = _inputs(b, s, h, 0, hd, torch.float16, seed=4)
    seed = torch.tensor([99], dtype=torch.int64)
    fwd, bwd = _ops("triton")
    o, lse = fwd(qkv, None, h, kv, True, 0.25, P, seed)
    d = bwd(do, qkv, o, lse, None, h, kv, True, 0.25, P, seed)
    _assert_2x_same_seed(o, d, qkv, do, None, h, kv, 0.25, seed)


def _assert_2x_same_seed(o, d, qkv, do, km, h, kv, scale, seed):
    """16-bit o and dqkv (causal, dropout P under `seed`) within 2x the contract's error (the reference
    in the inputs' dtype: fp32 inside, one rounding per output) of the fp64 truth with the same bits."""
    o_t, l_t = R.attention_fwd(qkv.double(), km, h, kv, True, scale, P, seed)
    d_t = R.attention_bwd(do.double(), qkv.double(), o_t, l_t, km, h, kv, True, scale, P, seed)
    o_p, l_p = R.attention_fwd(qkv, km, h, kv, True, scale, P, seed)
    d_p = R.attention_bwd(do, qkv, o_p, l_p, km, h, kv, True, scale, P, seed)
    assert_low_precision_ok(o.double(), o_p.double(), o_t, "o")
    assert_low_precision_ok(d.double(), d_p.double(), d_t, "dqkv")


@pytest.mark.parametrize("be", [b for b in BACKENDS if b.values[0] == "triton"])
def test_triton_dropout_at_gpu_tiles(be):
    """The DROPOUT kernels at the tiles an sm_90 launch takes (``sized_for``: 16-bit hd 64 -> the dropout
    tiles, executed here by the interpreter), S long enough for several query and key blocks with a ragged
    tail: the bits are keyed by (b, h, q, k), not by the tiling, so o and dqkv meet the 2x rule against the
    reference applying the same seed, as at the interpreter's tiles."""
    import triton_kernels.attention as ta
    from triton_kernels._common import ARCH_LIMITS, sized_for

    b, s, h, kv, hd = 1, 80, 2, 1, 64
    qkv = _inputs(b, s, h, kv, hd, torch.float16, seed=5)
    do = _inputs(b, s, h, 0, hd, torch.float16, seed=6)
    seed = torch.tensor([7], dtype=torch.int64)
    km = torch.ones(b, s, dtype=torch.bool)
    km[:, -5:] = False
    fwd, bwd = _ops("triton")
    with sized_for(ARCH_LIMITS[90]):
        tiles = ta._tiles(hd, torch.float16, qkv.device, dropout=True)
        assert tiles == ta.attention_tiles(hd, torch.float16, ARCH_LIMITS[90].smem, dropout=True)
        assert max(tiles["fwd"][:2] + tiles["dkdv"][:2] + tiles["dq"][:2]) < s
        o, lse = fwd(qkv, km, h, kv, True, 0.125, P, seed)
        d = bwd(do, qkv, o, lse, km, h, kv, True, 0.125, P, seed)
    _assert_2x_same_seed(o, d, qkv, do, km, h, kv, 0.125, seed)


def _attn(be, dtype, **kw):
    torch.manual_seed(0)
    m = ckpt_ops.nn.Attention(32, 4, 2, norm="layernorm", rope=True, residual=True, attn_dropout=P, **kw)
    m = m.to(DEVICE, dtype)
    m.backend = be
    return m


def _step(m, x, mask, seed):
    torch.manual_seed(seed)
    y = m(x, mask)
    return y.detach(), torch.autograd.grad((y * y).sum(), [x, *m.parameters()])


@pytest.mark.parametrize("be", BACKENDS)
def test_fresh_mask_per_call_follows_manual_seed_and_eval_is_off(be):
    dtype = _dtype(be)
    m = _attn(be, dtype)
    x = torch.randn(2, 12, 32, dtype=dtype, device=DEVICE, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    mask[1, -4:] = False
    y1, g1 = _step(m, x, mask, 7)
    y2, g2 = _step(m, x, mask, 7)
    y3, _ = _step(m, x, mask, 8)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(y1, y3)
    torch.manual_seed(7)
    a, b = m(x, mask), m(x, mask)  # consecutive calls: new seeds
    assert not torch.equal(a, b)
    m.eval()
    plain = copy.deepcopy(m)
    plain.attn_dropout = 0.0
    plain.train()
    assert torch.equal(m(x, mask), plain(x, mask))


@pytest.mark.parametrize("be", BACKENDS)
def test_every_level_bitwise_equals_none(be):
    """Attention (norm, RoPE, GQA, causal, key mask, residual dropout too) and the GPT-2-style block: output
    and every gradient at each recompute level bitwise the "none" level's -- the mask is regenerated from the
    seed at every recompute, bit for bit."""
    dtype = _dtype(be)
    x = torch.randn(2, 12, 32, dtype=dtype, device=DEVICE, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool, device=DEVICE)
    mask[0, -3:] = False
    m = _attn(be, dtype, dropout=0.1)
    torch.manual_seed(0)
    blk = ckpt_ops.nn.TransformerBlock(32, 4, style="gpt2", dropout=0.1, attn_dropout=P).to(DEVICE, dtype)
    blk.backend = be
    for mod, levels in ((m, ckpt_ops.attention.LEVELS), (blk, ckpt_ops.block.LEVELS)):
        res = {}
        for lvl in levels:
            mod.recompute = lvl
            res[lvl] = _step(mod, x, mask, 11)
        for lvl, (y, g) in res.items():
            assert torch.equal(y, res["none"][0]), lvl
            for a, b in zip(g, res["none"][1]):
                assert torch.equal(a, b), lvl


@pytest.mark.skipif(not _backend._unavailable_reason("attention", "cpu", "cpu") is None, reason="no C++ ops")
def test_cpu_kernel_independent_of_thread_count_and_opcheck():
    b, s, h, kv, hd = 2, 70, 4, 2, 8  # 2 query tiles per head, a ragged one
    qkv = _inputs(b, s, h, kv, hd, torch.float32, seed=5)
    do = _inputs(b, s, h, 0, hd, torch.float32, seed=6)
    km = torch.ones(b, s, dtype=torch.bool)
    km[1, :9] = False
    seed = torch.tensor([31337], dtype=torch.int64)
    ops = torch.ops.ckpt_ops
    n = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            o, lse = ops.attention_fwd(qkv, km, h, kv, True, 0.3, P, seed)
            out.append((o, lse, ops.attention_bwd(do, qkv, o, lse, km, h, kv, True, 0.3, P, seed)))
    finally:
        torch.set_num_threads(n)
    for a, b_ in zip(*out):
        assert torch.equal(a, b_)
    torch.library.opcheck(ops.attention_fwd.default, (qkv, km, h, kv, True, 0.3, P, seed))
    torch.library.opcheck(ops.attention_bwd.default, (do, qkv, *out[0][:2], km, h, kv, True, 0.3, P, seed))
    with pytest.raises(RuntimeError, match="seed"):
        ops.attention_fwd(qkv, km, h, kv, True, 0.3, P, None)
    with pytest.raises(RuntimeError, match="dropout_p"):
        ops.attention_fwd(qkv, km, h, kv, True, 0.3, 1.0, seed)


def test_saved_bytes_full_level_is_the_input_and_seed():
    """No mask is stored: at "full" the segment keeps x and the 8-byte seed, with or without attn_dropout."""
    x = torch.randn(2, 12, 32, requires_grad=True)
    sizes = []
    for p in (0.0, P):
        torch.manual_seed(0)
        m = ckpt_ops.nn.Attention(32, 4, norm="layernorm", residual=True, dropout=0.1, attn_dropout=p)
        sizes.append(ckpt_ops.saved_bytes(m, x))
    assert sizes[0] == sizes[1] == x.numel() * 4 + 8


def test_bad_attn_dropout():
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="attn_dropout"):
            ckpt_ops.nn.Attention(32, 4, attn_dropout=bad)
        with pytest.raises(ValueError, match="attn_dropout"):
            ckpt_ops.nn.TransformerBlock(32, 4, attn_dropout=bad)
    w = torch.randn(96, 32)
    with pytest.raises(ValueError, match="attn_dropout"):
        ckpt_ops.functional.attention(torch.randn(1, 4, 32), w, None, torch.randn(32, 32), None, num_heads=4,
                                      attn_dropout=1.5)
    qkv = torch.randn(1, 4, 96)
    with pytest.raises(ValueError, match="seed"):
        R.attention_fwd(qkv, None, 4, 4, True, 1.0, 0.2, None)


def test_converted_llama_with_attention_dropout_trains_fused():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97, max_position_embeddings=32,
                                   attention_dropout=0.1, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = ckpt_ops.convert(transformers.LlamaForCausalLM(cfg).train())
    ids = torch.randint(0, 97, (2, 10))
    losses = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        losses.append(out.loss.detach())
    rep = ckpt_ops.conversion_report(model)
    assert rep["fused_calls"].get("LlamaDecoderLayer") == 6 and not rep["fallbacks"], rep
    assert torch.equal(losses[0], losses[1]) and not torch.equal(losses[0], losses[2])


@pytest.mark.skipif(not _backend._unavailable_reason("attention", "cpu", "cpu") is None, reason="no C++ ops")
def test_compile_fullgraph_with_attention_dropout():
    """torch.compile(fullgraph=True) of a block with attn_dropout: no graph break (the seed offset is a tensor
    op, the ops have fake implementations with the extended signature); with inductor's fallback_random the
    seeds are eager's, so the step equals eager ckpt_ops by the fp32 rule."""
    import torch._inductor.config as icfg

    torch._dynamo.reset()  # (icfg.patch, not monkeypatch: undoing a setattr on the config module deletes the key)
    torch.manual_seed(0)
    blk = ckpt_ops.nn.TransformerBlock(32, 4, style="gpt2", attn_dropout=P)
    blk.backend = "cpu"
    cblk = torch.compile(blk, fullgraph=True, backend="inductor")
    x = torch.randn(2, 12, 32, requires_grad=True)
    res = []
    for m in (cblk, blk):
        torch.manual_seed(3)
        with icfg.patch(fallback_random=True):
            y = m(x)
            res.append((y.detach(), torch.autograd.grad(y.square().sum(), [x, *blk.parameters()])))
    assert_fp32_close(res[0][0], res[1][0], "out")
    for a, b in zip(res[0][1], res[1][1]):
        assert_fp32_close(a, b, "grad")
