"""``ckpt_ops.convert(model)``: swap supported modules of an existing model for fused checkpointed
ones, in place, keeping every ``Parameter`` object and every ``state_dict`` key.

One generic mechanism: an *adapter* per supported module type knows (1) whether a module can be
converted at all, and (2) at call time, whether this particular call can be served exactly. A
converted module keeps its class, parameters and children; only its ``forward`` is overridden *on
the instance* (other models of the same class are untouched). A call the fused path cannot serve
exactly -- a KV cache being filled for generation, attention weights requested, cross-attention,
attention-probability dropout in training, masks that are not causal + padding, mixed dtypes,
autocast -- runs the module's original forward, and the reason is counted in the report. Never a
wrong answer.

Supported: Hugging Face ``transformers`` ``GPT2Block`` (Conv1D weights are used transposed, as
views) and ``LlamaDecoderLayer`` (the model's own rotary tables), both as ONE checkpointed segment
(``ckpt_ops.block``), the separate q/k/v projections running as three GEMMs into one packed buffer;
``torch.nn.LayerNorm``, ``torch.nn.RMSNorm`` and ``LlamaRMSNorm`` anywhere
else.

As Hugging Face's own gradient checkpointing does, a training call (module in train mode, grad
enabled) does not fill an empty KV cache the model created by default (``use_cache=True``); the
cache stays empty. In eval mode, or when the cache already holds tokens, the original forward runs.
"""
from __future__ import annotations

import logging
import types
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import torch

from ckpt_ops import attention as _attn
from ckpt_ops import block as _block
from ckpt_ops import mlp as _mlp
from ckpt_ops import norm as _norm
from ckpt_ops.reference import attention_valid

log = logging.getLogger("ckpt_ops")

__all__ = ["convert", "conversion_report", "unconvert"]

_REPORTS: "weakref.WeakKeyDictionary[torch.nn.Module, Dict[str, Any]]" = weakref.WeakKeyDictionary()


class Unservable(Exception):
    """Raised inside an adapter when a call cannot be served exactly by the fused path."""


# ------------------------------------------------------------------------------------------------
# Helpers shared by the adapters
# ------------------------------------------------------------------------------------------------
_MASK_CACHE: Dict[str, Any] = {"ref": None, "version": None, "out": None}


def key_mask_from_hf(mask: Optional[torch.Tensor], b: int, s: int, causal: bool) -> Optional[torch.Tensor]:
    """The (B, S) key-padding mask equivalent to a Hugging Face 4-D attention mask, or Unservable.

    HF passes None (plain causal), a bool (B, 1, S, S) mask (True = attend, sdpa) or an additive
    float one (0 = attend, finfo.min = masked, eager). The conversion is accepted only if the 4-D
    mask equals exactly causal & padding; one mask object serves every layer of a forward, so the
    check runs once per forward (cached on the tensor's identity and version)."""
    if mask is None:
        return None
    if _MASK_CACHE["ref"] is not None and _MASK_CACHE["ref"]() is mask and _MASK_CACHE["version"] == mask._version:
        out = _MASK_CACHE["out"]
        if isinstance(out, Unservable):
            raise out
        return out
    try:
        out = _convert_mask(mask, b, s, causal)
    except Unservable as e:
        out = e
    _MASK_CACHE.update(ref=weakref.ref(mask), version=mask._version, out=out)
    if isinstance(out, Unservable):
        raise out
    return out


