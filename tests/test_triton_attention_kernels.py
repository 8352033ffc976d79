"""Triton attention kernels (flash forward/backward over packed qkv) and the in-place RoPE pass, through their
ckpt_ops::*_triton ops, against the contracts in ckpt_ops.reference evaluated in fp64.

Runs on CUDA when Triton compiles there, otherwise on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, set below before Triton is imported). The interpreter runs every tile as numpy arrays
in Python, so shapes are small and the grid is trimmed: instead of the full product of
{MHA, GQA, MQA} x causal x {no mask, right padding, left padding, one fully padded sequence} x S {1, 7, 64, 129}
x hd {16, 64, 80} x dtype, each case below pairs features so that every value of every axis appears, and
the combinations that interact get a case of their own: left padding under causal (rows with no key at the
start of a sequence), a fully padded sequence with causal and without, GQA/MQA with padding (dk/dv summed
over a group whose rows include empty ones), S = 129 (a ragged tail past several 16/32 tiles) with hd 80
(BLOCK_D 128 masked on d) and causal. fp16 runs a smaller set with the same pairings (its kernels are the
same code, only the dot operand dtype changes); bf16 three (under the interpreter its dots run in fp32 on
operands rounded to bf16 exactly as on a GPU -- P and dS included --, see the module docstring).
"""
import math
import os
import sys
import warnings

import pytest

if os.environ.get("CKPT_OPS_TEST_TRITON", "1") != "0":  # the package conftest's opt-out of the slow interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first `import triton`

import torch  # noqa: E402

pytest.importorskip("triton")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import triton  # noqa: E402
import triton_kernels.attention as ta  # noqa: E402
import triton_kernels.rope as tr  # noqa: E402
from ckpt_ops import reference as ref  # noqa: E402
from triton_kernels._common import ARCH_LIMITS, check_grid, recording, sized_for  # noqa: E402

if not ta._interpreted() and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 before Triton is imported", allow_module_level=True)
DEVICE = "cpu" if ta._interpreted() else "cuda"
OPS = torch.ops.ckpt_ops

# numpy (the interpreter) warns on exp2 of masked scores (2^inf before tl.where discards it) and on log2 of
# the zero denominators of empty rows (also discarded by tl.where); the results are checked below.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# (B, S, H, KV, hd, causal, mask)
FP32_CASES = [
    (1, 1, 4, 4, 16, True, None),            # one row, one key
    (2, 1, 4, 1, 16, False, "one_empty"),    # S = 1, sequence 0 fully padded: a whole batch of empty rows
    (2, 7, 8, 2, 16, False, "right"),        # GQA, padding, shorter than one tile
    (2, 7, 4, 4, 80, True, "left"),          # left padding under causal: empty leading rows; hd 80
    (2, 64, 4, 1, 64, True, None),           # MQA, S a multiple of every tile
    (2, 64, 8, 2, 16, False, "one_empty"),   # GQA with a fully padded sequence (integer mask, values 256)
    (2, 33, 4, 1, 80, True, "one_empty"),    # MQA, causal, fully padded sequence, hd 80
    (2, 64, 8, 2, 64, True, "left"),         # GQA, causal, empty rows spanning a whole first tile
    (1, 129, 4, 4, 16, True, "right"),       # ragged tail past several tiles, causal
    (1, 129, 8, 2, 80, False, "left"),       # GQA, S 129, hd 80, non-causal
]
FP16_CASES = [
    (2, 7, 8, 2, 16, True, "left"),
    (2, 64, 4, 4, 64, False, "right"),
    (2, 33, 4, 1, 80, False, "one_empty"),
    (1, 129, 8, 2, 16, True, None),
]
BF16_CASES = [(2, 33, 8, 2, 16, True, "right"), (2, 64, 4, 1, 64, False, "one_empty"), (1, 129, 4, 4, 80, True, None)]


