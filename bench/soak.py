"""``python -m bench --soak``: a long-run check of the fused block.

For every recompute level, ``--steps`` small training steps (a gpt2-style TransformerBlock with
residual dropout, a padding mask, SGD) from one seed, then the same run again from the same seed.
Reports per level: the RSS trend (MiB at the first sample after warm-up and at the end, and the
slope per 1,000 steps), the allocator bytes (CUDA: torch.cuda.memory_allocated; CPU: the bytes of
the live torch tensors the garbage collector can see) at the same points, and whether the two runs
are bitwise identical (every loss and every final parameter)."""
from __future__ import annotations

import argparse
import gc
import os
import time
import warnings

import torch

import ckpt_ops


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _alloc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    gc.collect()
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance() on some lazy module objects warns
        warnings.simplefilter("ignore")
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objs:
        if o.device.type == "cpu":
            st = o.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def run_level(level: str, steps: int, device, backend, seed: int = 0, alloc: bool = True):
    sample_every = max(1, min(100, steps // 10))
    torch.manual_seed(seed)
    blk = ckpt_ops.nn.TransformerBlock(32, 4, style="gpt2", recompute=level, dropout=0.1).to(device)
    blk.backend = backend
    opt = torch.optim.SGD(blk.parameters(), lr=1e-3)
    x = torch.randn(2, 16, 32, device=device)
    mask = torch.ones(2, 16, dtype=torch.bool, device=device)
    mask[1, :5] = False
    losses, samples = [], []
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = blk(x, mask).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())  # a Python float: exact for fp32, and no tensor kept alive
        if step % sample_every == 0:
            samples.append((step, _rss_mib(), _alloc_bytes(device) if alloc else 0))
    return losses, [p.detach().clone() for p in blk.parameters()], samples


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --soak", description=__doc__)
    p.add_argument("--soak", action="store_true")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default=None, help="ckpt_ops backend (default: auto)")
    p.add_argument("--levels", nargs="+", choices=ckpt_ops.block.LEVELS, default=list(ckpt_ops.block.LEVELS))
    p.add_argument("--no-alloc", action="store_true", help="skip the allocator samples (a gc scan on CPU)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"# soak: {args.steps} steps per level, gpt2 block d32 h4 B2 S16, dropout 0.1, {device}, "
          f"backend {args.backend or 'auto'}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'level':<10} {'RSS MiB first->last':>20} {'RSS MiB/1k steps':>17} {'alloc B first->last':>22} "
          f"{'bitwise':>8} {'s/run':>6}")
    ok = True
    for level in args.levels:
        t0 = time.time()
        l1, p1, s1 = run_level(level, args.steps, device, args.backend, alloc=not args.no_alloc)
        dt = time.time() - t0
        l2, p2, _ = run_level(level, args.steps, device, args.backend, alloc=False)
        same = l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))
        first, last = s1[1] if len(s1) > 1 else s1[0], s1[-1]  # first sample after one of warm-up
        slope = (last[1] - first[1]) / max(last[0] - first[0], 1) * 1000
        ok &= same and last[2] <= first[2]
        print(f"{level:<10} {first[1]:>9.1f} -> {last[1]:<8.1f} {slope:>17.2f} {first[2]:>10d} -> {last[2]:<9d} "
              f"{str(same):>8} {dt:>6.1f}", flush=True)
    print("soak: " + ("OK (no allocator growth, bitwise reproducible)" if ok else "FAILED"))
    return 0 if ok else 1
