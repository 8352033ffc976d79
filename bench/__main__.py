"""``python -m bench``: fused checkpointing against the alternatives, measured side by side.

Prints a table (median / p20 / p80 step time, ratio to eager measured in the same run, saved bytes
for backward and their ratio to eager) and writes JSON lines with the environment to
bench/results/.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench import bench_mlp, bench_norm
from bench.common import environment, print_table, write_jsonl

OPS = {"norm": bench_norm, "mlp": bench_mlp}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=sorted(OPS) + ["all"], default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--tokens", type=int, default=2048, help="batch x sequence (default 4 x 512)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per provider")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1], help="dropout probabilities (MLP)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.reps is None:
        args.reps = 5 if args.quick else 40
    if args.quick:
        args.warmup = 1

    env = environment(device, dtype)
    print(f"# ckpt_ops bench on {env['device']} ({device.type}, {env['threads']} threads), {env['dtype']}, "
          f"torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    results = []
    for name, mod in OPS.items():
        if args.op in (name, "all"):
            results += mod.run(args, device, dtype)
    print_table(results)
    path = write_jsonl(results, env, "bench")
    print(f"\nJSON lines: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
