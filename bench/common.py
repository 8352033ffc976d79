"""Measuring machinery shared by the op benchmarks (DESIGN §5).

A benchmark builds, per provider, a ``Case``: a ``forward`` (used for saved bytes) and a ``step``
(forward + backward, what is timed). Time is only ever reported as a ratio of strategies measured
in the same process, interleaved (round-robin, rotating the order), after warm-up: the median
over rounds of each round's ratio to the baseline (``paired_ratios``), with its p20-p80 spread;
perf_counter on CPU, CUDA events on GPUs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

import ckpt_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


@dataclasses.dataclass
class Case:
    provider: str
    forward: Callable[[], torch.Tensor]          # builds the graph; its saved tensors are what we count
    backward: Callable[[torch.Tensor], None]     # clears grads, backpropagates dy through forward's output
    note: str = ""
    inputs: List[torch.Tensor] = dataclasses.field(default_factory=list)  # activations fed in
    params: List[torch.Tensor] = dataclasses.field(default_factory=list)  # excluded from bytes
    group: str = "peer"                          # "eager" | "peer" | "compiled" | "ckpt_ops"
    reference: Optional[Callable[[], torch.Tensor]] = None  # the forward its gradients must equal
    invalid: str = ""                            # why its gradients are wrong (check_rng_gradients)

    def step(self) -> None:
        """One full training step: forward + backward."""
        self.backward(self.forward())


def make_case(provider: str, forward: Callable[[], torch.Tensor], dy: torch.Tensor, inputs: List[torch.Tensor],
              params: List[torch.Tensor], note: str = "", group: Optional[str] = None) -> Case:
    """A Case whose backward clears the gradients of `inputs` and `params` and backpropagates `dy`."""
    def backward(out: torch.Tensor) -> None:
        for t in list(params) + list(inputs):
            t.grad = None
        out.backward(dy)
    if group is None:
        group = ("eager" if provider == "eager" else "ckpt_ops" if provider.startswith("ckpt_ops")
                 else "compiled" if provider.startswith("compile") else "peer")
    return Case(provider, forward, backward, note, list(inputs), list(params), group,
                getattr(forward, "reference", None))


def build_cases(forwards, x: torch.Tensor, dy: torch.Tensor, params: List[torch.Tensor]) -> List[Case]:
    """One Case per (provider, forward(x)) pair, all on the same input, upstream gradient and
    parameters (a forward's ``reference``, if it has one, on the same input too)."""
    cases = [make_case(name, (lambda f=f: f(x)), dy, [x], params) for name, f in forwards]
    for c, (_, f) in zip(cases, forwards):
        if getattr(f, "reference", None) is not None:
            c.reference = lambda r=f.reference: r(x)
    return cases


def _seeded_step(case: Case, forward: Callable[[], torch.Tensor], seed: int):
    """(output, gradients of the case's inputs and parameters) of one step of `forward` after
    torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    out = forward()
    case.backward(out)
    grads = [t.grad.detach().clone() for t in case.inputs + case.params if t.grad is not None]
    for t in case.inputs + case.params:
        t.grad = None
    return out.detach(), grads


def check_rng_gradients(cases: List[Case], baseline: str = "eager", seed: int = 1234, tol: float = 0.05) -> None:
    """Mark the cases whose gradients are wrong: a case with a ``reference`` (a compile-budget peer:
    the same function compiled at budget 1.0) must give, after the same torch.manual_seed, the
    reference's output and gradients. Run only when the baseline draws random numbers (two seeds
    give two outputs): torch 2.14's min-cut partitioner, below budget 1.0, may move a dropout into
    the backward graph, where it draws a fresh mask (pytorch#190758) -- the gradient is then that
    of another network, and its bytes (no mask, no seed kept) are not a point on the frontier.
    Sets ``case.invalid`` (with the relative error) and prints a line per case checked."""
    todo = [c for c in cases if c.reference is not None]
    base = next((c for c in cases if c.provider == baseline), None)
    if not todo or base is None:
        return
    with torch.no_grad():
        outs = []
        for s in (seed, seed + 1):
            torch.manual_seed(s)
            outs.append(base.forward().detach())
    if torch.equal(outs[0], outs[1]):
        return  # nothing random: a replayed op gives what it gave in the forward
    for c in todo:
        out, grads = _seeded_step(c, c.forward, seed)
        ref_out, ref_grads = _seeded_step(c, c.reference, seed)
        scale = ref_out.abs().max().clamp_min(1e-30)
        if out.shape != ref_out.shape or float((out - ref_out).abs().max() / scale) > tol:
            print(f"  {c.provider}: gradient check inconclusive (its output differs from budget 1.0's under the "
                  f"same seed)")
            continue
        err = float("inf") if len(grads) != len(ref_grads) else max(
            (float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, ref_grads)),
            default=0.0)
        if err > tol:
            c.invalid = (f"wrong gradients: max rel err {err:.2f} vs torch.compile at budget 1.0, same seed and output "
                         f"(dropout replayed with a fresh mask, pytorch#190758)")
        print(f"  {c.provider}: gradients {'WRONG' if c.invalid else 'ok'} (max rel err {err:.1e} vs budget 1.0, "
              f"same seed)")


def autocast_case(case: Case, device: torch.device, dtype: torch.dtype) -> Case:
    """The case with its forward (and its reference's) under torch.autocast(device, dtype) (backward
    outside, as in training)."""
    def under_autocast(f):
        def forward():
            with torch.autocast(device.type, dtype=dtype):
                return f()
        return forward
    ref = under_autocast(case.reference) if case.reference is not None else None
    return dataclasses.replace(case, forward=under_autocast(case.forward), reference=ref)


def run_cases(op: str, config: Dict[str, object], cases: List[Case], args, device: torch.device) -> List["Result"]:
    """measure() with the command line's repetitions, modes and roofline peaks."""
    if getattr(args, "autocast", None):
        config = {**config, "autocast": args.autocast}
        cases = [autocast_case(c, device, getattr(torch, args.autocast)) for c in cases]
    print(f"- {op}: {', '.join(f'{k}={v}' for k, v in config.items())}; {len(cases)} providers")
    return measure(op, config, cases, device, reps=args.reps, warmup=args.warmup, modes=tuple(args.modes),
                   peaks=getattr(args, "peaks", None))


MODES = ("forward", "backward", "step")


@dataclasses.dataclass
class Result:
    op: str
    provider: str
    config: Dict[str, object]
    median_ms: float
    p20_ms: float
    p80_ms: float
    ratio_to_eager: float
    saved_bytes: int
    saved_ratio: float
    kept_bytes: int = 0
    kept_ratio: float = 0.0
    note: str = ""
    mode: str = "step"
    group: str = "peer"
    flops: Optional[int] = None    # FLOPs of this mode (FlopCounterMode, ckpt_ops formulas registered;
    flops_ratio: Optional[float] = None  # None under torch.compile); ratio to eager's, same mode
    peak_bytes: int = 0            # allocator peak of one step above the memory before it
    io_bytes: int = 0              # compulsory traffic of this mode (inputs, params, outputs, grads)
    tflops: Optional[float] = None  # achieved (roofline runs only: CUDA, or --triton-smoke)
    gbs: Optional[float] = None
    floor_ms: Optional[float] = None  # max(FLOPs / peak FLOP/s, io_bytes / peak bandwidth)
    ratio_p20: Optional[float] = None  # spread of the per-round ratios behind ratio_to_eager
    ratio_p80: Optional[float] = None
    round_ms: Optional[List[float]] = None  # this provider's time in each interleaved round (paired figures)
    invalid: str = ""              # why this provider's gradients are wrong (check_rng_gradients)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++ log lines (kineto prints profiler_start/stop and a GPU-count error on CPU-only
    machines) for the duration of a profiler run."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def kept_bytes(forward: Callable[[], torch.Tensor], inputs: List[torch.Tensor], device: torch.device) -> int:
    """Memory a forward keeps alive for backward, measured by the allocator rather than by
    saved-tensor hooks: the net bytes allocated during `forward` that are still alive when it
    returns, minus its output, plus the storages of pre-existing `inputs` the graph saved.
    CPU: the profiler's memory events; CUDA: ``torch.cuda.memory_allocated`` before and after.

    Saved-tensor hooks (DESIGN §5, ckpt_ops.saved_bytes) miss tensors a strategy keeps by other
    means -- selective activation checkpointing caches matmul outputs in its own storage -- so
    the frontier verdicts use this number; for every other provider the two agree (the table
    shows both).
    """
    input_storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}
    saved_inputs = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in input_storages:
            saved_inputs.add(ptr)
        return t

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
        torch.cuda.synchronize(device)
        net = torch.cuda.memory_allocated(device) - before
    else:
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = forward()
        net = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None)
    out_bytes = out.untyped_storage().nbytes()
    del out
    return int(net - out_bytes + sum(input_storages[p] for p in saved_inputs))


def peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Allocator peak of one step above the memory allocated before it (CUDA:
    max_memory_allocated; CPU: running sum of the profiler's memory events)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Every allocation and free, in time order (the raw "[memory]" records of the profiler; the
    # FunctionEvents would attribute them to enclosing ops and lose their order).
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return int(peak)


class _AsModule(torch.nn.Module):
    """Holds a provider's parameters so ckpt_ops.saved_bytes excludes their storages (and views of
    them, such as the transposed weight an eager addmm saves)."""

    def __init__(self, forward: Callable[[], torch.Tensor], params: List[torch.Tensor]):
        super().__init__()
        self._fwd = forward
        self.ps = torch.nn.ParameterList([p for p in params if isinstance(p, torch.nn.Parameter)])

    def forward(self) -> torch.Tensor:
        return self._fwd()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


warnings.filterwarnings("ignore", message="A saved_tensors_hooks context")  # SAC under our byte hooks


def time_interleaved(cases: List[Case], device: torch.device, reps: int, warmup: int, mode: str = "step",
                     progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, List[float]]:
    """Seconds per `mode` ("forward", "backward" or "step") for each case, measured round-robin,
    rotating the order, so drift hits every case alike. "backward" runs the forward untimed."""
    for _ in range(warmup):
        for c in cases:
            c.step()
    _sync(device)
    times: Dict[str, List[float]] = {c.provider: [] for c in cases}
    for r in range(reps):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for c in order:
            out = c.forward() if mode == "backward" else None
            _sync(device)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            if mode == "forward":
                out = c.forward()
            elif mode == "backward":
                c.backward(out)
            else:
                c.step()
            if device.type == "cuda":
                end.record()
                torch.cuda.synchronize(device)
                times[c.provider].append(start.elapsed_time(end) / 1e3)
            else:
                times[c.provider].append(time.perf_counter() - t0)
            del out
        if progress:
            progress(r + 1, reps)
    return times


def paired_ratios(ts: List[float], base_ts: List[float]) -> List[float]:
    """Per-round ratios t[r] / base[r]: each round times every provider once, close together, so
    a slow spell of a shared machine (minutes-long here: the whole VM ran 20 % slower for a
    while, with no steal time showing) scales both terms of a round's ratio alike and cancels,
    where a ratio of the two medians would keep it."""
    return [t / b for t, b in zip(ts, base_ts)]


def _quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclasses.dataclass
class Peaks:
    """Peak throughput of the device for the roofline floor."""
    tflops: float
    gbs: float
    source: str


# Dense peaks (no sparsity) by device-name substring: bf16/fp16 tensor-core, fp32 (no TF32), HBM GB/s.
_GPU_PEAKS = {"H200": (989.0, 67.0, 4800.0), "H100": (989.0, 67.0, 3350.0), "A100": (312.0, 19.5, 2039.0),
              "L40S": (362.0, 91.6, 864.0), "L4": (121.0, 30.3, 300.0), "A10": (125.0, 31.2, 600.0)}


def device_peaks(device: torch.device, dtype: torch.dtype, tflops: Optional[float] = None,
                 gbs: Optional[float] = None) -> Optional[Peaks]:
    """Peaks from the command line, else from the table above for a known GPU; None if unknown."""
    if tflops is not None and gbs is not None:
        return Peaks(tflops, gbs, "command line")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, single, bw) in _GPU_PEAKS.items():
            if key in name:
                return Peaks(tflops or (single if dtype == torch.float32 else half), gbs or bw, f"table: {key}")
    return None


