"""The C++ CPU kernels' run-time instruction-set choice (csrc/include/ckpt_ops/cpu_isa.h).

Every ISA copy this CPU supports (avx512, avx2, scalar) runs in a fresh interpreter forced by
CKPT_OPS_CPU_ISA, and there must: match the pure-torch contract (ckpt_ops.reference) -- bitwise
for dropout, within a few ulps of the fp64 truth for the activations, norms and RoPE; recompute
bitwise what the forward computed (the activation output of act_bwd is act_fwd's, the norm
re-run is the forward's, the MLP's "full" / "selective" forwards are "none"'s); give the same
bits at 1 and 3 threads. Across copies, the elementwise kernels (activations, dropout, RoPE; no
FMA, no reductions) must agree bitwise, so the copy a process picks never changes a result.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from ckpt_ops import _backend

pytestmark = pytest.mark.skipif(not _backend.extension_loaded(), reason="extension not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys
import torch
import ckpt_ops
from ckpt_ops import reference as R

ops = torch.ops.ckpt_ops
info = ckpt_ops.backend_info()["cpu_isa"]
out = {"isa": info["isa"]}
g = torch.Generator()
rnd = lambda *s: torch.randn(*s, generator=g) * 3.0


def few_ulps(actual, truth, dtype, name):
    eps = torch.finfo(dtype).eps
    err = float((actual.double() - truth.double()).abs().max())
    tol = 16 * eps * max(float(truth.abs().max()), 1.0)
    assert err <= tol, f"{info['isa']} {name}: max error {err:.3g} > {tol:.3g}"


def kernels():
    g.manual_seed(0)
    res = {}
    h, gt, da = rnd(37, 301), rnd(37, 301), rnd(37, 301) / 3
    for act in range(4):
        for gated in (False, True):
            gg = gt if gated else None
            a = ops.act_fwd(h, gg, act)
            a2, dh, dg = ops.act_bwd(da, h, gg, act, True)
            assert torch.equal(a, a2), f"{info['isa']} act {act} gated {gated}: recomputed a differs"
            ta, tdh, tdg = R.act_bwd(da.double(), h.double(), gg.double() if gated else None, act, True)
            few_ulps(a, ta, torch.float32, f"act {act} a")
            few_ulps(dh, tdh, torch.float32, f"act {act} dh")
            res[f"act{act}{gated}"] = [a, dh] + ([dg] if gated else [])
            hb = h.bfloat16()
            ab = ops.act_fwd(hb, gg.bfloat16() if gated else None, act)
            assert torch.equal(ab, ops.act_bwd(da.bfloat16(), hb, gg.bfloat16() if gated else None, act, True)[0])
            res[f"act{act}{gated}bf16"] = [ab]
    y, r, seed = rnd(5, 1003), rnd(5, 1003), torch.tensor([12345])
    for dt in (torch.float32, torch.bfloat16):
        d = ops.dropout_fwd(y.to(dt), r.to(dt), seed, 0.1)
        assert torch.equal(d, R.dropout_fwd(y.to(dt), r.to(dt), seed, 0.1)), f"{info['isa']} dropout {dt}"
        res[f"dropout{dt}"] = [d, ops.dropout_bwd(y.to(dt), seed, 0.1)]
    x, w, b, dy = rnd(33, 769), rnd(769), rnd(769), rnd(33, 769)
    for dt in (torch.float32, torch.bfloat16):
        ln = ops.layer_norm_fwd(x.to(dt), w.to(dt), b.to(dt), 1e-5)
        assert all(torch.equal(u, v) for u, v in zip(ln, ops.layer_norm_fwd(x.to(dt), w.to(dt), b.to(dt), 1e-5)))
        rms = ops.rms_norm_fwd(x.to(dt), w.to(dt), 1e-6)
        lnb = ops.layer_norm_bwd(dy.to(dt), x.to(dt), w.to(dt), ln[1], ln[2], True, True, True)
        res[f"norm{dt}"] = [*ln, *rms, *lnb]
    tl = R.layer_norm_fwd(x.double(), w.double(), b.double(), 1e-5)[0]
    few_ulps(res["normtorch.float32"][0], tl, torch.float32, "layer_norm y")
    tr = R.rms_norm_fwd(x.double(), w.double(), 1e-6)[0]
    few_ulps(res["normtorch.float32"][3], tr, torch.float32, "rms_norm y")
    qkv = rnd(2, 7, (4 + 2 * 2) * 16)
    cos, sin = R.rope_tables(7, 16, 10000.0, torch.device("cpu"))
    ours, truth = qkv.clone(), qkv.double()
    ops.rope_(ours, cos, sin, 4, 2, False)
    R.rope_(truth, cos.double(), sin.double(), 4, 2, False)
    few_ulps(ours, truth, torch.float32, "rope")
    res["rope"] = [ours]
    cos, sin = R.rope_tables(7, 6, 10000.0, torch.device("cpu"))  # partial rotary: r = 6 of head_dim 16
    ours, truth = qkv.clone(), qkv.double()
    ops.rope_(ours, cos, sin, 4, 2, True)
    R.rope_(truth, cos.double(), sin.double(), 4, 2, True)
    few_ulps(ours, truth, torch.float32, "partial rope")
    res["rope_partial"] = [ours]
    return res


torch.set_num_threads(1)
one = kernels()
torch.set_num_threads(3)
three = kernels()
for k in one:
    assert all(torch.equal(u, v) for u, v in zip(one[k], three[k])), f"{info['isa']} {k}: 1 vs 3 threads differ"

torch.manual_seed(0)
m = ckpt_ops.nn.MLP(64, 256, dropout=0.1, norm="layernorm", residual=True)
xm = torch.randn(3, 9, 64, requires_grad=True)
outs = {}
for level in ("none", "selective", "full"):
    m.recompute = level
    torch.manual_seed(7)
    o = m(xm)
    o.backward(torch.ones_like(o))
    outs[level] = [o.detach()] + [t.grad.clone() for t in [xm, *m.parameters()]]
    xm.grad = None
    m.zero_grad()
for level in ("selective", "full"):
    assert torch.equal(outs[level][0], outs["none"][0]), f"{info['isa']} MLP {level} forward != none"
    for u, v in zip(outs[level][1:], outs["none"][1:]):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)
torch.save(one, sys.argv[1])
print("CHILD-OK", json.dumps(out))
"""