def _convert_mask(mask: torch.Tensor, b: int, s: int, causal: bool) -> Optional[torch.Tensor]:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (s, s) or mask.shape[0] not in (1, b):
        raise Unservable(f"attention mask of shape {tuple(mask.shape)} (not (B, 1, S, S) with S = query length)")
    if mask.dtype == torch.bool:
        valid = mask[:, 0]
    elif mask.dtype.is_floating_point:
        low = torch.finfo(mask.dtype).min
        if not ((mask == 0) | (mask == low)).all():
            raise Unservable("additive attention mask with values other than 0 and the dtype's minimum (a bias)")
        valid = mask[:, 0] == 0
        if not bool(valid.any(dim=-1).all()):
            # softmax over a row of equal minima averages every value: not what a fused kernel
            # computes for a row with no key (exact zeros), so such calls stay on the original path
            raise Unservable("additive mask with rows that attend to no key (left padding under eager attention)")
    else:
        raise Unservable(f"attention mask of dtype {mask.dtype}")
    keys = valid[:, -1, :] if causal else valid.any(dim=1)
    expected = attention_valid(keys, valid.shape[0], s, causal, mask.device)[:, 0]
    if not torch.equal(expected, valid):
        raise Unservable("attention mask is not exactly causal & key padding (packed sequences, windows, "
                         "or fully masked rows unmasked by the attention implementation)")
    if bool(keys.all()):
        return None
    return keys.expand(b, s).contiguous() if keys.shape[0] != b else keys.contiguous()


def _check_cache(module: torch.nn.Module, cache: Any, layer_idx: Optional[int]) -> None:
    """A KV cache may be passed along in training (HF creates one by default); it is served only
    when it is empty and the call trains (as HF gradient checkpointing, it is not filled)."""
    if cache is None:
        return
    if not (module.training and torch.is_grad_enabled()):
        raise Unservable("KV cache in use (inference/generation)")
    try:
        seen = cache.get_seq_length(layer_idx) if layer_idx is not None else cache.get_seq_length()
    except Exception as e:  # unknown cache type
        raise Unservable(f"KV cache of type {type(cache).__name__}: {e}") from None
    if seen:
        raise Unservable("KV cache already holds tokens")


def _check_dtypes(x: torch.Tensor, module: torch.nn.Module) -> None:
    if torch.is_autocast_enabled(x.device.type):
        raise Unservable("autocast (run the original forward under its casting policy)")
    for p in module.parameters():
        if p.dtype != x.dtype or p.device != x.device:
            raise Unservable(f"parameter dtype/device {p.dtype}/{p.device} differs from the input's "
                             f"{x.dtype}/{x.device}")


# ------------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------------
class Adapter:
    """Converts one kind of module. Subclasses define `kind`, `matches`, `static_reason`,
    `fused`."""
    kind = "module"

    def matches(self, module: torch.nn.Module) -> bool:
        raise NotImplementedError

    def static_reason(self, module: torch.nn.Module) -> Optional[str]:
        """None when the module can be converted, else why not (it is then left alone)."""
        return None

    def fused(self, module: torch.nn.Module, state: "_State", args: tuple, kwargs: dict):
        """The fused result of module(*args, **kwargs), or raise Unservable."""
        raise NotImplementedError


def _hf_class(module_path: str, name: str):
    try:
        mod = __import__(module_path, fromlist=[name])
        return getattr(mod, name)
    except Exception:  # transformers not installed, or another version without it
        return None


_ACTS_GPT2 = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
              "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACTS_LLAMA = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


class _BlockAdapter(Adapter):
    """Shared call path of the transformer-block adapters: subclasses extract the parameters and
    configs; this class checks the call and runs ckpt_ops.block."""

    def _run(self, module, state, x, mask4d, attn_p: dict, mlp_p: dict, attn_kw: dict, mlp_kw: dict,
             cos=None, sin=None):
        if x.dim() != 3:
            raise Unservable(f"hidden states of shape {tuple(x.shape)}")
        _check_dtypes(x, module)
        b, s, _ = x.shape
        key_mask = key_mask_from_hf(mask4d, b, s, causal=True)
        level = state.recompute
        qkv_w = attn_p["wq"] if attn_p["wk"] is None else (attn_p["wq"], attn_p["wk"], attn_p["wv"])
        qkv_b = attn_p["bq"] if attn_p["wk"] is None else (
            None if attn_p["bq"] is None else (attn_p["bq"], attn_p["bk"], attn_p["bv"]))
        acfg, mask, c, sn = _attn.prepare(
            x, qkv_w, qkv_b, attn_p["wo"], attn_p["bo"], attention_mask=key_mask, causal=True,
            rope_cos=cos, rope_sin=sin, training=module.training, recompute=_block._ATTN_LEVEL[level],
            backend=state.backend, **attn_kw)
        mcfg = _mlp.prepare(x, mlp_p["w1"], mlp_p["b1"], mlp_p["w2"], mlp_p["b2"], gate_weight=mlp_p["wg"],
                            gate_bias=mlp_p["bg"], training=module.training, recompute=_block._MLP_LEVEL[level],
                            backend=state.backend, residual=True, **mlp_kw)
        return _block.transformer_block(x, attn_p, mlp_p, acfg, mcfg, level, mask, c, sn)


