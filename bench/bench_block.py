"""The default benchmark: a stack of N GPT-2-small-shaped blocks (d 768, 12 heads, S 512, batch 4;
pre-LayerNorm, causal attention, gelu_tanh MLP, residual dropout 0.1 and 0, residuals), each a
``ckpt_ops.nn.TransformerBlock(style="gpt2")`` checkpointed as one segment at each recompute
level, against the same computation built eagerly from the same parameters
(``bench.eager.block_forward``): eager, torch.utils.checkpoint per block, selective AC per block,
and torch.compile of the whole stack with activation memory budgets 0.5 and 0.1.
"""
from __future__ import annotations

from typing import Dict, List

import torch

import ckpt_ops
from bench import eager, providers
from bench.common import Case, build_cases, run_cases
from ckpt_ops import block as _block


def setup(config: Dict[str, object], device: torch.device, dtype: torch.dtype, backends: List[str],
          with_compile: bool = True) -> List[Case]:
    b, s, d, h, n = (int(config[k]) for k in ("batch", "seq", "d_model", "heads", "layers"))
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(ckpt_ops.nn.TransformerBlock(d, h, style="gpt2", dropout=float(config["dropout"]),
                                                              device=device, dtype=dtype) for _ in range(n))
    x = torch.randn(b, s, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(b, s, d, device=device, dtype=dtype)
    layers = [lambda t, blk=blk: eager.block_forward(blk, t) for blk in blocks]
    forwards = providers.peer_forwards(layers, device, with_compile)
    forwards += providers.ckpt_forwards(list(blocks), _block.LEVELS, backends, providers.sequential(list(blocks)))
    return build_cases(forwards, x, dy, list(blocks.parameters()))


def configs(args) -> List[Dict[str, object]]:
    """S 512 at --batch; with --long also S 2048 at batch 1; each at every --dropout value."""
    out = []
    for p in getattr(args, "block_dropouts", [args.dropout]):
        base = {"batch": args.batch, "d_model": args.d_model, "heads": args.heads, "layers": args.layers,
                "dropout": p}
        out += [{**base, "seq": s} for s in (args.seqs or [512])]
        if args.long:
            out.append({**base, "seq": 2048, "batch": 1})
    return out


def run(args, device, dtype) -> list:
    results = []
    backends = providers.ckpt_backends("attention", device, args.backends)
    for config in configs(args):
        op = f"block x{config['layers']} S={config['seq']} p={config['dropout']:g}"
        results += run_cases(op, config, setup(config, device, dtype, backends, not args.no_compile), args, device)
    return results
