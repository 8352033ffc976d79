"""Smoke tests of the benchmark suite: every op runs end to end on CPU at tiny sizes (1 rep),
writes JSON lines and a PNG, prints verdict lines; the FLOP formulas make recomputation visible;
the roofline (CUDA reporting) path runs under the Triton interpreter. Not timing tests."""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

import ckpt_ops
from bench import flops
from bench.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--quick", "--reps", "1", "--warmup", "1", "--no-compile", "--d-model", "32",
        "--heads", "2", "--batch", "1", "--seq", "16", "--layers", "1", "--tokens", "32", "--dropouts", "0.1",
        "--vocab", "64"]


def _outputs(out_dir):
    jsonl, png = glob.glob(os.path.join(out_dir, "*.jsonl")), glob.glob(os.path.join(out_dir, "*.png"))
    return jsonl, png


@pytest.mark.parametrize("op", ["norm", "mlp", "attention", "block"])
def test_cli_runs_each_op(op, tmp_path, capsys):
    assert main(["--op", op, "--out", str(tmp_path)] + TINY) == 0
    out = capsys.readouterr().out
    jsonl, png = _outputs(tmp_path)
    assert len(jsonl) == 1 and len(png) == 1
    with open(png[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in open(jsonl[0])]
    providers = {r["provider"] for r in rows}
    assert {"eager", "torch.utils.checkpoint", "selective AC (matmuls)"} <= providers
    assert any(p.startswith("ckpt_ops") for p in providers)
    env = rows[0]["env"]
    for key in ("device", "dtype", "torch", "triton", "ckpt_ops", "commit"):
        assert key in env
    assert all(r["config"] for r in rows)
    assert "| torch.utils.checkpoint:" in out and ("dominated by ckpt_ops" in out or "NOT dominated" in out)
    assert "| compile budget 0.1: not measured" in out
    assert "frontier PNG:" in out and "JSON lines:" in out


def test_model_runs_or_skips_with_reason(tmp_path, capsys):
    assert main(["--op", "model", "--out", str(tmp_path)] + TINY) == 0
    out = capsys.readouterr().out
    if not hasattr(ckpt_ops, "convert"):
        assert "model: skipped (ckpt_ops.convert does not exist yet)" in out
    else:
        assert "JSON lines:" in out or "skipped" in out


def test_modes_forward_backward(tmp_path, capsys):
    assert main(["--op", "mlp", "--modes", "forward", "backward", "step", "--out", str(tmp_path)] + TINY) == 0
    rows = [json.loads(line) for line in open(_outputs(tmp_path)[0][0])]
    assert {r["mode"] for r in rows} == {"forward", "backward", "step"}
    eager = {r["mode"]: r["flops"] for r in rows if r["provider"] == "eager"}
    assert eager["forward"] > 0 and eager["forward"] + eager["backward"] == eager["step"]


def _step_flops(level, backend="reference", retain=False):
    torch.manual_seed(0)
    blk = ckpt_ops.nn.TransformerBlock(32, 2, style="gpt2", recompute=level)
    blk.backend = backend
    x = torch.randn(1, 16, 32, requires_grad=True)
    return flops.count_flops(lambda: blk(x).sum().backward(retain_graph=retain))


def test_recompute_shows_in_flops():
    backends = ["reference"]
    if torch._C._dispatch_has_kernel_for_dispatch_key("ckpt_ops::attention_fwd", "CPU"):
        backends.append("cpu")
    for be in backends:
        full, keep, none = (_step_flops(lv, be) for lv in ("full", "keep_attn", "none"))
        assert full > keep > none > 0, (be, full, keep, none)
        # the in-place kernels of a backward that frees its graph (attention_bwd_) count as their
        # out-of-place forms do under retain_graph
        assert [_step_flops(lv, be, retain=True) for lv in ("full", "keep_attn", "none")] == [full, keep, none]


def test_cpu_flash_attention_formula():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    fl = flops.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward())
    fwd = 4 * 2 * 16 * 16 * 8
    assert fl == fwd + int(2.5 * fwd)
    fl_causal = flops.count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward())
    assert fl_causal == fl // 2


