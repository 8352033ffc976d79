"""LayerNorm / RMSNorm: fused ckpt_ops kernels vs eager and torch.utils.checkpoint.

One full step (forward + backward of x, weight, bias) over a (tokens, d) activation; GPT-2-small
sizes by default (4 x 512 tokens, d 768).
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.utils.checkpoint as tuc

import ckpt_ops
from bench.common import Case
from ckpt_ops import _backend


def ckpt_backends(family: str, device: torch.device) -> List[str]:
    """ckpt_ops backends worth timing on `device` (the Triton interpreter is for correctness only)."""
    out = []
    for be in ("cpu", "cuda", "triton", "reference"):
        if be == "triton" and device.type == "cpu":
            continue
        if _backend._unavailable_reason(family, be, device.type) is None:
            out.append(be)
    return out


def setup(kind: str, config: Dict[str, object], device: torch.device, dtype: torch.dtype) -> List[Case]:
    tokens, d = int(config["tokens"]), int(config["d_model"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, d, generator=g).to(device, dtype)
    if kind == "layer_norm":
        eager = torch.nn.LayerNorm(d, device=device, dtype=dtype)
        fused = ckpt_ops.nn.LayerNorm(d, device=device, dtype=dtype)
    else:
        eager = torch.nn.RMSNorm(d, eps=1e-6, device=device, dtype=dtype)
        fused = ckpt_ops.nn.RMSNorm(d, eps=1e-6, device=device, dtype=dtype)
    fused.load_state_dict(eager.state_dict())
    params = list(eager.parameters()) + list(fused.parameters())

    def make_case(name, fwd, note=""):
        def step():
            for p in params + [x]:
                p.grad = None
            fwd().backward(dy)
        return Case(name, fwd, step, note, inputs=[x], params=params)

    cases = [
        make_case("eager", lambda: eager(x)),
        make_case("torch.utils.checkpoint", lambda: tuc.checkpoint(eager, x, use_reentrant=False)),
    ]
    for be in ckpt_backends(kind, device):
        def fwd(be=be):
            fused.backend = be
            return fused(x)
        cases.append(make_case(f"ckpt_ops[{be}]", fwd))
    return cases


def run(args, device, dtype) -> list:
    from bench.common import measure

    config = {"tokens": args.tokens, "d_model": args.d_model}
    results = []
    for kind in ("layer_norm", "rms_norm"):
        cases = setup(kind, config, device, dtype)
        results += measure(kind, config, cases, device, reps=args.reps, warmup=args.warmup)
    return results
