"""torch.compile of converted models (issue 10 item 6): every fused family compiles a training step
with fullgraph=True (no graph break), loss and every gradient equal the unconverted eager model
(DESIGN 4, fp32), and ``fused_calls`` counts executed calls, not traces. Calls the fused path cannot
serve stay exact under compile: decided at trace time where shapes/dtypes/config decide, asserted
in the graph (a RuntimeError, never a wrong answer) where only tensor values could.

Tiny shapes (2 layers, d 64, S 10) and backend="aot_eager" (Inductor adds nothing to what is
checked here and is slow on CPU); one test runs Inductor."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ckpt_ops

T = pytest.importorskip("transformers")
from conftest import assert_fp32_close  # noqa: E402
from test_convert import batch, gpt2, llama  # noqa: E402
from test_convert_families import make  # noqa: E402

FAMILIES = {"gpt2": lambda **kw: gpt2(**kw).train(), "llama": lambda **kw: llama(**kw).train(),
            **{f: (lambda f=f, **kw: make(f, num_hidden_layers=2, **kw)) for f in ("mistral", "qwen2", "phi3",
                                                                                  "gemma")}}
KIND = {"gpt2": "GPT2Block", "llama": "LlamaDecoderLayer", "mistral": "MistralDecoderLayer",
        "qwen2": "Qwen2DecoderLayer", "phi3": "Phi3DecoderLayer", "gemma": "GemmaDecoderLayer"}


def step(model, ids, am, labels, **kw):
    """A training step with the loss computed outside the model: GPT-2's own labels= path has a
    graph break in transformers' loss_function (unconverted too; docs/convert.md)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=am, **kw).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), logits.detach()


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(conv_model, ref_model, got, want):
    assert_fp32_close(got[0], want[0], "loss")
    assert_fp32_close(got[1], want[1], "logits")
    g_ref, g_conv = grads(ref_model), grads(conv_model)
    assert g_ref.keys() == g_conv.keys() and g_ref
    for name in g_ref:
        assert_fp32_close(g_conv[name], g_ref[name], name)


def assert_compiled_steps(ref, conv, compiled, kind, steps, fused_before=0):
    """`steps` training steps of `compiled` (the compiled `conv`), each equal to `ref`'s eager step;
    the report then counts 2 fused calls (the 2 layers) per executed step and no fallback."""
    ids, am, labels = batch()
    want = step(ref, ids, am, labels)
    for _ in range(steps):
        assert_same(conv, ref, step(compiled, ids, am, labels), want)
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"][kind] - fused_before == 2 * steps and not rep["fallbacks"], rep


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fullgraph_training_step_matches_unconverted_and_counts_executions(family):
    ref = FAMILIES[family]()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    explained = torch._dynamo.explain(conv)(input_ids=ids, attention_mask=am)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    conv.zero_grad(set_to_none=True)
    before = ckpt_ops.conversion_report(conv)["fused_calls"].get(KIND[family], 0)  # explain ran the layers
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    assert_compiled_steps(ref, conv, compiled, KIND[family], 3, before)


@pytest.mark.parametrize("level", ["full", "keep_attn"])
def test_inductor_training_step_matches_unconverted(level):
    """The levels that replay QKV + RoPE in backward: under torch 2.14 Inductor the in-place RoPE
    on a CSE-shared QKV value gave wrong gradients (k_proj off by 60%) until it got its own copy
    (ckpt_ops.attention._rope_buffer)."""
    ref = FAMILIES["llama"]()
    conv = ckpt_ops.convert(copy.deepcopy(ref), recompute=level)
    compiled = torch.compile(conv, fullgraph=True, backend="inductor")
    assert_compiled_steps(ref, conv, compiled, "LlamaDecoderLayer", 2)


def test_sliding_window_shorter_than_the_sequence_fuses_inside_the_graph():
    """A sliding window shorter than the sequence is known at trace time: the compiled graph runs the
    fused window kernels (no graph break; the bool mask's sliding-window form asserted in the graph),
    answers the unconverted model's, and counts fused calls per executed call."""
    ref = FAMILIES["mistral"](sliding_window=4)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    assert_compiled_steps(ref, conv, compiled, "MistralDecoderLayer", 2)


