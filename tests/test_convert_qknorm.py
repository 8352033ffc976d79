"""ckpt_ops.convert for the families with q/k RMSNorms and post-sublayer norms (tiny random
configs, nothing downloaded): Qwen3 (per-head q/k norm), OLMo2 (q/k norm over the whole
projection, post-norms without pre-norms), Gemma3 (text; (1 + w) norms in fp32 around both
sublayers, per-head q/k norm, query_pre_attn_scalar, alternating sliding/global layers with their
own rotary tables) and Gemma2 without soft-capping. A training step equals the unconverted model's
(loss and every gradient, fp32) at every level; every decoder layer is reported fused; "full"
keeps <= 0.15x the unconverted model's bytes and <= HF checkpointing's; under CPU bf16 autocast the
error vs the fp32 truth is within 2x the unconverted model's; what the fused path cannot serve
(a window shorter than the sequence, soft-capping) falls back to the original forward exactly."""
import copy

import pytest
import torch

import ckpt_ops

T = pytest.importorskip("transformers")
from test_convert import assert_same_step, batch, train_step  # noqa: E402
from conftest import assert_fp32_close  # noqa: E402
from test_convert_hf_habits import _eval_grad_step  # noqa: E402
from test_convert_autocast import assert_like_eager_autocast, step, step_bytes  # noqa: E402
from test_convert_families import assert_keeps_less_than_hf  # noqa: E402

T.logging.set_verbosity_error()
DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, attn_implementation="sdpa")
GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, layer_types=["sliding_attention", "full_attention"])
FAMILIES = {
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(**GEMMA, sliding_window=32)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(**GEMMA, sliding_window=32, attn_logit_softcapping=None,
                                                         attn_implementation="eager")),
}
THREE = ["qwen3", "olmo2", "gemma3"]
# Gemma2 as HF configures it: attn_logit_softcapping 50.0 (fused by the kernels' cap), eager attention
# (HF's sdpa path does not cap), so its masks are additive float ones
FAMILIES["gemma2_default"] = ("Gemma2Config", "Gemma2ForCausalLM", dict(**GEMMA, sliding_window=32,
                                                                        attn_implementation="eager"))
FOUR = THREE + ["gemma2_default"]


def make(family, decoder=DECODER, **over):
    cfg, cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(T, cls)(getattr(T, cfg)(**{**decoder, **extra, **over})).train()
    with torch.no_grad():  # norms away from their init (ones / zeros), so their weights matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.1 if family.startswith("gemma") else 1.0, 0.3)
    return model


def kind(model):
    return type(model.model.layers[0]).__name__


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("level", ["full", "keep_attn", "keep_mlp", "selective", "none"])
def test_training_step_matches_unconverted(family, level):
    ref = make(family)
    conv = ckpt_ops.convert(copy.deepcopy(ref), strict=True, recompute=level)
    ids, am, labels = batch(b=2, s=24)  # right padding
    assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"].get(kind(ref)) == 2 and not rep["fallbacks"], rep
    assert [s for _, _, s in rep["layers"]] == ["fused"] * 2


@pytest.mark.parametrize("family", FOUR)
def test_full_keeps_less_than_unconverted_and_hf_checkpointing(family):
    ids, am, labels = batch(b=2, s=24)
    assert_keeps_less_than_hf(make, family, ckpt_ops.convert(make(family), strict=True), ids, am, labels)


def test_gemma3_layers_get_their_own_rotary_tables():
    """Local (sliding) and global layers use different rope thetas: swapping the tables would change
    the result, and the converted step still equals the unconverted one (which reads each layer's)."""
    model = make("gemma3")
    pe = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: pe.__setitem__(i, kw["position_embeddings"]),
                                             with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    ids, am, _ = batch(b=2, s=12)
    model(input_ids=ids, attention_mask=am)
    for h in hooks:
        h.remove()
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert not torch.allclose(pe[0][0], pe[1][0])  # local vs global theta


def test_gemma3_window_shorter_than_the_sequence_trains_fused():
    """Alternating layers: the sliding layer (0) runs the window kernels (its mask checked against
    sliding-window causal & padding), the global one (1) plain causal; both fused, exact."""
    ref = make("gemma3", sliding_window=4)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=10)
    loss = assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert not rep["fallbacks"] and rep["fused_calls"]["Gemma3DecoderLayer"] == 2, rep
    assert [m.self_attn.sliding_window for m in ref.model.layers] == [4, None]
    assert not torch.allclose(train_step(make("gemma3", sliding_window=64), ids, am, labels)[0], loss)
    ids, am, labels = batch(b=2, s=4)  # a call no longer than the window: no window
    train_step(conv, ids, am, labels)
    assert ckpt_ops.conversion_report(conv)["fused_calls"]["Gemma3DecoderLayer"] == 4


def test_gemma3_softcapping_setting_falls_back_exactly():
    """Gemma3's config carries attn_logit_softcapping but its attention (transformers 5.24) never
    applies it: such calls stay on the original forward (exact, reported)."""
    ref = make("gemma3", attn_logit_softcapping=30.0, attn_implementation="eager")
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=10)
    assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fallbacks"] == {"Gemma3DecoderLayer: attention logit soft-capping (30.0) set but not applied by "
                                "Gemma3Attention: not served fused": 2}, rep
    assert not rep["fused_calls"].get(kind(ref))


