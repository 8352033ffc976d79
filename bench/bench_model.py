"""End to end: a Hugging Face GPT-2 (random init from a GPT2Config, no download; language-model
loss over random tokens) trained one step per provider: eager, torch.utils.checkpoint and
selective AC around every block, torch.compile with memory budgets, and the model after
``ckpt_ops.convert`` at each recompute level. Skipped, with the reason printed, when
``ckpt_ops.convert`` does not exist yet or transformers is not installed.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
from typing import Callable, Dict, List, Optional

import torch

import ckpt_ops
from bench import providers
from bench.common import Case, make_case, run_cases
from ckpt_ops import block as _block


def unavailable_reason() -> Optional[str]:
    if not hasattr(ckpt_ops, "convert"):
        return "ckpt_ops.convert does not exist yet"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    return None


@contextlib.contextmanager
def _wrapped_blocks(blocks: List[torch.nn.Module], wrap: Callable[[Callable], Callable]):
    """Temporarily route every block's forward through `wrap` (checkpointing per block)."""
    for blk in blocks:
        blk.forward = wrap(type(blk).forward.__get__(blk))
    try:
        yield
    finally:
        for blk in blocks:
            del blk.forward


def setup(config: Dict[str, object], device: torch.device, dtype: torch.dtype, backends: List[str],
          with_compile: bool = True) -> List[Case]:
    from transformers import GPT2Config, GPT2LMHeadModel

    b, s = int(config["batch"]), int(config["seq"])
    torch.manual_seed(0)
    # attn_pdrop stays 0: attention-probability dropout has no fused kernel, so a converted block
    # would run its original forward (ckpt_ops.convert falls back) and measure nothing new.
    cfg = GPT2Config(vocab_size=int(config["vocab"]), n_positions=s, n_embd=int(config["d_model"]),
                     n_layer=int(config["layers"]), n_head=int(config["heads"]), resid_pdrop=float(config["dropout"]),
                     embd_pdrop=float(config["dropout"]), attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg).to(device, dtype).train()
    ids = torch.randint(0, cfg.vocab_size, (b, s), device=device)
    loss = lambda mdl=model: mdl(input_ids=ids, labels=ids).loss  # noqa: E731
    blocks = list(model.transformer.h)
    params = list(model.parameters())
    one = torch.ones((), device=device, dtype=dtype)

    def per_block(wrap):
        def fwd():
            with _wrapped_blocks(blocks, wrap):
                return loss()
        return fwd

    # HF's own gradient checkpointing (transformers 5.24: use_reentrant=False by default).
    gc_model = copy.deepcopy(model)
    gc_model.gradient_checkpointing_enable()
    gc_params = list(gc_model.parameters())
    cases = [make_case("eager", loss, one, [], params),
             make_case("HF gradient_checkpointing", lambda: loss(gc_model), one, [], gc_params),
             make_case("torch.utils.checkpoint", per_block(providers.checkpointed), one, [], params),
             make_case("selective AC (matmuls)", per_block(providers.selective), one, [], params)]
    reason = None if with_compile else "--no-compile"
    reason = reason or providers.compile_unavailable_reason(device)
    for budget in providers.COMPILE_BUDGETS:
        if reason is None:
            f = providers.compiled_with_budget(lambda: loss(), budget)
            cases.append(make_case(f"compile budget {budget}", f, one, [], params))
        else:
            print(f"  skipped compile budget {budget}: {reason}")
    converted = ckpt_ops.convert(model, inplace=False)
    cparams = list(converted.parameters())
    for be in backends:
        for level in _block.LEVELS:
            def fwd(level=level, be=be):
                ckpt_ops.convert(converted, recompute=level, backend=be)  # re-convert: sets the level
                return loss(converted)
            cases.append(make_case(f"ckpt_ops {level} [{be}]", fwd, one, [], cparams))
    return cases


def run(args, device, dtype) -> list:
    reason = unavailable_reason()
    if reason is not None:
        print(f"- model: skipped ({reason})")
        return []
    results = []
    backends = providers.ckpt_backends("attention", device, args.backends)
    for s in args.seqs or [512]:
        config = {"batch": args.batch, "seq": s, "d_model": args.d_model, "heads": args.heads,
                  "layers": args.layers, "vocab": args.vocab, "dropout": args.dropout}
        results += run_cases(f"gpt2 x{args.layers} S={s}", config,
                             setup(config, device, dtype, backends, not args.no_compile), args, device)
    return results