def test_additive_mask_under_compile_falls_back_at_trace_time():
    """Eager attention's float mask needs a value check (rows attending to no key) the graph
    cannot branch on: under compile such calls run the original forward, exactly, reported."""
    ref = FAMILIES["llama"](impl="eager")
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    am = am.flip(-1)  # left padding: rows with no key under eager attention
    labels = ids.masked_fill(am == 0, -100)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    assert_same(conv, ref, step(compiled, ids, am, labels), step(ref, ids, am, labels))
    rep = ckpt_ops.conversion_report(conv)
    assert list(rep["fallbacks"]) == ["LlamaDecoderLayer: under torch.compile: a torch.float32 additive attention "
                                      "mask (eager attention) needs a check of its values (rows attending to no "
                                      "key) that a compiled graph cannot branch on"], rep
    assert rep["fallbacks"][list(rep["fallbacks"])[0]] == 2


def _packed_mask(b, s, split):
    """A (B, 1, S, S) bool mask of two packed sequences [0, split) and [split, S): causal within
    each, nothing across -- not causal & padding."""
    i = torch.arange(s)
    seg = (i >= split).long()
    m = (i[:, None] >= i[None, :]) & (seg[:, None] == seg[None, :])
    return m[None, None].expand(b, 1, s, s)


def test_mask_that_is_not_causal_padding_never_answers_wrong_under_compile():
    """A 4-D packed-sequence mask passed to the model: eager, the converted model falls back and
    answers the unconverted one's; compiled, the mask's form can only be known from its values, so
    the graph asserts it and raises a RuntimeError naming the reason instead of a wrong answer."""
    ref = FAMILIES["llama"]()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, _, _ = batch()
    mask = _packed_mask(2, 10, 6)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, use_cache=False).logits
        assert_fp32_close(conv(input_ids=ids, attention_mask=mask, use_cache=False).logits, want, "eager logits")
        assert any("not exactly causal & key padding" in k for k in ckpt_ops.conversion_report(conv)["fallbacks"])
        compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
        with pytest.raises(RuntimeError, match="under torch.compile: attention mask is not exactly causal"):
            compiled(input_ids=ids, attention_mask=mask, use_cache=False)
        # the same graph with a causal mask (all ones, expressed in 4-D) runs fused
        causal = _packed_mask(2, 10, 10)
        assert_fp32_close(compiled(input_ids=ids, attention_mask=causal, use_cache=False).logits,
                          ref(input_ids=ids, attention_mask=causal, use_cache=False).logits, "compiled logits")


@pytest.mark.parametrize("level", ["keep_mlp", "selective", "none"])
def test_other_levels_compile_fullgraph(level):
    ref = FAMILIES["llama"]()
    conv = ckpt_ops.convert(copy.deepcopy(ref), recompute=level)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    assert_compiled_steps(ref, conv, compiled, "LlamaDecoderLayer", 1)


def test_changing_sequence_lengths_recompile_dynamic_and_respect_the_window():
    """A new sequence length makes dynamo recompile with a dynamic S (automatic dynamic shapes):
    still one graph, still exact. Mistral's window check is a guard on S: calls longer than the
    window run the fused window kernels (a recompile), shorter ones the plain ones; all fused."""
    ref = FAMILIES["mistral"](sliding_window=12)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    for s, fused, fallen in ((10, 2, 0), (11, 4, 0), (14, 6, 0)):
        ids, am, labels = batch(s=s)
        assert_same(conv, ref, step(compiled, ids, am, labels), step(ref, ids, am, labels))
        rep = ckpt_ops.conversion_report(conv)
        assert rep["fused_calls"]["MistralDecoderLayer"] == fused, (s, rep)
        assert sum(rep["fallbacks"].values()) == fallen, (s, rep)


