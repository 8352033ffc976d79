"""``python -m bench``: fused checkpointing against the alternatives, measured side by side.

Default: the GPT-2-small-shaped block stack (d 768, 12 heads, S 512, batch 4, fp32 on CPU) with
every provider. Prints a table (median / p20 / p80 time, ratio to eager in the same run, saved and
kept bytes, peak memory, FLOPs; on CUDA TFLOP/s, GB/s and the roofline floor), one verdict line
per peer point, and the paths of the JSON lines and the frontier PNG (bench/results/).

Examples:
  python -m bench                                 # block stack, all providers (about 3 min on 2 cores)
  python -m bench --long                          # + S 2048 at batch 1
  python -m bench --op attention --quick          # attention sublayer, S 512 and 2048
  python -m bench --op mlp --modes forward backward step --no-compile
  python -m bench --op all --quick
  python -m bench --op planner --batch 1          # budget sweep: plans vs compile budgets and every-n-layers
  python -m bench --op segments --batch 1         # outer segments of k blocks on 4..32-block stacks
  python -m bench --soak                          # 1,000 steps per level: memory trend, bitwise repro
  python -m bench --op lora --reps 5              # PEFT LoRA step: ckpt_ops vs PEFT + HF checkpointing vs PEFT
                                                  # (Llama-shaped, d 1024, S 512; bench/bench_lora.py)
  python -m bench --device cpu --triton-smoke     # Triton interpreter at tiny sizes: the CUDA
                                                  # reporting path (roofline), correctness only
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types

OPS = ("norm", "mlp", "attention", "block", "model", "planner", "segments")
SMOKE = {"d_model": 64, "heads": 2, "batch": 2, "seqs": [32], "layers": 1, "tokens": 64, "vocab": 256}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=OPS + ("all", "lora"), default="block")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                   help="run every forward under torch.autocast(device, dtype) (inputs and parameters stay --dtype)")
    sz = p.add_argument_group("sizes")
    sz.add_argument("--batch", type=int, default=4)
    sz.add_argument("--seq", dest="seqs", type=int, nargs="+", default=None,
                    help="sequence lengths (default: 512; attention: 512 2048)")
    sz.add_argument("--d-model", type=int, default=768)
    sz.add_argument("--heads", type=int, default=12)
    sz.add_argument("--layers", type=int, default=2, help="blocks in the stack (block, model)")
    sz.add_argument("--tokens", type=int, default=2048, help="rows of the norm / MLP benchmarks (4 x 512)")
    sz.add_argument("--vocab", type=int, default=8192, help="vocabulary of --op model")
    sz.add_argument("--family", default="gpt2", choices=("gpt2", "llama", "mistral", "qwen2", "phi3", "gemma"),
                    help="model: the Hugging Face family (Llama-like ones without dropout)")
    sz.add_argument("--dropout", type=float, nargs="+", default=None,
                    help="residual dropout: block runs each value (default 0.1 and 0: with dropout the "
                         "compile-budget peers' gradients are wrong, pytorch#190758, so dropout 0 is where they "
                         "are valid peers); attention and model take the first (default 0.1)")
    sz.add_argument("--attn-dropout", type=float, default=0.0,
                    help="attention-probability dropout of --op model (GPT-2 attn_pdrop / attention_dropout)")
    sz.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1], help="dropout probabilities (MLP)")
    sz.add_argument("--long", action="store_true", help="block: also S 2048 at batch 1")
    sz.add_argument("--budgets", type=float, nargs="+", default=None,
                    help="planner: budgets as fractions of eager's saved bytes (default 0.06 0.1 0.2 0.3 0.5 0.7 0.9)")
    sz.add_argument("--segment-layers", type=int, nargs="+", default=None,
                    help="segments: stack depths of the sweep (default 4 8 16 32)")
    lo = p.add_argument_group("lora (--op lora: d-model 1024, heads 16, batch 1, seq 512 unless given)")
    lo.add_argument("--lora-r", type=int, default=16)
    lo.add_argument("--lora-dropout", type=float, default=0.0)
    lo.add_argument("--d-hidden", type=int, default=None, help="MLP width (default 2.75 d_model, rounded to 64)")
    m = p.add_argument_group("measuring")
    m.add_argument("--reps", type=int, default=None, help="timed repetitions per provider (default 8; --quick 3)")
    m.add_argument("--warmup", type=int, default=1, help="untimed steps per provider (the first compiles)")
    m.add_argument("--quick", action="store_true", help="few repetitions")
    m.add_argument("--modes", nargs="+", choices=["forward", "backward", "step"], default=["step"])
    m.add_argument("--backends", nargs="+", choices=["cpu", "cuda", "triton", "reference"], default=None,
                   help="ckpt_ops kernel backends (default: every compiled one available, else reference)")
    m.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    m.add_argument("--triton-smoke", action="store_true",
                   help="CPU + TRITON_INTERPRET=1, tiny sizes, ckpt_ops on the Triton backend, roofline columns "
                        "with nominal peaks: exercises the CUDA reporting path; times are meaningless")
    m.add_argument("--peak-tflops", type=float, default=None, help="roofline: peak TFLOP/s (default: GPU table)")
    m.add_argument("--peak-gbs", type=float, default=None, help="roofline: peak GB/s (default: GPU table)")
    m.add_argument("--out", default=None, help="results folder (default bench/results/)")
    args = p.parse_args(argv)
    if args.family != "gpt2" and args.op not in ("model", "all"):
        # the other ops build their own fixed stacks (bench_block's and bench_planner's docstrings):
        # refuse rather than measure a GPT-2 stack under a Llama label
        p.error(f"--family {args.family} applies to --op model (or all) only; --op {args.op} builds its own stack")
    args.block_dropouts = args.dropout or [0.1, 0.0]
    args.dropout = (args.dropout or [0.1])[0]
    if args.reps is None:
        args.reps = 3 if args.quick else 8
    if args.quick:
        args.warmup = min(args.warmup, 1)
    if args.triton_smoke:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--triton-smoke needs a fresh process (triton was imported without TRITON_INTERPRET=1)")
        os.environ["TRITON_INTERPRET"] = "1"
        args.device = args.device or "cpu"
        defaults = {a.dest: a.default for a in p._actions}
        for k, v in SMOKE.items():  # tiny sizes unless given explicitly
            if getattr(args, k) == defaults[k]:
                setattr(args, k, v)
        args.backends = args.backends or ["triton"]
        args.no_compile, args.reps, args.warmup = True, min(args.reps, 2), 1
        args.peak_tflops = args.peak_tflops or 1.0
        args.peak_gbs = args.peak_gbs or 100.0
    return args


def main(argv=None) -> int:
    if "--soak" in (sys.argv[1:] if argv is None else argv):  # long-run check: bench/soak.py
        from bench import soak
        return soak.main(argv)
    args = parse(argv)
    import torch

    if args.op == "lora":
        return _lora(args, argv)

    from bench import (bench_attention, bench_block, bench_mlp, bench_model, bench_norm, bench_planner, frontier,
                       targets)
    from bench.common import device_peaks, environment, print_table, result_path, write_jsonl

    modules = {"norm": bench_norm, "mlp": bench_mlp, "attention": bench_attention, "block": bench_block,
               "model": bench_model, "planner": bench_planner,
               "segments": types.SimpleNamespace(run=bench_planner.run_segments)}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.peaks = device_peaks(device, dtype, args.peak_tflops, args.peak_gbs)
    if device.type == "cuda" and args.peaks is None:
        print("  roofline columns off: unknown GPU peaks (give --peak-tflops and --peak-gbs)")
    t0 = time.time()
    env = environment(device, dtype)
    print(f"# ckpt_ops bench on {env['device']} ({device.type}, {env['threads']} threads), {env['dtype']}"
          + (f" under autocast {args.autocast}" if args.autocast else "") + ", "
          f"torch {env['torch']}, triton {env['triton']}, ckpt_ops {env['ckpt_ops']}, commit {env['commit']}"
          + (f"; roofline peaks {args.peaks.tflops} TFLOP/s, {args.peaks.gbs} GB/s ({args.peaks.source})"
             if args.peaks else ""))
    if args.triton_smoke:
        print("# --triton-smoke: Triton interpreter on CPU at tiny sizes; correctness of the reporting path only, "
              "the times are meaningless")
    results = []
    for name in OPS:
        if args.op in (name, "all"):
            results += modules[name].run(args, device, dtype)
    if not results:
        print("nothing was measured")
        return 0
    print()
    print_table(results)
    print()
    for line in frontier.verdicts(results):
        print(line)
    print()
    for line in targets.lines(results):
        print(line)
    tag = f"bench-{args.op}"
    json_path = write_jsonl(results, env, result_path(tag, "jsonl", args.out))
    png_path = result_path(tag, "png", args.out)
    note = frontier.plot(results, png_path, title=f"{env['device']} {env['dtype']} torch {env['torch']} "
                                                  f"commit {env['commit']}")
    if note:
        print(f"  ({note})")
    print(f"\nJSON lines: {json_path}\nfrontier PNG: {png_path}\nwall time: {time.time() - t0:.0f} s")
    return 0


def _lora(args, argv) -> int:
    import torch

    from bench import bench_lora

    given = set(argv if argv is not None else sys.argv[1:])
    if "--d-model" not in given:
        args.d_model = 1024
    if "--heads" not in given:
        args.heads = 16
    if "--batch" not in given:
        args.batch = 1
    if "--vocab" not in given:
        args.vocab = 2048
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return bench_lora.run_cli(args, device, dtype)


if __name__ == "__main__":
    sys.exit(main())