class GPT2BlockAdapter(_BlockAdapter):
    kind = "GPT2Block"

    def __init__(self):
        self.cls = _hf_class("transformers.models.gpt2.modeling_gpt2", "GPT2Block")

    def matches(self, module):
        return self.cls is not None and isinstance(module, self.cls)

    def static_reason(self, module):
        act = module.mlp.act.__class__.__name__
        fn = getattr(module.attn.config, "activation_function", None)
        if fn not in _ACTS_GPT2:
            return f"activation {fn!r} ({act}) has no fused kernel"
        return None

    def fused(self, module, state, args, kwargs):
        names = ("hidden_states", "cache", "attention_mask", "encoder_hidden_states")
        call = dict(zip(names, args))
        call.update(kwargs)
        x = call["hidden_states"]
        if call.get("encoder_hidden_states") is not None:
            raise Unservable("cross-attention")
        if call.get("output_attentions"):
            raise Unservable("attention weights requested")
        _check_cache(module, call.get("cache", call.get("past_key_values")), module.attn.layer_idx)
        attn, mlp = module.attn, module.mlp
        if module.training and attn.attn_dropout.p > 0:
            raise Unservable("attention-probability dropout in training (attn_pdrop > 0)")
        cfg = attn.config
        attn_p = {"nw": module.ln_1.weight, "nb": module.ln_1.bias, "wq": attn.c_attn.weight.t(), "wk": None,
                  "wv": None, "bq": attn.c_attn.bias, "bk": None, "bv": None, "wo": attn.c_proj.weight.t(),
                  "bo": attn.c_proj.bias}
        mlp_p = {"nw": module.ln_2.weight, "nb": module.ln_2.bias, "w1": mlp.c_fc.weight.t(), "b1": mlp.c_fc.bias,
                 "wg": None, "bg": None, "w2": mlp.c_proj.weight.t(), "b2": mlp.c_proj.bias}
        attn_kw = dict(num_heads=attn.num_heads, num_kv_heads=attn.num_heads, scale=attn.scaling, norm="layernorm",
                       norm_weight=attn_p["nw"], norm_bias=attn_p["nb"], norm_eps=module.ln_1.eps, rope=False,
                       rope_theta=10000.0, dropout=attn.resid_dropout.p, residual=True)
        mlp_kw = dict(activation=_ACTS_GPT2[cfg.activation_function], norm="layernorm", norm_weight=mlp_p["nw"],
                      norm_bias=mlp_p["nb"], norm_eps=module.ln_2.eps, dropout=mlp.dropout.p)
        return self._run(module, state, x, call.get("attention_mask"), attn_p, mlp_p, attn_kw, mlp_kw)