def _ids(cases):
    return ["B{}-S{}-H{}-KV{}-hd{}-{}-{}".format(b, s, h, kv, hd, "causal" if c else "full", m)
            for b, s, h, kv, hd, c, m in cases]


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------
def _mask(kind, b, s):
    if kind is None:
        return None
    if kind == "right":  # sequence i keeps its first s - i * (s // 3) positions (bool)
        m = torch.ones(b, s, dtype=torch.bool)
        for i in range(b):
            m[i, s - i * (s // 3) if i else s:] = False
        m[-1, max(1, s // 2):] = False  # at least one padded sequence, even for B = 1
    elif kind == "left":  # the first s // 3 + 1 positions of sequence 0 are padding (int32 0/1)
        m = torch.ones(b, s, dtype=torch.int32)
        m[0, :s // 3 + 1] = 0
    elif kind == "one_empty":  # sequence 0 all padding, the others right-padded; int64, "attend" = 256
        m = torch.full((b, s), 256, dtype=torch.int64)
        m[0] = 0
        m[1:, s - s // 4:] = 0
    else:
        raise ValueError(kind)
    return m.to(DEVICE)


def _inputs(case, dtype, seed=0):
    b, s, h, kv, hd, causal, mask = case
    g = torch.Generator().manual_seed(seed)
    # x1.5: scores of std ~2.3 after the 1/sqrt(hd) scale, so rows range from flat to peaked softmaxes
    qkv = (torch.randn(b, s, (h + 2 * kv) * hd, generator=g) * 1.5).to(DEVICE, dtype)
    do = torch.randn(b, s, h * hd, generator=g).to(DEVICE, dtype)
    return qkv, do, _mask(mask, b, s), hd ** -0.5


def _parts(dqkv, h, kv, hd):
    return {"dq": dqkv[..., :h * hd], "dk": dqkv[..., h * hd:(h + kv) * hd], "dv": dqkv[..., (h + kv) * hd:]}


def _run(case, qkv, do, km, scale):
    """(o, lse, dqkv) of the Triton ops; checks that no input is modified."""
    _, _, h, kv, _, causal, _ = case
    before = [t.clone() for t in (qkv, do) + ((km,) if km is not None else ())]
    o, lse = OPS.attention_fwd_triton(qkv, km, h, kv, causal, scale)
    o_saved, lse_saved = o.clone(), lse.clone()
    dqkv = OPS.attention_bwd_triton(do, qkv, o, lse, km, h, kv, causal, scale)
    after = [qkv, do] + ([km] if km is not None else [])
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "an input was modified"
    assert torch.equal(o, o_saved) and torch.equal(lse, lse_saved), "the backward modified o or lse"
    return o, lse, dqkv


def _truth(case, qkv, do, km, scale):
    """The contract evaluated in fp64 on the very (rounded) inputs the kernels saw."""
    _, _, h, kv, _, causal, _ = case
    o, lse = ref.attention_fwd(qkv.double(), km, h, kv, causal, scale)
    dqkv = ref.attention_bwd(do.double(), qkv.double(), o, lse, km, h, kv, causal, scale)
    return o, lse, dqkv


def _check_empty_rows(case, km, o, lse, dqkv, lse_true):
    """Rows with no key: lse == +inf, o == 0 and dq == 0 exactly; padded keys: dk == dv == 0 exactly; no NaN."""
    b, s, h, kv, hd, _, _ = case
    for name, t in (("o", o), ("lse", lse), ("dqkv", dqkv)):
        assert not t.isnan().any(), f"{name} has NaN"
    empty = torch.isinf(lse_true)  # (B, H, S)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] > 0).all(), "lse is +inf exactly on empty rows"
    assert torch.isfinite(lse[~empty]).all()
    rows = empty.transpose(1, 2)  # (B, S, H)
    parts = _parts(dqkv, h, kv, hd)
    assert (o.view(b, s, h, hd)[rows] == 0).all(), "o of an empty row is not exactly 0"
    assert (parts["dq"].reshape(b, s, h, hd)[rows] == 0).all(), "dq of an empty row is not exactly 0"
    if km is not None:
        pad = km == 0
        assert (parts["dk"][pad] == 0).all() and (parts["dv"][pad] == 0).all(), "dk/dv of a padded key != 0"
    return empty


def _rel(x, truth):
    x, truth = x.double(), truth.double()
    return float((x - truth).norm() / truth.norm().clamp_min(1e-6 * max(truth.numel(), 1) ** 0.5))


def _assert_fp32(name, x, truth, like=None):
    """DESIGN fp32 rule: rtol 1e-4 elementwise (atol 1e-5 of the largest magnitude), relative-norm 1e-5.

    ``like``: the tensor whose magnitude sets the scale (default: truth). dq and dk are sums of
    P * (dP - delta), which cancel when a row's attention sits on one key (exactly at S = 1: dq = dk = 0 while
    dP and delta are O(1)), so their fp32 error is measured against the size of the whole gradient dqkv:
    atol from max|dqkv|, and the norm of the part floored at the norm it would have at dqkv's RMS size."""
    truth = truth.double()
    like = truth if like is None else like.double()
    atol = 1e-5 * max(float(like.abs().max()) if like.numel() else 0.0, 1e-6)
    bad = ~torch.isclose(x.double(), truth, rtol=1e-4, atol=atol)
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{bad.numel()} beyond rtol 1e-4, first at "
                           f"{bad.nonzero()[:3].tolist()}")
    norm = float(truth.norm())
    if like.numel():
        norm = max(norm, float(like.norm()) * (truth.numel() / like.numel()) ** 0.5)
    err = float((x.double() - truth).norm()) / max(norm, 1e-30)
    assert err <= 1e-5, f"{name}: relative-norm error {err:.3g} > 1e-5"


# ----------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", FP32_CASES, ids=_ids(FP32_CASES))
def test_attention_fp32(case):
    qkv, do, km, scale = _inputs(case, torch.float32)
    o, lse, dqkv = _run(case, qkv, do, km, scale)
    o_t, lse_t, dqkv_t = _truth(case, qkv, do, km, scale)
    empty = _check_empty_rows(case, km, o, lse, dqkv, lse_t)
    _assert_fp32("o", o, o_t)
    _assert_fp32("lse", lse[~empty], lse_t[~empty])
    _, _, h, kv, hd, _, _ = case
    for (name, x), t in zip(_parts(dqkv, h, kv, hd).items(), _parts(dqkv_t, h, kv, hd).values()):
        _assert_fp32(name, x, t, like=dqkv_t)


@pytest.mark.parametrize("dtype,case", [(torch.float16, c) for c in FP16_CASES] + [(torch.bfloat16, c)
                                                                                    for c in BF16_CASES],
                         ids=["fp16-" + i for i in _ids(FP16_CASES)] + ["bf16-" + i for i in _ids(BF16_CASES)])
def test_attention_16bit(dtype, case):
    """Error bound: relative-norm error vs the fp64 truth at most 2x that of the contract evaluated on the same
    16-bit inputs (``reference.attention_fwd/bwd`` computing in fp32 and rounding each output once), plus a
    floor of 1e-6. That peer is stricter than DESIGN's "eager PyTorch in the same dtype" (which also rounds
    q k^T and the probabilities, ~1.5-2x the peer's error): its error is the unavoidable final rounding, and
    the kernels' only extra roundings are P and dS cast to the storage dtype before their dots (measured
    1.2-1.4x the peer in fp16). lse is fp32 in both, so it gets the fp32 rule."""
    qkv, do, km, scale = _inputs(case, dtype, seed=1)
    o, lse, dqkv = _run(case, qkv, do, km, scale)
    o_t, lse_t, dqkv_t = _truth(case, qkv, do, km, scale)
    _, _, h, kv, hd, causal, _ = case
    o_p, lse_p = ref.attention_fwd(qkv, km, h, kv, causal, scale)
    dqkv_p = ref.attention_bwd(do, qkv, o_p, lse_p, km, h, kv, causal, scale)
    empty = _check_empty_rows(case, km, o, lse, dqkv, lse_t)
    _assert_fp32("lse", lse[~empty], lse_t[~empty])
    pairs = [("o", o, o_p, o_t)] + [(n, x, p, t) for (n, x), p, t in zip(
        _parts(dqkv, h, kv, hd).items(), _parts(dqkv_p, h, kv, hd).values(), _parts(dqkv_t, h, kv, hd).values())]
    for name, x, peer, truth in pairs:
        ours, theirs = _rel(x, truth), _rel(peer, truth)
        assert ours <= 2 * theirs + 1e-6, f"{name}: relative error {ours:.3g} > 2 x the contract's {theirs:.3g}"


@pytest.mark.parametrize("dtype,sizing", [(torch.float32, "interpreter"), (torch.float32, "sm_90"),
                                          (torch.float16, "sm_90"), (torch.float16, "sm_86")])
def test_causal_block_skipping(dtype, sizing):
    """Under causal, the forward and the dq kernel never read key blocks right of the diagonal block: NaN in
    k/v of the key blocks at or after row R (R a multiple of both query tiles) leaves o, lse and dq of every
    row before R finite and equal to the clean inputs' results (a loaded NaN would leak through 0 * NaN).
    Run with the interpreter's tiles and with the tiles a GPU would use (``sized_for``: the GPU's shared
    memory limit, executed here by the interpreter), on a sequence long enough that R < S for both; the
    clean run also meets the fp32 / 2x rule at the GPU tiles."""
    case = (1, 160, 4, 2, 16, True, None)
    b, s, h, kv, hd, causal, _ = case
    qkv, do, _, scale = _inputs(case, dtype)
    limits = None if sizing == "interpreter" else ARCH_LIMITS[int(sizing[3:])]
    with sized_for(limits):
        tiles = ta._tiles(hd, dtype, qkv.device)
        if sizing != "interpreter" and DEVICE == "cpu":
            assert tiles == ta.attention_tiles(hd, dtype, limits.smem)
        r = max(tiles["fwd"][0], tiles["dq"][0])
        assert r < s, f"tiles {tiles} as long as the test sequence: no block would be skipped"
        poisoned = qkv.clone()
        poisoned[:, r:, h * hd:] = float("nan")
        o, lse, dqkv = _run(case, qkv, do, None, scale)
        o_n, lse_n = OPS.attention_fwd_triton(poisoned, None, h, kv, causal, scale)
        dq_n = OPS.attention_bwd_triton(do, poisoned, o_n, lse_n, None, h, kv, causal, scale)[..., :h * hd]
    assert torch.equal(o_n[:, :r], o[:, :r]) and torch.equal(lse_n[..., :r], lse[..., :r])
    assert torch.equal(dq_n[:, :r], dqkv[..., :h * hd][:, :r])
    o_t, lse_t, dqkv_t = _truth(case, qkv, do, None, scale)
    if dtype == torch.float32:
        _assert_fp32("o", o, o_t)
        _assert_fp32("dqkv", dqkv, dqkv_t)
    else:
        o_p, lse_p = ref.attention_fwd(qkv, None, h, kv, causal, scale)
        dqkv_p = ref.attention_bwd(do, qkv, o_p, lse_p, None, h, kv, causal, scale)
        for name, x, p, t in (("o", o, o_p, o_t), ("dqkv", dqkv, dqkv_p, dqkv_t)):
            assert _rel(x, t) <= 2 * _rel(p, t) + 1e-6, f"{name} at tiles {tiles}"


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_attention_tiles(dropout):
    """The GPU tile choice is a pure function of (head_dim, dtype, shared memory limit, dropout): the largest
    entry that fits, the small fallback on parts with less shared memory, an error when nothing fits; tiles
    are never smaller than tl.dot's 16, and BLOCK_D covers head_dim. The DROPOUT variants take their own
    entry only where the plain tiles spilled (16-bit hd 64), the plain ones elsewhere."""
    for hd in (16, 64, 80, 128, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            width = 4 if dtype == torch.float32 else 2
            block_d = max(64, triton.next_power_of_2(hd))
            entries = ta.tile_entries(block_d, width, dropout)
            assert (entries is not ta._GPU_TILES[(block_d, width)]) == (dropout and (block_d, width) == (64, 2))
            for arch, lim in ARCH_LIMITS.items():
                t = ta.attention_tiles(hd, dtype, lim.smem, dropout)
                assert t == dict(entries[0][1], block_d=max(16, triton.next_power_of_2(hd))), (hd, dtype, arch)
                assert t["block_d"] >= hd and all(min(t[k][:2]) >= 16 for k in ("fwd", "dkdv", "dq"))
            need_small = entries[-1][0]
            assert ta.attention_tiles(hd, dtype, need_small, dropout) == dict(entries[-1][1], block_d=t["block_d"])
            with pytest.raises(ValueError, match="shared memory"):
                ta.attention_tiles(hd, dtype, need_small - 1, dropout)
    assert ta.attention_tiles(64, torch.float32, 232448) != ta.attention_tiles(64, torch.bfloat16, 232448)
    with pytest.raises(ValueError, match="head_dim"):
        ta.attention_tiles(512, torch.float16, 232448)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_p_and_ds_rounded_to_operand_dtype(dtype):
    """P (before P V and P^T dO) and dS (before dS K and dS^T Q) are rounded to the operand dtype, as a compiled
    kernel feeds them to tensor cores: o, dq, dk and dv equal, element for element, an fp64 emulation that rounds
    P and dS to ``dtype`` (one key block, so the online softmax is exact), and differ from one that does not
    (which would be the interpreter computing bf16 dots in fp32 without the rounding)."""
    b, s, h, kv, hd, scale = 1, 16, 2, 2, 16, 0.25
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(b, s, (h + 2 * kv) * hd, generator=g, dtype=torch.float64) * 1.5).to(DEVICE, dtype)
    do = torch.randn(b, s, h * hd, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    o, lse = OPS.attention_fwd_triton(qkv, None, h, kv, False, scale)
    dqkv = OPS.attention_bwd_triton(do, qkv, o, lse, None, h, kv, False, scale)
    rnd = lambda t: t.to(dtype).double()  # noqa: E731
    x = qkv.double().view(b, s, h + 2 * kv, hd).transpose(1, 2)
    q, k, v = x[:, :h], x[:, h:h + kv], x[:, h + kv:]
    sc = q @ k.transpose(-1, -2) * scale * math.log2(math.e)
    m = sc.amax(-1, keepdim=True)
    p, l = torch.exp2(sc - m), torch.exp2(sc - m).sum(-1, keepdim=True)
    p_n = p / l  # normalised P, as the backward recomputes it from lse
    d_o = do.double().view(b, s, h, hd).transpose(1, 2)
    ds = p_n * (d_o @ v.transpose(-1, -2) - (o.double().view(b, s, h, hd).transpose(1, 2) * d_o).sum(-1, keepdim=True))
    got = {"o": o.double().view(b, s, h, hd).transpose(1, 2), "dq": dqkv[..., :h * hd],
           "dk": dqkv[..., h * hd:(h + kv) * hd], "dv": dqkv[..., (h + kv) * hd:]}
    heads = lambda t: t.transpose(1, 2).reshape(b, s, -1)  # noqa: E731
    match = {}
    for rounded, f in ((True, rnd), (False, lambda t: t)):
        want = {"o": (f(p) @ v) / l, "dq": heads(scale * (f(ds) @ k)), "dk": heads(scale * (f(ds).transpose(-1, -2) @ q)),
                "dv": heads(f(p_n).transpose(-1, -2) @ d_o)}
        match[rounded] = {n: (rnd(want[n]) == got[n].double()).double().mean().item() for n in got}
    assert all(f >= 0.98 for f in match[True].values()), match
    assert all(f <= 0.9 for f in match[False].values()), match


def test_dropout_launches_take_the_dropout_tiles():
    """A launch with dropout_p > 0 on a GPU (recorded on meta tensors for sm_90) uses the DROPOUT tiles for all
    three kernels, without dropout the plain ones: what ``._aot`` compiled and docs/gpu_resources.md lists."""
    b, s, h, kv, hd = 2, 256, 4, 2, 64
    meta = torch.device("meta")
    qkv = torch.empty(b, s, (h + 2 * kv) * hd, dtype=torch.bfloat16, device=meta)
    o, lse = torch.empty(b, s, h * hd, dtype=torch.bfloat16, device=meta), torch.empty(b, h, s, device=meta)
    seed = torch.empty(1, dtype=torch.int64, device=meta)
    lim = ARCH_LIMITS[90]
    for p, dropout in ((0.0, False), (0.1, True)):
        with recording(lim) as launches:
            ta.attention_fwd(qkv, None, h, kv, True, 0.125, p, seed)
            ta.attention_bwd(o, qkv, o, lse, None, h, kv, True, 0.125, p, seed)
        want = ta.attention_tiles(hd, torch.bfloat16, lim.smem, dropout)
        names = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}
        got = {names[ln.kernel.__name__]: (ln.meta["BLOCK_M"], ln.meta["BLOCK_N"], ln.meta["num_warps"],
                                           ln.meta["num_stages"]) for ln in launches if ln.kernel.__name__ in names}
        assert got == {k: want[k] for k in names.values()}, (p, got)
        assert all(bool(ln.meta.get("DROPOUT", False)) == dropout for ln in launches if ln.kernel.__name__ in names)
    assert ta.attention_tiles(hd, torch.bfloat16, lim.smem, True) != ta.attention_tiles(hd, torch.bfloat16, lim.smem)


def test_grid_within_cuda_limits():
    """B * H = 2048 * 32 = 65,536 (one past CUDA's 65,535 cap on grid axes y/z): every attention launch is a 1-D
    grid of cdiv(S, BLOCK) * B * heads programs; recorded on meta tensors (nothing allocated or run). A grid
    past the limits raises before launching."""
    b, s, h, kv, hd = 2048, 256, 32, 8, 64
    meta = torch.device("meta")
    qkv = torch.empty(b, s, (h + 2 * kv) * hd, dtype=torch.bfloat16, device=meta)
    o, lse = torch.empty(b, s, h * hd, dtype=torch.bfloat16, device=meta), torch.empty(b, h, s, device=meta)
    with recording(ARCH_LIMITS[90]) as launches:
        ta.attention_fwd(qkv, None, h, kv, True, 0.125)
        ta.attention_bwd(o, qkv, o, lse, None, h, kv, True, 0.125)
    assert len(launches) == 4
    for ln in launches:
        blk = ln.meta["BLOCK_N"] if "dkdv" in ln.kernel.__name__ else ln.meta["BLOCK_M"]
        heads = kv if "dkdv" in ln.kernel.__name__ else h
        assert ln.grid == (triton.cdiv(s, blk) * b * heads,), (ln.kernel.__name__, ln.grid)
        assert ln.grid[0] <= 2**31 - 1
    with pytest.raises(ValueError, match="axis y"):
        check_grid((4, b * h))


def test_noncontiguous_inputs():
    """qkv and do as strided views (every other row of a larger buffer): same results as contiguous copies."""
    case = (2, 7, 4, 2, 16, True, "right")
    qkv, do, km, scale = _inputs(case, torch.float32)
    _, _, h, kv, _, causal, _ = case
    qkv_nc = torch.stack([qkv, torch.zeros_like(qkv)], 2).flatten(1, 2)[:, ::2]
    do_nc = torch.stack([do, torch.zeros_like(do)], 2).flatten(1, 2)[:, ::2]
    assert not qkv_nc.is_contiguous() and torch.equal(qkv_nc, qkv)
    o, lse = OPS.attention_fwd_triton(qkv, km, h, kv, causal, scale)
    o2, lse2 = OPS.attention_fwd_triton(qkv_nc, km, h, kv, causal, scale)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    d = OPS.attention_bwd_triton(do, qkv, o, lse, km, h, kv, causal, scale)
    d2 = OPS.attention_bwd_triton(do_nc, qkv_nc, o2, lse2, km, h, kv, causal, scale)
    assert torch.equal(d, d2)


def test_bad_inputs():
    qkv = torch.randn(1, 4, 6 * 16, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        OPS.attention_fwd_triton(qkv, None, 3, 2, True, 0.25)
    with pytest.raises(ValueError, match="head_dim"):
        OPS.attention_fwd_triton(qkv, None, 3, 3, True, 0.25)  # 96 is not (3 + 6) * hd
    with pytest.raises(TypeError, match="key_mask"):
        OPS.attention_fwd_triton(qkv, torch.ones(1, 4, device=DEVICE), 4, 1, True, 0.25)
    with pytest.raises(ValueError, match="even head_dim"):  # head_dim 5: a rotary width r = 6 > 5 (r = 4 would be partial rotary)
        OPS.rope_triton_(torch.randn(1, 4, 6 * 5, device=DEVICE), torch.ones(4, 3), torch.ones(4, 3), 4, 1, False)


# ----------------------------------------------------------------------------------------------------------
# RoPE
# ----------------------------------------------------------------------------------------------------------
def _rope_both_ways(qkv, cos, sin, h, kv, eps):
    """Forward and inverse Triton RoPE of qkv, each against reference.rope_ of the same input."""
    x = qkv.clone()
    OPS.rope_triton_(x, cos, sin, h, kv, False)
    want = qkv.clone()
    ref.rope_(want, cos, sin, h, kv, False)
    torch.testing.assert_close(x, want, rtol=eps, atol=eps)
    y = x.clone()
    OPS.rope_triton_(y, cos, sin, h, kv, True)
    want_inv = x.clone()
    ref.rope_(want_inv, cos, sin, h, kv, True)
    torch.testing.assert_close(y, want_inv, rtol=eps, atol=eps)
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tables", ["2d", "3d"])
@pytest.mark.parametrize("shape", [(2, 7, 4, 2, 16), (1, 33, 4, 1, 80), (2, 1, 2, 2, 64)],
                         ids=["S7-GQA-hd16", "S33-MQA-hd80", "S1-MHA-hd64"])
def test_rope(dtype, tables, shape):
    """Forward and inverse against ``reference.rope_`` (one fp32 evaluation, one rounding: equal up to one
    ulp of the storage dtype, for a GPU's FMA contraction), v heads bitwise untouched, tables unmodified, and
    inverse(forward(x)) == x up to the two roundings. 3-D tables: per-sequence positions (offset i * 5)."""
    b, s, h, kv, hd = shape
    g = torch.Generator().manual_seed(3)
    qkv = (torch.randn(b, s, (h + 2 * kv) * hd, generator=g) * 2).to(DEVICE, dtype)
    cos, sin = ref.rope_tables(s + 5 * b, hd, 10000.0, torch.device(DEVICE))
    if tables == "2d":
        cos, sin = cos[:s], sin[:s]
    else:  # (B, S, hd/2), sequence i at positions 5i .. 5i + S - 1, stored in the storage dtype
        cos = torch.stack([cos[5 * i:5 * i + s] for i in range(b)]).to(dtype)
        sin = torch.stack([sin[5 * i:5 * i + s] for i in range(b)]).to(dtype)
    tabs = (cos.clone(), sin.clone())
    eps = torch.finfo(dtype).eps
    x, y = _rope_both_ways(qkv, cos, sin, h, kv, eps)
    nqk = (h + kv) * hd
    assert torch.equal(x[..., nqk:], qkv[..., nqk:]), "v heads modified"
    assert torch.equal(cos, tabs[0]) and torch.equal(sin, tabs[1]), "tables modified"
    # two roundings of the storage dtype (+ the tables' own rounding when they are 16-bit: cos^2 + sin^2 != 1)
    tol = (2 if tables == "2d" or dtype == torch.float32 else 4) * eps
    torch.testing.assert_close(y, qkv, rtol=tol, atol=tol * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 4, 4, 16, 4), (1, 3, 2, 1, 80, 20)], ids=["MHA-hd16-r4", "MQA-hd80-r20"])
def test_rope_partial_rotary(dtype, shape):
    """Partial rotary (r = 2 * cos.shape[-1] < hd): forward and inverse against ``reference.rope_``, dims
    [r, hd) of every head and the v heads bitwise untouched, inverse(forward(x)) == x up to the roundings."""
    b, s, h, kv, hd, r = shape
    g = torch.Generator().manual_seed(4)
    qkv = (torch.randn(b, s, (h + 2 * kv) * hd, generator=g) * 2).to(DEVICE, dtype)
    cos, sin = ref.rope_tables(s, r, 10000.0, torch.device(DEVICE))
    eps = torch.finfo(dtype).eps
    x, y = _rope_both_ways(qkv, cos, sin, h, kv, eps)
    heads, xh = qkv.view(b, s, h + 2 * kv, hd), x.view(b, s, h + 2 * kv, hd)
    assert torch.equal(xh[..., r:], heads[..., r:]), "pass-through dims modified"
    assert torch.equal(xh[:, :, h + kv:], heads[:, :, h + kv:]), "v heads modified"
    torch.testing.assert_close(y, qkv, rtol=2 * eps, atol=4 * eps)
    z = qkv.clone()  # (1, S, r/2) tables (HF's, for position_ids of shape (1, S)) broadcast over the batch
    OPS.rope_triton_(z, cos[None], sin[None], h, kv, False)
    assert torch.equal(z, x)
    with pytest.raises(ValueError, match="rotary width"):
        tr.rope_(qkv.clone(), torch.zeros(s, hd), torch.zeros(s, hd), h, kv, False)  # r = 2 hd > hd


# ----------------------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) implementations, autograd registration, AOT dispatch
# ----------------------------------------------------------------------------------------------------------
def test_opcheck():
    b, s, h, kv, hd = 2, 5, 4, 2, 16
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(b, s, (h + 2 * kv) * hd, generator=g).to(DEVICE)
    do = torch.randn(b, s, h * hd, generator=g).to(DEVICE)
    km = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    cos, sin = ref.rope_tables(s, hd, 10000.0, torch.device(DEVICE))
    o, lse = OPS.attention_fwd_triton(qkv, km, h, kv, True, 0.25)
    cases = [
        (OPS.rope_triton_, (qkv.clone(), cos, sin, h, kv, False)),
        (OPS.rope_triton_, (qkv.clone(), cos[None].expand(b, s, hd // 2), sin[None].expand(b, s, hd // 2),
                            h, kv, True)),
        (OPS.attention_fwd_triton, (qkv, None, h, kv, False, 0.25)),
        (OPS.attention_fwd_triton, (qkv, km, h, kv, True, 0.25)),
        (OPS.attention_bwd_triton, (do, qkv, o, lse, km, h, kv, True, 0.25)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for op, args in cases:
            torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------------------
# sliding window and logit soft-capping (the WINDOW / SOFTCAP variants)
# ----------------------------------------------------------------------------------------------------------
# (B, S, H, KV, hd, window, softcap, mask, dropout): windows 1, 3, S-1 and one between the tiles; caps alone,
# with a window, with dropout; GQA/MQA with padding; S 40 spans several interpreter tiles (16 / 32).
WINDOW_CASES = [
    (2, 7, 4, 2, 16, 1, 0.0, "right", 0.0),
    (2, 40, 4, 2, 16, 3, 0.0, "left", 0.0),
    (1, 40, 4, 1, 16, 39, 0.0, None, 0.0),
    (2, 40, 4, 2, 16, 20, 2.0, "one_empty", 0.0),
    (2, 33, 2, 2, 16, 0, 1.5, "right", 0.0),
    (2, 40, 4, 1, 16, 5, 3.0, "right", 0.2),
]


def _wid(c):
    return "B{}-S{}-H{}-KV{}-hd{}-w{}-cap{}-{}-p{}".format(*c)


def _window_run_and_truth(c, dtype, seed):
    b, s, h, kv, hd, w, cap, mk, p = c
    case = (b, s, h, kv, hd, True, mk)
    qkv, do, km, scale = _inputs(case, dtype, seed=seed)
    sd = torch.tensor([1234], device=DEVICE) if p else None
    o, lse = OPS.attention_fwd_triton(qkv, km, h, kv, True, scale, p, sd, w, cap)
    dqkv = OPS.attention_bwd_triton(do, qkv, o, lse, km, h, kv, True, scale, p, sd, w, cap)
    kmc = None if km is None else km.cpu()
    sdc = None if sd is None else sd.cpu()
    o_t, lse_t = ref.attention_fwd(qkv.double().cpu(), kmc, h, kv, True, scale, p, sdc, w, cap)
    d_t = ref.attention_bwd(do.double().cpu(), qkv.double().cpu(), o_t, lse_t, kmc, h, kv, True, scale, p, sdc, w,
                            cap)
    return case, (qkv, do, km, scale, sd), (o, lse, dqkv), (o_t, lse_t, d_t)


@pytest.mark.parametrize("c", WINDOW_CASES, ids=[_wid(c) for c in WINDOW_CASES])
def test_attention_window_softcap_fp32(c):
    case, inp, (o, lse, dqkv), (o_t, lse_t, d_t) = _window_run_and_truth(c, torch.float32, seed=2)
    empty = _check_empty_rows(case, inp[2], o.cpu(), lse.cpu(), dqkv.cpu(), lse_t)
    _assert_fp32("o", o.cpu(), o_t)
    _assert_fp32("lse", lse.cpu()[~empty], lse_t[~empty])
    h, kv, hd = c[2], c[3], c[4]
    for (name, x), t in zip(_parts(dqkv.cpu(), h, kv, hd).items(), _parts(d_t, h, kv, hd).values()):
        _assert_fp32(name, x, t, like=d_t)


@pytest.mark.parametrize("c", WINDOW_CASES[1:5], ids=[_wid(c) for c in WINDOW_CASES[1:5]])
def test_attention_window_softcap_fp16(c):
    """fp16: within 2x of the contract evaluated on the same fp16 inputs (as test_attention_16bit)."""
    case, (qkv, do, km, scale, sd), (o, lse, dqkv), (o_t, lse_t, d_t) = _window_run_and_truth(c, torch.float16, 3)
    _, _, h, kv, hd, w, cap, _, p = c
    o_p, lse_p = ref.attention_fwd(qkv, km, h, kv, True, scale, p, sd, w, cap)
    d_p = ref.attention_bwd(do, qkv, o_p, lse_p, km, h, kv, True, scale, p, sd, w, cap)
    _check_empty_rows(case, km, o.cpu(), lse.cpu(), dqkv.cpu(), lse_t)
    for name, x, peer, truth in (("o", o, o_p, o_t), ("dqkv", dqkv, d_p, d_t)):
        ours, theirs = _rel(x.cpu(), truth), _rel(peer.cpu(), truth)
        assert ours <= 2 * theirs + 1e-6, f"{name}: relative error {ours:.3g} > 2 x the contract's {theirs:.3g}"


def test_window_block_skipping():
    """With a window, the forward and dq kernels never read key blocks left of the window, the dk/dv kernel
    never reads query blocks right of it: NaN in k/v of keys < R leaves o/lse (and dq) of the query blocks whose
    first key block starts at or after R exactly equal to the clean run; NaN in q/dO of rows >= R2 leaves dk/dv
    of the key blocks whose last query block ends before R2 exactly equal. (A loaded NaN would leak through
    0 * NaN; without window block skipping every row would be NaN.)"""
    b, s, h, kv, hd, w = 1, 96, 2, 1, 16, 5
    case = (b, s, h, kv, hd, True, None)
    qkv, do, _, scale = _inputs(case, torch.float32, seed=4)
    tiles = ta._tiles(hd, torch.float32, qkv.device)
    o, lse = OPS.attention_fwd_triton(qkv, None, h, kv, True, scale, 0.0, None, w, 0.5)
    dqkv = OPS.attention_bwd_triton(do, qkv, o, lse, None, h, kv, True, scale, 0.0, None, w, 0.5)

    def first_key_block(start_m, block_n):
        return (max(start_m - w + 1, 0) // block_n) * block_n

    r = 32
    poisoned = qkv.clone()
    poisoned[:, :r, h * hd:] = float("nan")
    o_n, lse_n = OPS.attention_fwd_triton(poisoned, None, h, kv, True, scale, 0.0, None, w, 0.5)
    bm, bn = tiles["fwd"][:2]
    clean = min(m for m in range(0, s, bm) if first_key_block(m, bn) >= r)
    assert clean < s
    assert torch.equal(o_n[:, clean:], o[:, clean:]) and torch.equal(lse_n[..., clean:], lse[..., clean:])
    assert o_n[:, :r].isnan().any()  # the poison is real
    dq_n = OPS.attention_bwd_triton(do, poisoned, o, lse, None, h, kv, True, scale, 0.0, None, w, 0.5)
    bm, bn = tiles["dq"][:2]
    clean = min(m for m in range(0, s, bm) if first_key_block(m, bn) >= r)
    assert clean < s and torch.equal(dq_n[:, clean:, :h * hd], dqkv[:, clean:, :h * hd])

    r2 = 64
    poisoned = qkv.clone()
    poisoned[:, r2:, :h * hd] = float("nan")
    do_n = do.clone()
    do_n[:, r2:] = float("nan")
    lse_p = lse.clone()
    lse_p[..., r2:] = float("nan")
    dkv_n = OPS.attention_bwd_triton(do_n, poisoned, o, lse_p, None, h, kv, True, scale, 0.0, None, w, 0.5)
    bm, bn = tiles["dkdv"][:2]
    ok_n = [n for n in range(0, s, bn) if -(-min(s, n + bn + w - 1) // bm) * bm <= r2]
    assert ok_n
    upto = ok_n[-1] + bn
    assert torch.equal(dkv_n[:, :upto, h * hd:], dqkv[:, :upto, h * hd:])
    assert dkv_n[:, r2:, h * hd:].isnan().any()


def test_window_softcap_launch_tiles():
    """WINDOW launches (recorded on meta tensors for sm_90) use the plain tiles, SOFTCAP ones the softcap entry
    (its dq takes 8 warps at hd 64 in 16-bit, where 4 spilled; the AOT sweep checks neither spills); a window
    >= S is no window (the plain kernel); no window/cap: the flags stay off."""
    b, s, h, kv, hd = 2, 256, 4, 2, 64
    meta = torch.device("meta")
    qkv = torch.empty(b, s, (h + 2 * kv) * hd, dtype=torch.bfloat16, device=meta)
    o, lse = torch.empty(b, s, h * hd, dtype=torch.bfloat16, device=meta), torch.empty(b, h, s, device=meta)
    lim = ARCH_LIMITS[90]
    names = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}
    for w, cap, flags in ((0, 0.0, (False, False)), (64, 0.0, (True, False)), (0, 30.0, (False, True)),
                          (64, 30.0, (True, True)), (256, 0.0, (False, False))):
        with recording(lim) as launches:
            ta.attention_fwd(qkv, None, h, kv, True, 0.125, 0.0, None, w, cap)
            ta.attention_bwd(o, qkv, o, lse, None, h, kv, True, 0.125, 0.0, None, w, cap)
        got = {names[ln.kernel.__name__]: (ln.meta["BLOCK_M"], ln.meta["BLOCK_N"], ln.meta["num_warps"],
                                           ln.meta["num_stages"]) for ln in launches if ln.kernel.__name__ in names}
        want = ta.attention_tiles(hd, torch.bfloat16, lim.smem, softcap=cap > 0)
        assert got == {k: want[k] for k in names.values()}
        for ln in launches:
            if ln.kernel.__name__ in names:
                assert (bool(ln.meta.get("WINDOW", False)), bool(ln.meta.get("SOFTCAP", False))) == flags, (w, cap)
    plain, capped = ta.attention_tiles(hd, torch.bfloat16, lim.smem), ta.attention_tiles(hd, torch.bfloat16, lim.smem,
                                                                                            softcap=True)
    assert capped["dq"] == (64, 32, 8, 3) and plain["dq"] == (64, 32, 4, 3)
    assert {k: capped[k] for k in ("fwd", "dkdv")} == {k: plain[k] for k in ("fwd", "dkdv")}


def test_window_softcap_bad_inputs():
    qkv = torch.randn(1, 4, 3 * 16, device=DEVICE)
    for kw, match in ((dict(window=-1), "window"), (dict(softcap=-1.0), "softcap"),
                      (dict(softcap=float("nan")), "softcap")):
        with pytest.raises(ValueError, match=match):
            ta.attention_fwd(qkv, None, 1, 1, True, 0.5, **kw)
    with pytest.raises(ValueError, match="causal"):
        ta.attention_fwd(qkv, None, 1, 1, False, 0.5, window=2)
