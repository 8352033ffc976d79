"""The planner benchmark: verdict logic on synthetic points, and both ops end to end at tiny sizes
(one repetition, no torch.compile; times meaningless)."""
from __future__ import annotations

import glob
import os

from bench import bench_planner
from bench.__main__ import main
from bench.common import Result

TINY = ["--device", "cpu", "--reps", "1", "--warmup", "1", "--no-compile", "--d-model", "32", "--heads", "2",
        "--batch", "1", "--seq", "16"]


def _r(provider, kept, t, group):
    return Result("op", provider, {}, 1.0, 1.0, 1.0, t, 0, kept, 0, kept, group=group, ratio_p20=t, ratio_p80=t)


def test_verdicts():
    rs = [_r("eager", 1.0, 1.0, "eager"), _r("every 2 layers", 0.5, 1.20, "peer"),
          _r("compile budget 0.1", 0.1, 1.10, "compiled"), _r("compile budget 0.06", 0.05, 1.3, "compiled"),
          _r("ckpt_ops plan 0.5", 0.45, 1.21, "ckpt_ops"), _r("ckpt_ops plan 0.1", 0.09, 1.25, "ckpt_ops")]
    other = Result("other op", "ckpt_ops plan 0.1", {}, 1.0, 1.0, 1.0, 0.5, 0, 0.01, 0, 0.01, group="ckpt_ops")
    lines = bench_planner.verdicts(rs + [other])  # a point of another op never counts
    assert len(lines) == 3
    assert "every 2 layers" in lines[0] and "dominated by ckpt_ops plan 0.5" in lines[0]  # 1.21 <= 1.02 x 1.20
    assert "compile budget 0.1" in lines[1] and "NOT dominated" in lines[1]  # 1.25 > 1.02 x 1.10
    assert "compile budget 0.06" in lines[2] and "NOT dominated" in lines[2]  # no plan at <= 0.05 bytes


def test_cli_planner_and_segments(tmp_path, capsys):
    assert main(["--op", "planner", "--budgets", "0.3", "1.0", "--out", str(tmp_path)] + TINY) == 0
    out = capsys.readouterr().out
    assert "planner verdicts" in out and "every 1 layers (bytes" in out and "ckpt_ops plan 1.0" in out
    assert len(glob.glob(os.path.join(tmp_path, "bench-planner-frontier-*.png"))) == 1
    assert main(["--op", "segments", "--segment-layers", "4", "8", "--out", str(tmp_path)] + TINY) == 0
    out = capsys.readouterr().out
    assert "L=8   k=2" in out and "fitted exponent" in out


def test_a_plan_at_every_peer_point():
    """A peer keeping less than every fraction budget (here only budget 1.0) still meets a plan
    that fits its own kept bytes: one planned at them, unless an earlier plan already fits."""
    import torch

    config = {"stack": "llama", "batch": 1, "seq": 16, "d_model": 32, "heads": 2, "layers": 4}
    cases, plans = bench_planner.setup(config, torch.device("cpu"), torch.float32, (1.0,), with_compile=False,
                                       plan_reps=1)
    by = {c.provider: c for c in cases}
    x, dy = by["eager"].inputs[0], torch.randn(1, 16, 32)
    for n in bench_planner.EVERY_N:
        peer = by[f"every {n} layers"]
        kept = bench_planner.peer_kept_bytes(lambda t, c=peer: c.forward(), x, dy, torch.device("cpu"))
        fits = [label for label, p, _e in plans if p.predicted_bytes <= kept]
        assert fits, (n, kept, [(label, p.predicted_bytes) for label, p, _e in plans])
    assert all(f"ckpt_ops plan {label}" in by for label, _p, _e in plans)
    assert len({(tuple(p.levels), tuple(p.segments)) for _l, p, _e in plans}) == len(plans)  # each plan once
