"""``python -m bench --op planner``: the memory/time frontier answered at every budget.

1. Budget sweep, on an 8-layer GPT-2-small stack (d 768, 12 heads, residual dropout 0.1) and an
   8-layer Llama-shaped stack (RMSNorm, SwiGLU, GQA 12/4 heads, RoPE, no dropout), S 512: one
   ``ckpt_ops.plan`` per budget (a fraction of eager's saved bytes, --budgets, default 0.06 0.1 0.2
   0.3 0.5 0.7 0.9; costs from one timing probe on the stack), against ``torch.compile`` with
   ``activation_memory_budget`` at the same budgets and Hugging Face-style every-n-layers
   checkpointing (torch.utils.checkpoint around layers i % n == 0, n = 1, 2, 4) of the eager
   stack, all measured interleaved in one run; plus one plan at each peer's own kept bytes (a peer
   keeping less than every fraction budget still meets the fastest plan that fits it; plans equal
   to an earlier one are measured once). A peer point is dominated when a planner point
   keeps no more bytes (allocator, ``bench.common.kept_bytes``) and takes at most 1.02x its time.
2. Segment sweep (``--op segments``): stacks of L "full" blocks (--segment-layers, default 4 8 16 32) in outer
   segments of k blocks (``ckpt_ops.checkpoint_sequential``), weights frozen so that the peak is
   activations only: saved bytes, the allocator's peak during the step, time vs k = 1 (per-layer
   "full"); the exponent of min_k peak ~ L^a is fitted (the sqrt(L) law: a = 0.5).
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

import ckpt_ops
from bench import eager, providers
from bench.common import Case, Result, build_cases, kept_bytes, measure, ratio_noise, run_cases
from ckpt_ops import planner

BUDGETS = (0.06, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
EVERY_N = (1, 2, 4)
TIME_SLACK = 1.02
STACKS = {"gpt2": dict(style="gpt2", dropout=0.1), "llama": dict(style="llama", num_kv_heads=4, dropout=0.0)}


def _stack(kind: str, n: int, d: int, h: int, device, dtype) -> torch.nn.ModuleList:
    torch.manual_seed(0)
    kw = dict(STACKS[kind])
    if kind == "llama" and h % kw["num_kv_heads"]:
        kw["num_kv_heads"] = 1
    return torch.nn.ModuleList(ckpt_ops.nn.TransformerBlock(d, h, device=device, dtype=dtype, **kw) for _ in range(n))


def _every_n(layers, n: int):
    return providers.sequential([providers.checkpointed(f) if i % n == 0 else f for i, f in enumerate(layers)])


def setup(config: Dict[str, object], device, dtype, budgets, with_compile=True, plan_reps=3) -> Tuple[List[Case], list]:
    b, s, d, h, n = (int(config[k]) for k in ("batch", "seq", "d_model", "heads", "layers"))
    blocks = _stack(str(config["stack"]), n, d, h, device, dtype)
    x = torch.randn(b, s, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(b, s, d, device=device, dtype=dtype)
    layers = [lambda t, blk=blk: eager.block_forward(blk, t) for blk in blocks]
    eager_fwd = providers.sequential(layers)
    eager_bytes = ckpt_ops.saved_bytes(lambda t, _m: eager_fwd(t), x, blocks)
    forwards = [("eager", eager_fwd)] + [(f"every {k} layers", _every_n(layers, k)) for k in EVERY_N]
    reason = None if with_compile else "--no-compile"
    reason = reason or providers.compile_unavailable_reason(device)
    for budget in budgets:
        if reason is None:
            forwards.append((f"compile budget {budget}", providers.compiled_with_budget(eager_fwd, budget)))
    if reason is not None:
        print(f"  skipped the compile budgets: {reason}")
    costs = planner.measure_costs(blocks, x.detach(), reps=plan_reps)
    plans, seen = [], set()

    def add_plan(label, budget_bytes):
        try:
            p = ckpt_ops.plan(blocks, x, budget=int(budget_bytes), costs=costs)
        except ValueError as e:
            print(f"  plan {label}: {e}")
            return
        key = (tuple(p.levels), tuple(p.segments))
        if key in seen:  # the same plan as an earlier budget's: measured once
            return
        seen.add(key)
        plans.append((label, p, eager_bytes))

        def fwd(t, p=p):
            p.apply(blocks)
            return providers.sequential(list(blocks))(t)
        forwards.append((f"ckpt_ops plan {label}", fwd))

    for budget in budgets:
        add_plan(f"{budget}", budget * eager_bytes)
    # The frontier answered at every peer's own point: a plan at each peer's kept bytes
    # (allocator-measured after one warm step, as the verdicts compare them), so that a peer
    # which keeps less than the fraction budgets is compared with the fastest plan that fits it.
    for name, f in forwards[1:]:
        if name.startswith("ckpt_ops"):
            continue
        short = name.replace("compile budget ", "compile").replace("every ", "every").replace(" layers", "")
        add_plan(f"@{short}", peer_kept_bytes(f, x, dy, device))
    cases = build_cases(forwards, x, dy, list(blocks.parameters()))
    for c in cases:
        if c.provider.startswith("every"):
            c.group = "peer"
    return cases, plans


def peer_kept_bytes(forward, x, dy, device) -> int:
    """The bytes `forward(x)` keeps for backward (``bench.common.kept_bytes``), after one warm step
    (compiles a compiled peer, so compile-time allocations are not counted)."""
    forward(x).backward(dy)
    x.grad = None
    return kept_bytes(lambda: forward(x), [x], device)


def verdicts(results: List[Result]) -> List[str]:
    """One line per peer point: the planner point dominating it (kept bytes <=, time <= 1.02x), or
    the closest miss; with the timing noise of the two points."""
    lines = []
    for p in results:
        if p.group == "ckpt_ops" or p.provider == "eager":
            continue
        ours = [r for r in results if r.group == "ckpt_ops" and r.op == p.op]
        head = f"{p.op} | {p.provider} (bytes {p.kept_ratio:.3f}, time {p.ratio_to_eager:.3f}):"
        if p.invalid:
            lines.append(f"{head} INVALID peer, not a frontier point: {p.invalid}")
            continue
        dom = [r for r in ours if r.kept_ratio <= p.kept_ratio and r.ratio_to_eager <= TIME_SLACK * p.ratio_to_eager]
        noise = lambda r: max(ratio_noise(r) or 0.0, ratio_noise(p) or 0.0)  # noqa: E731
        if dom:
            best = min(dom, key=lambda r: r.ratio_to_eager)
            lines.append(f"{head} dominated by {best.provider}: bytes {best.kept_ratio:.3f}, time "
                         f"{best.ratio_to_eager:.3f} ({best.ratio_to_eager / p.ratio_to_eager - 1:+.1%}; "
                         f"noise +-{noise(best):.1%})")
        elif ours:
            fit = [r for r in ours if r.kept_ratio <= p.kept_ratio]
            best = min(fit, key=lambda r: r.ratio_to_eager) if fit else min(ours, key=lambda r: r.kept_ratio)
            lines.append(f"{head} NOT dominated: best planner point at or below its bytes {best.provider} (bytes "
                         f"{best.kept_ratio:.3f}, time {best.ratio_to_eager:.3f}, "
                         f"{best.ratio_to_eager / p.ratio_to_eager - 1:+.1%}; noise +-{noise(best):.1%})")
    return lines


def segment_sweep(args, device, dtype) -> Tuple[List[Result], List[str]]:
    """Outer segments of k "full" blocks on stacks of L blocks (module docstring, item 2)."""
    results, lines = [], []
    b, s, d, h = args.batch, (args.seqs or [512])[0], args.d_model, args.heads
    for n in tuple(getattr(args, "segment_layers", None) or (4, 8, 16, 32)):
        blocks = _stack("gpt2", n, d, h, device, dtype)
        for q in blocks.parameters():
            q.requires_grad_(False)
        x = torch.randn(b, s, d, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        # k = 1 is per-layer "full"; n // k segments with torch's split (the last one not
        # checkpointed), so k must leave at least two segments
        ks = [k for k in (1, 2, 4, 8, 16) if k == 1 or (n // k >= 2 and k * k <= 4 * n)]
        fwds = [(f"k={k}", (lambda t, k=k: ckpt_ops.checkpoint_sequential(blocks, n // k, t)) if k > 1
                 else providers.sequential(list(blocks))) for k in ks]
        cases = build_cases(fwds, x, dy, [])
        for c in cases:
            c.group = "ckpt_ops"
        config = {"batch": b, "seq": s, "d_model": d, "layers": n}
        print(f"- segments x{n}: k in {ks}")
        rs = measure(f"segments L={n}", config, cases, device, reps=args.reps, warmup=args.warmup, baseline="k=1")
        results += rs
        xb = x.numel() * x.element_size()
        for r in rs:
            lines.append(f"  L={n:<3} {r.provider:<5} saved {r.saved_bytes / xb:6.2f} block inputs, peak "
                         f"{r.peak_bytes / 1e6:8.2f} MB ({r.peak_bytes / xb:6.2f} inputs), time {r.ratio_to_eager:.3f}"
                         f" x k=1 (+-{100 * (ratio_noise(r) or 0):.1f}%)")
    return results, lines + segment_fit(results)


def _slope(pts) -> float:
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return sum((u - mx) * (v - my) for u, v in pts) / sum((u - mx) ** 2 for u, _ in pts)


def segment_fit(results: List[Result]) -> List[str]:
    """Exponents a of min over k ~ L^a: of the saved bytes, and of the allocator peak above the
    part that does not grow with L (per L: the k = 1 peak minus its L saved block inputs, i.e. one
    block's backward working set and the step's own buffers)."""
    by_l: Dict[int, List[Result]] = {}
    for r in results:
        if r.op.startswith("segments L="):
            by_l.setdefault(int(r.config["layers"]), []).append(r)
    if len(by_l) < 2:
        return []
    saved, peak, const = {}, {}, {}
    for n, rs in sorted(by_l.items()):
        k1 = next(r for r in rs if r.provider == "k=1")
        xb = k1.saved_bytes / n
        const[n] = k1.peak_bytes - k1.saved_bytes
        saved[n] = min(r.saved_bytes for r in rs) / xb
        peak[n] = (min(r.peak_bytes for r in rs) - const[n]) / xb
    ls = sorted(by_l)
    out = [f"  L = {ls}: min over k of saved bytes = {[round(saved[n], 2) for n in ls]} block inputs; of the peak above "
           f"the L-independent part ({[round(const[n] / (by_l[n][0].saved_bytes / n), 1) for n in ls]} inputs) = "
           f"{[round(peak[n], 2) for n in ls]} inputs"]
    for name, v in (("saved bytes", saved), ("allocator peak above the L-independent part", peak)):
        a = _slope([(math.log(n), math.log(max(v[n], 1e-9))) for n in ls])
        out.append(f"  fitted exponent a of min over k of {name} ~ L^a: a = {a:.3f} (sqrt law 0.5; per-layer full 1.0)")
    return out


def plot(results: List[Result], path: str, verdict_lines: List[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in dict.fromkeys(r.op for r in results)]
    fig, axes = plt.subplots(1, len(ops), figsize=(7 * len(ops), 5.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        rs = [r for r in results if r.op == op]
        ours = sorted((r for r in rs if r.group == "ckpt_ops"), key=lambda r: r.kept_ratio)
        ax.plot([r.kept_ratio for r in ours], [r.ratio_to_eager for r in ours], "-s", color="tab:red",
                label="ckpt_ops.plan (budgets)", zorder=3)
        for r in ours:
            ax.annotate(r.provider.split()[-1], (r.kept_ratio, r.ratio_to_eager), fontsize=7,
                        textcoords="offset points", xytext=(4, 4), color="tab:red")
        for r in rs:
            if r.group == "ckpt_ops":
                continue
            dominated = any(f"{op} | {r.provider} (" in v and "dominated by" in v and "NOT" not in v
                            for v in verdict_lines)
            marker = "X" if r.provider == "eager" else "o" if r.provider.startswith("every") else "^"
            ax.scatter(r.kept_ratio, r.ratio_to_eager, marker=marker, s=60,
                       color="black" if r.provider == "eager" else "lightgray" if r.invalid else
                       ("tab:green" if dominated else "tab:orange"), edgecolors="black", zorder=4)
            ax.annotate(r.provider.replace("compile budget", "compile") + (" (wrong grads)" if r.invalid else ""),
                        (r.kept_ratio, r.ratio_to_eager), fontsize=6,
                        textcoords="offset points", xytext=(4, -9))
        ax.set_xlabel("kept bytes / eager (allocator)")
        ax.set_ylabel("step time / eager (same run)")
        ax.set_title(f"{op}\npeers: green = dominated by a plan (<= bytes, <= 1.02x time), orange = not, "
                     "gray = wrong gradients", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args, device, dtype) -> list:
    from bench.common import result_path

    budgets = tuple(getattr(args, "budgets", None) or BUDGETS)
    results, lines = [], []
    for kind in ("gpt2", "llama"):
        config = {"stack": kind, "batch": args.batch, "seq": (args.seqs or [512])[0], "d_model": args.d_model,
                  "heads": args.heads, "layers": 8}
        cases, plans = setup(config, device, dtype, budgets, not args.no_compile, plan_reps=max(9, args.reps))
        for budget, p, eager_bytes in plans:
            print(f"  plan {budget}: levels {p.levels}, segments {p.segments}, predicted "
                  f"{p.predicted_bytes / eager_bytes:.3f} of eager's saved bytes, {p.predicted_ms:.1f} ms")
        results += run_cases(f"{kind} x8 S={config['seq']}", config, cases, args, device)
    lines = verdicts(results)
    print("\nplanner verdicts (kept bytes <=, time <= 1.02x, same run):")
    for line in lines:
        print("  " + line)
    try:
        path = result_path("bench-planner-frontier", "png", args.out)
        plot(results, path, lines)
        print(f"planner frontier PNG: {path}")
    except ImportError:
        print("  (matplotlib missing: no planner PNG)")
    return results


def run_segments(args, device, dtype) -> list:
    """``python -m bench --op segments``: the segment sweep alone (item 2 of the module docstring)."""
    results, lines = segment_sweep(args, device, dtype)
    print("\nsegment sweep (outer segments of k 'full' blocks, frozen weights):")
    for line in lines:
        print(line)
    return results
