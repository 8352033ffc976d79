"""``ckpt_ops.memory_report``: what each layer of a stack keeps for backward and what it recomputes,
at its current level, against eager (the unconverted layer) and torch.utils.checkpoint around it.

Per layer (probed alone on its input from one example forward, as ``ckpt_ops.plan`` does; see
``ckpt_ops._probe``): saved bytes, recompute FLOPs (the FLOPs of its forward+backward step
minus eager's, from ``torch.utils.flop_counter``: GEMMs and the attention ops that have a FLOP
formula -- ``bench.flops.register_formulas()`` adds those of ckpt_ops' attention kernels and of
CPU SDPA, which torch lacks) and the step time measured interleaved with eager's and
torch.utils.checkpoint's (median of `reps`). The totals add the model's own saved bytes measured
as it runs now (outer segments included, and whatever lies outside the stack).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from ckpt_ops import _probe
from ckpt_ops.measure import saved_bytes

__all__ = ["memory_report", "MemoryReport", "LayerReport"]


@dataclasses.dataclass
class LayerReport:
    name: str
    level: str                       # "-" for a layer without levels
    saved_bytes: int
    eager_bytes: int
    checkpoint_bytes: int            # torch.utils.checkpoint(use_reentrant=False) around the eager layer
    recompute_gflops: float          # step FLOPs at the current level minus eager's
    checkpoint_recompute_gflops: float
    step_ms: float
    eager_ms: float
    checkpoint_ms: float


@dataclasses.dataclass
class MemoryReport:
    layers: List[LayerReport]
    model_saved_bytes: int           # the whole model as it runs now (saved-tensor hooks)
    segments: List[tuple]            # outer segments installed (ckpt_ops.sequential spans)

    def total(self, field: str) -> float:
        return sum(getattr(r, field) for r in self.layers)

    def __str__(self) -> str:
        head = (f"{'layer':<20} {'level':<10} {'saved MB':>9} {'eager MB':>9} {'ckpt MB':>8} {'recomp GF':>10} "
                f"{'ckpt GF':>8} {'step ms':>8} {'eager ms':>9} {'ckpt ms':>8}")
        rows = [head, "-" * len(head)]
        for r in self.layers:
            rows.append(f"{r.name:<20} {r.level:<10} {r.saved_bytes / 1e6:>9.2f} {r.eager_bytes / 1e6:>9.2f} "
                        f"{r.checkpoint_bytes / 1e6:>8.2f} {r.recompute_gflops:>10.3f} "
                        f"{r.checkpoint_recompute_gflops:>8.3f} {r.step_ms:>8.2f} {r.eager_ms:>9.2f} "
                        f"{r.checkpoint_ms:>8.2f}")
        t = {f: self.total(f) for f in ("saved_bytes", "eager_bytes", "checkpoint_bytes", "step_ms", "eager_ms",
                                        "checkpoint_ms")}
        rows.append(f"layers total: saved {t['saved_bytes'] / 1e6:.2f} MB = "
                    f"{t['saved_bytes'] / max(t['eager_bytes'], 1):.3f} x eager, "
                    f"{t['saved_bytes'] / max(t['checkpoint_bytes'], 1):.3f} x torch.utils.checkpoint; step "
                    f"{t['step_ms']:.2f} ms = {t['step_ms'] / max(t['eager_ms'], 1e-12):.3f} x eager, "
                    f"{t['step_ms'] / max(t['checkpoint_ms'], 1e-12):.3f} x torch.utils.checkpoint")
        rows.append(f"model as it runs now: {self.model_saved_bytes / 1e6:.2f} MB saved"
                    + (f" (outer segments {self.segments}: per-layer rows are without them)" if self.segments else ""))
        return "\n".join(rows)


def memory_report(model: torch.nn.Module, *args, reps: int = 3, **kwargs) -> MemoryReport:
    """Per-layer accounting of `model` (a converted model, a stack of ckpt_ops blocks or an
    ``nn.Sequential``) on the example inputs; see the module docstring. ``print()`` it for a
    table."""
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int; got {reps!r}")
    layers, prefix = _probe.find_layers(model)
    calls = _probe.record_calls(model, layers, args, kwargs)
    eager = _probe.EAGER
    rows = []
    for i, (layer, call) in enumerate(zip(layers, calls)):
        level: Optional[str] = _probe.get_level(layer)
        cur = level if level is not None else eager
        provs, flags = [cur, eager, eager], [False, False, True]
        ms = _probe.time_levels(layer, call, provs, reps, "measure", flags)
        fl = _probe.time_levels(layer, call, provs, 1, "flops", flags)
        ck = (eager, True)
        rows.append(LayerReport(
            f"{prefix}.{i}" if prefix else str(i), level or "-",
            _probe.layer_saved_bytes(layer, call, cur), _probe.layer_saved_bytes(layer, call, eager),
            _probe.layer_saved_bytes(layer, call, eager, checkpoint=True),
            fl[cur][0] - fl[eager][0], fl[ck][0] - fl[eager][0], ms[cur][0], ms[eager][0], ms[ck][0]))
    spans = sorted({(s.start, s.end) for m in layers for s in m.__dict__.get("_ckpt_ops_spans", [])})
    with torch.enable_grad():
        total = saved_bytes(lambda m: _probe.run_model(m, layers, args, kwargs), model)
    return MemoryReport(rows, total, spans)
