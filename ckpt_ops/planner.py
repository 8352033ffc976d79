"""``ckpt_ops.plan``: the fastest step whose activations fit a memory budget.

A plan gives each layer of a stack a recompute level (``"full"`` / ``"keep_attn"`` / ``"keep_mlp"`` /
``"selective"`` / ``"none"``; layers without levels run as they are) and, when the budget is below
what per-layer levels can reach, groups runs of consecutive layers into outer segments
(``ckpt_ops.sequential``: one kept input per segment, the segment replayed in backward with its
layers at their own levels).

Memory model (what the budget bounds): the bytes saved for backward that are alive at once --

    M = sum(saved bytes of the layers outside segments) + sum(input bytes of each segment)
        + max over segments (saved bytes of the segment's layers at their levels)

(the last term: while one segment's backward runs, its replay keeps its layers' saved tensors).
Without segments M is the forward's saved bytes of the stack (``ckpt_ops.saved_bytes``).
Time model: the sum of the layers' step times at their levels, plus for each segment the forwards
of its layers (the replay). Both come from measured per-layer costs (``ckpt_ops._probe``).

The choice is exact for these costs: a dynamic programme over the layers whose states are
(bytes outside segments, largest segment replay) in exact bytes (``quantum`` 1; the code takes
any unit, every cost rounded up and the budget down), pruned to the Pareto front of
(bytes, replay, time) after each layer -- small, since equal layers give equal sums. Every plan
kept has M <= budget, and a larger budget only adds feasible plans, so it never yields a slower
one. Plans with segments are searched only below the smallest per-layer plan's M (or everywhere when
the stack has layers without levels); the best of both searches is returned, which keeps the
answer monotone in the budget. With ``time="flops"`` each level's step also counts 1e-6 ms per
step of recompute order (the FLOP counter sees no elementwise recompute, so "selective" would
tie "none"); remaining ties go to the larger M: the same costs give the same plan.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ckpt_ops import _probe
from ckpt_ops import block as _block
from ckpt_ops import sequential as _seq

__all__ = ["plan", "Plan", "LayerCost", "measure_costs", "parse_budget", "plan_with_inputs"]

_TIE_MS = 1e-6  # time="flops": per level of recompute order, so "selective" is not a tie of "none"
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


@dataclasses.dataclass
class LayerCost:
    """Measured costs of one layer: per level, saved bytes, step ms and forward ms (the replay of an
    outer segment); `input_bytes` is what an outer segment starting here keeps; `eager_bytes` what
    the unconverted layer saves."""
    name: str
    levels: Tuple[str, ...]
    saved: Dict[str, int]
    step_ms: Dict[str, float]
    fwd_ms: Dict[str, float]
    input_bytes: int
    eager_bytes: int


def parse_budget(budget, eager_bytes: int) -> int:
    """Bytes from a fraction of the unconverted stack's saved bytes (a float), a byte count (an
    int) or a string with a unit ("6GiB", "500MB", "0.5 GB"; decimal and binary prefixes)."""
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a fraction, a byte count or a size string; got {budget!r}")
    if isinstance(budget, float):
        if not math.isfinite(budget) or budget <= 0:
            raise ValueError(f"budget must be a positive fraction of the unconverted model's saved bytes; got {budget}")
        return int(math.floor(budget * eager_bytes))
    if isinstance(budget, int):
        if budget <= 0:
            raise ValueError(f"budget must be a positive number of bytes; got {budget}")
        return budget
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"budget {budget!r}: expected a number and a unit in {sorted(set(_UNITS) - {''})}, "
                             "e.g. '6GiB' or '500MB'")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if value <= 0:
            raise ValueError(f"budget must be positive; got {budget!r}")
        return int(math.floor(value))
    raise ValueError(f"budget must be a fraction (float), bytes (int) or a size string; got {type(budget).__name__}")


def measure_costs(model: torch.nn.Module, *args, time: str = "measure", reps: int = 3,
                  levels: Sequence[str] = _block.LEVELS, **kwargs) -> List[LayerCost]:
    """Per-layer costs of `model` on the example inputs (see ckpt_ops._probe)."""
    if time not in ("measure", "flops"):
        raise ValueError(f"time must be 'measure' or 'flops'; got {time!r}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int; got {reps!r}")
    bad = [lv for lv in levels if lv not in _block.LEVELS]
    if bad or not levels:
        raise ValueError(f"levels must be a non-empty subset of {_block.LEVELS}; got {list(levels)}")
    layers, prefix = _probe.find_layers(model)
    calls = _probe.record_calls(model, layers, args, kwargs)
    timings: Dict[tuple, dict] = {}
    out = []
    for i, (layer, call) in enumerate(zip(layers, calls)):
        lv = tuple(levels) if _probe.levelled(layer) else (None,)
        sig = _probe.signature(layer, call) + (lv,)
        if sig not in timings:
            timings[sig] = _probe.time_levels(layer, call, lv, reps, time)
        t = timings[sig]
        if time == "flops":  # the counter sees no elementwise recompute: break ties toward less of it
            t = {k: (v[0] + _TIE_MS * _block.LEVELS[::-1].index(k), v[1]) if k is not None else v
                 for k, v in t.items()}
        name = f"{prefix}.{i}" if prefix else str(i)
        saved = {level: _probe.layer_saved_bytes(layer, call, level) for level in lv}
        eager = _probe.layer_saved_bytes(layer, call, _probe.EAGER) if lv != (None,) else saved[None]
        out.append(LayerCost(name, tuple("-" if level is None else level for level in lv),
                             {("-" if k is None else k): v for k, v in saved.items()},
                             {("-" if k is None else k): v[0] for k, v in t.items()},
                             {("-" if k is None else k): v[1] for k, v in t.items()},
                             call.x.untyped_storage().nbytes(), eager))
    return out


@dataclasses.dataclass
class Plan:
    """Levels per layer, outer segments ([start, end) layer ranges) and the predictions. Apply with
    ``plan.apply(model)``; ``print(plan)`` shows the table."""
    levels: List[str]
    segments: List[Tuple[int, int]]
    budget: int
    predicted_bytes: int
    predicted_ms: float
    costs: List[LayerCost]
    eager_bytes: int
    quantum: int

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set each layer's level and install the outer segments (replacing earlier ones)."""
        layers, _ = _probe.find_layers(model)
        if len(layers) != len(self.levels):
            raise ValueError(f"the plan is for {len(self.levels)} layers; the model has {len(layers)}")
        for layer, level in zip(layers, self.levels):
            if level != "-":
                _probe.set_level(layer, level)
        if isinstance(model, _seq.Sequential):
            model.segments = None  # the plan's segments take over
        _seq.remove_spans(layers)
        if self.segments:
            _seq.checkpoint_spans(layers, self.segments)
        return model

    def _segment_of(self, i: int) -> str:
        for k, (s, e) in enumerate(self.segments):
            if s <= i < e:
                return f"seg {k}"
        return ""

    def __str__(self) -> str:
        rows = [f"{'layer':<22} {'level':<10} {'segment':<8} {'saved MB':>9} {'step ms':>9} {'replay ms':>9}"]
        rows.append("-" * len(rows[0]))
        starts = {s for s, _ in self.segments}
        inside = {i for s, e in self.segments for i in range(s, e)}
        for i, (c, lv) in enumerate(zip(self.costs, self.levels)):
            replay = c.fwd_ms[lv] if i in inside else 0.0
            extra = f"  (+ {c.input_bytes / 1e6:.2f} MB segment input)" if i in starts else ""
            rows.append(f"{c.name:<22} {lv:<10} {self._segment_of(i):<8} {c.saved[lv] / 1e6:>9.2f} "
                        f"{c.step_ms[lv]:>9.2f} {replay:>9.2f}{extra}")
        rows.append(f"predicted: {self.predicted_bytes / 1e6:.2f} MB alive at once "
                    f"({self.predicted_bytes / max(self.eager_bytes, 1):.3f} of the unconverted "
                    f"{self.eager_bytes / 1e6:.2f} MB; budget {self.budget / 1e6:.2f} MB), "
                    f"{self.predicted_ms:.2f} ms per step of these layers")
        return "\n".join(rows)