def _run(isa, path):
    env = dict(os.environ, CKPT_OPS_CPU_ISA=isa, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)


def test_backend_info_reports_the_isa():
    info = _backend.backend_info()["cpu_isa"]
    assert info["error"] == "", info
    supported = info["supported"].split(",")
    assert info["isa"] in supported and "scalar" in supported
    if os.environ.get("CKPT_OPS_CPU_ISA", "auto") == "auto":
        assert info["isa"] == supported[0]  # the widest
    assert info["cpu"]


def test_every_isa_copy_is_correct_and_elementwise_kernels_agree_bitwise(tmp_path):
    supported = _backend.backend_info()["cpu_isa"]["supported"].split(",")
    results = {}
    for isa in supported:
        path = str(tmp_path / f"{isa}.pt")
        out = _run(isa, path)
        assert out.returncode == 0 and "CHILD-OK" in out.stdout, f"{isa}:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"
        reported = json.loads(out.stdout.split("CHILD-OK", 1)[1])
        assert reported["isa"] == isa
        results[isa] = torch.load(path)
    base = results[supported[-1]]  # scalar
    for isa in supported[:-1]:
        for key, tensors in results[isa].items():
            if key.startswith("norm"):  # row sums split across vector lanes: last bits may move
                for u, v in zip(tensors, base[key]):
                    torch.testing.assert_close(u.float(), v.float(), rtol=2e-2 if "bfloat16" in key else 1e-5,
                                               atol=1e-5)
            else:
                assert all(torch.equal(u, v) for u, v in zip(tensors, base[key])), f"{isa} vs scalar: {key}"


@pytest.mark.parametrize("value,word", [("avx1024", "must be one of"), ("", None)])
def test_bad_or_empty_request(value, word):
    code = ("import torch, ckpt_ops\n"
            "print('ISA', ckpt_ops.backend_info()['cpu_isa'])\n"
            "torch.ops.ckpt_ops.act_fwd(torch.randn(8), None, 1)\nprint('RAN')\n")
    env = dict(os.environ, CKPT_OPS_CPU_ISA=value, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    if word is None:  # empty = auto
        assert out.returncode == 0 and "RAN" in out.stdout, out.stderr[-2000:]
    else:
        assert out.returncode != 0 and "ValueError" in out.stderr and word in out.stderr, out.stderr[-2000:]
        assert "RAN" not in out.stdout
