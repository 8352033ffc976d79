"""The adapters of ``ckpt_ops.convert``: GPT-2's block, the Llama-like decoder layers (one small
declarative :class:`Family` each), the norms, and the decoder layers known to be left (with why).

Adding a Llama-like family (pre-norm RMSNorm, q/k/v/o + gated MLP, rotate-half RoPE tables passed as
``position_embeddings``) is one :class:`Family` entry in ``FAMILIES``; so are its variants with q/k
RMSNorms before RoPE (Qwen3, Gemma3 per head; OLMo2 over the whole projection) and with
post-sublayer norms, with or without the pre-norms (Gemma2/3: both; OLMo2: post-norms only).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ckpt_ops import _amp
from ckpt_ops import attention as _attn
from ckpt_ops import block as _block
from ckpt_ops import lora as _lora
from ckpt_ops import mlp as _mlp
from ckpt_ops import norm as _norm
from ckpt_ops._convert_guard import Guard, Unservable
from ckpt_ops.reference import attention_valid

Linear = (torch.nn.Linear,)


def _hf_class(module_path: str, name: str):
    try:
        mod = __import__(module_path, fromlist=[name])
        return getattr(mod, name)
    except Exception:  # transformers not installed, or another version without it
        return None


# ------------------------------------------------------------------------------------------------
# Call checks shared by the block adapters
# ------------------------------------------------------------------------------------------------
_MASK_CACHE: Dict[str, Any] = {"ref": None, "version": None, "window": None, "out": None}


def key_mask_from_hf(mask: Optional[torch.Tensor], b: int, s: int, causal: bool,
                     window: int = 0) -> Optional[torch.Tensor]:
    """The (B, S) key-padding mask equivalent to a Hugging Face 4-D attention mask, or Unservable.

    HF passes None (plain causal), a bool (B, 1, S, S) mask (True = attend, sdpa) or an additive
    float one (0 = attend, finfo.min = masked, eager). The conversion is accepted only if the 4-D
    mask equals exactly causal & padding (``window`` w > 0: sliding-window causal & padding, query i
    sees keys i - w < j <= i: transformers' sliding_window_causal_mask_function); one mask object
    serves every layer of a forward, so the check runs once per forward and window (cached on the
    tensor's identity and version). Under torch.compile see :func:`_traced_mask`."""
    if mask is None:
        return None
    if torch.compiler.is_compiling():
        return _traced_mask(mask, b, s, causal, window)
    if _MASK_CACHE["ref"] is not None and _MASK_CACHE["ref"]() is mask and _MASK_CACHE["version"] == mask._version \
            and _MASK_CACHE["window"] == window:
        out = _MASK_CACHE["out"]
        if isinstance(out, Unservable):
            raise out
        return out
    try:
        out = _convert_mask(mask, b, s, causal, window)
    except Unservable as e:
        out = e
    _MASK_CACHE.update(ref=weakref.ref(mask), version=mask._version, window=window, out=out)
    if isinstance(out, Unservable):
        raise out
    return out


def _check_mask_shape(mask: torch.Tensor, b: int, s: int) -> None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (s, s) or mask.shape[0] not in (1, b):
        raise Unservable(f"attention mask of shape {tuple(mask.shape)} (not (B, 1, S, S) with S = query length)")


NOT_CAUSAL_PADDING = ("attention mask is not exactly causal & key padding (packed sequences, windows, "
                      "or fully masked rows unmasked by the attention implementation)")


def _keys_of(valid: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """The key-padding candidate of a (B, S, S) bool mask: under causal the last row (which sees every
    key); with a window the diagonal (key j is seen by query j unless padded); else any row."""
    if window > 0:
        return torch.diagonal(valid, dim1=-2, dim2=-1)
    return valid[:, -1, :] if causal else valid.any(dim=1)


def _not_expected(window: int) -> str:
    if window > 0:
        return (f"attention mask is not exactly sliding-window ({window}) causal & key padding (packed "
                "sequences, another window, or fully masked rows unmasked by the attention implementation)")
    return NOT_CAUSAL_PADDING


def _convert_mask(mask: torch.Tensor, b: int, s: int, causal: bool, window: int = 0) -> Optional[torch.Tensor]:
    _check_mask_shape(mask, b, s)
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
    keys = _keys_of(valid, causal, window)
    expected = attention_valid(keys, valid.shape[0], s, causal, mask.device, window)[:, 0]
    if not torch.equal(expected, valid):
        raise Unservable(_not_expected(window))
    if bool(keys.all()):
        return None
    return keys.expand(b, s).contiguous() if keys.shape[0] != b else keys.contiguous()


def require(ok: torch.Tensor, why: str) -> None:
    """Inside a torch.compile graph: a check on tensor *values* that the fused path needs. A
    compiled graph cannot branch to the original forward on data, so the graph asserts it
    (``torch._assert_async``: a RuntimeError naming the reason when a call breaks it) instead of
    returning what the unconverted model would not."""
    torch._assert_async(ok, f"ckpt_ops.convert under torch.compile: {why}; the compiled graph cannot switch to "
                            "the original forward on tensor values: call this model eagerly or "
                            "ckpt_ops.unconvert it")


def _traced_mask(mask: torch.Tensor, b: int, s: int, causal: bool, window: int = 0) -> torch.Tensor:
    """key_mask_from_hf under torch.compile: no Python bool of a tensor. Shape and dtype decide at
    trace time (they are static to the graph); a bool mask's causal & padding form is asserted in
    the graph (:func:`require`); an additive float mask (eager attention) is served only where
    rows that attend to no key can be ruled out, which needs its values: it falls back at trace
    time. The all-True case is not special-cased (a key mask of ones is exact too)."""
    _check_mask_shape(mask, b, s)
    if mask.dtype != torch.bool:
        raise Unservable(f"under torch.compile: a {mask.dtype} additive attention mask (eager attention) needs a "
                         "check of its values (rows attending to no key) that a compiled graph cannot branch on")
    valid = mask[:, 0]
    keys = _keys_of(valid, causal, window)
    expected = attention_valid(keys, valid.shape[0], s, causal, mask.device, window)[:, 0]
    require((expected == valid).all(), _not_expected(window))
    return keys.expand(b, s).contiguous() if keys.shape[0] != b else keys.contiguous()


def _check_cache(module: torch.nn.Module, cache: Any, layer_idx: Optional[int], can_fill: bool = False) -> bool:
    """A KV cache may be passed along in training (HF creates one by default); it is served only
    when it is empty: a training call does not fill it (as HF gradient checkpointing). An eval call
    with grad enabled (HF fills the cache it creates and returns it) is served when the adapter
    `can_fill` it exactly: returns True, and the adapter must then fill it. Without grad the
    original forward serves (it is already the fastest exact path: no memory to win)."""
    if cache is None:
        return False
    training = module.training and torch.is_grad_enabled()
    if not training and not (can_fill and torch.is_grad_enabled()):
        raise Unservable("KV cache to fill (eval mode or no grad: HF returns it filled; the fused path computes no "
                         "keys/values)")
    try:
        seen = cache.get_seq_length(layer_idx) if layer_idx is not None else cache.get_seq_length()
    except Exception as e:  # unknown cache type
        raise Unservable(f"KV cache of type {type(cache).__name__}: {e}") from None
    if seen:
        raise Unservable("KV cache already holds tokens")
    return not training


def _check_dtypes(x: torch.Tensor, module: torch.nn.Module) -> None:
    # torch.autocast is served fused (ckpt_ops._amp: GEMMs in the autocast dtype, norms in fp32, the
    # residual stream in the dtype the model gives it); parameters and input must still agree.
    adapters = None
    for p in module.parameters():
        if p.dtype != x.dtype or p.device != x.device:
            if adapters is None:  # built once, and only when some parameter differs
                adapters = _lora_param_ids(module)
            if id(p) in adapters:  # PEFT's adapters: their dtype is ckpt_ops.lora.read's question
                continue
            raise Unservable(f"parameter dtype/device {p.dtype}/{p.device} differs from the input's "
                             f"{x.dtype}/{x.device}")


def _lora_param_ids(module: torch.nn.Module) -> set:
    """ids of the PEFT LoRA adapter weights (lora_A / lora_B) inside `module`."""
    return {id(q) for n, q in module.named_parameters() if "lora_A." in n or "lora_B." in n}


_KNOWN_KWARGS = {"hidden_states", "attention_mask", "position_ids", "cache", "past_key_values", "layer_past", "use_cache",
                 "cache_position", "position_embeddings", "output_attentions", "encoder_hidden_states"}


# passed down to every layer by transformers (TransformersKwargs) without changing what it computes
_INERT_KWARGS = {"num_items_in_batch", "output_hidden_states", "output_router_logits", "encoder_attention_mask",
                 "return_dict"}


def _bind(names: Tuple[str, ...], args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name. Anything not known to be served (packed-sequence metadata
    such as cu_seq_lens_q / max_length_q / seq_idx, is_causal=False, ...) is Unservable."""
    call = dict(zip(names, args))
    call.update(kwargs)
    for k, v in call.items():
        if k == "is_causal" and v is False:
            raise Unservable("is_causal=False")
        if k not in _KNOWN_KWARGS and k not in _INERT_KWARGS and k != "is_causal" and v is not None \
                and v is not False:
            raise Unservable(f"call argument {k!r} (e.g. packed-sequence metadata) is not served fused")
    if call.get("output_attentions"):
        raise Unservable("attention weights requested")
    return call


_TABLE_CACHE: Dict[str, Any] = {"ref": None, "out": None}


def _half_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                 rotary_dim: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """HF rotary tables (B, S, r) repeat their first half; ckpt_ops takes (B, S, r/2). r is the
    rotary width: head_dim, or GPT-NeoX's rotary_ndims (partial rotary) as `rotary_dim`. Checked
    once per forward (the same tensors serve every layer)."""
    r = head_dim if rotary_dim is None else rotary_dim
    if cos.shape[-1] != r or sin.shape != cos.shape:
        raise Unservable(f"rotary tables of width {cos.shape[-1]} for rotary width {r} (head_dim {head_dim})")
    compiling = torch.compiler.is_compiling()
    if not compiling and _TABLE_CACHE["ref"] is not None and _TABLE_CACHE["ref"]() is cos:
        return _TABLE_CACHE["out"]
    h = r // 2
    why = "rotary tables are not of the rotate-half form (cos/sin halves differ)"
    if compiling:  # asserted in the graph (see require); every layer re-checks (cheap: B*S*hd compares)
        require((cos[..., :h] == cos[..., h:]).all() & (sin[..., :h] == sin[..., h:]).all(), why)
        return cos[..., :h].contiguous(), sin[..., :h].contiguous()
    if not (torch.equal(cos[..., :h], cos[..., h:]) and torch.equal(sin[..., :h], sin[..., h:])):
        raise Unservable(why)
    out = (cos[..., :h].contiguous(), sin[..., :h].contiguous())
    _TABLE_CACHE.update(ref=weakref.ref(cos), out=out)
    return out


def _proj(parent: torch.nn.Module, attr: str, name: str, target: str, x: torch.Tensor, loras: list,
          conv1d: bool = False):
    """(weight, bias) of a projection the block reads (a Conv1D weight as its transposed view); a
    PEFT LoRA wrapper gives its base layer's and appends its active adapters to `loras`
    (ckpt_ops.lora.read; the guard has checked its structure)."""
    m = parent._modules[attr]
    if _lora.is_lora(m):
        m, found = _lora.read(m, target, name, x)
        loras.extend(found)
    return (m.weight.t() if conv1d else m.weight), m.bias


# ------------------------------------------------------------------------------------------------
# Adapters
# ------------------------------------------------------------------------------------------------
class Adapter:
    """Converts one kind of module. Subclasses define `kind`, `matches`, `static_reason`,
    `fused`; block adapters also `guard` (what they read, see ckpt_ops._convert_guard)."""
    kind = "module"
    is_block = False

    def matches(self, module: torch.nn.Module) -> bool:
        raise NotImplementedError

    def static_reason(self, module: torch.nn.Module) -> Optional[str]:
        """None when the module can be converted, else why not (it is then left alone)."""
        return None

    def guard(self, module: torch.nn.Module) -> Optional[Guard]:
        return None

    def fused(self, module: torch.nn.Module, state, args: tuple, kwargs: dict):
        """The fused result of module(*args, **kwargs), or raise Unservable."""
        raise NotImplementedError


_ACTS_GPT2 = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
              "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}
_ACTS_GATED = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


class _BlockAdapter(Adapter):
    """Shared call path of the transformer-block adapters: subclasses extract the parameters and
    configs; this class checks the call and runs ckpt_ops.block."""
    is_block = True

    def _run(self, module, state, x, mask4d, attn_p: dict, mlp_p: dict, attn_kw: dict, mlp_kw: dict,
             cos=None, sin=None, loras=(), *, parallel: bool = False, window: int = 0):
        """`parallel`: out = x + attn(x) + mlp(x) (GPT-NeoX's use_parallel_residual): the attention
        segment (residual) and the MLP segment (no residual) on the same x, as two segment Functions
        at the levels the block level maps to (ckpt_ops.block._ATTN_LEVEL/_MLP_LEVEL); both keep the
        same x, which ckpt_ops.saved_bytes (and autograd) holds once. Without LoRA only. `window`:
        the layer's sliding window (0: none), for the mask check and the attention kernels."""
        if x.dim() != 3:
            raise Unservable(f"hidden states of shape {tuple(x.shape)}")
        _check_dtypes(x, module)
        if loras and _amp.gemm_dtype(x) is not None and any(t.dtype not in _amp.AMP_DTYPES for _, a, b in loras
                                                            for t in (a, b)):
            raise Unservable("PEFT LoRA adapters in a dtype autocast does not cast (e.g. fp64) under torch.autocast")
        b, s, _ = x.shape
        key_mask = key_mask_from_hf(mask4d, b, s, causal=True, window=window)
        level = state.call_level or state.recompute  # HF's checkpointing flags (ckpt_ops._convert_hf)
        qkv_w = attn_p["wq"] if attn_p["wk"] is None else (attn_p["wq"], attn_p["wk"], attn_p["wv"])
        qkv_b = attn_p["bq"] if attn_p["wk"] is None else (
            None if attn_p["bq"] is None else (attn_p["bq"], attn_p["bk"], attn_p["bv"]))
        if parallel:
            if loras:
                raise Unservable("PEFT LoRA adapters on a parallel-residual layer are not served fused")
            a = _attn.attention(x, qkv_w, qkv_b, attn_p["wo"], attn_p["bo"], attention_mask=key_mask, causal=True,
                                rope_cos=cos, rope_sin=sin, training=module.training,
                                recompute=_block._ATTN_LEVEL[level], backend=state.backend,
                                sliding_window=window or None, **attn_kw)
            m = _mlp.mlp(x, mlp_p["w1"], mlp_p["b1"], mlp_p["w2"], mlp_p["b2"], gate_weight=mlp_p["wg"],
                         gate_bias=mlp_p["bg"], training=module.training, recompute=_block._MLP_LEVEL[level],
                         backend=state.backend, residual=False, **mlp_kw)
            return a + m
        acfg, mask, c, sn = _attn.prepare(
            x, qkv_w, qkv_b, attn_p["wo"], attn_p["bo"], attention_mask=key_mask, causal=True,
            rope_cos=cos, rope_sin=sin, training=module.training, recompute=_block._ATTN_LEVEL[level],
            backend=state.backend, sliding_window=window or None, **attn_kw)
        mcfg = _mlp.prepare(x, mlp_p["w1"], mlp_p["b1"], mlp_p["w2"], mlp_p["b2"], gate_weight=mlp_p["wg"],
                            gate_bias=mlp_p["bg"], training=module.training, recompute=_block._MLP_LEVEL[level],
                            backend=state.backend, residual=True, **mlp_kw)
        return _block.transformer_block(x, attn_p, mlp_p, acfg, mcfg, level, mask, c, sn, lora=loras)


class GPT2BlockAdapter(_BlockAdapter):
    kind = "GPT2Block"

    def __init__(self):
        mod = "transformers.models.gpt2.modeling_gpt2"
        self.cls = _hf_class(mod, "GPT2Block")
        self.parts = (_hf_class(mod, "GPT2Attention"), _hf_class(mod, "GPT2MLP"),
                      _hf_class("transformers.pytorch_utils", "Conv1D"))

    def matches(self, module):
        return self.cls is not None and isinstance(module, self.cls)

    def static_reason(self, module):
        act = module.mlp.act.__class__.__name__
        fn = getattr(module.attn.config, "activation_function", None)
        if fn not in _ACTS_GPT2:
            return f"activation {fn!r} ({act}) has no fused kernel"
        return None

    def guard(self, module):
        attn, mlp, conv = ((c,) for c in self.parts)
        ln = (torch.nn.LayerNorm,)
        return Guard({"ln_1": ln, "ln_2": ln, "attn": attn, "attn.c_attn": conv, "attn.c_proj": conv, "mlp": mlp,
                      "mlp.c_fc": conv, "mlp.c_proj": conv},
                     lora=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))

    def fused(self, module, state, args, kwargs):
        call = _bind(("hidden_states", "cache", "attention_mask", "encoder_hidden_states"), args, kwargs)
        x = call["hidden_states"]
        if call.get("encoder_hidden_states") is not None:
            raise Unservable("cross-attention")
        _check_cache(module, call.get("cache", call.get("past_key_values")), module.attn.layer_idx)
        attn, mlp = module.attn, module.mlp
        # attn_pdrop: fused (dropout on the probabilities inside the attention kernels, Philox bits);
        # HF applies it when the attention module trains (GPT2Attention: `p if self.training else 0`).
        p_probs = attn.attn_dropout.p if attn.training else 0.0
        cfg = attn.config
        loras: list = []
        (wq, bq), (wo, bo) = (_proj(attn, a, f"attn.{a}", t, x, loras, True) for a, t in (("c_attn", "wq"),
                                                                                         ("c_proj", "wo")))
        (w1, b1), (w2, b2) = (_proj(mlp, a, f"mlp.{a}", t, x, loras, True) for a, t in (("c_fc", "w1"),
                                                                                       ("c_proj", "w2")))
        attn_p = {"nw": module.ln_1.weight, "nb": module.ln_1.bias, "wq": wq, "wk": None,
                  "wv": None, "bq": bq, "bk": None, "bv": None, "wo": wo, "bo": bo}
        mlp_p = {"nw": module.ln_2.weight, "nb": module.ln_2.bias, "w1": w1, "b1": b1,
                 "wg": None, "bg": None, "w2": w2, "b2": b2}
        attn_kw = dict(num_heads=attn.num_heads, num_kv_heads=attn.num_heads, scale=attn.scaling, norm="layernorm",
                       norm_weight=attn_p["nw"], norm_bias=attn_p["nb"], norm_eps=module.ln_1.eps, rope=False,
                       rope_theta=10000.0, dropout=attn.resid_dropout.p, residual=True, attn_dropout=p_probs)
        mlp_kw = dict(activation=_ACTS_GPT2[cfg.activation_function], norm="layernorm", norm_weight=mlp_p["nw"],
                      norm_bias=mlp_p["nb"], norm_eps=module.ln_2.eps, dropout=mlp.dropout.p)
        return self._run(module, state, x, call.get("attention_mask"), attn_p, mlp_p, attn_kw, mlp_kw, loras=loras)


class GPTNeoXLayerAdapter(_BlockAdapter):
    """GPT-NeoX (Pythia): LayerNorm + biases, one query_key_value projection whose output is
    interleaved per head ([q_h | k_h | v_h], served with qkv_layout="head_interleaved"), partial
    rotary (RoPE on the first rotary_ndims dims of each head, tables from position_embeddings),
    GELU MLP, and either the parallel residual out = x + attn(ln1(x)) + mlp(ln2(x))
    (use_parallel_residual, the default) or GPT-2's sequential pre-norm block. hidden_dropout is
    residual dropout on each branch (post_attention_dropout / post_mlp_dropout), attention_dropout
    is fused on the probabilities. An eval call with grad and an empty KV cache is fused and fills
    the cache with HF's own modules (as the Llama-like families). PEFT LoRA wrappers are not served
    (they fall back, reported)."""
    kind = "GPTNeoXLayer"

    def __init__(self):
        mod = "transformers.models.gpt_neox.modeling_gpt_neox"
        self.cls, self.attn_cls, self.mlp_cls = (_hf_class(mod, n) for n in ("GPTNeoXLayer", "GPTNeoXAttention",
                                                                             "GPTNeoXMLP"))
        self.rope = _hf_class(mod, "apply_rotary_pos_emb")

    def matches(self, module):
        return self.cls is not None and isinstance(module, self.cls)

    def static_reason(self, module):
        act = getattr(module.attention.config, "hidden_act", None)
        if act not in _ACTS_GPT2:
            return f"hidden_act {act!r} has no fused kernel"
        r = module.attention.rotary_ndims
        if r < 2 or r % 2 or r > module.attention.head_size:
            return f"rotary_ndims {r} (not an even width in [2, head_size]): no fused kernel feature"
        return None

    def guard(self, module):
        ln, drop = (torch.nn.LayerNorm,), (torch.nn.Dropout,)
        return Guard({"input_layernorm": ln, "post_attention_layernorm": ln, "post_attention_dropout": drop,
                      "post_mlp_dropout": drop, "attention": (self.attn_cls,), "attention.query_key_value": Linear,
                      "attention.dense": Linear, "mlp": (self.mlp_cls,), "mlp.dense_h_to_4h": Linear,
                      "mlp.dense_4h_to_h": Linear})

    def fused(self, module, state, args, kwargs):
        call = _bind(("hidden_states", "attention_mask", "position_ids", "use_cache", "layer_past",
                      "position_embeddings"), args, kwargs)
        x = call["hidden_states"]
        attn, mlp = module.attention, module.mlp
        cache = call.get("layer_past", call.get("cache", call.get("past_key_values")))
        fill = _check_cache(module, cache, attn.layer_idx, can_fill=self.rope is not None)
        pe = call.get("position_embeddings")
        if pe is None:
            raise Unservable("no position_embeddings passed (older transformers call convention)")
        hd, r = attn.head_size, attn.rotary_ndims
        cos, sin = _half_tables(pe[0], pe[1], hd, r)
        # attention_dropout: fused in the attention kernels, applied when the attention module trains
        p_probs = float(attn.attention_dropout) if attn.training else 0.0
        # hidden_dropout: nn.Dropout on each branch's output (before the residual sums)
        p_attn, p_mlp = ((d.p if d.training else 0.0) for d in (module.post_attention_dropout,
                                                                module.post_mlp_dropout))
        qkv, dense, fc1, fc2 = attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h
        n1, n2 = module.input_layernorm, module.post_attention_layernorm
        attn_p = {"nw": n1.weight, "nb": n1.bias, "wq": qkv.weight, "wk": None, "wv": None, "bq": qkv.bias,
                  "bk": None, "bv": None, "wo": dense.weight, "bo": dense.bias}
        mlp_p = {"nw": n2.weight, "nb": n2.bias, "w1": fc1.weight, "b1": fc1.bias, "wg": None, "bg": None,
                 "w2": fc2.weight, "b2": fc2.bias}
        heads = attn.config.num_attention_heads
        attn_kw = dict(num_heads=heads, num_kv_heads=heads, scale=attn.scaling, norm="layernorm",
                       norm_weight=n1.weight, norm_bias=n1.bias, norm_eps=n1.eps, rope=True, rope_theta=10000.0,
                       rotary_dim=r, qkv_layout="head_interleaved", dropout=p_attn, residual=True,
                       attn_dropout=p_probs)
        mlp_kw = dict(activation=_ACTS_GPT2[attn.config.hidden_act], norm="layernorm", norm_weight=n2.weight,
                      norm_bias=n2.bias, norm_eps=n2.eps, dropout=p_mlp)
        out = self._run(module, state, x, call.get("attention_mask"), attn_p, mlp_p, attn_kw, mlp_kw, cos, sin,
                        parallel=bool(module.use_parallel_residual))
        if fill:
            self._fill_cache(module, x, pe, cache)
        return out

    def _fill_cache(self, module, x, pe, cache) -> None:
        """An eval call with grad: store this call's keys/values in the (empty) cache as the original
        forward does, with HF's own modules and functions (input_layernorm, query_key_value viewed
        (B, S, H, 3 hd) and chunked, apply_rotary_pos_emb, cache.update): bitwise what it stores.
        Costs the norm and the QKV projection once more (eval calls with grad only)."""
        attn = module.attention
        qkv = attn.query_key_value(module.input_layernorm(x))
        qkv = qkv.view(*x.shape[:-1], -1, 3 * attn.head_size).transpose(1, 2)
        _, k, v = qkv.chunk(3, dim=-1)
        _, k = self.rope(k, k, pe[0], pe[1])
        cache.update(k, v, attn.layer_idx)


@dataclass(frozen=True)
class Family:
    """A Llama-like decoder layer: RMSNorms around attention and a gated MLP, RoPE tables passed
    as ``position_embeddings``: ``h = x + post1(attn(pre1(x)))``, ``out = h + post2(mlp(pre2(h)))``
    with each pre/post norm optional (Llama: pre only; Gemma2/3: both; OLMo2: post only) and an
    optional q/k RMSNorm before RoPE. Names are submodule names inside the layer."""
    name: str                                       # the HF model folder, e.g. "llama"
    prefix: str                                     # class prefix, e.g. "Llama" -> LlamaDecoderLayer, ...
    qkv: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # or one packed name, rows [q | k | v]
    gate_up: Tuple[str, ...] = ("gate_proj", "up_proj")     # or one packed name, rows [gate | up]
    resid_dropout: Optional[Tuple[str, str]] = None  # nn.Dropout after attention / MLP (residual dropout)
    # attention may have a window: "config" = config.sliding_window on every layer (Mistral, Phi3 in
    # transformers 5.24: the attention passes getattr(config, "sliding_window") and the model builds
    # the sliding-window mask whenever it is set); "layer" = the attention's own sliding_window, set
    # from config.layer_types (Qwen2: use_sliding_window / max_window_layers decide layer_types; Qwen3,
    # Gemma2/3: layer_types' "sliding_attention" layers)
    sliding_window: Optional[str] = None
    norm_offset: float = 0.0                         # Gemma: RMSNorm scales by (offset + weight)
    # the norms before attention / before the MLP (None: no pre-norm, OLMo2) and after them (Gemma2/3,
    # OLMo2: out = x + post(sublayer(pre(x)))), submodule names in the layer
    pre_norms: Tuple[Optional[str], Optional[str]] = ("input_layernorm", "post_attention_layernorm")
    post_norms: Optional[Tuple[str, str]] = None
    qk_norm: Optional[str] = None                    # "head" (Qwen3, Gemma3) | "proj" (OLMo2): self_attn.q_norm/k_norm
    act: str = "hidden_act"                          # the config attribute naming the MLP activation
    # config.attn_logit_softcapping: "kernel" = the attention caps its scores (Gemma2 passes softcap= to its
    # attention): fused with the kernels' cap; "unservable" = transformers 5.24 stores it but its attention
    # never applies it (Gemma3): Unservable when set (not verified against another version)
    softcap: Optional[str] = None
    layer_args: Tuple[str, ...] = ("hidden_states", "attention_mask", "position_ids", "cache", "use_cache",
                                   "position_embeddings")  # the layer's positional arguments

    def cls(self, suffix: str):
        return _hf_class(f"transformers.models.{self.name}.modeling_{self.name}", self.prefix + suffix)


_POST = ("post_attention_layernorm", "post_feedforward_layernorm")
_GEMMA_PRE = ("input_layernorm", "pre_feedforward_layernorm")
_GEMMA_ARGS = ("hidden_states", "position_embeddings", "attention_mask", "position_ids", "cache")
FAMILIES = (
    Family("llama", "Llama"),
    Family("mistral", "Mistral", sliding_window="config"),
    Family("qwen2", "Qwen2", sliding_window="layer"),  # q/k/v biases: the split projections take them
    Family("phi3", "Phi3", qkv=("qkv_proj",), gate_up=("gate_up_proj",),
           resid_dropout=("resid_attn_dropout", "resid_mlp_dropout"), sliding_window="config"),
    Family("gemma", "Gemma", norm_offset=1.0),  # GeGLU (tanh GELU) via hidden_act; embed scaling is outside
    Family("qwen3", "Qwen3", sliding_window="layer", qk_norm="head"),
    Family("olmo2", "Olmo2", pre_norms=(None, None), post_norms=_POST, qk_norm="proj"),
    # Gemma2/3: (1 + w) norms around both sublayers, query_pre_attn_scalar (attn.scaling), alternating
    # sliding/global layers (each layer gets its own rotary tables as position_embeddings)
    Family("gemma2", "Gemma2", norm_offset=1.0, sliding_window="layer", pre_norms=_GEMMA_PRE, post_norms=_POST,
           act="hidden_activation", softcap="kernel", layer_args=_GEMMA_ARGS),
    Family("gemma3", "Gemma3", norm_offset=1.0, sliding_window="layer", pre_norms=_GEMMA_PRE, post_norms=_POST,
           qk_norm="head", act="hidden_activation", softcap="unservable", layer_args=_GEMMA_ARGS),
)


def _norm_weight(norm: torch.nn.Module, offset: float) -> torch.Tensor:
    """The RMSNorm scale: weight, or (offset + weight) for Gemma's norms, which HF computes in fp32
    (served fused in fp32 only: (1 + w) rounded to 16 bits would lose w's low bits)."""
    if not offset:
        return norm.weight
    if norm.weight.dtype != torch.float32:
        raise Unservable(f"(1 + weight) RMSNorm with {norm.weight.dtype} weights (HF computes it in fp32): "
                         "fused in fp32 only")
    return norm.weight + offset


def _eps(norm: torch.nn.Module) -> float:
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


class LlamaLikeAdapter(_BlockAdapter):
    """One adapter per :class:`Family`."""

    def __init__(self, fam: Family):
        self.fam, self.kind = fam, fam.prefix + "DecoderLayer"
        self.cls, self.attn_cls, self.mlp_cls, self.norm_cls = (fam.cls(s) for s in
                                                                ("DecoderLayer", "Attention", "MLP", "RMSNorm"))
        self.rope = _hf_class(f"transformers.models.{fam.name}.modeling_{fam.name}", "apply_rotary_pos_emb")

    def matches(self, module):
        return self.cls is not None and isinstance(module, self.cls)

    def _norm_names(self) -> list:
        fam = self.fam
        names = [n for n in (*fam.pre_norms, *(fam.post_norms or ())) if n is not None]
        return names + (["self_attn.q_norm", "self_attn.k_norm"] if fam.qk_norm else [])

    def static_reason(self, module):
        act = getattr(module.mlp.config, self.fam.act, None)
        if act not in _ACTS_GATED:
            return f"{self.fam.act} {act!r} has no fused kernel"
        for name in self._norm_names():
            n = module.get_submodule(name)
            if self.norm_cls is None or type(n) is not self.norm_cls:
                return f"norm of type {type(n).__name__}"
        return None

    def guard(self, module):
        norm = (self.norm_cls,)
        reads = {n: norm for n in self._norm_names()}
        reads.update({"self_attn": (self.attn_cls,), "self_attn.o_proj": Linear, "mlp": (self.mlp_cls,),
                      "mlp.down_proj": Linear})
        reads.update({f"self_attn.{n}": Linear for n in self.fam.qkv})
        reads.update({f"mlp.{n}": Linear for n in self.fam.gate_up})
        # PEFT LoRA wrappers served fused on every projection (ckpt_ops.lora)
        lora = [f"self_attn.{n}" for n in (*self.fam.qkv, "o_proj")] + ["mlp.down_proj"]
        lora += [f"mlp.{n}" for n in self.fam.gate_up]
        return Guard(reads, lora=lora)

    def fused(self, module, state, args, kwargs):
        fam = self.fam
        call = _bind(fam.layer_args, args, kwargs)
        x = call["hidden_states"]
        attn, mlp = module.self_attn, module.mlp
        cache = call.get("cache", call.get("past_key_values"))
        fill = _check_cache(module, cache, attn.layer_idx, can_fill=self.rope is not None)
        if not getattr(attn, "is_causal", True):
            raise Unservable("bidirectional attention (use_bidirectional_attention)")
        # Gemma2's eager attention caps the scaled scores: softcap * tanh(scores / softcap) (fused kernels)
        cap = getattr(attn.config, "attn_logit_softcapping", None) if fam.softcap else None
        if cap is not None and fam.softcap == "unservable":
            raise Unservable(f"attention logit soft-capping ({cap}) set but not applied by {type(attn).__name__}: "
                             "not served fused")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise Unservable(f"attention logit soft-capping {cap!r} (not a positive float)")
        # attention_dropout: fused in the attention kernels; HF applies it when the attention module
        # trains (`dropout=0.0 if not self.training else self.attention_dropout`).
        p_probs = float(attn.attention_dropout) if attn.training else 0.0
        window = self._window(attn, x, call.get("attention_mask"))
        pe = call.get("position_embeddings")
        if pe is None:
            raise Unservable("no position_embeddings passed (older transformers call convention)")
        cfg = attn.config
        cos, sin = _half_tables(pe[0], pe[1], attn.head_dim)
        loras: list = []
        if len(fam.qkv) == 1:  # packed rows [q | k | v]: one projection (its adapter: on all of qkv)
            (wq, bq), wk, wv, bk, bv = _proj(attn, fam.qkv[0], f"self_attn.{fam.qkv[0]}", "wq", x, loras), \
                None, None, None, None
        else:
            (wq, bq), (wk, bk), (wv, bv) = (_proj(attn, n, f"self_attn.{n}", t, x, loras)
                                            for n, t in zip(fam.qkv, ("wq", "wk", "wv")))
        (wo, bo) = _proj(attn, "o_proj", "self_attn.o_proj", "wo", x, loras)
        gu = [getattr(mlp, n) for n in fam.gate_up]
        if len(gu) == 1:  # packed rows [gate | up]: row views of one weight (its adapter's B: row views too)
            base = gu[0]
            if _lora.is_lora(base):
                base, found = _lora.read(base, "wg", f"mlp.{fam.gate_up[0]}", x)
                loras.extend(_lora.split_packed(found, ("wg", "w1"), base.weight.shape[0] // 2))
            wg, w1 = base.weight.chunk(2, dim=0)
            bg, b1 = base.bias.chunk(2) if base.bias is not None else (None, None)
        else:
            (wg, bg), (w1, b1) = (_proj(mlp, n, f"mlp.{n}", t, x, loras) for n, t in zip(fam.gate_up, ("wg", "w1")))
        w2, b2 = _proj(mlp, "down_proj", "mlp.down_proj", "w2", x, loras)
        p_attn, p_mlp = ((getattr(module, n).p if module.training else 0.0) for n in fam.resid_dropout) \
            if fam.resid_dropout else (0.0, 0.0)
        n1, n2 = (None if n is None else module.get_submodule(n) for n in fam.pre_norms)
        nw1, nw2 = (None if n is None else _norm_weight(n, fam.norm_offset) for n in (n1, n2))
        pn1, pn2 = (None, None) if fam.post_norms is None else (module.get_submodule(n) for n in fam.post_norms)
        pw1, pw2 = (None if n is None else _norm_weight(n, fam.norm_offset) for n in (pn1, pn2))
        qw = kw = None
        if fam.qk_norm:
            if _eps(attn.q_norm) != _eps(attn.k_norm):  # the segment takes one eps for both
                raise Unservable(f"q_norm eps {_eps(attn.q_norm)} differs from k_norm eps {_eps(attn.k_norm)}")
            qw, kw = (_norm_weight(n, fam.norm_offset) for n in (attn.q_norm, attn.k_norm))
        attn_p = {"nw": nw1, "nb": None, "wq": wq, "wk": wk, "wv": wv, "bq": bq, "bk": bk, "bv": bv,
                  "wo": wo, "bo": bo, "qw": qw, "kw": kw, "pw": pw1}
        mlp_p = {"nw": nw2, "nb": None, "w1": w1, "b1": b1, "wg": wg, "bg": bg, "w2": w2, "b2": b2, "pw": pw2}
        attn_kw = dict(num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, scale=attn.scaling,
                       norm=None if n1 is None else "rmsnorm", norm_weight=nw1, norm_bias=None,
                       norm_eps=None if n1 is None else _eps(n1), rope=True, rope_theta=10000.0, dropout=p_attn,
                       residual=True, attn_dropout=p_probs, softcap=None if cap is None else float(cap),
                       qk_norm=fam.qk_norm, q_norm_weight=qw, k_norm_weight=kw,
                       qk_norm_eps=_eps(attn.q_norm) if fam.qk_norm else None, post_norm_weight=pw1,
                       post_norm_eps=None if pn1 is None else _eps(pn1))
        mlp_kw = dict(activation=_ACTS_GATED[getattr(cfg, fam.act)], norm=None if n2 is None else "rmsnorm",
                      norm_weight=nw2, norm_bias=None, norm_eps=None if n2 is None else _eps(n2), dropout=p_mlp,
                      post_norm_weight=pw2, post_norm_eps=None if pn2 is None else _eps(pn2))
        out = self._run(module, state, x, call.get("attention_mask"), attn_p, mlp_p, attn_kw, mlp_kw, cos, sin,
                        loras, window=window)
        if fill:
            self._fill_cache(module, x, pe, cache, call)
        return out

    def _window(self, attn, x, mask4d) -> int:
        """The sliding window this layer's attention applies (0: none, or one >= S, which hides nothing),
        by the family's rule (Family.sliding_window); the 4-D mask is then checked against it."""
        rule = self.fam.sliding_window
        if rule is None or x.dim() != 3:
            return 0
        if rule == "layer":
            if not hasattr(attn, "sliding_window"):
                raise Unservable(f"{type(attn).__name__} without a per-layer sliding_window attribute (another "
                                 "transformers version)")
            w = attn.sliding_window
        else:
            w = getattr(attn.config, "sliding_window", None)
        if w is None:
            return 0
        if isinstance(w, bool) or not isinstance(w, int) or w <= 0:
            raise Unservable(f"sliding window {w!r} (not a positive int)")
        if w >= x.shape[1]:
            return 0
        if mask4d is None:
            raise Unservable(f"sliding window {w} shorter than the sequence ({x.shape[1]}) with no 4-D mask (the "
                             "attention implementation would apply the window itself)")
        return w

    _ATTN_OWN = ("hidden_states", "attention_mask", "cache", "past_key_values", "position_embeddings")

    def _fill_cache(self, module, x, pe, cache, call) -> None:
        """Store this call's keys/values in the (empty) cache as the original forward does, with
        HF's own modules and functions (input norm, k/v projections, the family's
        apply_rotary_pos_emb, cache.update with the attention's kwargs): bitwise what it stores.
        Costs the norm and the k/v projections (+ the k norm) once more (eval calls with grad only)."""
        attn, cfg, pre = module.self_attn, module.self_attn.config, self.fam.pre_norms[0]
        n = module.get_submodule(pre)(x) if pre is not None else x
        hd, kv = attn.head_dim, cfg.num_key_value_heads * attn.head_dim
        if len(self.fam.qkv) == 1:  # packed rows [q | k | v], sliced as HF does
            qkv = getattr(attn, self.fam.qkv[0])(n)
            q_end = cfg.num_attention_heads * hd
            k, v = qkv[..., q_end:q_end + kv], qkv[..., q_end + kv:]
        else:
            k, v = getattr(attn, self.fam.qkv[1])(n), getattr(attn, self.fam.qkv[2])(n)
        shape = (*x.shape[:-1], -1, hd)
        if self.fam.qk_norm == "proj":  # OLMo2: over the whole projection, before the head split
            k = attn.k_norm(k)
        k = k.view(shape)
        if self.fam.qk_norm == "head":  # Qwen3/Gemma3: each head's hd values (a row op: order-free)
            k = attn.k_norm(k)
        k, v = k.transpose(1, 2), v.view(shape).transpose(1, 2)
        _, k = self.rope(k, k, pe[0], pe[1])
        cache.update(k, v, attn.layer_idx, kwargs={a: b for a, b in call.items() if a not in self._ATTN_OWN})


# Decoder/encoder layers seen but not fused, and why (kernel features they would need).
KNOWN_LEFT = {
    "FalconDecoderLayer": "parallel attention/MLP and multi-query layout: no fused adapter yet",
    "BertLayer": "encoder layer (post-norm, bidirectional, optional cross-attention): encoders stay unconverted",
    "RobertaLayer": "encoder layer (post-norm, bidirectional, optional cross-attention): encoders stay "
                    "unconverted",
    "T5Block": "T5 block (relative position bias, cross-attention in the decoder): stays unconverted",
}


class NormAdapter(Adapter):
    """torch.nn.LayerNorm, torch.nn.RMSNorm and the RMSNorm classes of the families above (Gemma's
    (1 + w) form in fp32)."""
    kind = "norm"

    def __init__(self):
        self.offset = {c: f.norm_offset for c, f in ((f.cls("RMSNorm"), f) for f in FAMILIES) if c is not None}

    def matches(self, module):
        return type(module) in (torch.nn.LayerNorm, torch.nn.RMSNorm) or type(module) in self.offset

    def fused(self, module, state, args, kwargs):
        if len(args) != 1 or kwargs:
            raise Unservable("unexpected call arguments")
        x = args[0]
        _check_dtypes(x, module)
        with self._autocast_policy(module, x):
            if isinstance(module, torch.nn.LayerNorm):
                return _norm.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps,
                                        backend=state.backend)
            if isinstance(module, torch.nn.RMSNorm):
                return _norm.rms_norm(x, module.normalized_shape, module.weight, module.eps, backend=state.backend)
            weight = _norm_weight(module, self.offset[type(module)])
            return _norm.rms_norm(x, (x.shape[-1],), weight, _eps(module), backend=state.backend)

    @staticmethod
    def _autocast_policy(module, x):
        """What the module computes in under torch.autocast, as a context for the fused call:
        torch's norms follow autocast's op lists (ckpt_ops._amp.norm_dtype: fp32 on CUDA for
        layer_norm, the input's dtype on CPU); Hugging Face's RMSNorm classes upcast by hand and cast
        back, so autocast plays no part (it is switched off around the fused call). Unservable where
        torch's dtype is not known."""
        dev = x.device.type
        if not torch.is_autocast_enabled(dev):
            return contextlib.nullcontext()
        if type(module) in (torch.nn.LayerNorm, torch.nn.RMSNorm):
            op = "layer_norm" if type(module) is torch.nn.LayerNorm else "rms_norm"
            dt = _amp.norm_dtype(dev, x.dtype, op)
            if dt is None:
                raise Unservable(f"torch.nn.{type(module).__name__} on a {x.dtype} input under {dev} autocast "
                                 "(torch's output dtype there is not known to ckpt_ops)")
            if dt != x.dtype:  # upcast: the fused norm's autocast path (ckpt_ops.norm)
                return contextlib.nullcontext()
        return _amp.off(dev)


ADAPTERS: list = []


def adapters() -> list:
    if not ADAPTERS:
        ADAPTERS.extend([GPT2BlockAdapter(), GPTNeoXLayerAdapter(), *(LlamaLikeAdapter(f) for f in FAMILIES), NormAdapter()])
    return ADAPTERS
