"""End to end: a Hugging Face causal LM (``--family``: GPT-2 by default, or any fused Llama-like
family -- llama, mistral, qwen2, phi3, gemma; random init from its config, no download;
language-model loss over random tokens) trained one step per provider: eager, torch.utils.checkpoint and
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


FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "phi3", "gemma")
_PREFIX = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "phi3": "Phi3", "gemma": "Gemma"}


def build_model(config: Dict[str, object]) -> torch.nn.Module:
    """The family's causal LM with random weights. GPT-2: residual/embedding dropout
    ``config["dropout"]``, attention-probability dropout ``config["attn_dropout"]`` (default 0, as the
    README's figures were taken; fused in the attention kernels when > 0). Llama-like families: residual
    dropout none (as they train), ``attention_dropout`` = ``config["attn_dropout"]``, hidden 4/3 x 2 x d (SwiGLU /
    GeGLU sized like Llama's 8/3 d, rounded to 64), GQA with a third of the heads as KV heads where
    that divides, head_dim d / heads."""
    import transformers

    family = str(config.get("family", "gpt2"))
    s, d, h, n, v = (int(config[k]) for k in ("seq", "d_model", "heads", "layers", "vocab"))
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=v, n_positions=s, n_embd=d, n_layer=n, n_head=h,
                                      resid_pdrop=float(config["dropout"]), embd_pdrop=float(config["dropout"]),
                                      attn_pdrop=float(config.get("attn_dropout", 0.0)), attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg)
    if family not in _PREFIX:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")
    kv = h // 3 if h % 3 == 0 else h
    cfg = getattr(transformers, f"{_PREFIX[family]}Config")(
        vocab_size=v, hidden_size=d, intermediate_size=max(64, (8 * d // 3 + 63) // 64 * 64), num_hidden_layers=n,
        num_attention_heads=h, num_key_value_heads=kv, head_dim=d // h, max_position_embeddings=max(s, 128),
        attention_dropout=float(config.get("attn_dropout", 0.0)), attn_implementation="sdpa", pad_token_id=0)
    return getattr(transformers, f"{_PREFIX[family]}ForCausalLM")(cfg)


def setup(config: Dict[str, object], device: torch.device, dtype: torch.dtype, backends: List[str],
          with_compile: bool = True) -> List[Case]:
    b, s = int(config["batch"]), int(config["seq"])
    torch.manual_seed(0)
    model = build_model(config).to(device, dtype).train()
    ids = torch.randint(0, model.config.vocab_size, (b, s), device=device)
    loss = lambda mdl=model: mdl(input_ids=ids, labels=ids).loss  # noqa: E731
    blocks = list(model.transformer.h if hasattr(model, "transformer") else model.model.layers)
    params = list(model.parameters())
    one = torch.ones((), device=device, dtype=dtype)

    def per_block(wrap):
        def fwd():
            with _wrapped_blocks(blocks, wrap):
                return loss()
        return fwd

    # HF's own gradient checkpointing (transformers 5.24: use_reentrant=False by default).
    gc_model = copy.deepcopy(model)
    gc_model.activation_checkpointing_enable()  # transformers 5.24: use_reentrant=False
    gc_params = list(gc_model.parameters())
    cases = [make_case("eager", loss, one, [], params),
             make_case("HF gradient_checkpointing", lambda: loss(gc_model), one, [], gc_params),
             make_case("torch.utils.checkpoint", per_block(providers.checkpointed), one, [], params),
             make_case("selective AC (matmuls)", per_block(providers.selective), one, [], params)]
    reason = None if with_compile else "--no-compile"
    reason = reason or providers.compile_unavailable_reason(device)
    whole = lambda: loss()  # noqa: E731  (one function for every budget: one budget-1.0 reference)
    for budget in providers.COMPILE_BUDGETS:
        if reason is None:
            f = providers.compiled_with_budget(whole, budget)
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
        family = getattr(args, "family", "gpt2") or "gpt2"
        config = {"family": family, "batch": args.batch, "seq": s, "d_model": args.d_model, "heads": args.heads,
                  "layers": args.layers, "vocab": args.vocab, "dropout": args.dropout if family == "gpt2" else 0.0,
                  "attn_dropout": getattr(args, "attn_dropout", 0.0)}
        results += run_cases(f"{family} x{args.layers} S={s}", config,
                             setup(config, device, dtype, backends, not args.no_compile), args, device)
    return results
