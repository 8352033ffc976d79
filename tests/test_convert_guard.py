"""ckpt_ops.convert is never wrong: a submodule a fused block reads but does not call (a PEFT
wrapper it does not serve, a forward hook or pre-hook, a global module hook, a parametrization) makes that call run
the original forward, with the reason in the report, and the result equals the unconverted model's;
transformers' output recorders (output_attentions) are honoured the same way."""
import copy

import pytest
import torch
from torch.nn.utils import parametrize

import ckpt_ops

pytest.importorskip("transformers")
from conftest import assert_fp32_close  # noqa: E402
from test_convert import assert_same_step, batch, gpt2, llama, train_step  # noqa: E402


def fallbacks(model):
    return ckpt_ops.conversion_report(model)["fallbacks"]


def double(module, args, out):
    return out * 2.0


def shift_input(module, args):
    return (args[0] + 0.5,)


class Halve(torch.nn.Module):
    def forward(self, w):
        return 0.5 * w


MODIFIERS = {
    "forward_hook": ("model.layers.0.mlp.down_proj", lambda m: m.register_forward_hook(double),
                     "mlp.down_proj has forward hooks"),
    "pre_hook": ("model.layers.0.self_attn.q_proj", lambda m: m.register_forward_pre_hook(shift_input),
                 "self_attn.q_proj has forward pre hooks"),
    "parametrization": ("model.layers.0.self_attn.o_proj",
                        lambda m: parametrize.register_parametrization(m, "weight", Halve()),
                        "self_attn.o_proj is parametrized"),
}


@pytest.mark.parametrize("kind", list(MODIFIERS))
def test_modified_projection_falls_back_to_the_unconverted_result(kind):
    path, apply, reason = MODIFIERS[kind]
    ref = llama().train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    plain_loss, _ = train_step(copy.deepcopy(ref), ids, am, labels)
    handles = [apply(m.get_submodule(path)) for m in (ref, conv)]
    loss = assert_same_step(conv, ref, ids, am, labels)
    assert not torch.equal(loss, plain_loss)  # the modifier changes the result
    rep = ckpt_ops.conversion_report(conv)
    assert any(reason in k for k in rep["fallbacks"]), rep
    assert rep["fused_calls"]["LlamaDecoderLayer"] == 1  # layer 1 is untouched and stays fused
    if kind != "parametrization":  # removing the hook: the cached verdict is re-checked, fused again
        handles[1].remove()
        conv(input_ids=ids, attention_mask=am, labels=labels)
        assert ckpt_ops.conversion_report(conv)["fused_calls"]["LlamaDecoderLayer"] == 3


def test_global_module_hook_falls_back_and_sees_every_call():
    ref = gpt2().train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(type(m).__name__))
    try:
        ref(input_ids=ids, attention_mask=am, labels=labels)
        n_ref, seen[:] = list(seen), []
        conv(input_ids=ids, attention_mask=am, labels=labels)
        assert seen == n_ref  # every submodule call the hook expects happens
        assert_same_step(conv, ref, ids, am, labels)
    finally:
        handle.remove()
    assert any("global module hook" in k for k in fallbacks(conv))
    assert not ckpt_ops.conversion_report(conv)["fused_calls"].get("GPT2Block")


