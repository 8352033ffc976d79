"""ckpt_ops.convert across model families (tiny random configs, nothing downloaded): the Llama-like
families (Mistral, Qwen2 with q/k/v biases, Phi3 with packed projections, Gemma with its (1 + w)
RMSNorm and GeGLU) train fused -- loss and
every gradient vs the unconverted model, saved bytes vs the unconverted model and HF's own
checkpointing; the report lists every layer, fused or left with the reason; strict=True raises."""
import copy

import pytest
import torch

import ckpt_ops

T = pytest.importorskip("transformers")
from test_convert import assert_same_step, batch, train_step  # noqa: E402

T.logging.set_verbosity_error()
DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, attn_implementation="sdpa")
FUSED = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral_window_ge_s": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),  # RMSNorm (1 + w), GeGLU (tanh GELU)
}


def make(family, **over):
    cfg, cls, extra = FUSED[family]
    torch.manual_seed(0)
    return getattr(T, cls)(getattr(T, cfg)(**{**DECODER, **extra, **over})).train()


def layer_kind(model):
    return type(model.model.layers[0]).__name__


@pytest.mark.parametrize("family", list(FUSED))
def test_family_training_step_matches_unconverted(family):
    ref = make(family)
    conv = ckpt_ops.convert(copy.deepcopy(ref), strict=True)
    ids, am, labels = batch(b=2, s=24)
    assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"].get(layer_kind(ref)) == 4 and not rep["fallbacks"], rep
    assert [s for _, _, s in rep["layers"]] == ["fused"] * 4

    assert_keeps_less_than_hf(make, family, conv, ids, am, labels)


def assert_keeps_less_than_hf(make, family, conv, ids, am, labels):
    """The converted model `conv` (at "full") saves at most 0.15 of what the unconverted `make(family)`
    saves in a training step, and no more than it under HF gradient checkpointing."""
    def step_bytes(model):
        return ckpt_ops.saved_bytes(model, input_ids=ids, attention_mask=am, labels=labels, use_cache=False)

    hf_ckpt = make(family)
    hf_ckpt.gradient_checkpointing_enable()
    b_plain, b_hf, b_conv = step_bytes(make(family)), step_bytes(hf_ckpt), step_bytes(conv)
    assert b_conv <= 0.15 * b_plain, (b_conv, b_plain)
    assert b_conv <= b_hf, (b_conv, b_hf)


def test_left_padding_trains_fused():
    """Left padding (sdpa): the padded query rows attend to no key; their outputs never reach the
    loss, and every gradient equals the unconverted model's."""
    ref = make("qwen2")
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch(b=2, s=12)
    am = am.flip(-1)
    labels = ids.masked_fill(am == 0, -100)
    assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"]["Qwen2DecoderLayer"] == 4 and not rep["fallbacks"], rep


def test_sliding_window_shorter_than_the_sequence_trains_fused():
    """A window shorter than S is fused with the window (the 4-D mask checked against
    sliding-window causal & padding); tests/test_attention_window.py has the other families."""
    ref = make("mistral", sliding_window=4)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=10)
    assert_same_step(conv, ref, ids, am, labels)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"]["MistralDecoderLayer"] == 4 and not rep["fallbacks"], rep
    ids, am, labels = batch(b=2, s=4)  # a call no longer than the window: no window at all
    assert_same_step(conv, ref, ids, am, labels)
    assert ckpt_ops.conversion_report(conv)["fused_calls"]["MistralDecoderLayer"] == 8


def _tiny(cfg, cls, **kw):
    torch.manual_seed(0)
    return getattr(T, cls)(getattr(T, cfg)(**kw))


ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=97)
LEFT = {
    "bert": (lambda: _tiny("BertConfig", "BertModel", **ENC), "BertLayer", "encoder layer", True),
    "roberta": (lambda: _tiny("RobertaConfig", "RobertaModel", **ENC, pad_token_id=1), "RobertaLayer",
                "encoder layer", True),
    "t5": (lambda: _tiny("T5Config", "T5Model", d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                         vocab_size=97), "T5Block", "relative position bias", False),
}


@pytest.mark.parametrize("family", list(LEFT))
def test_report_lists_every_layer_left_with_its_reason(family):
    build, cls, reason, norms_swapped = LEFT[family]
    model = build()
    with pytest.raises(ValueError, match=f"strict=True.*{cls}.*{reason}"):
        ckpt_ops.convert(model, strict=True)
    assert not any(hasattr(m, "_ckpt_ops_state") for m in model.modules())  # strict raised before any swap
    ckpt_ops.convert(model)
    rep = ckpt_ops.conversion_report(model)
    layers = [(n, c) for n, c, _ in rep["layers"]]
    expected = [(n, c) for n, c in ((n, type(m).__name__) for n, m in model.named_modules()) if c == cls]
    assert layers == expected and len(expected) >= 2
    for name, c, why in rep["layers"]:
        assert reason in why, why
        assert ("no saved-bytes effect" in why) == norms_swapped, why
        assert (name, c, why) in rep["left"]


def test_strict_conversion_of_a_supported_model_succeeds():
    model = make("qwen2")
    assert ckpt_ops.convert(model, strict=True) is model
    assert all(s == "fused" for _, _, s in ckpt_ops.conversion_report(model)["layers"])
    with pytest.raises(TypeError, match="strict"):
        ckpt_ops.convert(model, strict="yes")


def test_gemma_norm_in_bf16_falls_back_to_torch_exactly():
    """HF computes Gemma's (1 + w) RMSNorm in fp32; with bf16 weights (1 + w) would be rounded to
    bf16 by the fused path, so every layer and norm runs torch's own code: bitwise the unconverted."""
    ref = make("gemma").to(torch.bfloat16)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=12)
    a = ref(input_ids=ids, attention_mask=am, labels=labels).loss
    b = conv(input_ids=ids, attention_mask=am, labels=labels).loss
    assert torch.equal(a, b)
    rep = ckpt_ops.conversion_report(conv)
    assert not rep["fused_calls"] and set(rep["fallbacks"]) == {
        f"{kind}: (1 + weight) RMSNorm with torch.bfloat16 weights (HF computes it in fp32): fused in fp32 only"
        for kind in ("GemmaDecoderLayer", "norm")}, rep
