"""``python -m bench --op lora``: a PEFT LoRA fine-tuning step of a Llama-shaped stack (default d 1024,
16 heads, 2816 MLP, S 512, batch 1, 2 layers, LoRA r 16 on q/k/v/o/gate/up/down, frozen base
weights) with three providers, measured in one process, interleaved (DESIGN 5):

* ``ckpt_ops full``: ``ckpt_ops.convert(peft_model, recompute="full")`` (LoRA fused in the block)
* ``PEFT + HF checkpointing``: ``gradient_checkpointing_enable()`` (+ ``enable_input_require_grads()``)
* ``PEFT``: no checkpointing (the speed baseline)

Prints the median step time (forward + backward of the LM loss, p20-p80), the ratio to each of the
other two providers (paired per repetition), and the saved bytes of a forward (ckpt_ops.saved_bytes:
saved-tensor hooks, parameters excluded). torch.utils.checkpoint holds the layers' non-tensor-argument
inputs (the rotary cos/sin tuple) in its own frame, outside those hooks, so for
``PEFT + HF checkpointing`` those bytes are added (from the shapes) and the row says so.
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Dict, List

import torch


def build(args, device, dtype, provider: str):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import ckpt_ops

    d, heads = args.d_model, args.heads
    cfg = LlamaConfig(hidden_size=d, intermediate_size=args.d_hidden or int(2.75 * d) // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      vocab_size=args.vocab, max_position_embeddings=max(args.seqs), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    lcfg = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=args.lora_dropout,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(1)
    model = peft.get_peft_model(model, lcfg, autocast_adapter_dtype=False).train()
    if provider == "ckpt_ops full":
        ckpt_ops.convert(model, recompute="full")
    elif provider == "PEFT + HF checkpointing":
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    return model


PROVIDERS = ("ckpt_ops full", "PEFT + HF checkpointing", "PEFT")


def run_cli(args, device, dtype) -> int:
    import ckpt_ops

    s, b = args.seqs[0] if args.seqs else 512, args.batch
    args.seqs = [s]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (b, s), generator=g).to(device)
    models = {p: build(args, device, dtype, p) for p in PROVIDERS}

    def step(model):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    saved: Dict[str, int] = {}
    stack: Dict[str, int] = {}  # the decoder stack alone (no LM head / loss, whose logits dominate at small S)
    for p, m in models.items():
        saved[p] = ckpt_ops.saved_bytes(m, input_ids=ids, labels=ids, use_cache=False)
        stack[p] = ckpt_ops.saved_bytes(m.get_base_model().model, input_ids=ids, use_cache=False)
    # torch.utils.checkpoint holds the layers' rotary tables (one shared cos/sin pair, 2 S hd
    # elements) in its own frame, outside the saved-tensor hooks: added so the comparison is fair
    hd = args.d_model // args.heads
    for d in (saved, stack):
        d["PEFT + HF checkpointing"] += 2 * s * hd * (torch.finfo(dtype).bits // 8)
    times: Dict[str, List[float]] = {p: [] for p in PROVIDERS}
    for _ in range(args.warmup):
        for m in models.values():
            step(m)
    for _ in range(args.reps):
        for p, m in models.items():  # interleaved: the same machine load for every provider
            t0 = time.perf_counter()
            step(m)
            times[p].append(time.perf_counter() - t0)
    rep = ckpt_ops.conversion_report(models["ckpt_ops full"])
    print(f"# LoRA step: Llama-shaped stack d {args.d_model}, heads {args.heads}, layers {args.layers}, S {s}, "
          f"batch {b}, r {args.lora_r}, lora_dropout {args.lora_dropout}, {dtype}, reps {args.reps}; "
          f"ckpt_ops fused calls {rep['fused_calls']}, fallbacks {rep['fallbacks'] or 'none'}")
    print(f"{'provider':<26}{'median s':>10}{'p20':>8}{'p80':>8}{'saved MB':>10}{'stack MB':>10}")
    rows = []
    for p in PROVIDERS:
        ts = sorted(times[p])
        q = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))]  # noqa: E731
        note = " (+ the rotary tables checkpoint holds outside the hooks)" if p == "PEFT + HF checkpointing" else ""
        print(f"{p:<26}{statistics.median(ts):>10.3f}{q(0.2):>8.3f}{q(0.8):>8.3f}{saved[p] / 1e6:>10.2f}"
              f"{stack[p] / 1e6:>10.2f}{note}")
        rows.append({"provider": p, "median_s": statistics.median(ts), "times": times[p], "saved_bytes": saved[p],
                     "stack_saved_bytes": stack[p]})
    base = "ckpt_ops full"
    for other in PROVIDERS[1:]:
        r = statistics.median(a / c for a, c in zip(times[base], times[other]))
        print(f"ckpt_ops full / {other}: time {r:.3f}x (paired median), saved bytes "
              f"{saved[base] / saved[other]:.3f}x (decoder stack alone {stack[base] / stack[other]:.3f}x)")
        rows.append({"ratio": f"{base} / {other}", "time": r, "saved_bytes": saved[base] / saved[other],
                     "stack_saved_bytes": stack[base] / stack[other]})
    if args.out:
        import os

        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench-lora.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0
