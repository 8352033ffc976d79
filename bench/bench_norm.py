"""LayerNorm / RMSNorm: fused ckpt_ops kernels vs eager and the peers.

One full step (forward + backward of x, weight, bias) over a (tokens, d) activation; GPT-2-small
sizes by default (4 x 512 tokens, d 768). Norms have one level (they save x and per-row stats);
selective AC has no matmul to save here, so it equals torch.utils.checkpoint.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import ckpt_ops
from bench import eager, providers
from bench.common import Case, build_cases, run_cases


def setup(kind: str, config: Dict[str, object], device: torch.device, dtype: torch.dtype, backends: List[str],
          with_compile: bool = True) -> List[Case]:
    tokens, d = int(config["tokens"]), int(config["d_model"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(tokens, d, generator=g).to(device, dtype)
    if kind == "layer_norm":
        fused = ckpt_ops.nn.LayerNorm(d, device=device, dtype=dtype)
    else:
        fused = ckpt_ops.nn.RMSNorm(d, eps=1e-6, device=device, dtype=dtype)
    forwards = providers.peer_forwards([lambda t: eager.norm_forward(fused, t)], device, with_compile)
    for be in backends:
        def fwd(t, be=be):
            fused.backend = be
            return fused(t)
        forwards.append((f"ckpt_ops [{be}]", fwd))
    return build_cases(forwards, x, dy, list(fused.parameters()))


def run(args, device, dtype) -> list:
    config = {"tokens": args.tokens, "d_model": args.d_model}
    results = []
    for kind in ("layer_norm", "rms_norm"):
        backends = providers.ckpt_backends(kind, device, args.backends)
        results += run_cases(kind, config, setup(kind, config, device, dtype, backends, not args.no_compile),
                             args, device)
    return results
