"""The CPU time targets of issue 13, checked on one run's paired (per-round) figures.

For every op (and backend) of a run with eager and torch.utils.checkpoint measured:

* ``full overhead / checkpoint overhead`` = (t_full - t_eager) / (t_ckpt - t_eager), per round,
  target <= 0.90 (MLP sublayer);
* ``full / checkpoint`` time, per round, target <= 1.00 (block stack);
* ``selective / eager`` <= 1.02, ``none / eager`` <= 1.00;
* each level's time ratio to eager within 4 % of its FLOP ratio (the floor: on CPU a step is no
  faster than its FLOPs allow, elementwise savings aside): t/eager <= 1.04 x FLOPs/eager.

Each figure is the median over rounds with its p20-p80, and the verdict says whether the
target is met or missed outside or inside that noise.
"""
from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

from bench.common import Result, _quantile

CKPT = "torch.utils.checkpoint"


def _verdict(med: float, p20: float, p80: float, target: float) -> str:
    if p80 <= target:
        return "met"
    if med <= target:
        return "met, inside the noise"
    if p20 <= target:
        return "missed, inside the noise"
    return "MISSED"


def _line(name: str, values: List[float], target: Optional[float]) -> str:
    med, p20, p80 = _quantile(values, 0.5), _quantile(values, 0.2), _quantile(values, 0.8)
    head = f"  {name:<44} {med:7.3f}  (p20-p80 {p20:.3f}-{p80:.3f}, {len(values)} rounds)"
    return head if target is None else f"{head}  target <= {target:.2f}: {_verdict(med, p20, p80, target)}"


def _groups(results: List[Result]) -> Dict[Tuple[str, str, str], List[Result]]:
    out: Dict[Tuple[str, str, str], List[Result]] = {}
    for r in results:
        if r.round_ms:
            out.setdefault((r.op, json.dumps(r.config, sort_keys=True, default=str), r.mode), []).append(r)
    return out


def lines(results: List[Result]) -> List[str]:
    """The target lines of every op measured with eager (and, for the checkpoint figures,
    torch.utils.checkpoint); [] when nothing qualifies."""
    out = []
    for (op, _cfg, mode), rs in _groups(results).items():
        by = {r.provider: r for r in rs}
        eager, ckpt = by.get("eager"), by.get(CKPT)
        if eager is None:
            continue
        e = eager.round_ms
        sub = "block" not in op  # the MLP / attention sublayers vs the block stack
        out.append(f"{op} [{mode}] targets (issue 13; paired per-round figures):")
        for r in rs:
            if r.group != "ckpt_ops":
                continue
            level, _, backend = r.provider[len("ckpt_ops "):].partition(" ")
            t = r.round_ms
            tag = f"{level} {backend}".strip()
            if ckpt is not None and level == "full":
                c = ckpt.round_ms
                ovh = [(f - b) / (k - b) for f, k, b in zip(t, c, e) if k - b > 0]
                if ovh:
                    out.append(_line(f"{tag}: overhead / checkpoint's overhead", ovh, 0.90 if sub else None))
                out.append(_line(f"{tag}: time / checkpoint's time", [f / k for f, k in zip(t, c)],
                                 None if sub else 1.00))
            ratios = [f / b for f, b in zip(t, e)]
            target = {"selective": 1.02, "none": 1.00}.get(level)
            out.append(_line(f"{tag}: time / eager", ratios, target))
            if r.flops_ratio:
                out.append(_line(f"{tag}: (time / eager) / FLOP floor {r.flops_ratio:.3f}",
                                 [x / r.flops_ratio for x in ratios], 1.04))
        if ckpt is not None:
            out.append(_line("torch.utils.checkpoint: time / eager", [k / b for k, b in zip(ckpt.round_ms, e)], None))
    return out
