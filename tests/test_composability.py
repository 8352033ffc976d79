"""ckpt_ops blocks composed with the rest of PyTorch (DESIGN §6): torch.compile (fullgraph,
inductor), torch.autocast (bf16 on CPU), gradient accumulation, frozen base weights with a
trainable adapter (LoRA-style), DistributedDataParallel and FSDP2 (gloo, 2 processes on
loopback). Small TransformerBlocks of both styles (llama with GQA), on the default "auto" backend
and, where cheap, on "reference". CPU only."""
import copy
import datetime
import math
import multiprocessing as mp
import os
import time
import traceback

import pytest
import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import reference as R
from conftest import assert_close, assert_low_precision_ok, rel_err
from eager_ref import rotate_half

CPU = torch.device("cpu")
LEVELS = ["full", "keep_attn", "keep_mlp", "selective", "none"]
STYLES = ["gpt2", "llama"]
D, H, S, B = 32, 4, 8, 4


def make_block(style, level="full", backend=None, d=D, seed=0):
    """A block whose norm weights/biases and linear biases are randomised (not 1/0), so every
    parameter shapes the result and every gradient is non-trivial."""
    torch.manual_seed(seed)
    kv = 2 if style == "llama" else None
    blk = ckpt_ops.nn.TransformerBlock(d, H, style=style, recompute=level, num_kv_heads=kv)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    blk.backend = backend
    return blk


