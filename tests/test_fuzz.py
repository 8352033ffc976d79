"""Differential fuzzer: seeded random configurations of every ckpt_ops.nn module against the eager
re-implementation in tests/eager_ref.py (torch ops only; never ckpt_ops.reference, a backend under
test).

Each configuration draws a module (LayerNorm, RMSNorm, MLP, Attention, gpt2/llama block), a
recompute level, activation, norm, bias/residual/causal/RoPE/GQA, a padding mask (none, random,
left padding, a fully padded row), dropout, fp32 or fp64 and tiny shapes (1-wide included), then
compares the output and the gradient of x and of every parameter:

* fp64: relative-norm error <= 1e-10 against the fp64 eager truth -- or, where the quantity is
  ill-conditioned (the input gradient of a width-1 norm is a cancellation whose true value is
  rounding-sized, so the fp64 "truth" itself is noise), <= 4 x eager fp32's error scaled to fp64's
  precision (x 2**-29, eps64 / eps32): eager fp32's error measures the conditioning; or within
  1e-12 x sqrt(numel) absolutely (all inputs are O(1)): a quantity that is exactly 0 in exact
  arithmetic (the weight gradient of a width-1 LayerNorm: xhat = x - mean = 0) has fp64 rounding
  noise as its "truth";
* fp32: error against the fp64 truth at most 2x eager fp32's own error + 2e-6 (DESIGN §4), so
  ill-conditioned tiny norms are judged fairly; where eager fp32 itself has under two correct
  digits (error > 1e-2: e.g. dx of a width-1 RMSNorm, 1 - x^2/(x^2 + eps) in fp32) both results
  are rounding noise and a factor 2 between two noise draws is chance: the bound there is 4x.

Dropout: the keep mask is regenerated from the Philox seed the module drew (the same
torch.manual_seed replayed, then ``ckpt_ops.reference.dropout_keep_mask``). That helper is shared
code of a backend under test, used here ONLY to recover the mask; the eager side applies the mask
itself, so a wrong mask use, scaling or gradient in any backend still shows.

``CKPT_OPS_FUZZ=N`` runs N configurations per backend (default 200; 40 under the Triton
interpreter). A failure prints every failing configuration, one line each.
"""
import copy
import json
import os
import random

import pytest
import torch

import ckpt_ops
import eager_ref
from ckpt_ops import reference as _philox  # the dropout mask only (see the module docstring)
from conftest import DEVICE, available_backends, rel_err

N = int(os.environ.get("CKPT_OPS_FUZZ", "200"))
N_TRITON = int(os.environ.get("CKPT_OPS_FUZZ", "40"))
KINDS = ["layernorm", "rmsnorm", "mlp", "attention", "gpt2", "llama"]
ACTS = ["gelu", "gelu_tanh", "relu", "silu", "swiglu", "geglu"]


def draw(rng: random.Random, backend: str) -> dict:
    kind = rng.choice(KINDS)
    fp64 = backend != "triton" and rng.random() < 0.5
    c = {"kind": kind, "dtype": "fp64" if fp64 else "fp32", "B": rng.randint(1, 2), "S": rng.randint(1, 5),
         "seed": rng.randrange(2**31)}
    if kind in ("layernorm", "rmsnorm"):
        c["D"] = rng.choice([1, 2, 3, 8])
        return c
    c["p"] = rng.choice([0.0, 0.0, 0.3])
    c["norm"] = rng.choice([None, "layernorm", "rmsnorm"])
    if kind == "mlp":
        c.update(D=rng.choice([1, 2, 4]), hidden=rng.choice([1, 3, 6]), act=rng.choice(ACTS), bias=rng.random() < .5,
                 residual=rng.random() < .5, level=rng.choice(ckpt_ops.mlp.LEVELS))
        return c
    h = rng.choice([1, 2, 4])
    c.update(H=h, KV=rng.choice([k for k in (1, 2, 4) if h % k == 0]), hd=rng.choice([1, 2, 4]),
             causal=rng.random() < .5, mask=rng.choice(["none", "random", "left", "padded_row"]))
    if kind == "attention":
        c.update(rope=c["hd"] % 2 == 0 and rng.random() < .5, bias=rng.random() < .5, residual=rng.random() < .5,
                 level=rng.choice(ckpt_ops.attention.LEVELS))
    else:
        c.update(level=rng.choice(ckpt_ops.block.LEVELS), hidden=rng.choice([1, 3, 8]))
        if kind == "llama" and c["hd"] % 2:
            c["hd"] = 2
    return c


def build(c: dict):
    dtype = torch.float64 if c["dtype"] == "fp64" else torch.float32
    k = c["kind"]
    if k == "layernorm":
        m = ckpt_ops.nn.LayerNorm(c["D"])
    elif k == "rmsnorm":
        m = ckpt_ops.nn.RMSNorm(c["D"])
    elif k == "mlp":
        m = ckpt_ops.nn.MLP(c["D"], c["hidden"], activation=c["act"], bias=c["bias"], dropout=c["p"], norm=c["norm"],
                            residual=c["residual"], recompute=c["level"])
    elif k == "attention":
        m = ckpt_ops.nn.Attention(c["H"] * c["hd"], c["H"], c["KV"], causal=c["causal"], bias=c["bias"],
                                  dropout=c["p"], norm=c["norm"], rope=c["rope"], residual=c["residual"],
                                  recompute=c["level"])
    else:
        m = ckpt_ops.nn.TransformerBlock(c["H"] * c["hd"], c["H"], c["hidden"], style=k, recompute=c["level"],
                                         num_kv_heads=c["KV"], dropout=c["p"], causal=c["causal"])
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))  # norm weights away from 1, biases away from 0
    return m.to(DEVICE, dtype)


