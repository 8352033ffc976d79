"""Roofline on paper for the GPU path: bytes each kernel must move and its FLOPs at the benchmark shapes, the
floor time max(bytes / bandwidth, FLOPs / peak) on H100 and H200, and the predicted recompute overhead of a
GPT-2 block step at level "full" against torch.utils.checkpoint's unfused replay.

    python scripts/roofline.py [--write docs/gpu_roofline.md]

Every figure comes from the formulas below (bf16 storage, fp32 statistics), nothing is measured. A floor is
the time no implementation can beat; real kernels reach 60-90% of HBM bandwidth and launches add a few us each.
"""
import argparse
import sys

BF16 = 2
# dense peaks (no sparsity): bf16 tensor-core TFLOP/s, HBM GB/s (the table of bench/common.py)
GPUS = {"H100 SXM": (989.0, 3350.0), "H200": (989.0, 4800.0)}


def floor_us(nbytes, flops, gpu):
    tflops, gbs = GPUS[gpu]
    return max(nbytes / (gbs * 1e9), flops / (tflops * 1e12)) * 1e6


# ----------------------------------------------------------------------------------------------------------
# kernels at the benchmark shapes (python -m bench defaults; S 2048 for attention)
# ----------------------------------------------------------------------------------------------------------
def kernels(tokens=2048, d=768, hidden=3072, b=4, s=2048, heads=12, hd=64, programs=264):
    """(family, kernel, shape, bytes, FLOPs). Norm backward: x, dy read once, dx written, fp32 partial
    dweight/dbias of ``programs`` rows written and re-read by their sum."""
    m, n = tokens, d
    e = tokens * hidden  # MLP hidden elements
    t, w = b * s, (heads + 2 * heads) * hd  # attention tokens, qkv width
    causal = 0.5  # causal: half of the S x S score matrix
    att_fwd = 4 * b * heads * s * s * hd * causal  # q k^T and p v
    return [
        ("norm", "layer_norm_fwd", f"{m}x{n}", 2 * m * n * BF16 + 2 * n * BF16 + 8 * m, 8 * m * n),
        ("norm", "layer_norm_bwd", f"{m}x{n}", 3 * m * n * BF16 + 8 * m + 2 * 2 * programs * n * 4, 11 * m * n),
        ("norm", "rms_norm_fwd", f"{m}x{n}", 2 * m * n * BF16 + n * BF16 + 4 * m, 5 * m * n),
        ("norm", "rms_norm_bwd", f"{m}x{n}", 3 * m * n * BF16 + 4 * m + 2 * programs * n * 4, 8 * m * n),
        ("mlp", "act_fwd gelu_tanh", f"{tokens}x{hidden}", 2 * e * BF16, 20 * e),
        ("mlp", "act_bwd gelu_tanh (+a)", f"{tokens}x{hidden}", 4 * e * BF16, 35 * e),
        ("mlp", "act_fwd swiglu", f"{tokens}x{hidden}", 3 * e * BF16, 8 * e),
        ("mlp", "dropout+residual fwd", f"{tokens}x{d}", 3 * tokens * d * BF16, 60 * tokens * d),
        ("mlp", "dropout bwd", f"{tokens}x{d}", 2 * tokens * d * BF16, 60 * tokens * d),
        ("attention", "rope (q, k heads)", f"B{b} S{s} H{heads} hd{hd}", 2 * t * 2 * heads * hd * BF16, 3 * t * 2 * heads * hd),
        ("attention", "attention_fwd causal", f"B{b} S{s} H{heads} hd{hd}",
         t * w * BF16 + t * heads * hd * BF16 + 4 * b * heads * s, att_fwd),
        ("attention", "attention_bwd causal (3 kernels)", f"B{b} S{s} H{heads} hd{hd}",
         t * w * BF16 + 2 * t * heads * hd * BF16 + 8 * b * heads * s + t * w * BF16, 2.5 * att_fwd),
    ]


# ----------------------------------------------------------------------------------------------------------
# a GPT-2 block step (S 2048, batch 1, d 768, 12 heads, gelu_tanh, residual dropout)
# ----------------------------------------------------------------------------------------------------------
def _gemm(m, k, n):
    return ((m * k + k * n + m * n) * BF16, 2 * m * k * n)