def test_flop_counter_module_tracker_does_not_force_a_fallback():
    """FlopCounterMode's ModuleTracker hooks only observe: the fused path keeps running under them,
    so FLOP counts of a converted model are the fused path's, recompute included."""
    from torch.utils.flop_counter import FlopCounterMode

    ref = gpt2().train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    counts = []
    for model in (ref, conv):
        with FlopCounterMode(display=False) as c:
            model(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        counts.append(c.get_total_flops())
    assert fallbacks(conv) == {}
    assert ckpt_ops.conversion_report(conv)["fused_calls"]["GPT2Block"] == 2
    assert counts[0] < counts[1]  # the fused step replays the attention half and fc1: more FLOPs than eager
    assert_same_step(conv, ref, ids, am, labels)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_output_attentions_runs_the_original_forward(arch):
    ref = (gpt2 if arch == "gpt2" else llama)("eager").train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    a = ref(input_ids=ids, attention_mask=am, output_attentions=True)
    b = conv(input_ids=ids, attention_mask=am, output_attentions=True)
    assert len(b.attentions) == len(a.attentions) == 2
    for x, y in zip(b.attentions, a.attentions):
        assert_fp32_close(x, y, "attentions")
    assert any("records 'attentions'" in k for k in fallbacks(conv)), fallbacks(conv)
    # the recorders stay installed but are inert: the next plain call runs fused
    before = ckpt_ops.conversion_report(conv)["fused_calls"].get("GPT2Block" if arch == "gpt2" else
                                                                  "LlamaDecoderLayer", 0)
    assert_same_step(conv, ref, ids, am, labels)
    after = ckpt_ops.conversion_report(conv)["fused_calls"]
    assert sum(v for k, v in after.items() if k != "norm") == before + 2


@pytest.mark.parametrize("order", ["peft_then_convert", "convert_then_peft"])
def test_peft_adapter_not_served_falls_back_with_adapter_gradients(order):
    """A PEFT method other than plain LoRA (here IA3, which scales a projection's output) wraps the
    projection in a class the block does not read: the call falls back, with its reason. (Plain
    LoRA is fused: tests/test_convert_lora.py.)"""
    peft = pytest.importorskip("peft", reason="peft is not installed")
    cfg = dict(target_modules=["q_proj", "v_proj"], feedforward_modules=[])
    ref = peft.get_peft_model(llama(), peft.IA3Config(**cfg)).train()
    base = llama()
    if order == "convert_then_peft":
        ckpt_ops.convert(base)
    conv = peft.get_peft_model(base, peft.IA3Config(**cfg)).train()
    if order == "peft_then_convert":
        ckpt_ops.convert(conv)
    for m in (ref, conv):  # IA3 starts at the identity: make it change the result
        for n, p in m.named_parameters():
            if "ia3_" in n:
                torch.manual_seed(3)
                p.data.uniform_(0.5, 1.5)
    ids, am, labels = batch()
    l_ref, g_ref = train_step(ref, ids, am, labels)
    l_conv, g_conv = train_step(conv, ids, am, labels)
    assert_fp32_close(l_conv, l_ref, "loss")
    adapters = [n for n in g_ref if "ia3_" in n]
    assert len(adapters) == 4 and set(g_conv) == set(g_ref) == set(adapters)  # base weights frozen
    for name in adapters:
        assert_fp32_close(g_conv[name], g_ref[name], name)
    rep = ckpt_ops.conversion_report(conv)
    assert any("self_attn.q_proj is a peft Linear layer: not fused" in k for k in rep["fallbacks"]), rep
    assert not rep["fused_calls"].get("LlamaDecoderLayer")
    if order == "peft_then_convert":  # the layers seen at convert time say their calls will fall back
        assert all("peft Linear layer" in status for _, _, status in rep["layers"]), rep["layers"]


def test_guard_check_traces_without_graph_breaks():
    """The per-call check (hooks, classes, transformers' recorders) is plain Python on modules:
    torch.compile traces it with no graph break."""
    conv = ckpt_ops.convert(llama("eager"))
    ids, am, _ = batch()
    conv(input_ids=ids, attention_mask=am, output_attentions=True)  # installs transformers' recorders
    layer = conv.model.layers[0]
    guard = layer._ckpt_ops_state.guard

    def f(x):
        guard.check(layer)
        return x * 2

    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(torch.randn(3))
    assert guard.recorders and explained.graph_break_count == 0, explained.break_reasons


def test_layer_kwargs_from_transformers_are_inert_or_fall_back():
    """num_items_in_batch (passed to every layer by HF Trainer's loss path) keeps the call fused;
    packed-sequence metadata (cu_seq_lens_q, ...) is not served fused and falls back."""
    ref = llama().train()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    n = (labels != -100).sum()
    a = ref(input_ids=ids, attention_mask=am, labels=labels, num_items_in_batch=n).loss
    b = conv(input_ids=ids, attention_mask=am, labels=labels, num_items_in_batch=n).loss
    assert_fp32_close(b, a, "loss")
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"]["LlamaDecoderLayer"] == 2 and not rep["fallbacks"], rep
    layer = conv.model.layers[0]
    x = torch.randn(1, 4, 64)
    pe = conv.model.rotary_emb(x, torch.arange(4)[None])
    cu = torch.tensor([0, 2, 4])
    out = layer(x, position_embeddings=pe, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2, max_length_k=2)
    ref_out = ref.model.layers[0](x, position_embeddings=pe, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2,
                                  max_length_k=2)
    torch.testing.assert_close(out, ref_out)
    assert any("'cu_seq_lens_q'" in k for k in fallbacks(conv)), fallbacks(conv)