class LlamaDecoderLayerAdapter(_BlockAdapter):
    kind = "LlamaDecoderLayer"

    def __init__(self):
        self.cls = _hf_class("transformers.models.llama.modeling_llama", "LlamaDecoderLayer")
        self.norm_cls = _hf_class("transformers.models.llama.modeling_llama", "LlamaRMSNorm")

    def matches(self, module):
        return self.cls is not None and isinstance(module, self.cls)

    def static_reason(self, module):
        act = getattr(module.mlp.config, "hidden_act", None)
        if act not in _ACTS_LLAMA:
            return f"hidden_act {act!r} has no fused kernel"
        for n in (module.input_layernorm, module.post_attention_layernorm):
            if self.norm_cls is None or type(n) is not self.norm_cls:
                return f"norm of type {type(n).__name__}"
        return None

    def fused(self, module, state, args, kwargs):
        call = dict(zip(("hidden_states", "attention_mask", "position_ids", "cache", "use_cache",
                         "position_embeddings"), args))
        call.update(kwargs)
        x = call["hidden_states"]
        if call.get("output_attentions"):
            raise Unservable("attention weights requested")
        attn, mlp = module.self_attn, module.mlp
        _check_cache(module, call.get("cache", call.get("past_key_values")), attn.layer_idx)
        if module.training and attn.attention_dropout > 0:
            raise Unservable("attention-probability dropout in training (attention_dropout > 0)")
        pe = call.get("position_embeddings")
        if pe is None:
            raise Unservable("no position_embeddings passed (older transformers call convention)")
        cos, sin = _half_tables(pe[0], pe[1], attn.head_dim)
        cfg = attn.config
        attn_p = {"nw": module.input_layernorm.weight, "nb": None, "wq": attn.q_proj.weight,
                  "wk": attn.k_proj.weight, "wv": attn.v_proj.weight, "bq": attn.q_proj.bias,
                  "bk": attn.k_proj.bias, "bv": attn.v_proj.bias, "wo": attn.o_proj.weight, "bo": attn.o_proj.bias}
        mlp_p = {"nw": module.post_attention_layernorm.weight, "nb": None, "w1": mlp.up_proj.weight,
                 "b1": mlp.up_proj.bias, "wg": mlp.gate_proj.weight, "bg": mlp.gate_proj.bias,
                 "w2": mlp.down_proj.weight, "b2": mlp.down_proj.bias}
        attn_kw = dict(num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, scale=attn.scaling,
                       norm="rmsnorm", norm_weight=attn_p["nw"], norm_bias=None,
                       norm_eps=module.input_layernorm.variance_epsilon, rope=True, rope_theta=10000.0,
                       dropout=0.0, residual=True)
        mlp_kw = dict(activation=_ACTS_LLAMA[cfg.hidden_act], norm="rmsnorm", norm_weight=mlp_p["nw"], norm_bias=None,
                      norm_eps=module.post_attention_layernorm.variance_epsilon, dropout=0.0)
        return self._run(module, state, x, call.get("attention_mask"), attn_p, mlp_p, attn_kw, mlp_kw, cos, sin)


_TABLE_CACHE: Dict[str, Any] = {"ref": None, "out": None}


def _half_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """HF rotary tables (B, S, hd) repeat their first half; ckpt_ops takes (B, S, hd/2). Checked
    once per forward (the same tensors serve every layer)."""
    if _TABLE_CACHE["ref"] is not None and _TABLE_CACHE["ref"]() is cos:
        return _TABLE_CACHE["out"]
    h = head_dim // 2
    if cos.shape[-1] != head_dim or not (torch.equal(cos[..., :h], cos[..., h:]) and
                                         torch.equal(sin[..., :h], sin[..., h:])):
        raise Unservable("rotary tables are not of the rotate-half form (cos/sin halves differ)")
    out = (cos[..., :h].contiguous(), sin[..., :h].contiguous())
    _TABLE_CACHE.update(ref=weakref.ref(cos), out=out)
    return out


class NormAdapter(Adapter):
    """torch.nn.LayerNorm, torch.nn.RMSNorm and LlamaRMSNorm."""
    kind = "norm"

    def __init__(self):
        self.llama = _hf_class("transformers.models.llama.modeling_llama", "LlamaRMSNorm")

    def matches(self, module):
        if type(module) in (torch.nn.LayerNorm, torch.nn.RMSNorm):
            return True
        return self.llama is not None and type(module) is self.llama

    def fused(self, module, state, args, kwargs):
        if len(args) != 1 or kwargs:
            raise Unservable("unexpected call arguments")
        x = args[0]
        _check_dtypes(x, module)
        if isinstance(module, torch.nn.LayerNorm):
            return _norm.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps,
                                    backend=state.backend)
        if isinstance(module, torch.nn.RMSNorm):
            return _norm.rms_norm(x, module.normalized_shape, module.weight, module.eps, backend=state.backend)
        return _norm.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon, backend=state.backend)


ADAPTERS: List[Adapter] = []


