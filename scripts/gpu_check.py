"""The steps of ``scripts/gpu_check.sh``: build for this GPU, the test-suite on CUDA tensors, a short benchmark.

    python scripts/gpu_check.py [--out DIR] [--dry-run] [--arch 9.0] [--python PY] [--tests ...]

Each step is a command with its own environment and time limit; its output goes to DIR/<step>.log and its
exit status, wall time and command line into DIR/summary.json. ``--dry-run`` prints the plan (JSON: the
commands, the shapes the benchmark measures) and runs nothing, so it works without a GPU, torch or nvcc.
Budget: 480 s in all by default (``--budget``), each step also capped (build 240 s: one arch, 3 .cu files;
tests 180 s; each benchmark 120 s); a step cut at its cap is reported as "timeout" in summary.json. Not yet
timed on a GPU: no device was lent to the session that wrote this.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The op test files: every op x backend (triton, cuda, cpu where it applies) x dtype against the reference.
TESTS = ["tests/test_backend.py", "tests/test_build.py", "tests/test_norm.py", "tests/test_mlp.py",
         "tests/test_attention.py", "tests/test_block.py", "tests/test_mlp_kernels.py",
         "tests/test_attention_kernels.py", "tests/test_triton_norm_kernels.py", "tests/test_triton_mlp_kernels.py",
         "tests/test_triton_attention_kernels.py"]
# The benchmark: norm and MLP at 4 x 512 tokens (d 768), attention and a 2-block stack at S 2048, bf16,
# every provider (eager, torch.utils.checkpoint, selective AC, torch.compile budgets, ckpt_ops per level and
# backend), with the roofline columns (achieved TFLOP/s and GB/s against the GPU's peaks).
BENCH = [
    ("bench_norm", ["--op", "norm", "--tokens", "2048", "--d-model", "768"]),
    ("bench_mlp", ["--op", "mlp", "--tokens", "2048", "--d-model", "768"]),
    ("bench_attention", ["--op", "attention", "--seq", "2048", "--batch", "4"]),
    ("bench_block", ["--op", "block", "--seq", "2048", "--batch", "1", "--layers", "2"]),
]


BENCH_SHAPES = {"norm": "layer_norm + rms_norm, 2048 tokens x d 768", "mlp": "2048 tokens, d 768 -> 3072, dropout 0 / 0.1",
                "attention": "B 4, S 2048, d 768, 12 heads (hd 64), causal", "block": "2 GPT-2 blocks, B 1, S 2048"}


def gpu_arch(python):
    """'9.0' for an H100/H200: the compute capability of GPU 0, from torch."""
    out = subprocess.run([python, "-c", "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')"],
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"gpu_check: no CUDA GPU visible to {python}: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def plan(out, python, arch, tests=None, reps=3, with_nvcc=True, build=True):
    """The steps: (name, argv, extra env, time limit s). Pure: no device, no subprocess."""
    build_env = {"CKPT_OPS_CUDA_ARCHS": f"{arch}+PTX", "CKPT_OPS_FORCE_CUDA": "1"} if with_nvcc else \
        {"CKPT_OPS_SKIP_CUDA": "1"}
    test_env = {"CKPT_OPS_EXPECT_EXTENSION": "1", "CKPT_OPS_EXPECT_CUDA_BUILD": "1" if with_nvcc else "0",
                "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    steps = [
        ("gpu", [python, "-c", "import torch, triton; p = torch.cuda.get_device_properties(0); "
                 "print(p.name, p.major, p.minor, p.multi_processor_count, 'SMs', "
                 "getattr(p, 'shared_memory_per_block_optin', '?'), 'B smem/block', "
                 "'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"], {}, 60),
    ]
    if build:
        steps.append(("build", [python, "setup.py", "build_ext", "--inplace", "-q"], build_env, 240))
    steps += [
        ("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                   f"--junitxml={os.path.join(out, 'tests.xml')}"] + list(tests or TESTS), test_env, 180),
    ]
    for name, args in BENCH:
        steps.append((name, [python, "-m", "bench", "--device", "cuda", "--dtype", "bfloat16", "--quick",
                             "--reps", str(reps), "--out", os.path.join(out, "bench")] + args,
                      {"PYTHONUNBUFFERED": "1"}, 120))
    return steps


def run(steps, out, budget):
    """Runs the steps in order; each is killed at its own limit or at the run's total ``budget`` (s)."""
    os.makedirs(out, exist_ok=True)
    summary = []
    deadline = time.time() + budget
    for name, argv, env, limit in steps:
        t0 = time.time()
        limit = max(1, min(limit, int(deadline - t0)))
        print(f"[gpu_check] {name}: {' '.join(argv)}", flush=True)
        with open(os.path.join(out, f"{name}.log"), "w") as log:
            try:
                rc = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        wall = round(time.time() - t0, 1)
        print(f"[gpu_check] {name}: rc {rc}, {wall} s", flush=True)
        summary.append(dict(step=name, rc=rc, wall_s=wall, argv=argv, env=env, limit_s=limit))
        if name in ("gpu", "build") and rc != 0:
            print(f"[gpu_check] {name} failed; see {out}/{name}.log", flush=True)
            break
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    total = round(sum(s["wall_s"] for s in summary), 1)
    print(f"[gpu_check] total {total} s (budget {budget} s); results in {out}", flush=True)
    return 0 if all(s["rc"] == 0 for s in summary) and len(summary) == len(steps) else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "gpu_check"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--arch", default=None, help="compute capability to build for (default: GPU 0's)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan as JSON, run nothing")
    ap.add_argument("--tests", nargs="*", default=None, help="test files (default: the op test files)")
    ap.add_argument("--reps", type=int, default=3, help="benchmark repetitions per provider")
    ap.add_argument("--budget", type=int, default=480, help="total seconds (each step is also capped)")
    ap.add_argument("--skip-build", action="store_true", help="the extension is already built for this GPU")
    ap.add_argument("--env-note", default="", help="how the Python environment was chosen (gpu_check.sh)")
    a = ap.parse_args(argv)
    with_nvcc = bool(shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))
    arch = a.arch or ("9.0" if a.dry_run else gpu_arch(a.python))
    steps = plan(os.path.abspath(a.out), a.python, arch, a.tests, a.reps, with_nvcc or a.dry_run, not a.skip_build)
    if a.dry_run:
        print(json.dumps(dict(out=os.path.abspath(a.out), arch=arch, python=a.python, env=a.env_note,
                              bench_shapes=BENCH_SHAPES, steps=[
            dict(step=n, argv=v, env=e, limit_s=t) for n, v, e, t in steps],
            budget_s=a.budget), indent=1))
        return 0
    if not with_nvcc:
        print("[gpu_check] WARNING: nvcc not found: the extension is built CPU-only; CUDA tensors run on the "
              "Triton backend and the cuda-backend tests skip (see tests.log)", flush=True)
    return run(steps, os.path.abspath(a.out), a.budget)


if __name__ == "__main__":
    sys.exit(main())
