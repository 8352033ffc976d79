"""MLP sublayer (GPT-2 small: pre-LayerNorm, fc1 768 -> 3072, gelu_tanh, fc2, dropout, residual):
ckpt_ops at each recompute level vs eager, torch.utils.checkpoint, selective AC (save matmuls)
and torch.compile with a memory budget. One full step = forward + backward of input and weights.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import ckpt_ops
from bench import eager, providers
from bench.common import Case, build_cases, run_cases
from ckpt_ops import mlp as _mlp


def setup(config: Dict[str, object], device: torch.device, dtype: torch.dtype, backends: List[str],
          with_compile: bool = True) -> List[Case]:
    tokens, d, hdim, p = int(config["tokens"]), int(config["d_model"]), int(config["d_hidden"]), float(config["dropout"])
    torch.manual_seed(0)
    m = ckpt_ops.nn.MLP(d, hdim, activation=str(config.get("activation", "gelu_tanh")), dropout=p,
                        norm="layernorm", residual=True, device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d, device=device, dtype=dtype)
    forwards = providers.peer_forwards([lambda t: eager.mlp_forward(m, t)], device, with_compile)
    forwards += providers.ckpt_forwards([m], _mlp.LEVELS, backends, m)
    return build_cases(forwards, x, dy, list(m.parameters()))


def run(args, device, dtype) -> list:
    results = []
    backends = providers.ckpt_backends("mlp", device, args.backends)
    for p in args.dropouts:
        config = {"tokens": args.tokens, "d_model": args.d_model, "d_hidden": 4 * args.d_model, "dropout": p}
        results += run_cases(f"mlp p={p}", config, setup(config, device, dtype, backends, not args.no_compile),
                             args, device)
    return results