def test_output_attentions_under_compile_runs_the_original_forward_in_the_graph():
    """transformers installs its output recorders at the first call that asks (eagerly here: the
    installation takes a lock dynamo cannot trace, converted or not); compiled calls that collect
    attentions then run the original forward inside the graph, one attention tensor per layer."""
    ref = FAMILIES["llama"](impl="eager")
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch()
    want = ref(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    conv(input_ids=ids, attention_mask=am, output_attentions=True)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    got = compiled(input_ids=ids, attention_mask=am, output_attentions=True).attentions
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert_fp32_close(a, b, "attentions")
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fallbacks"] == {"LlamaDecoderLayer: transformers records 'attentions' from self_attn "
                                "(output_attentions=True): original forward": 4}, rep


def test_hf_every_n_layers_checkpointing_under_compile():
    """HF checkpointing on (every_n_layers=2) and compiled: the fused layers take HF's flags as in
    eager (no double recompute), exact. Not fullgraph: HF's checkpointing has a graph break of its
    own, unconverted too (docs/convert.md)."""
    ref = FAMILIES["llama"]()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    conv.activation_checkpointing_enable(every_n_layers=2)
    compiled = torch.compile(conv, backend="aot_eager")
    assert_compiled_steps(ref, conv, compiled, "LlamaDecoderLayer", 2)


def test_rotary_tables_not_rotate_half_never_answer_wrong_under_compile():
    """Tables whose halves differ (not what HF's rotary embeddings make) passed to a layer: eager
    falls back to the unconverted layer; compiled, the graph asserts the form and raises."""
    ref = FAMILIES["llama"]()
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    layer, ref_layer = conv.model.layers[0], ref.model.layers[0]
    x = torch.randn(2, 10, 64)
    cos, sin = conv.model.rotary_emb(x, torch.arange(10)[None])
    cos = cos.clone()
    cos[..., -1] += 0.25
    with torch.no_grad():
        want = ref_layer(x, position_embeddings=(cos, sin))
        assert_fp32_close(layer(x, position_embeddings=(cos, sin)), want, "eager layer")
        assert any("rotate-half" in k for k in ckpt_ops.conversion_report(conv)["fallbacks"])
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        with pytest.raises(RuntimeError, match="under torch.compile: rotary tables are not of the rotate-half"):
            compiled(x, position_embeddings=(cos, sin))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_autocast_bf16_training_step_compiles_fullgraph(family):
    """CPU bf16 autocast around a compiled converted model (HF Trainer bf16=True + torch_compile):
    no graph break, fused, and DESIGN 4's low-precision rule against the fp32 truth (the configs
    and rule of tests/test_convert_autocast.py)."""
    from test_convert_autocast import assert_like_eager_autocast
    from test_convert_autocast import make as amp_make
    from test_convert_autocast import step as amp_step

    ref = amp_make(family)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=4, s=64)
    truth = amp_step(copy.deepcopy(ref), ids, am, labels)
    eager = amp_step(copy.deepcopy(ref), ids, am, labels, amp=torch.bfloat16)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    loss, logits, tok, g = amp_step(compiled, ids, am, labels, amp=torch.bfloat16)
    got = (loss, logits, tok, {k.removeprefix("_orig_mod."): v for k, v in g.items()})
    assert_like_eager_autocast(got, eager, truth, f"{family} compiled")
    rep = ckpt_ops.conversion_report(conv)
    assert rep["fused_calls"][KIND[family]] == 2 and not rep["fallbacks"], rep


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_lora_converted_model_compiles_fullgraph(arch):
    """PEFT LoRA on every projection (ckpt_ops.lora) of a converted model under torch.compile(fullgraph=True):
    no graph break, loss and every LoRA gradient equal the unconverted PEFT model in eager, all calls fused."""
    peft = pytest.importorskip("peft", reason="peft is not installed (requirements-dev.txt pins it)")
    targets = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               "gpt2": ["c_attn", "c_proj", "c_fc"]}[arch]
    cfg = lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,  # noqa: E731
                                  fan_in_fan_out=arch == "gpt2")
    ref = peft.get_peft_model(FAMILIES[arch](), cfg()).train()
    conv = peft.get_peft_model(FAMILIES[arch](), cfg()).train()  # same seeds: same weights and adapters
    ckpt_ops.convert(conv)
    compiled = torch.compile(conv, fullgraph=True, backend="aot_eager")
    assert_compiled_steps(ref, conv, compiled, KIND[arch], 2)
    assert any("lora_" in n for n in grads(ref))