def make_mask(c):
    b, s = c["B"], c["S"]
    kind = c.get("mask", "none")
    if kind == "none":
        return None
    if kind == "random":
        return (torch.rand(b, s, device=DEVICE) < 0.7).to(torch.int64)
    mask = torch.ones(b, s, dtype=torch.bool, device=DEVICE)
    if kind == "left":
        mask[0, :s // 2] = False
    else:
        mask[-1] = False
    return mask


def keep_masks(m, c, shape):
    """Dropout keep masks the module drew under torch.manual_seed(c['seed']) (None when p == 0)."""
    if not c.get("p"):
        return []
    torch.manual_seed(c["seed"])
    n = 2 if c["kind"] in ("gpt2", "llama") else 1
    seeds = [torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE) for _ in range(n)]
    numel = shape[0] * shape[1] * shape[2]
    return [_philox.dropout_keep_mask(sd, numel, c["p"], DEVICE).view(shape) for sd in seeds]


def eager(m, c, x, mask, keeps):
    k = c["kind"]
    if k in ("layernorm", "rmsnorm"):
        return eager_ref.norm(m, x)
    if k == "mlp":
        return eager_ref.mlp(m, x, keeps[0] if keeps else None)
    if k == "attention":
        return eager_ref.attention(m, x, mask, keeps[0] if keeps else None)
    return eager_ref.block(m, x, mask, *(keeps or [None, None]))


def outputs_and_grads(fn, m, x, dy):
    x = x.detach().clone().requires_grad_()
    out = fn(m, x)
    return [out, *torch.autograd.grad(out, [x, *m.parameters()], dy, allow_unused=True)]


def check(c: dict, backend: str):
    """[] when the config agrees, else [name of each mismatching tensor with its error]."""
    torch.manual_seed(c["seed"] + 1)
    m = build(c)
    m.backend = backend
    d = c["D"] if "D" in c else c["H"] * c["hd"]
    x = torch.randn(c["B"], c["S"], d, device=DEVICE, dtype=next(m.parameters()).dtype)
    mask = make_mask(c)
    dy = torch.randn_like(x)
    torch.manual_seed(c["seed"])
    ours = outputs_and_grads(lambda mm, xx: mm(xx, mask) if mask is not None else mm(xx), m, x, dy)
    keeps = keep_masks(m, c, tuple(x.shape))
    m64 = copy.deepcopy(m).double()
    truth = outputs_and_grads(lambda mm, xx: eager(mm, c, xx, mask, keeps), m64, x.double(), dy.double())
    # eager fp32: the fp32 yardstick, and for fp64 configs the conditioning of each quantity
    low = outputs_and_grads(lambda mm, xx: eager(mm, c, xx, mask, keeps), copy.deepcopy(m).float(), x.float(),
                            dy.float())
    names = ["out", "dx"] + ["d" + n for n, _ in m.named_parameters()]
    bad = []
    for i, (name, a, t) in enumerate(zip(names, ours, truth)):
        if a is None or t is None:
            a = torch.zeros(()) if a is None else a
            t = torch.zeros(()) if t is None else t
            if float(a.abs().sum()) or float(t.abs().sum()):
                bad.append(f"{name}: one side has no gradient")
            continue
        if not torch.equal(torch.isnan(a), torch.isnan(t.to(a.dtype))):
            bad.append(f"{name}: NaN pattern differs")
            continue
        err, e32 = rel_err(a, t), rel_err(low[i], t)
        if c["dtype"] == "fp64":
            noise = float((a.detach() - t.detach().to(a.dtype)).norm()) <= 1e-12 * max(a.numel(), 1) ** 0.5
            if err > max(1e-10, 4 * e32 * 2.0**-29) and not noise:
                bad.append(f"{name}: fp64 rel err {err:.3g} > max(1e-10, 4 x eager fp32 {e32:.3g} x 2**-29)")
        else:
            if err > (2 * e32 + 2e-6 if e32 <= 1e-2 else 4 * e32):
                bad.append(f"{name}: fp32 rel err {err:.3g} > 2 x eager fp32 {e32:.3g} + 2e-6")
    return bad


def _run(backend: str, n: int, base: int):
    rng = random.Random(base)
    failures = []
    for i in range(n):
        c = draw(rng, backend)
        try:
            bad = check(c, backend)
        except Exception as e:  # a crash is a mismatch too
            bad = [f"raised {type(e).__name__}: {str(e)[:200]}"]
        if bad:
            failures.append(f"FUZZ {backend} {json.dumps(c, sort_keys=True)} -> {'; '.join(bad)}")
    assert not failures, f"{len(failures)}/{n} fuzz configurations mismatch:\n" + "\n".join(failures)


@pytest.mark.parametrize("backend", available_backends("attention"))
def test_fuzz_against_eager(backend):
    _run(backend, N_TRITON if backend == "triton" else N, base=14)
