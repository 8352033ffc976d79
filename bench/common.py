"""Measuring machinery shared by the op benchmarks (DESIGN §5).

A benchmark builds, per provider, a ``Case``: a ``forward`` (used for saved bytes) and a ``step``
(forward + backward, what is timed). Time is only ever reported as a ratio of strategies measured
in the same process, interleaved (round-robin, rotating the order), median of many repetitions
after warm-up: perf_counter on CPU, CUDA events on GPUs.
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
from typing import Callable, Dict, List, Optional

import torch

import ckpt_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "bench", "results")


@dataclasses.dataclass
class Case:
    provider: str
    forward: Callable[[], torch.Tensor]   # builds the graph; its saved tensors are what we count
    step: Callable[[], None]              # forward + backward: what is timed
    note: str = ""
    inputs: List[torch.Tensor] = dataclasses.field(default_factory=list)  # activations fed in
    params: List[torch.Tensor] = dataclasses.field(default_factory=list)  # excluded from bytes


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


def kept_bytes(forward: Callable[[], torch.Tensor], inputs: List[torch.Tensor]) -> int:
    """Memory a forward keeps alive for backward, measured by the allocator rather than by
    saved-tensor hooks: the net bytes allocated during `forward` that are still alive when it
    returns, minus its output, plus the storages of pre-existing `inputs` the graph saved.

    Saved-tensor hooks (DESIGN §5, ckpt_ops.saved_bytes) miss tensors a strategy keeps by other
    means -- selective activation checkpointing caches matmul outputs in its own storage -- so
    the frontier verdicts use this number; for every other provider the two agree (the table
    shows both).
    """
    from torch.profiler import ProfilerActivity, profile

    input_storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in inputs}
    saved_inputs = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr in input_storages:
            saved_inputs.add(ptr)
        return t

    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    net = sum(e.cpu_memory_usage + getattr(e, "device_memory_usage", 0) for e in prof.events()
              if e.cpu_parent is None)
    out_bytes = out.untyped_storage().nbytes()
    del out
    return int(net - out_bytes + sum(input_storages[p] for p in saved_inputs))


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


def time_interleaved(cases: List[Case], device: torch.device, reps: int, warmup: int,
                     progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, List[float]]:
    """Seconds per step for each case, measured round-robin so drift hits every case alike."""
    for _ in range(warmup):
        for c in cases:
            c.step()
    _sync(device)
    times: Dict[str, List[float]] = {c.provider: [] for c in cases}
    for r in range(reps):
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for c in order:
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                c.step()
                end.record()
                torch.cuda.synchronize(device)
                times[c.provider].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                c.step()
                times[c.provider].append(time.perf_counter() - t0)
        if progress:
            progress(r + 1, reps)
    return times


def _quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure(op: str, config: Dict[str, object], cases: List[Case], device: torch.device, reps: int,
            warmup: int, baseline: str = "eager") -> List[Result]:
    bar = ProgressBar(f"{op}", reps)
    times = time_interleaved(cases, device, reps, warmup, bar.update)  # warm-up compiles first
    bar.close()
    saved = {c.provider: ckpt_ops.saved_bytes(_AsModule(c.forward, c.params)) for c in cases}
    kept = {c.provider: kept_bytes(c.forward, c.inputs) if device.type == "cpu" else saved[c.provider]
            for c in cases}
    base_t = statistics.median(times[baseline])
    base_b, base_k = saved[baseline] or 1, kept[baseline] or 1
    out = []
    for c in cases:
        ts = times[c.provider]
        med = statistics.median(ts)
        out.append(Result(op, c.provider, config, med * 1e3, _quantile(ts, 0.2) * 1e3, _quantile(ts, 0.8) * 1e3,
                          med / base_t, saved[c.provider], saved[c.provider] / base_b, kept[c.provider],
                          kept[c.provider] / base_k, c.note))
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


def print_table(results: List[Result]) -> None:
    hdr = (f"{'op':<14} {'provider':<30} {'median ms':>10} {'p20':>9} {'p80':>9} {'time/eager':>10} "
           f"{'saved MB':>9} {'kept MB':>9} {'kept/eager':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r.op:<14} {r.provider:<30} {r.median_ms:>10.2f} {r.p20_ms:>9.2f} {r.p80_ms:>9.2f} "
              f"{r.ratio_to_eager:>10.3f} {r.saved_bytes / 1e6:>9.2f} {r.kept_bytes / 1e6:>9.2f} "
              f"{r.kept_ratio:>10.3f}" + (f"   {r.note}" if r.note else ""))


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
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "device_type": device.type, "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": triton_version, "ckpt_ops": ckpt_ops.__version__, "commit": commit,
        "extension": ckpt_ops.backend_info()["extension"], "host": platform.node(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_jsonl(results: List[Result], env: Dict[str, object], tag: str) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(RESULTS_DIR, f"{tag}-{stamp}.jsonl")
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps({**dataclasses.asdict(r), "env": env}) + "\n")
    return path
