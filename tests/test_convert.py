"""ckpt_ops.convert on tiny Hugging Face GPT-2 and Llama models with random weights (nothing is
downloaded): a training step with a padding mask matches the unconverted model, parameters and
state_dict are untouched, unservable calls fall back to the original forward (and say why)."""
import copy

import pytest
import torch

import ckpt_ops

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from conftest import assert_fp32_close  # noqa: E402

transformers.logging.set_verbosity_error()
LEVELS = ["full", "keep_attn", "keep_mlp", "selective", "none"]


def gpt2(impl="sdpa", **over):
    cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=97, attn_implementation=impl,
               attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg.update(over)
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**cfg))


def llama(impl="sdpa", **over):
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=32, attn_implementation=impl)
    cfg.update(over)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg))


MODELS = {"gpt2": gpt2, "llama": llama}


def batch(b=2, s=10, pad="right"):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (b, s), generator=g)
    am = torch.ones(b, s, dtype=torch.long)
    if pad == "right":
        am[1, s - 3:] = 0
    labels = ids.masked_fill(am == 0, -100)
    return ids, am, labels


def train_step(model, ids, am, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(conv, ref, ids, am, labels):
    """One training step of each: loss and every gradient of `conv` vs `ref` by DESIGN 4's fp32 rule."""
    l_ref, g_ref = train_step(ref, ids, am, labels)
    l_conv, g_conv = train_step(conv, ids, am, labels)
    assert_fp32_close(l_conv, l_ref, "loss")
    assert g_ref.keys() == g_conv.keys() and g_ref
    for name in g_ref:
        assert_fp32_close(g_conv[name], g_ref[name], name)
    return l_ref


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("level", LEVELS)
def test_training_step_matches_unconverted(arch, impl, level):
    ref = MODELS[arch](impl).train()
    conv = ckpt_ops.convert(copy.deepcopy(ref), recompute=level)
    assert_same_step(conv, ref, *batch())
    rep = ckpt_ops.conversion_report(conv)
    block = "GPT2Block" if arch == "gpt2" else "LlamaDecoderLayer"
    assert rep["fused_calls"].get(block) == 2 and not rep["fallbacks"], rep


@pytest.mark.parametrize("arch", list(MODELS))
def test_parameters_and_state_dict_are_untouched(arch, tmp_path):
    model = MODELS[arch]()
    before = {n: p for n, p in model.named_parameters()}
    keys = {k: v.shape for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    conv = ckpt_ops.convert(model)
    assert conv is model
    assert all(p is before[n] for n, p in conv.named_parameters())  # the optimizer keeps working
    assert {k: v.shape for k, v in conv.state_dict().items()} == keys
    ids, am, labels = batch()
    train_step(conv, ids, am, labels)
    opt.step()
    torch.save(conv.state_dict(), tmp_path / "sd.pt")
    fresh = MODELS[arch]()
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    conv.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(conv(input_ids=ids, attention_mask=am).logits,
                                   fresh(input_ids=ids, attention_mask=am).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
def test_other_models_of_the_class_are_untouched(arch):
    a, b = MODELS[arch](), MODELS[arch]()
    ckpt_ops.convert(a)
    assert "forward" in vars(a.get_submodule("model.layers.0" if arch == "llama" else "transformer.h.0"))
    assert "forward" not in vars(b.get_submodule("model.layers.0" if arch == "llama" else "transformer.h.0"))
    with pytest.raises(ValueError):
        ckpt_ops.conversion_report(b)


@pytest.mark.parametrize("arch", list(MODELS))
def test_inference_with_kv_cache_falls_back_and_generates_the_same(arch):
    ref = MODELS[arch]().eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids = torch.randint(0, 97, (1, 5))
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out_ref = ref.generate(ids, **kw)
        out_conv = conv.generate(ids, **kw)
    # the converted final norm runs ckpt_ops' kernel (rounding may differ from torch's by CPU), so
    # scores are compared with a tolerance; the greedy tokens agree because every step's top-2
    # margin is far above that tolerance
    for a, b in zip(out_conv.scores, out_ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        top2 = b.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert torch.equal(out_ref.sequences, out_conv.sequences)
    assert any("KV cache" in k for k in ckpt_ops.conversion_report(conv)["fallbacks"])


@pytest.mark.parametrize("arch", list(MODELS))
def test_eval_without_cache_runs_fused_and_saves_nothing(arch):
    ref = MODELS[arch]().eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch()
    with torch.no_grad():
        a = conv(input_ids=ids, attention_mask=am, use_cache=False).logits
        b = ref(input_ids=ids, attention_mask=am, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert ckpt_ops.conversion_report(conv)["fused_calls"]
    with torch.no_grad():
        assert ckpt_ops.saved_bytes(conv, input_ids=ids, attention_mask=am, use_cache=False) == 0


def test_default_config_training_call_takes_the_fused_path():
    """Llama's default config asks for a KV cache (use_cache=True) and has no attention dropout: a
    training call with labels and a padding mask must run fused (the empty cache is not filled,
    as with HF gradient checkpointing)."""
    model = llama().train()
    assert model.config.use_cache
    conv = ckpt_ops.convert(model)
    ids, am, labels = batch()
    conv(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"].get("LlamaDecoderLayer") == 2 and not rep["fallbacks"], rep


def _block_outputs(model, blocks):
    """Forward hooks on the blocks themselves (they run around a converted forward, so they do not
    make it fall back) record every block's output."""
    outs = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
               for n in blocks]
    return outs, handles


def test_attention_probability_dropout_falls_back_exactly(monkeypatch):
    """GPT-2's default attn_pdrop = 0.1 has no fused kernel: training calls run the original
    forward, so every block output is bitwise the unconverted model's (same RNG stream, torch's own
    kernels on both sides -- also for a norm inside the block converted beforehand, which runs
    torch's forward inside the fallback). The converted final norm (outside any fallback) runs
    ckpt_ops' kernel, so the loss and gradients are compared by DESIGN 4's fp32 rule, not bitwise."""
    ref = gpt2(attn_pdrop=0.1, resid_pdrop=0.1).train()
    conv = copy.deepcopy(ref)
    ckpt_ops.convert(conv.transformer.h[0].ln_1)  # a norm converted before its block
    ckpt_ops.convert(conv)
    calls = []
    real = ckpt_ops.norm.layer_norm
    monkeypatch.setattr(ckpt_ops.norm, "layer_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, am, labels = batch()
    blocks = ["transformer.h.0", "transformer.h.1"]
    out_ref, _ = _block_outputs(ref, blocks)
    out_conv, _ = _block_outputs(conv, blocks)
    torch.manual_seed(5)
    l_ref, g_ref = train_step(ref, ids, am, labels)
    torch.manual_seed(5)
    l_conv, g_conv = train_step(conv, ids, am, labels)
    assert len(out_ref) == len(out_conv) == 2
    for a, b in zip(out_conv, out_ref):
        assert torch.equal(a, b)
    assert len(calls) == 1  # ln_f only: ln_1 of block 0 ran torch's LayerNorm inside the fallback
    assert_fp32_close(l_conv, l_ref, "loss")
    for name in g_ref:
        assert_fp32_close(g_conv[name], g_ref[name], name)
    assert any("attention-probability dropout" in k for k in ckpt_ops.conversion_report(conv)["fallbacks"])
    conv.eval()  # no dropout in eval: fused again
    with torch.no_grad():
        conv(input_ids=ids, attention_mask=am, use_cache=False)
    assert ckpt_ops.conversion_report(conv)["fused_calls"].get("GPT2Block")


def test_residual_dropout_trains_fused():
    model = gpt2(resid_pdrop=0.1).train()
    conv = ckpt_ops.convert(model)
    ids, am, labels = batch()
    loss = conv(input_ids=ids, attention_mask=am, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and ckpt_ops.conversion_report(conv)["fused_calls"].get("GPT2Block") == 2


@pytest.mark.parametrize("arch", list(MODELS))
def test_saved_bytes_vs_hf_gradient_checkpointing(arch):
    ids, am, labels = batch(b=2, s=24)

    def step_bytes(model):
        return ckpt_ops.saved_bytes(model, input_ids=ids, attention_mask=am, labels=labels, use_cache=False)

    plain = MODELS[arch]().train()
    gc_model = MODELS[arch]().train()
    gc_model.gradient_checkpointing_enable()
    conv = ckpt_ops.convert(MODELS[arch]().train(), recompute="full")
    b_plain, b_gc, b_conv = step_bytes(plain), step_bytes(gc_model), step_bytes(conv)
    stats = 2 * 24 * 8 * 4  # per-row statistics allowance
    assert b_conv <= b_gc + stats, (b_conv, b_gc)
    assert 5 * b_conv <= b_plain, (b_conv, b_plain)


def test_unconvert_and_errors():
    model = gpt2()
    ckpt_ops.convert(model)
    ckpt_ops.unconvert(model)
    assert "forward" not in vars(model.transformer.h[0])
    with pytest.raises(ValueError, match="recompute"):
        ckpt_ops.convert(gpt2(), recompute="half")
    with pytest.raises(TypeError, match="model"):
        ckpt_ops.convert("gpt2")
