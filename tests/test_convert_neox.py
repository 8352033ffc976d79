"""ckpt_ops.convert on GPT-NeoX (issue 10 item 1): the parallel residual (use_parallel_residual, HF's
default) and GPT-2's sequential pre-norm block, partial rotary (rotary_pct < 1: RoPE on the first
rotary_ndims dims of each head) and the per-head interleaved query_key_value projection
(qkv_layout="head_interleaved"). A tiny random GPTNeoXForCausalLM (2 layers, hidden 64, 4 heads,
right-padded batch, nothing downloaded) trains fused with the unconverted model's loss and every
parameter gradient (DESIGN §4's fp32 rule) at every level; it keeps at most 0.15x what the
unconverted model keeps and no more than HF's own checkpointing; under bf16 autocast its error vs
the fp32 truth is at most 2x the unconverted model's under the same autocast; calls the fused path
cannot serve run the original forward, exactly."""
import copy

import pytest
import torch

import ckpt_ops
from ckpt_ops import attention as A
from ckpt_ops import block as _block

T = pytest.importorskip("transformers")
from conftest import assert_close, assert_fp32_close  # noqa: E402
from test_convert import assert_same_step, batch, train_step  # noqa: E402
from test_convert_autocast import assert_like_eager_autocast, step  # noqa: E402

T.logging.set_verbosity_error()
KIND = "GPTNeoXLayer"
CONFIGS = {  # (rotary_pct, use_parallel_residual)
    "r025-parallel": (0.25, True), "r1-parallel": (1.0, True),
    "r025-sequential": (0.25, False), "r1-sequential": (1.0, False),
}


def make(rotary_pct=0.25, parallel=True, impl="sdpa", **over):
    torch.manual_seed(0)
    cfg = T.GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                          vocab_size=97, max_position_embeddings=64, rotary_pct=rotary_pct,
                          use_parallel_residual=parallel, attn_implementation=impl, **over)
    return T.GPTNeoXForCausalLM(cfg).train()


def assert_fused(conv, n=2):
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"].get(KIND) == n and not rep["fallbacks"], rep
    assert [(c, s) for _, c, s in rep["layers"]] == [(KIND, "fused")] * 2, rep["layers"]


def test_config_has_what_the_tests_claim():
    m = make(0.25)
    attn = m.gpt_neox.layers[0].attention
    assert (attn.head_size, attn.rotary_ndims) == (16, 4)  # partial: 4 of 16 dims rotate
    assert m.gpt_neox.layers[0].use_parallel_residual
    assert make(1.0).gpt_neox.layers[0].attention.rotary_ndims == 16
    assert not make(0.25, False).gpt_neox.layers[0].use_parallel_residual