def block_passes(s=2048, b=1, d=768, heads=12):
    """Passes of one block as (name, bytes, FLOPs): the eager forward, its backward, torch.utils.checkpoint's
    replay (the whole eager forward again, unfused: the stored dropout mask after fc2 defeats its early stop),
    and ckpt_ops "full"'s recompute (fused kernels; never fc2, no dropout mask)."""
    t, h = b * s, 4 * d
    el = t * d  # elements of a (T, d) activation
    attn = 4 * b * heads * s * s * (d // heads) * 0.5
    gemms = {"qkv": _gemm(t, d, 3 * d), "out": _gemm(t, d, d), "fc1": _gemm(t, d, h), "fc2": _gemm(t, h, d)}
    att_fwd = (4 * t * d * BF16 + 4 * b * heads * s, attn)
    fwd = [("ln1", 2 * el * BF16, 8 * el), ("qkv", *gemms["qkv"]), ("sdpa fwd", *att_fwd), ("out proj", *gemms["out"]),
           ("dropout (mask stored)", 2 * el * BF16 + el, el), ("residual add", 3 * el * BF16, el),
           ("ln2", 2 * el * BF16, 8 * el), ("fc1", *gemms["fc1"]), ("gelu", 2 * t * h * BF16, 20 * t * h),
           ("fc2", *gemms["fc2"]), ("dropout (mask stored)", 2 * el * BF16 + el, el),
           ("residual add", 3 * el * BF16, el)]
    bwd = [(f"{n} bwd", 2 * by, 2 * fl) for n, (by, fl) in gemms.items()]  # dgrad + wgrad
    bwd += [("sdpa bwd", 2 * att_fwd[0] + 2 * t * d * BF16, 2.5 * attn), ("ln1 bwd", 3 * el * BF16, 11 * el),
            ("ln2 bwd", 3 * el * BF16, 11 * el), ("gelu bwd", 3 * t * h * BF16, 35 * t * h),
            ("dropout bwd x2", 2 * (2 * el * BF16 + el), 2 * el), ("residual grad adds x2", 2 * 3 * el * BF16, 2 * el)]
    replay = list(fwd)
    fused = [("ln1 apply", 2 * el * BF16, 8 * el), ("qkv", *gemms["qkv"]), ("attention fwd", *att_fwd),
             ("out proj", *gemms["out"]), ("dropout+residual (mask from seed)", 3 * el * BF16, 60 * el),
             ("ln2 apply", 2 * el * BF16, 8 * el), ("fc1", *gemms["fc1"]),
             ("activation (inside act_bwd: +1 write)", t * h * BF16, 20 * t * h)]
    return dict(forward=fwd, backward=bwd, checkpoint_replay=replay, full_recompute=fused)


def _total(passes, gpu):
    return sum(floor_us(by, fl, gpu) for _, by, fl in passes)


def report():
    out = ["# Roofline on paper (generated by `python scripts/roofline.py --write docs/gpu_roofline.md`)", "",
           "bf16 storage, dense peaks: " + ", ".join(f"{g} {p[0]:.0f} TFLOP/s and {p[1]:.0f} GB/s"
                                                       for g, p in GPUS.items())
           + ". Floor = max(bytes / bandwidth, FLOPs / peak) per kernel: the time no implementation beats "
           "(real kernels reach ~60-90% of HBM bandwidth; each launch adds a few us).", "",
           "## Kernels at the benchmark shapes", "",
           "| family | kernel | shape | MB moved | GFLOP | intensity FLOP/B | floor H100 us | floor H200 us | bound |",
           "|---|---|---|---|---|---|---|---|---|"]
    for fam, name, shape, by, fl in kernels():
        bound = "memory" if by / (GPUS["H200"][1] * 1e9) > fl / (GPUS["H200"][0] * 1e12) else "compute"
        out.append(f"| {fam} | {name} | {shape} | {by / 1e6:.2f} | {fl / 1e9:.3f} | {fl / by:.1f} | "
                   f"{floor_us(by, fl, 'H100 SXM'):.1f} | {floor_us(by, fl, 'H200'):.1f} | {bound} |")
    p = block_passes()
    out += ["", "## A GPT-2 block step at S 2048 (batch 1, d 768, 12 heads): recompute overhead", "",
            "| pass | MB moved | GFLOP | floor H100 us | floor H200 us |", "|---|---|---|---|---|"]
    for key in ("forward", "backward", "checkpoint_replay", "full_recompute"):
        by = sum(x[1] for x in p[key])
        fl = sum(x[2] for x in p[key])
        out.append(f"| {key} | {by / 1e6:.1f} | {fl / 1e9:.2f} | {_total(p[key], 'H100 SXM'):.1f} | "
                   f"{_total(p[key], 'H200'):.1f} |")
    out.append("")
    for gpu in GPUS:
        step = _total(p["forward"], gpu) + _total(p["backward"], gpu)
        ck, fu = _total(p["checkpoint_replay"], gpu), _total(p["full_recompute"], gpu)
        ridge = GPUS[gpu][0] * 1e12 / (GPUS[gpu][1] * 1e9)  # FLOP/B where a kernel turns compute-bound
        el_ck = sum(floor_us(by, fl, gpu) for n, by, fl in p["checkpoint_replay"] if fl / by < ridge)
        el_fu = sum(floor_us(by, fl, gpu) for n, by, fl in p["full_recompute"] if fl / by < ridge)
        out.append(f"- {gpu}: eager step floor {step:.0f} us; torch.utils.checkpoint replays {ck:.0f} us "
                   f"(+{100 * ck / step:.0f}%, of which {el_ck:.0f} us memory-bound passes); ckpt_ops "
                   f"\"full\" recomputes {fu:.0f} us (+{100 * fu / step:.0f}%, memory-bound {el_fu:.0f} us): "
                   f"predicted overhead {fu / ck:.2f}x checkpoint's (it never replays fc2 nor stores a dropout "
                   f"mask, and fuses dropout + residual).")
    out += ["", "Assumptions: the eager step's backward GEMMs cost twice their forward (dgrad + wgrad); attention "
            "backward 2.5x the forward's FLOPs (5 matmuls vs 2, causal halves both); ckpt_ops' non-recompute work "
            "equals eager's. Measured counterparts: `scripts/gpu_check.sh` (bench JSON, roofline columns)."]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", help="write the markdown here (default: print)")
    a = ap.parse_args(argv)
    text = report()
    if a.write:
        with open(a.write, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