def _units(b: int, q: int) -> int:
    return -(-int(b) // q)


def _cost(costs: List[LayerCost], levels: List[str], segments: List[Tuple[int, int]]) -> Tuple[int, float]:
    """(bytes alive at once, step ms) of levels + segments, in exact bytes (module docstring)."""
    inside = {i for s, e in segments for i in range(s, e)}
    out_b = sum(c.saved[lv] for i, (c, lv) in enumerate(zip(costs, levels)) if i not in inside)
    seg_in = sum(costs[s].input_bytes for s, _ in segments)
    replay = max((sum(costs[i].saved[levels[i]] for i in range(s, e)) for s, e in segments), default=0)
    ms = sum(c.step_ms[lv] for c, lv in zip(costs, levels)) + sum(costs[i].fwd_ms[levels[i]] for i in inside)
    return out_b + seg_in + replay, ms


def _pareto(front: Dict[Tuple[int, int], Tuple[float, tuple]]):
    """The states of `front` no other state beats on bytes, replay and time at once, by (S, R)."""
    kept: List[Tuple[int, float]] = []  # (R, ms) of the states kept so far (all with S <= this S)
    out = []
    for (s, r), v in sorted(front.items()):
        if any(r2 <= r and t2 <= v[0] for r2, t2 in kept):
            continue
        kept.append((r, v[0]))
        out.append(((s, r), v))
    return out


def _solve(costs: List[LayerCost], budget_u: int, q: int, segments_allowed: bool):
    """Min-time (levels, segments) with S + R <= budget_u (units), or None. States after each
    prefix: {(S, R): (ms, back)}; `back` rebuilds the choices."""
    n = len(costs)
    inf = float("inf")
    fronts: List[Dict[Tuple[int, int], Tuple[float, tuple]]] = [dict() for _ in range(n + 1)]
    fronts[0][(0, 0)] = (0.0, None)
    for i in range(n):
        front = fronts[i]
        if not front:
            continue
        c = costs[i]
        moves = []  # (end, dS, R of the segment or -1, ms, choice)
        for lv in reversed(c.levels):  # layer i alone; on a tie, the level recomputing least
            moves.append((i + 1, _units(c.saved[lv], q), -1, c.step_ms[lv], ("layer", lv)))
        if segments_allowed:
            common = [lv for lv in costs[i].levels]
            for j in range(i + 1, n + 1):
                if j - i < 2 and _probe_levelled(c):
                    continue
                common = [lv for lv in common if lv in costs[j - 1].levels]
                for lv in reversed(common):
                    rb = _units(sum(costs[k].saved[lv] for k in range(i, j)), q)
                    ms = sum(costs[k].step_ms[lv] + costs[k].fwd_ms[lv] for k in range(i, j))
                    moves.append((j, _units(c.input_bytes, q), rb, ms, ("segment", j, lv)))
        for (s, r), (t, _) in _pareto(front):
            for end, ds, rb, ms, choice in moves:
                s2, r2 = s + ds, max(r, rb)
                if s2 + r2 > budget_u:
                    continue
                key, t2 = (s2, r2), t + ms
                nxt = fronts[end]
                if t2 < nxt.get(key, (inf,))[0] - 1e-12:
                    nxt[key] = (t2, (i, (s, r), choice))
    final = fronts[n]
    if not final:
        return None
    key = min(final, key=lambda k: (round(final[k][0], 9), -(k[0] + k[1]), k))  # tie: recompute least
    levels, segments, end = [None] * n, [], n
    while end > 0:
        i, key, choice = fronts[end][key][1]
        if choice[0] == "layer":
            levels[i] = choice[1]
        else:
            segments.append((i, end))
            levels[i:end] = [choice[2]] * (end - i)
        end = i
    return levels, sorted(segments)


def _probe_levelled(c: LayerCost) -> bool:
    return c.levels != ("-",)


def _segment_units(costs: List[LayerCost], i: int, j: int, q: int) -> Optional[int]:
    """Fewest units a segment over layers [i, j) replays (one level for all its layers)."""
    common = [lv for lv in costs[i].levels if all(lv in costs[k].levels for k in range(i, j))]
    return min((_units(sum(costs[k].saved[lv] for k in range(i, j)), q) for lv in common), default=None)


def _min_units(costs: List[LayerCost], q: int) -> int:
    """The smallest S + R any plan reaches (units): a DP over (S, R) Pareto fronts alone."""
    n = len(costs)
    fronts = [set() for _ in range(n + 1)]
    fronts[0].add((0, 0))
    for i, c in enumerate(costs):
        pts, keep, best_r = sorted(fronts[i]), [], None
        for s, r in pts:  # the Pareto front of (S, R)
            if best_r is None or r < best_r:
                keep.append((s, r))
                best_r = r
        for s, r in keep:
            fronts[i + 1].add((s + min(_units(c.saved[lv], q) for lv in c.levels), r))
            for j in range(i + (2 if _probe_levelled(c) else 1), n + 1):
                rb = _segment_units(costs, i, j, q)
                if rb is not None:
                    fronts[j].add((s + _units(c.input_bytes, q), max(r, rb)))
    return min(s + r for s, r in fronts[n])


def plan(model: torch.nn.Module, *example_args, budget: Union[float, int, str], time: str = "measure",
         reps: int = 3, levels: Sequence[str] = _block.LEVELS, costs: Optional[List[LayerCost]] = None,
         **example_kwargs) -> Plan:
    """The fastest plan for `model` (a converted model, a stack of ckpt_ops blocks or an
    ``nn.Sequential``) whose activations fit `budget` (module docstring).

    budget: a float fraction of the unconverted stack's saved bytes, an int byte count, or a
    string with a unit ("6GiB", "500MB"). time: "measure" (timing probe, `reps` interleaved
    repetitions per level) or "flops" (FLOP counts, deterministic). `costs`: reuse the costs of
    an earlier ``measure_costs`` (no probe runs). Raises ValueError when the budget is below the
    minimum achievable (the message states it)."""
    if costs is None:
        costs = measure_costs(model, *example_args, time=time, reps=reps, levels=levels, **example_kwargs)
    if not costs:
        raise ValueError("the model has no layers to plan")
    eager = sum(c.eager_bytes for c in costs)
    b = parse_budget(budget, eager)
    q = 1
    budget_u = b // q
    min_u = _min_units(costs, q)
    if budget_u < min_u:
        raise ValueError(f"budget {budget!r} ({b / 1e6:.3f} MB) is below the minimum achievable {min_u * q} bytes "
                         f"({min_u * q / 1e6:.3f} MB, {min_u * q / max(eager, 1):.4f} of the unconverted "
                         f"{eager / 1e6:.3f} MB)")
    per_layer_min = sum(min(_units(c.saved[lv], q) for lv in c.levels) for c in costs)
    if not all(_probe_levelled(c) for c in costs):
        candidates = [_solve(costs, budget_u, q, True)]
    else:  # per-layer plans up to the budget; plans with segments only where M < the per-layer minimum
        # (the search with segments everywhere is slow for large budgets). Both candidate sets grow
        # with the budget, so the best of them never gets slower as the budget grows.
        candidates = [_solve(costs, budget_u, q, False) if budget_u >= per_layer_min else None]
        if min_u < per_layer_min:
            candidates.append(_solve(costs, min(budget_u, per_layer_min - 1), q, True))
    scored = [(_cost(costs, *c)[1], i, c) for i, c in enumerate(candidates) if c is not None]
    lv, segs = min(scored)[2]
    nbytes, ms = _cost(costs, lv, segs)
    return Plan(lv, segs, b, nbytes, ms, costs, eager, q)


def plan_with_inputs(model: torch.nn.Module, budget, example_inputs, **options) -> Plan:
    """``plan`` with the example inputs as one object: a tensor, a tuple of positional arguments or a
    dict of keyword arguments (``convert(model, memory_budget=..., example_inputs=...)``)."""
    if example_inputs is None:
        raise ValueError("memory_budget needs example_inputs (a tensor, a tuple of positional arguments or a dict "
                         "of keyword arguments for one training forward of the model)")
    if isinstance(example_inputs, dict):
        return plan(model, budget=budget, **options, **example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tensor, a tuple or a dict; got {type(example_inputs).__name__}")
    return plan(model, *example_inputs, budget=budget, **options)
