"""MLP sublayer (GPT-2 small: pre-LayerNorm, fc1 768 -> 3072, gelu_tanh, fc2, dropout, residual):
ckpt_ops at each recompute level vs eager, torch.utils.checkpoint, selective AC (save matmuls)
and torch.compile with a memory budget. One full step = forward + backward of input and weights.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

import ckpt_ops
from bench import providers
from bench.common import Case


def eager_forward(m: ckpt_ops.nn.MLP, x: torch.Tensor) -> torch.Tensor:
    """The same MLP in plain PyTorch ops, from the module's own submodules."""
    n = F.layer_norm(x, (m.d_model,), m.norm.weight, m.norm.bias, m.norm.eps) if m.norm is not None else x
    if m.gate is not None:
        a = F.silu(m.gate(n)) * m.fc1(n)
    else:
        a = F.gelu(m.fc1(n), approximate="tanh")
    y = F.dropout(m.fc2(a), m.dropout, m.training)
    return x + y if m.residual else y


def setup(config: Dict[str, object], device: torch.device, dtype: torch.dtype, backends: List[str],
          with_compile: bool = True) -> List[Case]:
    tokens, d, hdim, p = int(config["tokens"]), int(config["d_model"]), int(config["d_hidden"]), float(config["dropout"])
    torch.manual_seed(0)
    m = ckpt_ops.nn.MLP(d, hdim, activation=str(config.get("activation", "gelu_tanh")), dropout=p,
                        norm="layernorm", residual=True, device=device, dtype=dtype)
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, d, device=device, dtype=dtype)
    params = list(m.parameters())
    eager = lambda x: eager_forward(m, x)  # noqa: E731

    def case(name, fwd, note=""):
        def step():
            for t in params + [x]:
                t.grad = None
            fwd().backward(dy)
        return Case(name, fwd, step, note, inputs=[x], params=params)

    cases = [case("eager", lambda: eager(x)),
             case("torch.utils.checkpoint", lambda: providers.checkpointed(eager)(x)),
             case("selective AC (matmuls)", lambda: providers.selective(eager)(x))]
    if with_compile:
        for budget in (0.5, 0.1):
            f = providers.compiled_with_budget(eager, budget)
            cases.append(case(f"compile budget {budget}", lambda f=f: f(x)))
    for be in backends:
        for level in ("full", "selective", "none"):
            def fwd(level=level, be=be):
                m.recompute, m.backend = level, be
                return m(x)
            cases.append(case(f"ckpt_ops {level} [{be}]", fwd))
    return cases


def run(args, device, dtype) -> list:
    from bench.bench_norm import ckpt_backends
    from bench.common import measure

    results = []
    for p in args.dropouts:
        config = {"tokens": args.tokens, "d_model": args.d_model, "d_hidden": 4 * args.d_model, "dropout": p}
        cases = setup(config, device, dtype, ckpt_backends("mlp", device), with_compile=not args.no_compile)
        results += measure(f"mlp p={p}", config, cases, device, reps=args.reps, warmup=args.warmup)
    return results
