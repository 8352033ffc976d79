"""Ahead-of-time compilation of every Triton kernel for real GPUs, without one.

Each case calls a real launcher (``norm.layer_norm_fwd``, ``attention.attention_bwd``, ...) on meta tensors
under ``_common.recording(limits)``: the launcher chooses its config (tiles, warps, stages, grid) for that
GPU's limits exactly as on the device, and records its launches instead of running them. Each recorded launch
is specialised with Triton's own binder (the same ``i32``/``i64``/constexpr-1/divisibility-16 rules as a
real launch) and compiled by ``triton.compile`` for the target (Triton 3.8 ships ptxas for sm_80 ... sm_120).
Resources per compile: shared memory (``metadata.shared``, what Triton checks against the device's opt-in
limit), registers and stack (``cuobjdump --dump-resource-usage`` on the cubin), spill stores/loads
(``ptxas -v``).

    python -m ckpt_ops.triton_kernels._aot [--full] [--jobs N] [--json out.json] [--write-docs docs/gpu_resources.md]

Not imported by the package: run it in a process without TRITON_INTERPRET (the interpreter replaces the
@triton.jit functions). Results are cached by compile key in ``build/aot/results.json`` (repo-ignored).
"""
import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from . import attention, mlp, norm, rope
from ._common import ARCH_LIMITS, _interpreted, recording

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # via the ckpt_ops/triton_kernels link too
CACHE = os.path.join(ROOT, "build", "aot")
ARCHS = (80, 86, 90, 100)  # sm_86: the 99 KB part (sm_89 / sm_120 have the same limit)
FULL_ARCHS = ARCHS + (89, 120)
FALLBACK_SMEM = 72 << 10  # a (hypothetical) part with 72 KB per block: the fallback entries of attention_tiles
# 16-bit kernels must not spill at all; fp32 ones (the IEEE FMA dots of attention) at most this many bytes of
# spill stores / stack per thread (they were up to 38 KB before the fp32 tiles were sized).
FP32_SPILL_BYTES = 64  # a part with 64 KB per block: attention_tiles' fallback entries
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ACTS = {0: "gelu", 1: "gelu_tanh", 2: "relu", 3: "silu"}
META = torch.device("meta")


def _t(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device=META)


# ----------------------------------------------------------------------------------------------------------
# cases: (family, label, dtype name, call) -- call() runs a launcher on meta tensors
# ----------------------------------------------------------------------------------------------------------
def _norm_cases(full):
    widths = (768, 1024, 2048, 4096, 8192, 12288, 16384) if full else (768, 8192, 16384)
    for n in widths:
        for dn in DTYPES if full else ("bf16", "fp32"):
            dt = DTYPES[dn]
            x, w, b = _t(4096, n, dtype=dt), _t(n, dtype=dt), _t(n, dtype=dt)
            mean, rstd = _t(4096), _t(4096)
            yield "norm", f"layer_norm N={n}", dn, lambda x=x, w=w, b=b: norm.layer_norm_fwd(x, w, b, 1e-5)
            yield "norm", f"layer_norm_bwd N={n}", dn, lambda x=x, w=w, m=mean, r=rstd: norm.layer_norm_bwd(
                x, x, w, m, r, True, True, True)
            if full:
                yield "norm", f"rms_norm N={n}", dn, lambda x=x, w=w: norm.rms_norm_fwd(x, w, 1e-6)
                yield "norm", f"rms_norm_bwd N={n}", dn, lambda x=x, w=w, r=rstd: norm.rms_norm_bwd(
                    x, x, w, r, True, True)