@pytest.mark.parametrize("level", _block.LEVELS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_step_matches_unconverted(config, level):
    ref = make(*CONFIGS[config])
    conv = ckpt_ops.convert(copy.deepcopy(ref), recompute=level, strict=True)
    assert_same_step(conv, ref, *batch(b=2, s=12))
    assert_fused(conv)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_eager_attention_and_attention_bias_off(impl):
    ref = make(0.5, True, impl=impl, attention_bias=False)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    assert_same_step(conv, ref, *batch(b=2, s=10))
    assert_fused(conv)


@pytest.mark.parametrize("config", ["r025-parallel", "r025-sequential"])
def test_saved_bytes_beat_unconverted_and_hf_checkpointing(config):
    ids, am, labels = batch(b=2, s=24)

    def step_bytes(model):
        return ckpt_ops.saved_bytes(model, input_ids=ids, attention_mask=am, labels=labels, use_cache=False)

    hf_ckpt = make(*CONFIGS[config])
    hf_ckpt.gradient_checkpointing_enable()
    conv = ckpt_ops.convert(make(*CONFIGS[config]), recompute="full")
    b_plain, b_hf, b_conv = step_bytes(make(*CONFIGS[config])), step_bytes(hf_ckpt), step_bytes(conv)
    assert b_conv <= 0.15 * b_plain, (b_conv, b_plain)
    # HF's checkpointing (GradientCheckpointingLayer) holds the layer's keyword inputs -- the mask
    # and the rotary tables -- in a functools.partial, outside saved-tensor hooks, so its count
    # omits them; the fused layers keep the (B, S) key mask and the (1, S, r/2) cos/sin tables as
    # saved tensors (once for all layers: one mask and one table pair serve every layer). Everything
    # else is at most HF's: the layer inputs, once each.
    r = conv.gpt_neox.layers[0].attention.rotary_ndims
    held = 2 * 24 + 2 * 24 * (r // 2) * 4
    assert b_conv <= b_hf + held, (b_conv, b_hf, held)
    assert_fused(conv)


def test_parallel_residual_keeps_x_once():
    """The two segment Functions of a parallel layer both keep the layer input at "full": counted
    once, so a layer keeps its input (plus a few bytes: padding mask, seeds, rotary tables)."""
    from ckpt_ops import _convert_families as CF
    layer = make(0.25, True).gpt_neox.layers[0]
    state = type("S", (), {"call_level": None, "recompute": "full", "backend": None})()
    x = torch.randn(2, 12, 64, requires_grad=True)
    pe = make(0.25, True).gpt_neox.rotary_emb(x, torch.arange(12)[None])
    n = ckpt_ops.saved_bytes(lambda: CF.GPTNeoXLayerAdapter().fused(layer, state, (x,),
                                                                    {"position_embeddings": pe}))
    x_bytes = x.numel() * 4
    assert x_bytes <= n <= x_bytes + 4096, (n, x_bytes)


@pytest.mark.parametrize("config", ["r025-parallel", "r1-sequential"])
def test_bf16_autocast_error_at_most_twice_unconverted(config):
    ids, am, labels = batch(b=4, s=32)
    truth = step(make(*CONFIGS[config]), ids, am, labels)
    eager = step(make(*CONFIGS[config]), ids, am, labels, amp=torch.bfloat16)
    conv_m = ckpt_ops.convert(make(*CONFIGS[config]))
    conv = step(conv_m, ids, am, labels, amp=torch.bfloat16)
    assert_like_eager_autocast(conv, eager, truth, config)
    assert_fused(conv_m)


def test_dropouts_are_fused_where_hf_applies_them(monkeypatch):
    """hidden_dropout: residual dropout on each branch (post_attention_dropout / post_mlp_dropout),
    attention_dropout: on the probabilities; all off in eval, where the converted model equals the
    unconverted one."""
    from ckpt_ops import _convert_families as CF
    seen = []
    real_attn, real_mlp = CF._attn.attention, CF._mlp.mlp
    monkeypatch.setattr(CF._attn, "attention", lambda *a, **k: seen.append(("attn", k["dropout"], k["attn_dropout"],
                                                                            k["training"])) or real_attn(*a, **k))
    monkeypatch.setattr(CF._mlp, "mlp", lambda *a, **k: seen.append(("mlp", k["dropout"], k["training"]))
                        or real_mlp(*a, **k))
    ref = make(0.25, True, hidden_dropout=0.3, attention_dropout=0.2)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=10)
    l_drop, _ = train_step(conv, ids, am, labels)
    assert seen == [("attn", 0.3, 0.2, True), ("mlp", 0.3, True)] * 2, seen
    assert_fused(conv)
    l_clean, _ = train_step(ckpt_ops.convert(make(0.25, True)), ids, am, labels)
    assert not torch.allclose(l_drop, l_clean)
    ref.eval(), conv.eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am, use_cache=False).logits
        got = conv(input_ids=ids, attention_mask=am, use_cache=False).logits
    assert_fp32_close(got, want, "eval logits")


def test_output_attentions_falls_back_exactly():
    ref = make(0.25, True, impl="eager")
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch(b=2, s=10)
    want = ref(input_ids=ids, attention_mask=am, output_attentions=True, use_cache=False)
    got = conv(input_ids=ids, attention_mask=am, output_attentions=True, use_cache=False)
    assert_fp32_close(got.logits, want.logits, "logits")  # the final norm runs fused
    assert len(got.attentions) == 2 and all(torch.equal(a, b) for a, b in zip(got.attentions, want.attentions))
    rep = ckpt_ops.conversion_report(conv)
    assert not rep["fused_calls"].get(KIND) and sum(v for k, v in rep["fallbacks"].items()
                                                    if k.startswith(KIND)) == 2, rep


@pytest.mark.parametrize("config", ["r025-parallel", "r1-sequential"])
def test_eval_call_with_grad_fills_the_cache_as_hf(config):
    """An eval call with grad (HF creates, fills and returns a DynamicCache): fused, and the cache
    holds what the unconverted model stores (layer 0 bitwise: HF's own modules on the same input;
    layer 1 within DESIGN §4, its input being the fused layer 0's output)."""
    ref = make(*CONFIGS[config]).eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch(b=2, s=10)
    want = ref(input_ids=ids, attention_mask=am, use_cache=True)
    got = conv(input_ids=ids, attention_mask=am, use_cache=True)
    assert_fp32_close(got.logits, want.logits, "logits")
    assert got.cache.get_seq_length() == want.cache.get_seq_length() == 10
    (g0, g1), (w0, w1) = got.cache.layers, want.cache.layers
    assert torch.equal(g0.keys, w0.keys) and torch.equal(g0.values, w0.values)
    assert_fp32_close(g1.keys, w1.keys, "layer 1 keys")
    assert_fp32_close(g1.values, w1.values, "layer 1 values")
    assert_fused(conv)


