"""Attention sublayer (GPT-2 small: pre-LayerNorm, QKV 768 -> 3 x 768, 12 heads, causal, output
projection, residual dropout, residual): ckpt_ops.nn.Attention at each recompute level vs the
eager SDPA sublayer built from the same module's parameters, torch.utils.checkpoint around it,
selective AC (save matmuls and the SDPA output) and torch.compile with a memory budget.
S 512 and 2048 at batch 4 by default: the attention core grows with S², which is what
"keep_attn" saves over "full".
"""
from __future__ import annotations

from typing import Dict, List

import torch

import ckpt_ops
from bench import eager, providers
from bench.common import Case, build_cases, run_cases
from ckpt_ops import attention as _attn


def setup(config: Dict[str, object], device: torch.device, dtype: torch.dtype, backends: List[str],
          with_compile: bool = True) -> List[Case]:
    b, s, d, h = (int(config[k]) for k in ("batch", "seq", "d_model", "heads"))
    torch.manual_seed(0)
    m = ckpt_ops.nn.Attention(d, h, causal=True, dropout=float(config["dropout"]), norm="layernorm", residual=True,
                              device=device, dtype=dtype)
    x = torch.randn(b, s, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(b, s, d, device=device, dtype=dtype)
    forwards = providers.peer_forwards([lambda t: eager.attention_forward(m, t)], device, with_compile)
    forwards += providers.ckpt_forwards([m], _attn.LEVELS, backends, m)
    return build_cases(forwards, x, dy, list(m.parameters()))


def run(args, device, dtype) -> list:
    results = []
    backends = providers.ckpt_backends("attention", device, args.backends)
    for s in args.seqs or [512, 2048]:
        config = {"batch": args.batch, "seq": s, "d_model": args.d_model, "heads": args.heads,
                  "dropout": args.dropout, "causal": True}
        results += run_cases(f"attention S={s}", config, setup(config, device, dtype, backends, not args.no_compile),
                             args, device)
    return results
