"""Measuring machinery shared by the op benchmarks (DESIGN §5).

A benchmark builds, per provider, a ``Case``: a ``forward`` (used for saved bytes) and a ``step``
(forward + backward, what is timed). Time is only ever reported as a ratio of strategies measured
in the same process, interleaved (round-robin, rotating the order), median of many repetitions
after warm-up: perf_counter on CPU, CUDA events on GPUs.
"""
from __future__ import annotations

import dataclasses
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
    note: str = ""


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
    saved = {c.provider: ckpt_ops.saved_bytes(c.forward) for c in cases}
    bar = ProgressBar(f"{op}", reps)
    times = time_interleaved(cases, device, reps, warmup, bar.update)
    bar.close()
    base_t = statistics.median(times[baseline])
    base_b = saved[baseline] or 1
    out = []
    for c in cases:
        ts = times[c.provider]
        med = statistics.median(ts)
        out.append(Result(op, c.provider, config, med * 1e3, _quantile(ts, 0.2) * 1e3, _quantile(ts, 0.8) * 1e3,
                          med / base_t, saved[c.provider], saved[c.provider] / base_b, c.note))
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
    hdr = f"{'op':<14} {'provider':<26} {'median ms':>10} {'p20':>9} {'p80':>9} {'time/eager':>10} {'saved MB':>9} {'bytes/eager':>11}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r.op:<14} {r.provider:<26} {r.median_ms:>10.3f} {r.p20_ms:>9.3f} {r.p80_ms:>9.3f} "
              f"{r.ratio_to_eager:>10.3f} {r.saved_bytes / 1e6:>9.3f} {r.saved_ratio:>11.3f}"
              + (f"   {r.note}" if r.note else ""))


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