def _adapters() -> List[Adapter]:
    if not ADAPTERS:
        ADAPTERS.extend([GPT2BlockAdapter(), LlamaDecoderLayerAdapter(), NormAdapter()])
    return ADAPTERS


# ------------------------------------------------------------------------------------------------
# The swap mechanism
# ------------------------------------------------------------------------------------------------
class _State:
    __slots__ = ("adapter", "recompute", "backend", "report", "__weakref__")

    def __init__(self, adapter, recompute, backend, report):
        self.adapter, self.recompute, self.backend, self.report = adapter, recompute, backend, report


def _converted_forward(self, *args, **kwargs):
    state: _State = self._ckpt_ops_state
    try:
        out = state.adapter.fused(self, state, args, kwargs)
        state.report["fused_calls"][state.adapter.kind] += 1
        return out
    except Unservable as e:
        key = f"{state.adapter.kind}: {e}"
        if key not in state.report["fallbacks"]:
            log.info("ckpt_ops.convert: %s runs its original forward (%s)", state.adapter.kind, e)
        state.report["fallbacks"][key] += 1
        return type(self).forward(self, *args, **kwargs)


def convert(model: torch.nn.Module, recompute: str = "full", inplace: bool = True, *,
            backend: Optional[str] = None, memory_budget=None, example_inputs=None) -> torch.nn.Module:
    """Swap the supported modules of `model` for fused checkpointed equivalents (see the module
    docstring) and return the model (a deep copy when ``inplace=False``).

    recompute: "full" | "keep_attn" | "keep_mlp" | "selective" | "none" for transformer blocks (norms have no
    levels). ``conversion_report(model)`` says what was swapped, what was left alone and why, and
    how many calls ran fused or fell back (and why).

    memory_budget (with example_inputs: a tuple of positional arguments or a dict of keyword
    arguments of one training forward): then apply ``ckpt_ops.plan(model, ..., budget=memory_budget)``
    (per-layer levels and outer segments; see ckpt_ops.planner) instead of one level everywhere."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if recompute not in _block.LEVELS:
        raise ValueError(f"recompute must be one of {_block.LEVELS}; got {recompute!r}")
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    report = _REPORTS.get(model) or {"swapped": [], "left": [], "fused_calls": Counter(), "fallbacks": Counter()}
    done: List[str] = []  # converted subtrees: their descendants are served by them
    for name, module in model.named_modules():
        if any(d == "" or name.startswith(d + ".") for d in done):
            continue
        if hasattr(module, "_ckpt_ops_state"):  # converted before: update the level
            module._ckpt_ops_state.recompute, module._ckpt_ops_state.backend = recompute, backend
            done.append(name)
            continue
        for adapter in _adapters():
            if adapter.matches(module):
                why = adapter.static_reason(module)
                if why is not None:
                    report["left"].append((name, type(module).__name__, why))
                    break
                module._ckpt_ops_state = _State(adapter, recompute, backend, report)
                module.forward = types.MethodType(_converted_forward, module)
                report["swapped"].append((name, type(module).__name__))
                done.append(name)
                break
    _REPORTS[model] = report
    if memory_budget is not None:
        from ckpt_ops.planner import plan_with_inputs

        plan_with_inputs(model, memory_budget, example_inputs).apply(model)
    return model


def conversion_report(model: torch.nn.Module) -> Dict[str, Any]:
    """What convert() did to `model`: {"swapped": [(name, class)], "left": [(name, class, why)],
    "fused_calls": {kind: n}, "fallbacks": {"kind: reason": n}}."""
    r = _REPORTS.get(model)
    if r is None:
        raise ValueError("this model was not converted by ckpt_ops.convert")
    return {"swapped": list(r["swapped"]), "left": list(r["left"]), "fused_calls": dict(r["fused_calls"]),
            "fallbacks": dict(r["fallbacks"])}


def unconvert(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the original forwards (parameters were never touched)."""
    for module in model.modules():
        if hasattr(module, "_ckpt_ops_state"):
            del module._ckpt_ops_state
            module.__dict__.pop("forward", None)
    _REPORTS.pop(model, None)
    return model
