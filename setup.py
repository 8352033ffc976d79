"""Build ckpt_ops and its extension ckpt_ops._C (C++ CPU kernels, plus CUDA kernels when possible).

Install against the torch you already have (build isolation would fetch another multi-GB torch):

    pip install --no-build-isolation .          # or -e . for development

CUDA sources are compiled whenever this torch is a CUDA build (``torch.version.cuda``) and nvcc
is found -- whether or not a GPU is present (a GPU-less build host must not silently produce a
CPU-only package). Knobs (environment variables):

    CKPT_OPS_SKIP_CUDA=1      C++ CPU kernels only (fast local iteration: ~1 min less per .cu)
    CKPT_OPS_FORCE_CUDA=1     fail the build instead of falling back to CPU-only
    CKPT_OPS_CUDA_ARCHS="8.0;9.0"  CUDA architectures (default: DEFAULT_ARCHS below);
                              TORCH_CUDA_ARCH_LIST is honoured when this is unset
    CKPT_OPS_SKIP_EXTENSION=1 no extension at all (pure Python: reference + Triton backends)
    MAX_JOBS=N                parallel compile jobs (default: sized from cores and free memory)
    CUDA_HOME=/path           the CUDA toolkit (default: found from nvcc on PATH or /usr/local/cuda)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# sm_75 is the oldest architecture CUDA 13 still targets; +PTX keeps newer GPUs working.
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
NVCC_GB_PER_JOB = 3.0  # peak RSS of one nvcc job on a torch-including .cu, measured ~2.5 GB


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"ckpt_ops setup: {msg}", file=sys.stderr, flush=True)


def _find_cuda_home():
    """CUDA_HOME from the environment, else the toolkit behind nvcc (following wrapper scripts)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        # A wrapper script in /usr/local/bin would make torch guess CUDA_HOME=/usr/local: require
        # the headers next to nvcc.
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
            os.path.join(home, "include", "cuda_runtime.h")
        ):
            return home
    return None


def _max_jobs():
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        avail_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        jobs = max(1, min(cores, int(avail_gb / NVCC_GB_PER_JOB)))
    except (ValueError, OSError):
        jobs = cores
    return str(jobs)


def _extensions():
    if _flag("CKPT_OPS_SKIP_EXTENSION"):
        _log("CKPT_OPS_SKIP_EXTENSION=1: no ckpt_ops._C (reference and Triton backends only)")
        return [], {}

    cuda_home = None
    reason = None
    if _flag("CKPT_OPS_SKIP_CUDA"):
        reason = "CKPT_OPS_SKIP_CUDA=1"
    else:
        import torch

        if not torch.version.cuda:
            reason = f"torch {torch.__version__} is not a CUDA build"
        else:
            cuda_home = _find_cuda_home()
            if cuda_home is None:
                reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    with_cuda = cuda_home is not None
    if not with_cuda:
        if _flag("CKPT_OPS_FORCE_CUDA"):
            raise SystemExit(f"ckpt_ops setup: CKPT_OPS_FORCE_CUDA=1 but CUDA kernels cannot be built: {reason}")
        _log(f"WARNING: building the C++ CPU kernels only: {reason}. CUDA tensors will use the "
             "Triton backend (or the reference one); see ckpt_ops.backend_info().")
    else:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        archs = os.environ.get("CKPT_OPS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"building C++ CPU and CUDA kernels (CUDA_HOME={cuda_home}, archs {archs})")
    os.environ["MAX_JOBS"] = _max_jobs()

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    torch_version = torch.__version__.split("+")[0]
    cxx = ["-O3", "-ffp-contract=off", "-fopenmp", f'-DCKPT_OPS_TORCH_VERSION="{torch_version}"']
    link = ["-fopenmp"]  # resolves to torch's own libgomp.so.1 (same soname): one OpenMP runtime
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        archs_define = os.environ["TORCH_CUDA_ARCH_LIST"].replace('"', "")
        cxx += ["-DCKPT_OPS_WITH_CUDA", f'-DCKPT_OPS_CUDA_ARCHS="{archs_define}"']
        # The nvidia-* wheels torch depends on carry the cuBLAS/cuSPARSE headers some ATen CUDA
        # headers include; a bare toolkit may lack them.
        site = os.path.dirname(os.path.dirname(torch.__file__))
        include_dirs += [d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d)]
        # --fmad=false: no FMA contraction, so an expression recomputed in a backward kernel rounds
        # exactly as in the forward kernel (bitwise-identical recompute); these kernels are
        # memory-bound, the cost is nil.
        nvcc = ["-O3", "-lineinfo", "-DCKPT_OPS_WITH_CUDA", "--expt-relaxed-constexpr", "--fmad=false"]
        ext = CUDAExtension("ckpt_ops._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    else:
        ext = CppExtension("ckpt_ops._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="ckpt_ops",
    version="0.1.0",
    description="Activation checkpointing with fused recompute kernels (Triton, C++, CUDA)",
    packages=["ckpt_ops", "ckpt_ops.triton_kernels"],
    # triton_kernels/ is a top-level folder of the repo but installs under the package namespace:
    # Triton's own repository publishes an unrelated top-level package named `triton_kernels`.
    package_dir={"ckpt_ops": "ckpt_ops", "ckpt_ops.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton"], "test": ["pytest", "numpy", "expecttest"], "bench": ["matplotlib"]},
)