def test_eval_call_without_grad_and_a_cache_falls_back_exactly():
    """No grad: the original forward serves (the fastest exact path; nothing to save)."""
    ref = make(0.25, True).eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch(b=2, s=10)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am, use_cache=True)
        got = conv(input_ids=ids, attention_mask=am, use_cache=True)
    assert_fp32_close(got.logits, want.logits, "logits")  # the final norm runs fused
    assert got.cache.get_seq_length() == want.cache.get_seq_length() == 10
    for lg, lw in zip(got.cache.layers, want.cache.layers):  # the layers ran HF's own forward
        assert torch.equal(lg.keys, lw.keys) and torch.equal(lg.values, lw.values)
    rep = ckpt_ops.conversion_report(conv)
    assert not rep["fused_calls"].get(KIND) and rep["fallbacks"], rep


def test_lora_wrapper_falls_back_exactly():
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(make(0.25, True), peft.LoraConfig(r=4, target_modules=["query_key_value"]))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=10)
    assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert not rep["fused_calls"].get(KIND) and rep["fallbacks"], rep


# ---- the attention segment's new options, against plain PyTorch math in fp64 --------------------------
def plain_attention(x, w, b, wo, bo, h, r, interleaved, mask=None):
    """GPT-NeoX's attention written out (fp64): interleaved or packed QKV, RoPE (HF's
    apply_rotary_pos_emb form) on the first r dims of each head, causal softmax attention."""
    bs, s, d = x.shape
    hd = d // h
    y = x @ w.t() + b
    if interleaved:
        q, k, v = y.view(bs, s, h, 3 * hd).transpose(1, 2).chunk(3, dim=-1)
    else:
        q, k, v = (t.view(bs, s, h, hd).transpose(1, 2) for t in y.split(h * hd, dim=-1))
    inv = 1.0 / (10000.0 ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):
        rot, rest = t[..., :r], t[..., r:]
        rh = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], -1)
        return torch.cat([rot * cos + rh * sin, rest], -1)

    q, k = rope(q), rope(k)
    att = (q @ k.transpose(-1, -2)) * hd ** -0.5
    ok = torch.tril(torch.ones(s, s, dtype=torch.bool))
    if mask is not None:
        ok = ok & mask[:, None, None, :].bool()
    att = att.masked_fill(~ok, float("-inf")).softmax(-1)
    o = (att @ v).transpose(1, 2).reshape(bs, s, d)
    return o @ wo.t() + bo


@pytest.mark.parametrize("level", A.LEVELS)
@pytest.mark.parametrize("layout,r", [("head_interleaved", 4), ("head_interleaved", 16), ("packed", 8)])
def test_attention_layout_and_partial_rotary_vs_plain_math(layout, r, level):
    torch.manual_seed(1)
    h, d, s = 4, 64, 9
    x = torch.randn(2, s, d, requires_grad=True)
    w, b = torch.randn(3 * d, d) * 0.1, torch.randn(3 * d) * 0.1
    wo, bo = torch.randn(d, d) * 0.1, torch.randn(d) * 0.1
    params = [t.requires_grad_() for t in (w, b, wo, bo)]
    mask = torch.ones(2, s, dtype=torch.bool)
    mask[1, -3:] = False
    out = A.attention(x, w, b, wo, bo, num_heads=h, rope=True, rotary_dim=r, qkv_layout=layout,
                      attention_mask=mask, recompute=level)
    x64 = x.detach().double().requires_grad_()
    p64 = [t.detach().double().requires_grad_() for t in params]
    want = plain_attention(x64, *p64, h, r, layout == "head_interleaved", mask)
    valid = mask[:, :, None].expand_as(out)
    assert_fp32_close(out[valid], want[valid], "out")
    g = torch.randn_like(out) * valid
    out.backward(g)
    want.backward(g.double())
    for name, got, ref in zip(("x", "w", "b", "wo", "bo"), (x, *params), (x64, *p64)):
        assert_fp32_close(got.grad, ref.grad, name)


