"""CPU activation kernels of ckpt_ops (act_fwd / act_bwd) against torch eager's own kernels.

Kernel-level, not a training step: ``torch.ops.ckpt_ops.act_fwd(h, None, code)`` against
``F.gelu`` / ``F.gelu(approximate="tanh")`` / ``F.silu`` / ``F.relu``, and ``act_bwd(da, h, None,
code, need_a)`` against torch's backward kernels (``aten.gelu_backward``, ``aten.silu_backward``,
``aten.threshold_backward``). Interleaved round-robin in one process, median of ``--reps``;
prints median times and the ratio ours / torch (< 1: ours is faster).

    PYTHONPATH=. python -m bench.bench_act --threads 2 --numel 4194304 --dtype float32 bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import ckpt_ops  # noqa: F401  (loads ckpt_ops._C)

ACTS = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


def _torch_fwd(name, h):
    if name == "gelu":
        return lambda: F.gelu(h)
    if name == "gelu_tanh":
        return lambda: F.gelu(h, approximate="tanh")
    if name == "relu":
        return lambda: F.relu(h)
    return lambda: F.silu(h)


def _torch_bwd(name, da, h):
    aten = torch.ops.aten
    if name == "gelu":
        return lambda: aten.gelu_backward(da, h)
    if name == "gelu_tanh":
        return lambda: aten.gelu_backward(da, h, approximate="tanh")
    if name == "relu":
        return lambda: aten.threshold_backward(da, h, 0.0)
    return lambda: aten.silu_backward(da, h)


def time_pair(ours, theirs, reps, warmup=3):
    for _ in range(warmup):
        ours(), theirs()
    t_ours, t_theirs = [], []
    for i in range(reps):
        pair = [(ours, t_ours), (theirs, t_theirs)]
        if i % 2:
            pair.reverse()
        for fn, acc in pair:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_theirs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_act", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--numel", type=int, nargs="+", default=[4 * 1024 * 1024])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--acts", nargs="+", default=list(ACTS), choices=list(ACTS))
    p.add_argument("--reps", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ops = torch.ops.ckpt_ops
    print(f"threads={torch.get_num_threads()} reps={args.reps} (median ms; ratio = ours / torch)")
    print(f"{'dtype':9} {'numel':>8} {'act':10} {'kernel':12} {'ours':>8} {'torch':>8} {'ratio':>6}")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for n in args.numel:
            g = torch.Generator().manual_seed(0)
            h = (torch.randn(n, generator=g) * 3).to(dtype)
            da = torch.randn(n, generator=g).to(dtype)
            for name in args.acts:
                code = ACTS[name]
                rows = [
                    ("fwd", lambda: ops.act_fwd(h, None, code), _torch_fwd(name, h)),
                    ("bwd", lambda: ops.act_bwd(da, h, None, code, False), _torch_bwd(name, da, h)),
                    ("bwd+a", lambda: ops.act_bwd(da, h, None, code, True), _torch_bwd(name, da, h)),
                ]
                for kernel, ours, theirs in rows:
                    mo, mt = time_pair(ours, theirs, args.reps)
                    print(f"{dtype_name:9} {n:>8} {name:10} {kernel:12} {mo * 1e3:8.2f} {mt * 1e3:8.2f} "
                          f"{mo / mt:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