def io_bytes(case: Case) -> Dict[str, int]:
    """Compulsory memory traffic per mode (a lower bound, whatever is recomputed): forward reads
    the inputs and parameters and writes the output; backward reads dy, the inputs and the
    parameters and writes their gradients. (The forward runs with grad, as timed: under no_grad a
    compiled provider would recompile.)"""
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    out = case.forward()
    o = out.numel() * out.element_size()
    del out
    fwd = size(case.inputs) + size(case.params) + o
    bwd = o + 2 * size(case.inputs) + 2 * size(case.params)
    return {"forward": fwd, "backward": bwd, "step": fwd + bwd}


def warm_up(cases: List[Case], device: torch.device) -> List[Case]:
    """One step of every case (compiles, loads kernels); a case that fails is dropped with its
    reason printed, so one unavailable provider never sinks the run."""
    ok = []
    for c in cases:
        try:
            c.step()
            ok.append(c)
        except Exception as e:  # noqa: BLE001  (any failure of a provider is a skip, reported)
            print(f"  skipped {c.provider}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    _sync(device)
    return ok


def measure(op: str, config: Dict[str, object], cases: List[Case], device: torch.device, reps: int,
            warmup: int, modes=("step",), peaks: Optional[Peaks] = None, baseline: str = "eager") -> List[Result]:
    from bench.flops import count_flops

    cases = warm_up(cases, device)
    if not any(c.provider == baseline for c in cases):
        raise RuntimeError(f"{op}: the baseline {baseline!r} did not run")
    check_rng_gradients(cases, baseline)
    times = {}
    for mode in modes:
        bar = ProgressBar(f"{op} {mode}", reps)
        times[mode] = time_interleaved(cases, device, reps, max(0, warmup - 1), mode, bar.update)
        bar.close()
    saved = {c.provider: ckpt_ops.saved_bytes(_AsModule(c.forward, c.params)) for c in cases}
    kept = {c.provider: kept_bytes(c.forward, c.inputs, device) for c in cases}
    traffic = {c.provider: io_bytes(c) for c in cases}
    peak, flops = {}, {}
    for c in cases:
        # Under torch.compile the counter sees the eager decomposition, not the partitioned graph
        # (its recompute would be missing): no FLOPs for compiled providers.
        counted = []
        step = (lambda c=c: counted.append(count_flops(c.step))) if c.group != "compiled" else c.step
        peak[c.provider] = peak_bytes(step, device)  # the FLOP counter allocates nothing
        f_fwd = count_flops(c.forward) if counted and set(modes) != {"step"} else 0
        flops[c.provider] = ({"forward": f_fwd, "backward": counted[0] - f_fwd, "step": counted[0]}
                             if counted else None)
    base_b, base_k = saved[baseline] or 1, kept[baseline] or 1
    out = []
    for mode in modes:
        base_ts = times[mode][baseline]
        base_f = (flops[baseline][mode] if flops[baseline] else 0) or 1
        for c in cases:
            ts = times[mode][c.provider]
            med = statistics.median(ts)
            ratios = paired_ratios(ts, base_ts)
            fl = flops[c.provider][mode] if flops[c.provider] else None
            r = Result(op, c.provider, config, med * 1e3, _quantile(ts, 0.2) * 1e3, _quantile(ts, 0.8) * 1e3,
                       statistics.median(ratios), saved[c.provider], saved[c.provider] / base_b, kept[c.provider],
                       kept[c.provider] / base_k, c.note, mode, c.group, fl, fl / base_f if fl is not None else None,
                       peak[c.provider],
                       traffic[c.provider][mode], ratio_p20=_quantile(ratios, 0.2), ratio_p80=_quantile(ratios, 0.8),
                       round_ms=[t * 1e3 for t in ts], invalid=c.invalid)
            if peaks is not None:
                r.gbs = r.io_bytes / med / 1e9
                r.tflops = fl / med / 1e12 if fl is not None else None
                r.floor_ms = max(fl or 0, 0) / (peaks.tflops * 1e12) * 1e3
                r.floor_ms = max(r.floor_ms, r.io_bytes / (peaks.gbs * 1e9) * 1e3)
            out.append(r)
    return out


class ProgressBar:
    """A one-line progress bar on stderr (only when it is a terminal or the run is long)."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.t0 = label, total, time.time()
        self.enabled = sys.stderr.isatty()

    def update(self, done: int, total: int) -> None:
        if not self.enabled and time.time() - self.t0 < 5:
            return
        width = 30
        fill = int(width * done / total)
        eta = (time.time() - self.t0) / done * (total - done)
        end = "\r" if self.enabled else "\n"
        if self.enabled or done in (total // 2, total):
            sys.stderr.write(f"  {self.label:<28} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} eta {eta:4.0f}s{end}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def ratio_noise(r: Result) -> Optional[float]:
    """Half the p20-p80 spread of a point's per-round time ratios, relative to its ratio (None when
    the per-round ratios are not recorded)."""
    if r.ratio_p20 is None or r.ratio_p80 is None or r.ratio_to_eager <= 0:
        return None
    return (r.ratio_p80 - r.ratio_p20) / (2.0 * r.ratio_to_eager)


def _spread(r: Result) -> str:
    noise = ratio_noise(r)
    return "n/a" if noise is None else f"{100 * noise:.1f}%"


def print_table(results: List[Result]) -> None:
    roof = any(r.tflops is not None for r in results)
    hdr = (f"{'op':<16} {'mode':<8} {'provider':<28} {'median ms':>10} {'p20':>9} {'p80':>9} {'t/eager':>8} {'+-':>6} "
           f"{'saved MB':>9} {'kept MB':>9} {'kept/eager':>10} {'peak MB':>9} {'GFLOP':>8} {'fl/eager':>8}")
    if roof:
        hdr += f" {'TFLOP/s':>8} {'GB/s':>8} {'floor ms':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        line = (f"{r.op:<16} {r.mode:<8} {r.provider:<28} {r.median_ms:>10.2f} {r.p20_ms:>9.2f} {r.p80_ms:>9.2f} "
                f"{r.ratio_to_eager:>8.3f} {_spread(r):>6} {r.saved_bytes / 1e6:>9.2f} {r.kept_bytes / 1e6:>9.2f} "
                f"{r.kept_ratio:>10.3f} {r.peak_bytes / 1e6:>9.2f} "
                + (f"{r.flops / 1e9:>8.2f} {r.flops_ratio:>8.3f}" if r.flops is not None else f"{'n/a':>8} {'n/a':>8}"))
        if roof:
            line += (f" {r.tflops:>8.3f}" if r.tflops is not None else f" {'n/a':>8}") + f" {r.gbs:>8.1f} {r.floor_ms:>9.4f}"
        print(line + (f"   {r.note}" if r.note else "") + ("   [WRONG GRADIENTS]" if r.invalid else ""))


def environment(device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from ckpt_ops import _backend

    isa = _backend.cpu_isa()
    return {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"{isa['cpu']}, ckpt_ops CPU kernels: {isa['isa']} (requested {isa['requested']}; "
                        f"CPU has {isa['supported']}{', avx512_bf16' if isa['avx512_bf16'] else ''}), "
                        f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}"),
        "cpu_isa": isa,
        "device_type": device.type, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "ckpt_ops": ckpt_ops.__version__, "commit": commit,
        "extension": ckpt_ops.backend_info()["extension"], "host": platform.node(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def result_path(tag: str, ext: str, out_dir: Optional[str] = None) -> str:
    """bench/results/<tag>-<timestamp>.<ext> (or under `out_dir`)."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(out_dir, f"{tag}-{stamp}.{ext}")


def write_jsonl(results: List[Result], env: Dict[str, object], path: str) -> str:
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps({**dataclasses.asdict(r), "env": env}) + "\n")
    return path