def test_standalone_module_rotary_dim():
    torch.manual_seed(2)
    m = ckpt_ops.nn.Attention(64, 4, rope=True, rotary_dim=6)
    x = torch.randn(2, 7, 64)
    want = plain_attention(x.double(), *(t.detach().double() for t in (m.qkv.weight, m.qkv.bias, m.out.weight,
                                                                      m.out.bias)), 4, 6, False)
    assert_close(m(x), want, rtol=1e-4, atol=1e-5, name="out")
    with pytest.raises(ValueError, match="rotary_dim"):
        ckpt_ops.nn.Attention(64, 4, rope=True, rotary_dim=5)
    with pytest.raises(ValueError, match="rotary_dim"):
        ckpt_ops.nn.Attention(64, 4, rope=False, rotary_dim=4)


def test_bad_arguments_raise_before_any_kernel():
    x = torch.randn(2, 5, 64)
    w, wo = torch.randn(192, 64), torch.randn(64, 64)
    kw = dict(num_heads=4, rope=True)
    with pytest.raises(ValueError, match="qkv_layout"):
        A.attention(x, w, None, wo, None, qkv_layout="per_head", **kw)
    with pytest.raises(ValueError, match="head_interleaved"):
        A.attention(x, torch.randn(128, 64), None, wo, None, num_heads=4, num_kv_heads=2, rope=True,
                    qkv_layout="head_interleaved")
    with pytest.raises(ValueError, match="rotary_dim"):
        A.attention(x, w, None, wo, None, rotary_dim=18, **kw)   # > head_dim 16
    with pytest.raises(ValueError, match="rotary_dim"):
        A.attention(x, w, None, wo, None, rotary_dim=3, **kw)
    c = torch.zeros(5, 9)  # r = 18 > head_dim
    with pytest.raises(ValueError, match="rope_cos"):
        A.attention(x, w, None, wo, None, rope_cos=c, rope_sin=c, **kw)
    c = torch.zeros(5, 2)  # r = 4, but rotary_dim says 8
    with pytest.raises(ValueError, match="rope_cos"):
        A.attention(x, w, None, wo, None, rope_cos=c, rope_sin=c, rotary_dim=8, **kw)


@pytest.mark.parametrize("config", ["r025-parallel", "r1-sequential"])
def test_fullgraph_compiled_training_step_matches_unconverted(config):
    """torch.compile(fullgraph=True, aot_eager) of the converted model: no graph break, 2 compiled
    steps each equal to the unconverted model's eager step, every layer fused."""
    from test_convert_compile import assert_compiled_steps
    torch._dynamo.reset()
    try:
        ref = make(*CONFIGS[config])
        conv = ckpt_ops.convert(copy.deepcopy(ref))
        ids, am, _ = batch()
        explained = torch._dynamo.explain(conv)(input_ids=ids, attention_mask=am, use_cache=False)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        before = ckpt_ops.conversion_report(conv)["fused_calls"].get(KIND, 0)  # explain ran the layers
        compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
        assert_compiled_steps(ref, conv, compiled, KIND, 2, before)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("level", _block.LEVELS)
def test_transformer_block_rotary_dim(level):
    """TransformerBlock(rotary_dim=r) = its two submodules in sequence (the Attention module with
    rotary_dim is checked against plain math above); gradients too."""
    torch.manual_seed(3)
    blk = ckpt_ops.nn.TransformerBlock(64, 4, style="llama", rotary_dim=6, recompute=level)
    x = torch.randn(2, 7, 64, requires_grad=True)
    out = blk(x)
    x2 = x.detach().clone().requires_grad_()
    want = blk.mlp(blk.attn(x2))
    assert_fp32_close(out, want, "out")
    g = torch.randn_like(out)
    out.backward(g)
    gw = [p.grad.clone() for p in blk.parameters()]
    blk.zero_grad()
    want.backward(g)
    assert_fp32_close(x.grad, x2.grad, "dx")
    for a, b in zip(gw, [p.grad for p in blk.parameters()]):
        assert_fp32_close(a, b, "param grad")
    full = ckpt_ops.nn.TransformerBlock(64, 4, style="llama", recompute=level)
    full.load_state_dict(blk.state_dict())
    assert not torch.allclose(full(x), out)  # rotary_dim changes what is computed


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("config", ["r025-parallel", "r025-sequential"])
def test_other_backends_match_unconverted(config, backend):
    """The reference backend and the Triton kernels (the interpreter on CPU; fp32) serve the same
    layers: HF's (1, S, r) tables reach rope_ as (1, S, r/2), which every backend broadcasts."""
    if backend == "triton":
        import os
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton needs CUDA or the interpreter (CKPT_OPS_TEST_TRITON=0)")
        pytest.importorskip("triton")
    ref = make(*CONFIGS[config])
    conv = ckpt_ops.convert(copy.deepcopy(ref), backend=backend)
    assert_same_step(conv, ref, *batch(b=2, s=8))
    assert_fused(conv)