def test_in_place_addmm_counts_as_its_gemm():
    a, b, c = torch.randn(8, 5), torch.randn(8, 3), torch.randn(3, 5)
    assert flops.count_flops(lambda: a.clone().addmm_(b, c)) == flops.count_flops(lambda: a + b @ c) == 2 * 8 * 3 * 5


def test_triton_smoke_roofline(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--triton-smoke", "--op", "block", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TFLOP/s" in proc.stdout and "floor ms" in proc.stdout
    rows = [json.loads(line) for line in open(_outputs(tmp_path)[0][0])]
    triton_rows = [r for r in rows if r["provider"].endswith("[triton]")]
    assert triton_rows and all(r["floor_ms"] > 0 and r["gbs"] > 0 for r in triton_rows)
    assert all(r["tflops"] > 0 for r in triton_rows)
    assert rows[0]["env"]["triton_interpret"] is True


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_eager_block_matches_ckpt_ops(style):
    """The eager reference every peer wraps computes what ckpt_ops.nn.TransformerBlock computes."""
    from bench import eager

    torch.manual_seed(0)
    kw = {"num_kv_heads": 1} if style == "llama" else {}
    blk = ckpt_ops.nn.TransformerBlock(32, 2, style=style, recompute="none", dtype=torch.float64, **kw)
    blk.backend = "reference"
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    torch.testing.assert_close(eager.block_forward(blk, x), blk(x), rtol=1e-10, atol=1e-10)


def _point(provider, t, b, spread=0.0, group=None):
    from bench.common import Result

    med = 100.0 * t
    return Result(op="op", provider=provider, config={}, median_ms=med, p20_ms=med * (1 - spread),
                  p80_ms=med * (1 + spread), ratio_to_eager=t, saved_bytes=0, saved_ratio=b, kept_bytes=0,
                  kept_ratio=b, group=group or ("ckpt_ops" if provider.startswith("ckpt_ops") else "peer"))


def test_verdicts_dominance_and_noise_flag():
    """The frontier verdicts: a peer is dominated only by a point at or below it on both axes; the
    closest miss is reported with its excess; margins inside the p20-p80 noise are flagged."""
    from bench.frontier import verdicts

    rs = [_point("eager", 1.0, 1.0, group="eager"),
          _point("torch.utils.checkpoint", 1.30, 0.06, 0.01),
          _point("selective AC (matmuls)", 1.00, 0.61, 0.05),
          _point("compile budget 0.5", 1.00, 0.47, 0.01),
          _point("compile budget 0.1", 1.10, 0.11, 0.01),
          _point("ckpt_ops full [cpu]", 1.20, 0.055, 0.01),
          _point("ckpt_ops selective [cpu]", 0.98, 0.56, 0.05),
          _point("ckpt_ops keep_mlp [cpu]", 1.05, 0.39, 0.01)]
    lines = {ln.split(" | ")[1].split(":")[0]: ln for ln in verdicts(rs)}
    assert "dominated by ckpt_ops full [cpu]" in lines["torch.utils.checkpoint"] and "noise" not in lines[
        "torch.utils.checkpoint"]
    assert "dominated by ckpt_ops selective [cpu]" in lines["selective AC (matmuls)"]
    assert "within the timing noise" in lines["selective AC (matmuls)"]  # 2 % margin, +-5 % noise
    assert "NOT dominated" in lines["compile budget 0.5"] and "keep_mlp" in lines["compile budget 0.5"]
    assert "time +5.0%" in lines["compile budget 0.5"] and "noise" not in lines["compile budget 0.5"]
    assert "NOT dominated" in lines["compile budget 0.1"] and "time +9.1%" in lines["compile budget 0.1"]


def test_verdicts_set_aside_a_peer_with_wrong_gradients():
    """A peer marked invalid by the gradient check is reported as such, never as dominated or not."""
    from bench.frontier import verdicts

    bad = _point("compile budget 0.1", 1.10, 0.11, 0.01)
    bad.invalid = "wrong gradients: max rel err 1.00"
    rs = [_point("eager", 1.0, 1.0, group="eager"), bad, _point("ckpt_ops full [cpu]", 1.20, 0.055, 0.01)]
    line = next(ln for ln in verdicts(rs) if "| compile budget 0.1:" in ln)
    assert "INVALID peer" in line and "max rel err 1.00" in line and "dominated" not in line


def _rng_cases(p_drop: float, budget: float, autocast: bool = False):
    from bench import providers
    from bench.common import autocast_case, build_cases, warm_up

    torch.manual_seed(0)
    w = torch.randn(32, 32, requires_grad=True)
    x = torch.randn(16, 32, requires_grad=True)

    def f(t):  # the dropout's input is cheap to replay: the min-cut partitioner recomputes it
        return torch.nn.functional.dropout(torch.sin(t @ w), p_drop, training=True).cos() @ w

    cases = build_cases([("eager", f), (f"compile budget {budget}", providers.compiled_with_budget(f, budget))],
                        x, torch.randn(16, 32), [w])
    if autocast:  # as bench.common.run_cases does, before the warm-up step compiles
        cases = [autocast_case(c, torch.device("cpu"), torch.bfloat16) for c in cases]
    return warm_up(cases, torch.device("cpu"))


def _need_compile():
    """Inductor on CPU needs a C++ compiler (the bench's TRITON_INTERPRET rule is about timing)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Inductor on CPU needs a C++ compiler ({e})")


def test_rng_gradient_check_catches_a_dropout_replayed_with_a_fresh_mask():
    """torch.compile at budget 0 replays the dropout in backward with a new mask (pytorch#190758):
    the check sees gradients unlike budget 1.0's under the same seed and output. Without dropout,
    or against a reference that is the case itself, it finds nothing."""
    _need_compile()
    from bench.common import check_rng_gradients

    cases = _rng_cases(0.5, 0.0)
    assert cases[1].reference is not None
    check_rng_gradients(cases)
    assert "wrong gradients" in cases[1].invalid and cases[0].invalid == ""
    cases[1].invalid, cases[1].reference = "", cases[1].forward  # same function, same seed: equal gradients
    check_rng_gradients(cases)
    assert cases[1].invalid == ""
    clean = _rng_cases(0.0, 0.0)  # p = 0: nothing random, nothing to replay wrongly
    check_rng_gradients(clean)
    assert clean[1].invalid == ""
    bf16 = _rng_cases(0.5, 0.0, autocast=True)  # the reference runs under the same autocast
    check_rng_gradients(bf16)
    assert "wrong gradients" in bf16[1].invalid and bf16[1].reference().dtype == torch.bfloat16


def test_paired_ratios_cancel_a_slow_spell():
    """Three rounds, the second one during a spell where the whole machine ran 1.5x slower: the
    per-round ratios see the true 0.9 in every round; the ratio of medians would not."""
    from bench.common import paired_ratios

    base = [1.0, 1.5, 1.0]
    ours = [0.9, 1.35, 0.9]
    assert paired_ratios(ours, base) == pytest.approx([0.9, 0.9, 0.9])
    skewed_base, skewed_ours = [1.0, 1.5, 1.5], [0.9, 0.9 * 1.5, 0.9]
    assert sorted(paired_ratios(skewed_ours, skewed_base))[1] == pytest.approx(0.9)
    assert sorted(skewed_ours)[1] / sorted(skewed_base)[1] != pytest.approx(0.9)


def test_issue13_target_lines_paired_and_noise_aware():
    """bench.targets: the checkpoint-overhead ratio is formed per round ((full - eager) /
    (ckpt - eager)), each level is held to its FLOP floor, and the verdict says whether the margin
    is outside the p20-p80 noise."""
    from bench.common import Result
    from bench.targets import lines

    def res(provider, rounds, flops_ratio=1.0, group="ckpt_ops"):
        return Result("mlp p=0.0", provider, {"tokens": 8}, 0.0, 0.0, 0.0, 1.0, 0, 0.0, group=group,
                      flops_ratio=flops_ratio, round_ms=rounds)

    eager = [100.0, 150.0, 100.0, 100.0, 100.0]  # round 2: a slow spell of the whole machine
    rs = [res("eager", eager, group="eager"), res("torch.utils.checkpoint", [120.0, 180.0, 120.0, 120.0, 120.0],
                                                   1.2, "peer"),
          res("ckpt_ops full [cpu]", [116.0, 174.0, 116.0, 116.0, 116.0], 1.2),
          res("ckpt_ops selective [cpu]", [101.0, 151.5, 104.0, 100.0, 103.0]),
          res("ckpt_ops none [cpu]", [110.0, 165.0, 110.0, 110.0, 110.0])]
    got = lines(rs)
    assert got[0].startswith("mlp p=0.0 [step] targets")
    line = lambda name: next(ln for ln in got if ln.strip().startswith(name))  # noqa: E731
    full = line("full [cpu]: overhead / checkpoint's overhead")
    assert "0.800" in full and "target <= 0.90: met" in full  # 16/20 in every round, the slow one too
    sel = line("selective [cpu]: time / eager")
    assert "1.010" in sel and "met, inside the noise" in sel  # p80 1.03 > 1.02
    assert "target <= 1.00: MISSED" in line("none [cpu]: time / eager")
    assert "0.967" in line("full [cpu]: (time / eager) / FLOP floor 1.200")


def test_soak_runs_and_is_reproducible(capsys):
    from bench import soak
    assert soak.main(["--soak", "--steps", "3", "--backend", "reference", "--no-alloc", "--levels", "full", "none"]) == 0
    out = capsys.readouterr().out
    assert "soak: OK" in out and out.count("True") == 2


def test_model_family_option_builds_that_family(tmp_path, capsys):
    """--op model --family: the named HF family is built, converted (every decoder layer fused) and
    measured against its unconverted and HF-checkpointed selves."""
    pytest.importorskip("transformers")
    from bench import bench_model
    from bench.__main__ import parse

    assert parse(["--op", "model", "--family", "qwen2"]).family == "qwen2"
    for fam in bench_model.FAMILIES:
        assert parse(["--op", "model", "--family", fam]).family == fam  # the CLI offers every family the builder knows
    with pytest.raises(SystemExit):  # the other ops build their own stacks: no Llama label on a GPT-2 stack
        parse(["--op", "block", "--family", "llama"])
    assert parse(["--op", "block", "--family", "gpt2"]).family == "gpt2"
    model = bench_model.build_model({"family": "mistral", "seq": 16, "d_model": 48, "heads": 3, "layers": 2,
                                     "vocab": 64, "dropout": 0.0})
    assert type(model).__name__ == "MistralForCausalLM" and model.config.num_key_value_heads == 1
    conv = ckpt_ops.convert(model, inplace=False)
    layers = [line for line in ckpt_ops.conversion_report(conv)["layers"]]
    assert len(layers) == 2 and all("fused" in str(line) for line in layers), layers
    with pytest.raises(ValueError, match="family"):
        bench_model.build_model({"family": "bert", "seq": 16, "d_model": 48, "heads": 3, "layers": 1, "vocab": 64})
    assert main(["--op", "model", "--family", "llama", "--out", str(tmp_path)] + TINY[:-4] +
                ["--heads", "3", "--d-model", "48", "--vocab", "64", "--layers", "1"]) == 0
    out = capsys.readouterr().out
    assert "llama x1 S=16" in out and "ckpt_ops full [cpu]" in out and "HF gradient_checkpointing" in out


def test_lora_bench_runs_and_reports_ratios(tmp_path, capsys):
    """--op lora (PEFT LoRA step: ckpt_ops vs PEFT + HF checkpointing vs PEFT) at tiny sizes: every
    provider measured, ckpt_ops fused with no fallback, ratios printed and written."""
    pytest.importorskip("peft", reason="peft is not installed")
    pytest.importorskip("transformers")
    assert main(["--op", "lora", "--device", "cpu", "--d-model", "32", "--heads", "2", "--seq", "16",
                 "--layers", "1", "--reps", "1", "--warmup", "1", "--vocab", "64", "--lora-r", "2",
                 "--lora-dropout", "0.1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fallbacks none" in out and "'LlamaDecoderLayer'" in out
    rows = [json.loads(line) for line in open(tmp_path / "bench-lora.jsonl")]
    by = {r["provider"]: r for r in rows if "provider" in r}
    assert set(by) == {"ckpt_ops full", "PEFT + HF checkpointing", "PEFT"}
    assert by["ckpt_ops full"]["saved_bytes"] < by["PEFT"]["saved_bytes"]
    assert sum(1 for r in rows if "ratio" in r) == 2
