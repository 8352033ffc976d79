"""scripts/gpu_check.sh --dry-run: the plan of the GPU check (build for the GPU's arch, the op tests on CUDA
tensors, the benchmark at S 2048 on CUDA), built without a GPU and without running anything."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _dry_run(tmp_path, *extra):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("GPU_CHECK_PYTHON", None)
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not out.exists(), "the dry run wrote results"
    return json.loads(proc.stdout), str(out)


def test_dry_run_plan(tmp_path):
    plan, out = _dry_run(tmp_path, "--arch", "8.6")
    steps = {s["step"]: s for s in plan["steps"]}
    assert [s["step"] for s in plan["steps"]] == ["gpu", "build", "tests", "bench_norm", "bench_mlp",
                                                   "bench_attention", "bench_block"]
    assert steps["build"]["env"]["CKPT_OPS_CUDA_ARCHS"] == "8.6+PTX"  # built for that GPU only
    assert steps["build"]["env"]["CKPT_OPS_FORCE_CUDA"] == "1"
    t = steps["tests"]
    assert t["env"]["TRITON_INTERPRET"] == "0" and t["env"]["CKPT_OPS_EXPECT_CUDA_BUILD"] == "1"
    assert f"--junitxml={out}/tests.xml" in t["argv"]
    files = [a for a in t["argv"] if a.startswith("tests/")]
    assert files and all(os.path.exists(os.path.join(ROOT, f)) for f in files)
    assert {"tests/test_norm.py", "tests/test_mlp.py", "tests/test_attention.py"} <= set(files)
    assert sum(s["limit_s"] for s in plan["steps"]) >= plan["budget_s"] == 480


def test_dry_run_bench_commands_parse(tmp_path):
    """Each benchmark command is a valid ``python -m bench`` command line on CUDA, bf16, writing under the
    output folder; attention and the block stack at S 2048."""
    from bench.__main__ import parse

    plan, out = _dry_run(tmp_path)
    assert plan["arch"] == "9.0"
    benches = [s for s in plan["steps"] if s["step"].startswith("bench_")]
    ops = set()
    for s in benches:
        i = s["argv"].index("bench")
        args = parse(s["argv"][i + 1:])
        assert args.device == "cuda" and args.dtype == "bfloat16" and args.out == os.path.join(out, "bench")
        assert not args.triton_smoke and not args.no_compile  # every provider, torch.compile included
        ops.add(args.op)
        if args.op in ("attention", "block"):
            assert args.seqs == [2048]
    assert ops == {"norm", "mlp", "attention", "block"}