def _mlp_cases(full):
    sizes = {"numel=2^25": (8192, 4096), "numel>2^31": (2**31 // 4096 + 1, 4096)}
    for label, shape in sizes.items():
        if not full and label == "numel=2^25":
            continue
        for dn in DTYPES if full else ("bf16",):
            h = _t(*shape, dtype=DTYPES[dn])
            seed = torch.empty(1, dtype=torch.int64, device=META)
            for act in ACTS if full else (1,):
                for gated in (False, True):
                    g = h if gated else None
                    name = ("gated " if gated else "") + ACTS[act]
                    yield "mlp", f"act_fwd {name} {label}", dn, lambda h=h, g=g, a=act: mlp.act_fwd(h, g, a)
                    yield "mlp", f"act_bwd {name} {label}", dn, lambda h=h, g=g, a=act: mlp.act_bwd(h, h, g, a, True)
            yield "mlp", f"dropout+residual {label}", dn, lambda h=h, s=seed: mlp.dropout_fwd(h, h, s, 0.1)
            if full:
                yield "mlp", f"dropout_bwd {label}", dn, lambda h=h, s=seed: mlp.dropout_bwd(h, s, 0.1)


def _attention_shapes(full):
    """(label, B, S, H, KV, hd, causal, masked)."""
    for hd in (64, 128, 256):
        for causal, masked, kv in ((True, False, None), (True, True, 4), (False, True, None), (False, False, 4)):
            # CI subset: causal + mask (with the dropout variants), and hd 64 full-attention GQA, whose dk/dv spilled
            # on sm_86 with the 4-warp tiles (the regression case of _GPU_TILES[(64, 2)])
            if not full and (causal, masked) != (True, True) and not (hd == 64 and (causal, masked) == (False, False)):
                continue
            h = 32 if hd < 256 else 16
            kvh = h if kv is None else kv
            yield (f"hd={hd} H={h} KV={kvh} {'causal' if causal else 'full'}{' +mask' if masked else ''}",
                   2, 2048, h, kvh, hd, causal, masked)


def _attention_cases(full):
    for label, b, s, h, kv, hd, causal, masked in _attention_shapes(full):
        for dn in DTYPES if full else (("bf16", "fp32") if hd == 128 else ("bf16",)):
            dt = DTYPES[dn]
            qkv = _t(b, s, (h + 2 * kv) * hd, dtype=dt)
            o, lse = _t(b, s, h * hd, dtype=dt), _t(b, h, s)
            mask = torch.empty(b, s, dtype=torch.bool, device=META) if masked else None
            yield "attention", f"attention_fwd {label}", dn, lambda q=qkv, m=mask, h=h, kv=kv, c=causal: (
                attention.attention_fwd(q, m, h, kv, c, 0.125))
            yield "attention", f"attention_bwd {label}", dn, lambda q=qkv, o=o, lse=lse, m=mask, h=h, kv=kv, c=causal: (
                attention.attention_bwd(o, q, o, lse, m, h, kv, c, 0.125))
            if causal and masked:  # probability dropout (GPT-2's attn_pdrop): the DROPOUT variants
                sd = torch.empty(1, dtype=torch.int64, device=META)
                yield "attention", f"attention_fwd dropout {label}", dn, lambda q=qkv, m=mask, h=h, kv=kv, sd=sd: (
                    attention.attention_fwd(q, m, h, kv, True, 0.125, 0.1, sd))
                yield "attention", f"attention_bwd dropout {label}", dn, (
                    lambda q=qkv, o=o, lse=lse, m=mask, h=h, kv=kv, sd=sd: attention.attention_bwd(
                        o, q, o, lse, m, h, kv, True, 0.125, 0.1, sd))
                # sliding window (Mistral/Qwen2; window < S) and logit soft-capping (Gemma2): the WINDOW / SOFTCAP
                # variants, alone and together (Gemma2's sliding layers)
                for vname, win, cap in (("window", 512, 0.0), ("softcap", 0, 50.0), ("window+softcap", 512, 50.0)):
                    yield "attention", f"attention_fwd {vname} {label}", dn, (
                        lambda q=qkv, m=mask, h=h, kv=kv, w=win, c=cap: attention.attention_fwd(
                            q, m, h, kv, True, 0.125, 0.0, None, w, c))
                    yield "attention", f"attention_bwd {vname} {label}", dn, (
                        lambda q=qkv, o=o, lse=lse, m=mask, h=h, kv=kv, w=win, c=cap: attention.attention_bwd(
                            o, q, o, lse, m, h, kv, True, 0.125, 0.0, None, w, c))
    for hd in (64, 128, 256) if full else (128,):
        for dn in DTYPES if full else ("bf16",):
            qkv = _t(2, 2048, 48 * hd, dtype=DTYPES[dn])
            cos = _t(2048, hd // 2)
            yield "rope", f"rope hd={hd} H=32 KV=8", dn, lambda q=qkv, c=cos: rope.rope_(q, c, c, 32, 8, False)
            if full:
                yield "rope", f"rope inverse hd={hd} H=32 KV=8", dn, lambda q=qkv, c=cos: rope.rope_(q, c, c, 32, 8, True)
                # partial rotary (GPT-NeoX/Pythia rotary_pct 0.25: r = hd/4; BLOCK_HALF follows r/2), MHA
                qp, cp = _t(2, 2048, 96 * hd, dtype=DTYPES[dn]), _t(2048, hd // 8)
                for inv in (False, True):
                    yield "rope", f"rope{' inverse' if inv else ''} hd={hd} r={hd // 4} H=KV=32", dn, (
                        lambda q=qp, c=cp, i=inv: rope.rope_(q, c, c, 32, 32, i))


def cases(full=False):
    yield from _norm_cases(full)
    yield from _mlp_cases(full)
    yield from _attention_cases(full)


# ----------------------------------------------------------------------------------------------------------
# specialisation and compilation
# ----------------------------------------------------------------------------------------------------------
_SKIP_META = {"debug", "instrumentation_mode"}


def _specialise(kernel, args, meta, arch):
    """Triton's own binder for ``target``: (signature, constexprs, attrs, options) as a real launch makes."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kw = dict(meta, debug=False)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    return signature, constexprs, attrs, options


def _config_label(kernel, constexprs, options):
    """Tiles, warps, stages, then every other constexpr that is set (flags by name, codes as NAME=value):
    one label per distinct specialisation of a kernel for a dtype and arch."""
    names = [p.name for p in kernel.params]
    vals = {names[k[0]]: v for k, v in constexprs.items() if len(k) == 1 and v is not None}
    tiles = " ".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in vals.items() if k.startswith("BLOCK"))
    flags = [k if v is True else f"{k}={v}" for k, v in vals.items()
             if not k.startswith("BLOCK") and v is not False and k not in ("DOT_FP32", "RTNE_BF16")]
    return " ".join(x for x in (tiles, f"w{options.num_warps} s{options.num_stages}", *flags) if x)


def _key(kernel, signature, constexprs, attrs, options, arch):
    blob = repr((kernel.cache_key, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                 sorted((k, v) for k, v in options.__dict__.items() if k not in _SKIP_META), arch,
                 triton.__version__))
    return hashlib.sha1(blob.encode()).hexdigest()


def _cuobjdump(cubin):
    tool = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.remove(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


_JOBS = []  # (key, kernel, signature, constexprs, attrs, options dict, arch): read by forked workers


def _compile(i):
    key, kernel, signature, constexprs, attrs, options, arch = _JOBS[i]
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(triton.compiler.ASTSource(kernel, signature, constexprs, attrs),
                               target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # reported per compile, never swallowed: the test asserts no errors
        return key, dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
    regs, stack = _cuobjdump(k.asm["cubin"])
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    return key, dict(shared=int(k.metadata.shared), regs=regs, stack=stack,
                     spill_stores=int(m.group(1)) if m else None, spill_loads=int(m.group(2)) if m else None,
                     compile_s=round(time.perf_counter() - t0, 2), error=None)


def run(full=False, archs=None, jobs=2, use_cache=True):
    """Compiles every case's launches for every arch; returns one row per distinct compile (+ the cases
    that reached it)."""
    if _interpreted():
        raise RuntimeError("run the AOT compile without TRITON_INTERPRET (the interpreter replaces the kernels)")
    archs = archs or (FULL_ARCHS if full else ARCHS)
    targets = [(a, ARCH_LIMITS[a], cases(full)) for a in archs]
    if full:  # the attention tiles a part with less shared memory gets (the entries' fallbacks), causal + mask
        targets += [(a, dataclasses.replace(ARCH_LIMITS[a], smem=FALLBACK_SMEM), _attention_cases(False))
                    for a in (80, 86)]
    rows = {}
    _JOBS.clear()
    for arch, limits, arch_cases in targets:
        for family, label, dn, call in arch_cases:
            with recording(limits) as launches:
                call()
            for ln in launches:
                sig, cst, attrs, opts = _specialise(ln.kernel, ln.args, ln.meta, arch)
                key = _key(ln.kernel, sig, cst, attrs, opts, arch)
                if key not in rows:
                    rows[key] = dict(family=family, kernel=ln.kernel.__name__, dtype=dn, arch=f"sm_{arch}",
                                     smem_limit=limits.smem, config=_config_label(ln.kernel, cst, opts),
                                     cases=[], grid=list(ln.grid))
                    _JOBS.append((key, ln.kernel, sig, cst, attrs, opts.__dict__, arch))
                rows[key]["cases"].append(label)
    cache_file = os.path.join(CACHE, "results.json")
    cached = {}
    if use_cache and os.path.exists(cache_file):
        with open(cache_file) as f:
            cached = json.load(f)
    todo = [i for i, job in enumerate(_JOBS) if job[0] not in cached]
    os.makedirs(CACHE, exist_ok=True)
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output (spills) on stdout, captured per compile
    os.environ["TRITON_CACHE_DIR"] = os.path.join(CACHE, "triton")
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # ptxas must run for its log; results.json is the cache
    results = {}
    if todo:
        if jobs > 1:
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                results.update(pool.map(_compile, todo))
        else:
            results.update(map(_compile, todo))
    cached.update({k: v for k, v in results.items() if v.get("error") is None})
    with open(cache_file + ".tmp", "w") as f:
        json.dump(cached, f)
    os.replace(cache_file + ".tmp", cache_file)
    out = []
    for key, row in rows.items():
        row.update(results.get(key) or cached[key])
        out.append(row)
    return out, len(todo)


# ----------------------------------------------------------------------------------------------------------
# checks and the docs table
# ----------------------------------------------------------------------------------------------------------
def _declared_smem(row):
    """smem_needed of the attention._GPU_TILES entry that ``attention_tiles`` picks for this row's limit."""
    block_d = int(re.search(r"D=(\d+)", row["config"]).group(1))
    width = 4 if row["dtype"] == "fp32" else 2
    flags = row["config"].split()
    for need, _ in attention.tile_entries(block_d, width, "DROPOUT" in flags, "SOFTCAP" in flags):
        if need <= row["smem_limit"]:
            return need
    return 0


def problems(rows):
    """What the AOT test fails on: compile errors, shared memory over the arch's limit, any spill in 16-bit
    (fp32: over FP32_SPILL_BYTES), attention
    kernels over the shared memory their tile entry declares (what ``attention_tiles`` selects by), and norm
    backwards whose registers exceed the budget its programs-per-SM rule assumes (``norm._bwd_regs``)."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} {r['config']} {r['arch']} ({r['cases'][0]})"
        if r.get("error"):
            bad.append(f"{where}: {r['error']}")
            continue
        if r["shared"] > r["smem_limit"]:
            bad.append(f"{where}: shared {r['shared']} > limit {r['smem_limit']}")
        spill_ok = r["dtype"] == "fp32" and max(r["spill_stores"], r["stack"]) <= FP32_SPILL_BYTES
        if (r["spill_stores"] or r["spill_loads"] or r["stack"]) and not spill_ok:
            bad.append(f"{where}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads, stack {r['stack']}")
        if r["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"):
            need = _declared_smem(r)
            if r["shared"] > need:
                bad.append(f"{where}: shared {r['shared']} > the {need} its attention._GPU_TILES entry declares")
        if r["kernel"] == "_norm_bwd_kernel":
            block_n = int(re.search(r"N=(\d+)", r["config"]).group(1))
            if r["regs"] > norm._bwd_regs(block_n):
                bad.append(f"{where}: {r['regs']} registers > the {norm._bwd_regs(block_n)} budgeted")
    return bad


def summary(rows):
    per_arch = {}
    for r in rows:
        if r.get("error"):
            continue
        a = per_arch.setdefault(r["arch"], dict(max_shared=0, limit=r["smem_limit"], max_regs=0))
        a["max_shared"] = max(a["max_shared"], r["shared"])
        a["max_regs"] = max(a["max_regs"], r["regs"])
    spills = {}
    for r in rows:
        spills[r["dtype"]] = spills.get(r["dtype"], 0) + (r.get("spill_stores") or 0)
    return dict(compiles=len(rows), errors=sum(bool(r.get("error")) for r in rows), per_arch=per_arch,
                spill_store_bytes_per_dtype=spills)


def table(rows):
    """The markdown resource table (kernel x dtype x config x arch)."""
    lines = ["| family | kernel | dtype | config | arch | shared B (limit) | regs | spills B | cases |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {"norm": 0, "mlp": 1, "rope": 2, "attention": 3}
    for r in sorted(rows, key=lambda r: (order[r["family"]], r["kernel"], r["dtype"], r["config"],
                                         int(r["arch"][3:]))):
        if r.get("error"):
            lines.append(f"| {r['family']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['arch']} | "
                         f"ERROR | | | {r['cases'][0]} |")
            continue
        more = f" (+{len(r['cases']) - 1})" if len(r["cases"]) > 1 else ""
        lines.append(f"| {r['family']} | `{r['kernel']}` | {r['dtype']} | {r['config']} | {r['arch']} | "
                     f"{r['shared']} ({r['smem_limit']}) | {r['regs']} | {r['spill_stores']} | {r['cases'][0]}{more} |")
    return "\n".join(lines)


def write_docs(rows, path):
    s = summary(rows)
    arch_lines = "\n".join(f"| {a} | {v['max_shared']} | {v['limit']} | {v['max_regs']} |"
                           for a, v in sorted(s["per_arch"].items(), key=lambda kv: int(kv[0][3:])))
    text = f"""# GPU resources of the Triton kernels (generated)

Generated by `python -m ckpt_ops.triton_kernels._aot --full --write-docs docs/gpu_resources.md` (Triton
{triton.__version__}, its bundled ptxas; no GPU needed): every `@triton.jit` kernel reached through its real
launcher's config choice for each arch's limits, at the shapes of `triton_kernels/_aot.py` (norms N 768-16384,
MLP up to numel > 2^31, RoPE, attention hd 64/128/256 causal/full, key masks, GQA), specialised by Triton's own
binder and compiled for the arch. `tests/test_aot_compile.py` compiles a subset in CI, checks it against this
table, and fails on any error, spill, or shared memory over the limit (`CKPT_OPS_AOT_FULL=1`: the whole sweep).

{s['compiles']} distinct compiles, {s['errors']} errors; spill-store bytes per dtype:
{', '.join(f'{k} {v}' for k, v in sorted(s['spill_store_bytes_per_dtype'].items()))}.

| arch | max shared B | opt-in limit B | max registers |
|---|---|---|---|
{arch_lines}

Shared = `metadata.shared` (what Triton checks against the device's opt-in limit before launching); registers
from `cuobjdump --dump-resource-usage`; spills from `ptxas -v` (spill stores). `cases`: the first shape that
reached the compile (+ how many others reached the same specialisation).

{table(rows)}
"""
    with open(path, "w") as f:
        f.write(text)


def parse_table(path):
    """{(kernel, dtype, config, arch): (shared, regs, spills)} from a generated docs file."""
    out = {}
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 9 and cells[1].startswith("`"):
                shared = int(cells[5].split()[0])
                out[(cells[1].strip("`"), cells[2], cells[3], cells[4])] = (shared, int(cells[6]), int(cells[7]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the whole sweep (default: the CI subset)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", help="write the rows and the summary here")
    ap.add_argument("--write-docs", help="write the markdown resource table here")
    ap.add_argument("--no-cache", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, compiled = run(full=a.full, jobs=a.jobs, use_cache=not a.no_cache)
    s = summary(rows)
    s.update(compiled_now=compiled, wall_s=round(time.perf_counter() - t0, 1), problems=problems(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(summary=s, rows=rows), f, indent=1)
    if a.write_docs:
        write_docs(rows, a.write_docs)
    print(json.dumps({k: v for k, v in s.items() if k != "problems"}, indent=1))
    for p in s["problems"]:
        print("PROBLEM:", p)
    return 1 if s["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
