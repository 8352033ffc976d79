"""Hugging Face habits around a converted model (issue 10 item 5): transformers' activation
checkpointing switched on before or after convert (no double recompute; every_n_layers honoured,
skipped layers at level "none"; offload=True honoured), output_hidden_states exact, and eval()
with grad: fused without a cache, the original forward (the cache filled exactly) with one."""
import copy
import warnings

import pytest
import torch

import ckpt_ops

T = pytest.importorskip("transformers")
from conftest import assert_fp32_close  # noqa: E402
from test_convert import assert_same_step, batch, gpt2, llama, train_step  # noqa: E402
from test_convert_families import make  # noqa: E402


def report(model):
    return ckpt_ops.conversion_report(model)


def step_bytes(model, ids, am, labels):
    return ckpt_ops.saved_bytes(model, input_ids=ids, attention_mask=am, labels=labels)


def enable(model, api, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # gradient_checkpointing_enable is deprecated in 5.x
        if api == "gradient":
            model.gradient_checkpointing_enable(**kw)
        else:
            model.activation_checkpointing_enable(**kw)


@pytest.mark.parametrize("order", ["before_convert", "after_convert"])
@pytest.mark.parametrize("api", ["activation", "gradient"])
def test_hf_checkpointing_does_not_recompute_fused_layers_twice(order, api):
    ref = llama().train()
    plain = ckpt_ops.convert(copy.deepcopy(ref))
    conv = copy.deepcopy(ref)
    if order == "before_convert":
        enable(conv, api)
        ckpt_ops.convert(conv)
    else:
        ckpt_ops.convert(conv)
        enable(conv, api)
    assert all(layer.gradient_checkpointing for layer in conv.model.layers)
    ids, am, labels = batch()
    assert_same_step(conv, ref, ids, am, labels)
    rep = report(conv)
    # torch.utils.checkpoint around a fused layer would call it again in backward: 4 calls
    assert rep["fused_calls"]["LlamaDecoderLayer"] == 2 and not rep["fallbacks"], rep
    assert step_bytes(conv, ids, am, labels) == step_bytes(plain, ids, am, labels)


def _with_levels(model, levels):
    for layer, level in zip(model.model.layers, levels):
        layer._ckpt_ops_state.recompute = level
    return model


def test_every_n_layers_runs_the_skipped_layers_at_level_none():
    ref = llama(num_hidden_layers=4).train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    enable(conv, "activation", every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in conv.model.layers] == [True, False, True, False]
    ids, am, labels = batch()
    assert_same_step(conv, ref, ids, am, labels)
    assert report(conv)["fused_calls"]["LlamaDecoderLayer"] == 4 and not report(conv)["fallbacks"]
    b = step_bytes(conv, ids, am, labels)
    mixed = _with_levels(ckpt_ops.convert(copy.deepcopy(ref)), ["full", "none", "full", "none"])
    full = ckpt_ops.convert(copy.deepcopy(ref))
    none = ckpt_ops.convert(copy.deepcopy(ref), recompute="none")
    assert b == step_bytes(mixed, ids, am, labels)
    assert step_bytes(full, ids, am, labels) < b < step_bytes(none, ids, am, labels)
    conv.activation_checkpointing_disable()  # off again: every layer at the convert level
    assert step_bytes(conv, ids, am, labels) == step_bytes(full, ids, am, labels)


def test_offload_is_honoured_on_fused_layers(monkeypatch):
    """offload=True: what the fused segments save goes through torch's save_on_cpu, as what HF's
    checkpoint saves does unconverted."""
    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Recording(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            pack = self.pack_hook
            self.pack_hook = lambda t: (packed.append(tuple(t.shape)), pack(t))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    ref = llama().train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    enable(conv, "activation", offload=True)
    ids, am, labels = batch()
    assert_same_step(conv, ref, ids, am, labels)
    assert report(conv)["fused_calls"]["LlamaDecoderLayer"] == 2 and not report(conv)["fallbacks"]
    assert packed.count((2, 10, 64)) == 2  # each fused layer's input x (b 2, s 10, d 64) goes to the host
    weights = {tuple(p.shape) for p in conv.parameters() if p.dim() == 2}
    assert not weights & set(packed), packed  # the weights the Function saves stay where they are
    n_conv, packed[:] = len(packed), []
    plain = ckpt_ops.convert(copy.deepcopy(ref))
    train_step(plain, ids, am, labels)
    assert packed == [] and n_conv > 0


def test_unknown_checkpoint_function_runs_the_original_forward():
    calls = []

    def my_checkpoint(fn, *args, **kwargs):
        calls.append(1)
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    ref = llama().train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    conv._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=my_checkpoint)
    ids, am, labels = batch()
    assert_same_step(conv, ref, ids, am, labels)
    assert len(calls) == 2  # the user's function ran around both layers
    rep = report(conv)
    assert not rep["fused_calls"].get("LlamaDecoderLayer")
    assert [k for k in rep["fallbacks"] if "checkpoint function ckpt_ops does not know" in k and "my_checkpoint" in k]


def test_output_hidden_states_is_exact_and_fused():
    ref = llama().train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch()
    a = ref(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    b = conv(input_ids=ids, attention_mask=am, output_hidden_states=True).hidden_states
    assert len(a) == len(b) == 3
    for i, (x, y) in enumerate(zip(b, a)):
        assert_fp32_close(x, y, f"hidden_states[{i}]")
    rep = report(conv)
    assert rep["fused_calls"]["LlamaDecoderLayer"] == 2 and not rep["fallbacks"], rep


EVAL = {"llama": lambda: llama(), "phi3": lambda: make("phi3", num_hidden_layers=2),  # packed qkv_proj
        "gemma": lambda: make("gemma", num_hidden_layers=2), "qwen2": lambda: make("qwen2", num_hidden_layers=2),
        "mistral_window": lambda: make("mistral_window_ge_s", num_hidden_layers=2)}  # sliding_window 24 >= S


def _eval_grad_step(model, ids, am, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=am, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_cache", [False, None])
@pytest.mark.parametrize("family", list(EVAL))
def test_eval_with_grad_fuses_and_fills_the_cache_exactly(family, use_cache):
    """model.eval() with grad: fused. With the default use_cache HF creates a cache, fills it and
    returns it: the fused layer stores the keys/values the original forward stores (HF's own
    modules and functions) and the returned cache equals the unconverted model's."""
    ref = EVAL[family]().eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    kw = {} if use_cache is None else {"use_cache": use_cache}
    a, g_ref = _eval_grad_step(ref, ids, am, labels, **kw)
    b, g_conv = _eval_grad_step(conv, ids, am, labels, **kw)
    assert_fp32_close(b.loss, a.loss, "loss")
    assert_fp32_close(b.logits, a.logits, "logits")
    assert g_ref.keys() == g_conv.keys() and g_ref
    for n in g_ref:
        assert_fp32_close(g_conv[n], g_ref[n], n)
    rep = report(conv)
    assert rep["fused_calls"][type(ref.model.layers[0]).__name__] == 2 and not rep["fallbacks"], rep
    if use_cache is None:
        ca, cb = a.past_key_values, b.past_key_values
        assert cb.get_seq_length() == ca.get_seq_length() == 10 and len(cb.layers) == len(ca.layers) == 2
        # layer 0 reads the embeddings, the same input as unconverted: HF's own ops, bitwise HF's
        # keys/values; layer 1 reads the fused layer 0's output (equal within rounding)
        assert torch.equal(cb.layers[0].keys, ca.layers[0].keys) and torch.equal(cb.layers[0].values,
                                                                                 ca.layers[0].values)
        for i, (la, lb) in enumerate(zip(ca.layers, cb.layers)):
            assert_fp32_close(lb.keys, la.keys, f"layer {i} keys")
            assert_fp32_close(lb.values, la.values, f"layer {i} values")
    else:
        assert a.past_key_values is None and b.past_key_values is None


def test_gpt2_eval_with_grad_and_a_cache_falls_back_and_fills_it():
    ref = gpt2().eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    a, _ = _eval_grad_step(ref, ids, am, labels)
    b, _ = _eval_grad_step(conv, ids, am, labels)
    assert_fp32_close(b.logits, a.logits, "logits")
    assert b.past_key_values.get_seq_length() == a.past_key_values.get_seq_length() == 10
    for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
        assert torch.equal(lb.keys, la.keys) and torch.equal(lb.values, la.values)
    assert report(conv)["fallbacks"] == {"GPT2Block: KV cache to fill (eval mode or no grad: HF returns it "
                                         "filled; the fused path computes no keys/values)": 2}


def test_no_grad_eval_with_a_cache_runs_the_original_forward():
    """Without grad there is no memory to win: the original forward (the fastest exact path) serves."""
    ref = llama().eval()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, _ = batch()
    with torch.no_grad():
        a, b = ref(input_ids=ids, attention_mask=am), conv(input_ids=ids, attention_mask=am)
    assert_fp32_close(b.logits, a.logits, "logits")
    for la, lb in zip(a.past_key_values.layers, b.past_key_values.layers):
        assert torch.equal(lb.keys, la.keys) and torch.equal(lb.values, la.values)
    assert list(report(conv)["fallbacks"]) == ["LlamaDecoderLayer: KV cache to fill (eval mode or no grad: HF "
                                               "returns it filled; the fused path computes no keys/values)"]