@pytest.mark.parametrize("family", ["gemma2"])
def test_attention_logit_softcapping_trains_fused(family):
    """attn_logit_softcapping (Gemma2): the fused kernels cap the scores as HF's eager attention
    does, softcap * tanh(scores / softcap); a small cap that bites (the step differs without it),
    with a short window on the sliding layer as well."""
    def sharp(model):  # scores of a few units, so that a cap of 2 changes them
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(40.0)
                layer.self_attn.k_proj.weight.mul_(40.0)
        return model

    ref = sharp(make(family, attn_logit_softcapping=2.0, sliding_window=4, attn_implementation="eager"))
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=10)
    loss = assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert not rep["fallbacks"] and rep["fused_calls"].get(kind(ref)) == 2, rep
    nocap = sharp(make(family, attn_logit_softcapping=None, sliding_window=4, attn_implementation="eager"))
    assert not torch.allclose(train_step(nocap, ids, am, labels)[0], loss)


@pytest.mark.parametrize("family", THREE)
def test_eval_call_with_grad_fills_the_cache_as_hf(family):
    """HF fills the cache it creates in an eval call with grad: the fused layer fills it with HF's own
    modules (pre-norm if any, k/v projections, the k norm, RoPE), bitwise HF's keys at layer 0."""
    ref = make(family).eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=8)
    a, g_ref = _eval_grad_step(ref, ids, am, labels)
    b, g_conv = _eval_grad_step(conv, ids, am, labels)
    assert_fp32_close(b.logits, a.logits, "logits")
    for n in g_ref:
        assert_fp32_close(g_conv[n], g_ref[n], n)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"][kind(ref)] == 2 and not rep["fallbacks"], rep
    ca, cb = a.past_key_values, b.past_key_values
    assert cb.get_seq_length() == ca.get_seq_length() == 8
    assert torch.equal(cb.layers[0].keys, ca.layers[0].keys) and torch.equal(cb.layers[0].values, ca.layers[0].values)
    for i, (la, lb) in enumerate(zip(ca.layers, cb.layers)):
        assert_fp32_close(lb.keys, la.keys, f"layer {i} keys")
        assert_fp32_close(lb.values, la.values, f"layer {i} values")


AMP_DECODER = dict(DECODER, intermediate_size=256, max_position_embeddings=64)


@pytest.mark.parametrize("family", FOUR)
def test_bf16_autocast_error_within_2x_of_unconverted(family):
    ref = make(family, AMP_DECODER, **({"sliding_window": 64} if family == "gemma3" else {}))
    conv = ckpt_ops.convert(copy.deepcopy(ref), strict=True)
    ids, am, labels = batch(b=4, s=64)
    truth = step(ref, ids, am, labels)
    eager = step(ref, ids, am, labels, torch.bfloat16)
    fused = step(conv, ids, am, labels, torch.bfloat16)
    assert_like_eager_autocast(fused, eager, truth, family)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"].get(kind(ref)) == 2 and not rep["fallbacks"], rep
    hf_ckpt = make(family, AMP_DECODER, **({"sliding_window": 64} if family == "gemma3" else {}))
    hf_ckpt.gradient_checkpointing_enable()
    assert step_bytes(conv, ids, am, labels) <= step_bytes(hf_ckpt, ids, am, labels)


@pytest.mark.parametrize("family", THREE)
def test_peft_lora_on_every_projection_trains_fused(family):
    """PEFT LoRA on q/k/v/o and the MLP projections: the adapters sit before the q/k norms and the
    post-norms, as in PEFT; loss and every adapter gradient equal PEFT on the unconverted model."""
    peft = pytest.importorskip("peft")
    from test_convert_lora import TARGETS, assert_lora_step
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS["llama"], init_lora_weights=False)
    ref = peft.get_peft_model(make(family), cfg).train()
    conv = ckpt_ops.convert(peft.get_peft_model(make(family), cfg).train())
    assert_lora_step(conv, ref, 2 * 2 * len(TARGETS["llama"]))
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"].get(kind(ref.base_model.model)) == 2 and not rep["fallbacks"], rep


@pytest.mark.parametrize("family", THREE)
def test_fullgraph_compiled_training_step_matches_unconverted(family):
    from test_convert_compile import assert_compiled_steps
    torch._dynamo.reset()
    try:
        ref = make(family)
        conv = ckpt_ops.convert(copy.deepcopy(ref))
        ids, am, _ = batch()
        explained = torch._dynamo.explain(conv)(input_ids=ids, attention_mask=am)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        before = ckpt_ops.conversion_report(conv)["fused_calls"].get(kind(ref), 0)
        compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
        assert_compiled_steps(ref, conv, compiled, kind(ref), 2, before)
    finally:
        torch._dynamo.reset()


def test_gemma2_under_compile_runs_the_original_forward_exactly():
    """Gemma2 needs eager attention (HF's sdpa path does not cap), whose additive float masks need a
    value check a compiled graph cannot branch on: compiled, its layers run the original forward
    (no graph break), answer the unconverted model's, and the report says why."""
    from test_convert_compile import assert_same, step as cstep
    torch._dynamo.reset()
    try:
        ref = make("gemma2_default")
        conv = ckpt_ops.convert(copy.deepcopy(ref))
        ids, am, labels = batch(b=2, s=24)
        compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
        assert_same(conv, ref, cstep(compiled, ids, am, labels), cstep(ref, ids, am, labels))
        rep = ckpt_ops.conversion_report(conv)
        assert any("additive attention mask" in k for k in rep["fallbacks"]), rep
    finally:
        torch._dynamo.reset()