def eager_block(blk, x, mask=None):
    """The same block in plain eager PyTorch from blk's parameters: pre-norm attention (softmax
    materialised, GQA by repeating K/V, RoPE "rotate half") + pre-norm MLP, both residual. Whatever
    dtype policy is active (autocast or not) applies to it as to any eager model."""
    a, m = blk.attn, blk.mlp
    b, s, d = x.shape
    h, kv, hd = a.num_heads, a.num_kv_heads, a.head_dim

    def norm(mod, t):
        if isinstance(mod, torch.nn.LayerNorm):
            return F.layer_norm(t, (d,), mod.weight, mod.bias, mod.eps)
        return F.rms_norm(t, (d,), mod.weight, mod.eps)

    qkv = F.linear(norm(a.norm, x), a.qkv.weight, a.qkv.bias)
    q = qkv[..., :h * hd].view(b, s, h, hd)
    k = qkv[..., h * hd:(h + kv) * hd].view(b, s, kv, hd)
    v = qkv[..., (h + kv) * hd:].view(b, s, kv, hd)
    if a.rope:
        cos, sin = R.rope_tables(s, hd, a.rope_theta, x.device)
        cos, sin = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
    q = q.transpose(1, 2)
    k = k.transpose(1, 2).repeat_interleave(h // kv, 1)
    v = v.transpose(1, 2).repeat_interleave(h // kv, 1)
    scores = (q @ k.transpose(-1, -2)) * hd ** -0.5
    ok = R.attention_valid(mask, b, s, a.causal, x.device)
    probs = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    o = (probs @ v).transpose(1, 2).reshape(b, s, h * hd)
    h1 = x + F.linear(o, a.out.weight, a.out.bias)
    n2 = norm(m.norm, h1)
    if m.gate is not None:  # swiglu: silu(gate(n)) * fc1(n)
        act = F.silu(F.linear(n2, m.gate.weight, m.gate.bias)) * F.linear(n2, m.fc1.weight, m.fc1.bias)
    else:
        act = F.gelu(F.linear(n2, m.fc1.weight, m.fc1.bias), approximate="tanh")
    return h1 + F.linear(act, m.fc2.weight, m.fc2.bias)


def step(model, x, wt, mask=None):
    """Loss (out . wt) and the gradients of x (if it requires grad) and every trainable parameter."""
    out = model(x, mask) if mask is not None else model(x)
    loss = (out.float() * wt).sum()
    leaves = ([x] if x.requires_grad else []) + [p for p in model.parameters() if p.requires_grad]
    return out, loss, torch.autograd.grad(loss, leaves)


class Eager(torch.nn.Module):
    """eager_block as a module over (a deep copy of) a ckpt_ops block's parameters."""

    def __init__(self, blk):
        super().__init__()
        self.blk = blk

    def forward(self, x, mask=None):
        return eager_block(self.blk, x, mask)


def _close(a, e, name, rtol=1e-5):
    scale = float(e.detach().abs().max()) if e.numel() else 1.0
    assert_close(a, e, rtol=rtol, atol=rtol * 0.1 * max(scale, 1e-6), name=name)


# ------------------------------------------------------------------------------------------------
# 0. the eager reference itself is right: ckpt_ops fp32 == eager fp32 (so the tests below compare
#    like with like)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", STYLES)
def test_eager_reference_matches_block_fp32(style):
    blk = make_block(style, "full")
    x = torch.randn(B, S, D, requires_grad=True)
    wt = torch.randn(B, S, D)
    out, _, grads = step(blk, x, wt)
    x2 = x.detach().clone().requires_grad_()
    ref, _, rgrads = step(Eager(copy.deepcopy(blk)), x2, wt)
    _close(out, ref, "out", rtol=1e-4)
    names = ["dx"] + [n for n, _ in blk.named_parameters()]
    for name, g, r in zip(names, grads, rgrads):
        _close(g, r, name, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# 1. torch.compile(fullgraph=True, inductor) == eager ckpt_ops, every level
# ------------------------------------------------------------------------------------------------
# Every level on llama (RoPE, GQA, SwiGLU: the larger graph); gpt2 at the two ends. An inductor
# compile costs 5-15 s on two shared cores, and the level logic is style-independent Python.
COMPILE_CASES = [("llama", lvl) for lvl in LEVELS] + [("gpt2", "full"), ("gpt2", "none")]


@pytest.mark.parametrize("style,level", COMPILE_CASES)
def test_compile_fullgraph_matches_eager(style, level):
    torch._dynamo.reset()
    blk = make_block(style, level)
    cblk = torch.compile(blk, fullgraph=True, backend="inductor")
    mask = torch.ones(2, S, dtype=torch.bool)
    mask[0, -3:] = False  # right padding
    x = torch.randn(2, S, D, requires_grad=True)
    wt = torch.randn(2, S, D)
    out_c, loss_c, g_c = step(cblk, x, wt, mask)
    out_e, loss_e, g_e = step(blk, x, wt, mask)
    _close(out_c, out_e, "out")
    names = ["dx"] + [n for n, _ in blk.named_parameters()]
    for name, a, e in zip(names, g_c, g_e):
        _close(a, e, name)


# ------------------------------------------------------------------------------------------------
# 2. torch.autocast(cpu, bf16): fp32 parameters, the DESIGN §4 2x rule against an fp64 truth
# ------------------------------------------------------------------------------------------------
AMP_BACKENDS = [None, "reference"]


@pytest.mark.parametrize("backend", AMP_BACKENDS, ids=["auto", "reference"])
@pytest.mark.parametrize("level", ["full", "none"])
@pytest.mark.parametrize("style", STYLES)
def test_autocast_bf16_matches_eager_autocast(style, level, backend):
    blk = make_block(style, level, backend)
    x = torch.randn(B, S, D, requires_grad=True)
    wt = torch.randn(B, S, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss, grads = step(blk, x, wt)
    # eager PyTorch under the same autocast, and the fp64 truth, from the same parameters
    eblk = Eager(copy.deepcopy(blk))
    xe = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eout, eloss, egrads = step(eblk, xe, wt)
    tblk = Eager(copy.deepcopy(blk).double())
    xt = x.detach().double().requires_grad_()
    tout, tloss, tgrads = step(tblk, xt, wt.double())

    assert out.dtype == eout.dtype == torch.float32  # the residual stream stays fp32, as in eager
    assert_low_precision_ok(out, eout, tout, "out", floor=1e-4)
    # The loss is one dot product: its error is a single draw whose size varies by chance (eager's
    # may cancel to ~0). Compare with 2x eager's *typical* loss error: its actual one, or the RMS
    # size ||eout - tout|| * ||wt|| / sqrt(n) of a sum of n independent output errors times wt.
    err = abs(float(loss.detach()) - float(tloss.detach()))
    typical = max(abs(float(eloss.detach()) - float(tloss.detach())),
                  float((eout.detach().double() - tout.detach()).norm() * wt.double().norm()) / math.sqrt(wt.numel()))
    assert err <= 2 * typical + 1e-4 * abs(float(tloss.detach())), f"loss error {err:.3g} > 2 x eager's {typical:.3g}"
    names = ["dx"] + [n for n, _ in blk.named_parameters()]
    params = [x] + list(blk.parameters())
    for name, p, g, eg, tg in zip(names, params, grads, egrads, tgrads):
        assert g.dtype == p.dtype == torch.float32, f"{name}: grad dtype {g.dtype}, param {p.dtype}"
        assert torch.isfinite(g).all(), name
        assert_low_precision_ok(g, eg, tg, name, floor=1e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_autocast_levels_forward_bitwise_equal(dropout):
    """Under autocast (bf16 GEMM outputs, fp32 residual stream) every level's forward is the
    "none" level's bit for bit, whether the residual add is torch's promoting add (p == 0) or the
    dropout kernel (p > 0); and "full"'s recompute reproduces it (its gradients equal "none"'s
    up to the bf16 GEMM rounding of the replay, which is the same GEMM on the same inputs)."""
    x = torch.randn(B, S, D, requires_grad=True)
    wt = torch.randn(B, S, D)
    res = {}
    for level in ckpt_ops.block.LEVELS:
        blk = make_block("gpt2", level)
        blk.attn.dropout = blk.mlp.dropout = dropout
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res[level] = step(blk, x, wt)
    for level, (out, _, grads) in res.items():
        assert torch.equal(out, res["none"][0]), level
        for g, ref in zip(grads, res["none"][2]):
            assert torch.equal(g, ref), level


@pytest.mark.parametrize("style", STYLES)
def test_autocast_runs_gemms_in_bf16_not_fp32(style):
    """Under autocast the block is not secretly fp32: its error is that of bf16 GEMMs (far above
    fp32 rounding), and the grads are the same whether backward() runs inside or outside the
    autocast region (the backward's replay does not depend on the caller's autocast state)."""
    blk = make_block(style, "full")
    x = torch.randn(B, S, D, requires_grad=True)
    wt = torch.randn(B, S, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _, grads_out = step(blk, x, wt)
        out_in = blk(x)
        grads_in = torch.autograd.grad((out_in.float() * wt).sum(), [x] + list(blk.parameters()))
    torch.testing.assert_close(out_in, out, rtol=0, atol=0)
    for a, b in zip(grads_in, grads_out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ref = blk(x.detach())
    assert rel_err(out, ref) > 1e-4, "autocast had no effect: the block ran in fp32"


@pytest.mark.parametrize("residual", [True, False])
def test_autocast_standalone_mlp_and_attention_dtypes(residual):
    """The functional entry points follow eager autocast's dtypes: a residual output in x's
    (promoted) dtype, a bare projection output in bf16; parameter grads in fp32; a bf16 input
    with fp32 parameters is accepted under autocast, as by eager layers."""
    torch.manual_seed(0)
    mlp = ckpt_ops.nn.MLP(D, 64, activation="swiglu", norm="rmsnorm", residual=residual, bias=False)
    att = ckpt_ops.nn.Attention(D, H, 2, norm="layernorm", rope=True, residual=residual)
    for mod in (mlp, att):
        for xdt in (torch.float32, torch.bfloat16):
            x = torch.randn(2, S, D, dtype=xdt, requires_grad=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = mod(x)
            expect = torch.promote_types(xdt, torch.bfloat16) if residual else torch.bfloat16
            assert out.dtype == expect, (type(mod).__name__, xdt, out.dtype)
            out.float().square().sum().backward()
            assert x.grad.dtype == xdt
            for n, p in mod.named_parameters():
                assert p.grad is not None and p.grad.dtype == torch.float32, n
                p.grad = None


# ------------------------------------------------------------------------------------------------
# 3. gradient accumulation: two micro-batches into .grad == one batch of both
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("style", STYLES)
def test_gradient_accumulation(style, level, backend):
    blk = make_block(style, level, backend)
    x = torch.randn(B, S, D)
    wt = torch.randn(B, S, D)
    for half in (slice(0, B // 2), slice(B // 2, B)):
        (blk(x[half]) * wt[half]).sum().backward()
    acc = {n: p.grad.clone() for n, p in blk.named_parameters()}
    blk.zero_grad(set_to_none=True)
    (blk(x) * wt).sum().backward()
    for n, p in blk.named_parameters():
        _close(acc[n], p.grad, n)


# ------------------------------------------------------------------------------------------------
# 4. frozen base weights + a trainable low-rank adapter on the input (LoRA-style)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [None, "reference"], ids=["auto", "reference"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("style", STYLES)
def test_frozen_block_with_trainable_adapter(style, level, backend):
    blk = make_block(style, level, backend)
    blk.requires_grad_(False)
    r = 4
    A = torch.nn.Parameter(torch.randn(D, r) * 0.2)
    Bm = torch.nn.Parameter(torch.randn(r, D) * 0.2)  # non-zero, so dA is non-trivial
    x = torch.randn(B, S, D)
    wt = torch.randn(B, S, D)
    loss = (blk(x + x @ A @ Bm) * wt).sum()
    loss.backward()
    assert all(p.grad is None for p in blk.parameters()), "a frozen block parameter got a .grad"
    eblk = Eager(copy.deepcopy(blk))
    A2, B2 = A.detach().clone().requires_grad_(), Bm.detach().clone().requires_grad_()
    eloss = (eblk(x + x @ A2 @ B2) * wt).sum()
    eloss.backward()
    _close(loss, eloss, "loss", rtol=1e-4)
    _close(A.grad, A2.grad, "dA", rtol=1e-4)
    _close(Bm.grad, B2.grad, "dB", rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# 5. DistributedDataParallel and FSDP2 (gloo, 2 processes on 127.0.0.1)
# ------------------------------------------------------------------------------------------------
WORLD = 2
DIST_TIMEOUT_S = 60      # collectives / rendezvous inside the children
JOIN_TIMEOUT_S = 150     # the parent's bound on the whole run


def _two_blocks(style, level):
    torch.manual_seed(0)
    kv = 2 if style == "llama" else None
    model = torch.nn.Sequential(*(ckpt_ops.nn.TransformerBlock(D, H, style=style, recompute=level, num_kv_heads=kv)
                                  for _ in range(2)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _dist_worker(rank, engine, result_dir):
    """One rank: for both styles, a 2-block model under `engine` on half of the global batch vs a
    plain copy on the whole batch in this process. Writes 'ok' or the traceback to a file; its
    stderr goes to another, so that a crash the traceback cannot show (an abort in C++ during
    teardown) is still explained in the parent's assertion."""
    import torch.distributed as dist

    err = os.open(os.path.join(result_dir, f"rank{rank}.stderr"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    os.close(err)
    torch.set_num_threads(1)
    status = "ok"
    try:
        # a FileStore rendezvous: no TCPStore server thread inside rank 0 and no free-port race
        dist.init_process_group("gloo", init_method="file://" + os.path.join(result_dir, "store"), rank=rank,
                                world_size=WORLD, timeout=datetime.timedelta(seconds=DIST_TIMEOUT_S))
        for style, level in (("gpt2", "full"), ("llama", "keep_attn")):
            model = _two_blocks(style, level)
            ref = copy.deepcopy(model)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(2 * WORLD, S, D, generator=g)
            wt = torch.randn(2 * WORLD, S, D, generator=g)
            if engine == "ddp":
                dmodel = torch.nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                mesh = init_device_mesh("cpu", (WORLD,))
                for blk in model:
                    fully_shard(blk, mesh=mesh)
                dmodel = fully_shard(model, mesh=mesh)
            mine = slice(2 * rank, 2 * rank + 2)
            # the loss is the mean over the global batch's sequences: each rank its local mean,
            # DDP/FSDP average the gradients over ranks, the loss is all-reduced by hand
            loss = (dmodel(x[mine]) * wt[mine]).sum() / 2
            loss.backward()
            gl = loss.detach().clone()
            dist.all_reduce(gl)
            gl /= WORLD
            rloss = (ref(x) * wt).sum() / (2 * WORLD)
            rloss.backward()
            _close(gl, rloss.detach(), f"{engine}/{style}: loss")
            for (name, p), (_, rp) in zip(dmodel.named_parameters(), ref.named_parameters()):
                assert p.grad is not None, f"{engine}/{style}: {name} has no grad"
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                _close(grad, rp.grad, f"{engine}/{style}: {name}")
            if engine == "fsdp2":
                assert any(hasattr(p, "full_tensor") for p in dmodel.parameters()), "FSDP2 did not shard"
            dist.barrier()
    except BaseException:
        status = traceback.format_exc()
    finally:
        with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
            f.write(status)
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_distributed(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")     # inherited by the spawned children
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dist_worker, args=(r, engine, str(tmp_path)), daemon=True)
             for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = JOIN_TIMEOUT_S
    t0 = time.monotonic()
    for p in procs:
        p.join(timeout=max(1.0, deadline - (time.monotonic() - t0)))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join(5)
    def read(name):
        path = tmp_path / name
        return path.read_text(errors="replace") if path.exists() else "<none>"

    results = {r: read(f"rank{r}") for r in range(WORLD)}
    stderr = {r: read(f"rank{r}.stderr")[-4000:] for r in range(WORLD)}
    assert not hung, f"{engine}: {len(hung)} rank(s) hung past {JOIN_TIMEOUT_S}s; results: {results}; stderr: {stderr}"
    for r, p in enumerate(procs):
        assert results[r] == "ok", f"{engine} rank {r} (exit {p.exitcode}):\n{results[r]}\nstderr:\n{stderr[r]}"
        assert p.exitcode == 0, f"{engine} rank {r} exit code {p.exitcode}; its stderr:\n{stderr[r]}"


def test_ddp_two_ranks_equal_one_process(tmp_path, monkeypatch):
    _run_distributed("ddp", tmp_path, monkeypatch)


def test_fsdp2_two_ranks_equal_one_process(tmp_path, monkeypatch):
    _run_distributed("fsdp2", tmp_path, monkeypatch)
