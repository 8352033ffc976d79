"""PEFT LoRA fused inside the checkpointed block (ckpt_ops.lora): tiny random-weight Llama and GPT-2
models (nothing downloaded) with LoRA on attention and MLP projections train exactly like the
unconverted PEFT model (DESIGN 4 fp32 rule), base weights get no gradient, the blocks run fused,
saved bytes at "full" are at most PEFT + HF gradient checkpointing's, and every configuration that
is not served (DoRA, lora_bias, mixed adapter dtypes, hooks, parametrizations) falls back with its
reason and the unconverted result."""
import copy

import pytest
import torch
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import ckpt_ops
from ckpt_ops import lora as lora_mod

pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is not installed (requirements-dev.txt pins it)")
from conftest import assert_fp32_close  # noqa: E402
from test_convert import batch, gpt2, llama, train_step  # noqa: E402
from test_convert_guard import Halve, double, shift_input  # noqa: E402

TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gpt2": ["c_attn", "c_proj", "c_fc"]}  # c_proj: GPT-2's attention and MLP output projections
MODELS = {"llama": llama, "gpt2": gpt2}
KIND = {"llama": "LlamaDecoderLayer", "gpt2": "GPT2Block"}


def lora_cfg(arch, **over):
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False, lora_dropout=0.0)
    if arch == "gpt2":
        cfg["fan_in_fan_out"] = True  # Conv1D
    cfg.update(over)
    return peft.LoraConfig(**cfg)


def pair(arch, order="peft_then_convert", level="full", **over):
    """(unconverted PEFT model, converted PEFT model) with the same weights and adapters."""
    ref = peft.get_peft_model(MODELS[arch](), lora_cfg(arch, **over)).train()
    base = MODELS[arch]()
    if order == "convert_then_peft":
        ckpt_ops.convert(base, recompute=level)
    conv = peft.get_peft_model(base, lora_cfg(arch, **over)).train()  # same seed: the same LoRA init
    if order == "peft_then_convert":
        ckpt_ops.convert(conv, recompute=level)
    return ref, conv


def assert_lora_step(conv, ref, n_lora):
    """Loss and every LoRA gradient of `conv` vs `ref`; no base weight gets a gradient."""
    ids, am, labels = batch()
    l_ref, g_ref = train_step(ref, ids, am, labels)
    l_conv, g_conv = train_step(conv, ids, am, labels)
    assert_fp32_close(l_conv, l_ref, "loss")
    lora = [n for n in g_ref if "lora_" in n]
    assert len(lora) == n_lora and set(g_conv) == set(g_ref), (sorted(set(g_conv) ^ set(g_ref)), len(lora))
    for name in g_ref:
        assert_fp32_close(g_conv[name], g_ref[name], name)
    assert all(p.grad is None for n, p in conv.named_parameters() if "lora_" not in n and not p.requires_grad)
    return l_ref


def report(model):
    return ckpt_ops.conversion_report(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("r", [4, 8])
@pytest.mark.parametrize("order", ["peft_then_convert", "convert_then_peft"])
def test_lora_step_matches_peft_and_runs_fused(arch, r, order):
    ref, conv = pair(arch, order, r=r, use_rslora=(r == 8))
    n_proj = 7 if arch == "llama" else 4
    loss = assert_lora_step(conv, ref, 2 * 2 * n_proj)
    rep = report(conv)
    assert rep["fused_calls"][KIND[arch]] == 2 and rep["fallbacks"] == {}, rep
    with ref.disable_adapter():  # the adapters change the loss: a fused path ignoring them would fail
        ids, am, labels = batch()
        assert not torch.allclose(ref(input_ids=ids, attention_mask=am, labels=labels).loss, loss, rtol=1e-3)
    if order == "peft_then_convert":
        assert all(status == "fused" for _, _, status in rep["layers"]), rep["layers"]


@pytest.mark.parametrize("level", ["full", "keep_attn", "keep_mlp", "selective", "none"])
def test_every_level_with_lora(level):
    ref, conv = pair("llama", level=level)
    assert_lora_step(conv, ref, 28)
    assert report(conv)["fused_calls"]["LlamaDecoderLayer"] == 2 and not report(conv)["fallbacks"]


def test_enable_input_require_grads_and_partial_targets():
    """The PEFT habit: enable_input_require_grads() (block inputs then require grad) or not, LoRA on
    a subset of the projections (here only the MLP's down projection: no attention adapter)."""
    for targets in (["q_proj", "v_proj"], ["down_proj"], ["o_proj", "up_proj"]):
        ref, conv = pair("llama", target_modules=targets)
        for m in (ref, conv):
            m.enable_input_require_grads()
        assert_lora_step(conv, ref, 2 * 2 * len(targets))
        ref, conv = pair("llama", target_modules=targets)
        assert_lora_step(conv, ref, 2 * 2 * len(targets))
        assert not report(conv)["fallbacks"]


def test_two_adapters_one_active_and_switching():
    ref, conv = pair("llama")
    for m in (ref, conv):
        torch.manual_seed(5)
        m.add_adapter("second", lora_cfg("llama", r=8, target_modules=["q_proj", "down_proj"]))
    assert_lora_step(conv, ref, 28)  # "default" active: the second adapter's parameters get nothing
    for m in (ref, conv):
        m.set_adapter("second")
    assert_lora_step(conv, ref, 8)
    assert report(conv)["fused_calls"]["LlamaDecoderLayer"] == 4 and not report(conv)["fallbacks"]


def test_disabled_and_merged_adapters_serve_the_base_projection():
    ref, conv = pair("gpt2")
    ids, am, labels = batch()
    with ref.disable_adapter(), conv.disable_adapter():
        a = ref(input_ids=ids, attention_mask=am, labels=labels).loss
        b = conv(input_ids=ids, attention_mask=am, labels=labels).loss
    assert_fp32_close(b, a, "loss (adapters disabled)")
    for m in (ref, conv):
        m.merge_adapter()
    with torch.no_grad():  # no_grad: use_cache=False, else HF's default cache is a generation call
        a = ref(input_ids=ids, attention_mask=am, labels=labels, use_cache=False).loss
        b = conv(input_ids=ids, attention_mask=am, labels=labels, use_cache=False).loss
    assert_fp32_close(b, a, "loss (merged)")
    assert report(conv)["fused_calls"]["GPT2Block"] == 4 and not report(conv)["fallbacks"]
    with ref.disable_adapter(), conv.disable_adapter():  # merged and disabled: peft unmerges in forward
        a = ref(input_ids=ids, attention_mask=am, labels=labels, use_cache=False).loss
        b = conv(input_ids=ids, attention_mask=am, labels=labels, use_cache=False).loss
    assert_fp32_close(b, a, "loss (merged, then disabled)")
    assert any("adapters disabled while merged" in k for k in report(conv)["fallbacks"]), report(conv)["fallbacks"]


class FixedMask(torch.nn.Module):
    """A reference lora_dropout: applies a given (recovered) keep * 1/(1-p) mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask.view(x.shape)


PATHS = {"llama": "base_model.model.model.layers.{}.{}", "gpt2": "base_model.model.transformer.h.{}.{}"}


def step_recording_drops(conv, monkeypatch):
    """One training step of `conv` recording every LoRA dropout drawn, as (spec, stream seed, the
    mask applied to ones): (batch, detached loss, forward records, backward records)."""
    records, orig = [], lora_mod.drop

    def recording_drop(lc, i, x):
        if lc.specs[i].p > 0.0:
            records.append((lc.specs[i], int(lc.seed) + i, orig(lc, i, torch.ones_like(x))))
        return orig(lc, i, x)

    monkeypatch.setattr(lora_mod, "drop", recording_drop)
    data = batch()
    conv.zero_grad(set_to_none=True)
    loss = conv(input_ids=data[0], attention_mask=data[1], labels=data[2]).loss
    n_fwd = len(records)
    loss.backward()
    return data, loss.detach(), records[:n_fwd], records[n_fwd:]


def assert_step_equals(ref, conv, data, loss, n_grads):
    """`ref`'s training step on `data` vs `conv`'s (already run: its loss and .grad): loss and all
    n_grads gradients by the fp32 rule."""
    l_ref, g_ref = train_step(ref, *data)
    g_conv = {n: p.grad for n, p in conv.named_parameters() if p.grad is not None}
    assert_fp32_close(loss, l_ref, "loss")
    assert set(g_conv) == set(g_ref) and len(g_ref) == n_grads
    for n in g_ref:
        assert_fp32_close(g_conv[n], g_ref[n], n)


@pytest.mark.parametrize("arch, level", [("llama", "full"), ("gpt2", "full"), ("llama", "none"),
                                         ("gpt2", "keep_mlp")])
def test_lora_dropout_matches_the_recovered_mask(arch, level, monkeypatch):
    ref, conv = pair(arch, level=level, lora_dropout=0.1)
    data, loss, fwd, bwd = step_recording_drops(conv, monkeypatch)
    n_proj = 7 if arch == "llama" else 4
    assert len(fwd) == 2 * n_proj
    first = {}
    for spec, seed, mask in fwd:
        first[(spec.name, seed)] = mask
    for spec, seed, mask in bwd:  # backward regenerates the very same masks
        assert torch.equal(mask, first[(spec.name, seed)]), spec.name
    kept = torch.cat([m.flatten() != 0 for _, _, m in fwd]).float().mean()
    assert 0.8 < float(kept) < 0.97  # p = 0.1 applied
    seen = {}
    for spec, _, mask in fwd:  # k-th occurrence of a projection: layer k
        k = seen.get(spec.name, 0)
        seen[spec.name] = k + 1
        proj, adapter = spec.name.split("/")
        ref.get_submodule(PATHS[arch].format(k, proj)).lora_dropout[adapter] = FixedMask(mask)
    assert_step_equals(ref, conv, data, loss, 4 * n_proj)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_bytes_at_full_at_most_peft_with_hf_checkpointing(arch):
    ids, am, labels = batch(b=2, s=24)

    def step_bytes(model):
        return ckpt_ops.saved_bytes(model, input_ids=ids, attention_mask=am, labels=labels, use_cache=False)

    ref, conv = pair(arch)
    gc = peft.get_peft_model(MODELS[arch](), lora_cfg(arch)).train()
    gc.gradient_checkpointing_enable()
    gc.enable_input_require_grads()
    full_ft = ckpt_ops.convert(MODELS[arch]().train())  # no LoRA, every weight trains
    b_plain, b_gc, b_conv, b_ft = step_bytes(ref), step_bytes(gc), step_bytes(conv), step_bytes(full_ft)
    # torch.utils.checkpoint holds each layer's non-hidden inputs (the rotary tables cos/sin
    # (1, S, hd) fp32, the 4-D bool mask (B, 1, S, S)) outside the saved-tensor hooks; the fused
    # block saves its (smaller) equivalents through them: half tables, a (B, S) key mask
    hidden = (2 * 24 * 16 * 4 if arch == "llama" else 0) + 2 * 24 * 24
    assert b_conv <= b_gc + hidden, (b_conv, b_gc)
    assert b_conv <= b_ft, (b_conv, b_ft)  # the adapters add nothing kept: no u, no mask, 0-byte seeds
    assert 3 * b_conv <= b_plain, (b_conv, b_plain)
    assert report(conv)["fused_calls"][KIND[arch]] == 2


LLAMA0 = "base_model.model.model.layers.0."
MODIFIED = {
    "forward_hook_on_wrapper": ("self_attn.q_proj", lambda m: m.register_forward_hook(double),
                                "self_attn.q_proj has forward hooks"),
    "pre_hook_on_base_layer": ("mlp.down_proj.base_layer", lambda m: m.register_forward_pre_hook(shift_input),
                               "mlp.down_proj.base_layer has forward pre hooks"),
    "parametrization_on_lora_B": ("self_attn.o_proj.lora_B.default",
                                  lambda m: parametrize.register_parametrization(m, "weight", Halve()),
                                  "self_attn.o_proj.lora_B.default is parametrized"),
}


@pytest.mark.parametrize("kind", list(MODIFIED))
def test_hooked_or_parametrized_lora_projection_falls_back(kind):
    path, apply, reason = MODIFIED[kind]
    ref, conv = pair("llama")
    plain = copy.deepcopy(ref)
    for m in (ref, conv):
        apply(m.get_submodule(LLAMA0 + path))
    loss = assert_lora_step(conv, ref, 28)
    ids, am, labels = batch()
    assert not torch.allclose(plain(input_ids=ids, attention_mask=am, labels=labels).loss, loss, rtol=1e-4)
    rep = report(conv)
    assert any(reason in k for k in rep["fallbacks"]), rep["fallbacks"]
    assert rep["fused_calls"]["LlamaDecoderLayer"] == 1  # layer 1 stays fused


def _to_double(model):
    for m in (model.get_submodule(LLAMA0 + "self_attn.v_proj.lora_A.default"),
              model.get_submodule(LLAMA0 + "self_attn.v_proj.lora_B.default")):
        m.to(torch.float64)


UNSERVED = {
    "dora": ("llama", dict(use_dora=True), None, "peft DoRA layer (use_dora=True): not fused"),
    "lora_bias": ("gpt2", dict(lora_bias=True), None, "has lora_bias=True: not fused"),
}


@pytest.mark.parametrize("case", list(UNSERVED))
def test_unserved_lora_configurations_fall_back_exactly(case):
    arch, over, modify, reason = UNSERVED[case]
    ref, conv = pair(arch, **over)
    if modify is not None:
        for m in (ref, conv):
            modify(m)
    ids, am, labels = batch()
    l_ref, g_ref = train_step(ref, ids, am, labels)
    l_conv, g_conv = train_step(conv, ids, am, labels)
    assert_fp32_close(l_conv, l_ref, "loss")
    assert set(g_conv) == set(g_ref) and g_ref
    for n in g_ref:
        assert_fp32_close(g_conv[n], g_ref[n], n)
    assert any(reason in k for k in report(conv)["fallbacks"]), report(conv)["fallbacks"]


def test_modules_to_save_training_then_merge_and_unload_equals_peft():
    ref, conv = pair("llama", modules_to_save=["lm_head"])
    ids, am, labels = batch()
    for m in (ref, conv):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            m(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
            opt.step()
    assert any("modules_to_save" in n for n, p in conv.named_parameters() if p.grad is not None)
    merged_ref, merged_conv = ref.merge_and_unload(), conv.merge_and_unload()
    sd_ref, sd_conv = merged_ref.state_dict(), merged_conv.state_dict()
    assert sd_ref.keys() == sd_conv.keys()
    for k in sd_ref:
        assert_fp32_close(sd_conv[k], sd_ref[k], k)
    before = report(merged_conv)["fused_calls"]["LlamaDecoderLayer"]
    a = merged_ref(input_ids=ids, attention_mask=am, labels=labels).loss
    b = merged_conv(input_ids=ids, attention_mask=am, labels=labels).loss
    assert_fp32_close(b, a, "loss after merge_and_unload")
    assert report(merged_conv)["fused_calls"]["LlamaDecoderLayer"] == before + 2  # plain Linears again: fused


def test_no_grad_and_eval_forward_with_lora():
    ref, conv = pair("llama", lora_dropout=0.1)
    ids, am, _ = batch()
    for m in (ref, conv):
        m.eval()
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=am, use_cache=False).logits
        b = conv(input_ids=ids, attention_mask=am, use_cache=False).logits
    assert_fp32_close(b, a, "logits")
    assert report(conv)["fused_calls"]["LlamaDecoderLayer"] == 2


def test_two_active_adapters_are_summed_in_peft_order():
    ref, conv = pair("gpt2")
    for m in (ref, conv):
        torch.manual_seed(6)
        m.add_adapter("second", lora_cfg("gpt2", r=2, target_modules=["c_attn", "c_fc"]))
        m.base_model.set_adapter(["default", "second"])
        for n, p in m.named_parameters():  # set_adapter with several names may freeze/unfreeze: LoRA trains
            p.requires_grad_("lora_" in n)
    assert_lora_step(conv, ref, 2 * 2 * 4 + 2 * 2 * 2)
    assert report(conv)["fused_calls"]["GPT2Block"] == 2 and not report(conv)["fallbacks"]


def _family(name, **extra):
    import transformers as T

    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    if name == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(**cfg, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0)).train()
    return T.Qwen2ForCausalLM(T.Qwen2Config(**cfg)).train()


@pytest.mark.parametrize("family, targets, n_fused", [
    ("qwen2", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2),  # q/k/v biases
    ("phi3", ["qkv_proj", "o_proj", "down_proj"], 2),  # packed qkv: one adapter over all of q | k | v
    ("phi3", ["gate_up_proj"], 2),  # packed gate | up: the adapter's B split in row views, one A
])
def test_llama_like_families_with_lora(family, targets, n_fused):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ref = peft.get_peft_model(_family(family), cfg).train()
    conv = ckpt_ops.convert(peft.get_peft_model(_family(family), cfg).train())
    assert_lora_step(conv, ref, 2 * 2 * len(targets))
    rep = report(conv)
    kind = "Phi3DecoderLayer" if family == "phi3" else "Qwen2DecoderLayer"
    assert rep["fused_calls"].get(kind, 0) == n_fused and not rep["fallbacks"], rep


def test_phi3_packed_gate_up_dropout_shares_one_mask(monkeypatch):
    """PEFT applies one lora_dropout to x for the packed gate_up projection: both halves of the
    fused adapter draw the same mask; the fused step equals PEFT run with that mask."""
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_up_proj"], init_lora_weights=False,
                          lora_dropout=0.2)
    ref = peft.get_peft_model(_family("phi3"), cfg).train()
    conv = ckpt_ops.convert(peft.get_peft_model(_family("phi3"), cfg).train())
    data, loss, fwd, _ = step_recording_drops(conv, monkeypatch)  # every adapter here has p = 0.2
    assert [spec.target for spec, _, _ in fwd] == ["w1", "wg"] * 2  # up then gate, per layer
    for k in range(2):
        (_, _, m_up), (_, _, m_gate) = fwd[2 * k], fwd[2 * k + 1]
        assert torch.equal(m_up, m_gate) and float((m_up == 0).float().mean()) > 0.05
        ref.get_submodule(f"base_model.model.model.layers.{k}.mlp.gate_up_proj").lora_dropout["default"] = \
            FixedMask(m_up)
    assert_step_equals(ref, conv, data, loss, 4)


def test_adapters_in_another_dtype_are_served_as_peft_computes_them():
    """fp64 adapters on an fp32 model (peft casts x to the adapter dtype, sums in fp64, casts back):
    fused, equal to PEFT by the fp32 rule."""
    ref, conv = pair("llama")
    for m in (ref, conv):
        _to_double(m)
    assert_lora_step(conv, ref, 28)
    assert report(conv)["fused_calls"]["LlamaDecoderLayer"] == 2 and not report(conv)["fallbacks"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_model_with_peft_fp32_adapters(arch):
    """The plain bf16 flow: a bf16 model, get_peft_model's default autocast_adapter_dtype=True (fp32
    adapters). DESIGN 4 low-precision rule against the fp32 truth (the same weights in fp32):
    the loss and every LoRA gradient within 2x eager PEFT bf16's error."""
    from conftest import assert_low_precision_ok

    eager = peft.get_peft_model(MODELS[arch]().to(torch.bfloat16), lora_cfg(arch)).train()
    assert all(p.dtype == torch.float32 for n, p in eager.named_parameters() if "lora_" in n)
    truth = copy.deepcopy(eager).float()
    conv = ckpt_ops.convert(copy.deepcopy(eager))
    ids, am, labels = batch()
    (l_e, g_e), (l_t, g_t), (l_c, g_c) = (train_step(m, ids, am, labels) for m in (eager, truth, conv))
    assert set(g_c) == set(g_e) == set(g_t) and all("lora_" in n for n in g_c)
    # the scalar loss: both errors are far below one bf16 step (eps 7.8e-3), where the ratio of two
    # such errors is luck of the rounding; the floor is an eighth of that step
    assert_low_precision_ok(l_c.float(), l_e.float(), l_t, "loss", floor=1e-3)
    for n in g_t:
        assert_low_precision_ok(g_c[n], g_e[n], g_t[n], n)
    assert report(conv)["fused_calls"][KIND[arch]] == 2 and not report(conv)["fallbacks"], report(conv)


def test_lora_read_and_guard_trace_without_graph_breaks():
    """What a fused call reads from PEFT's wrapper (ckpt_ops.lora.read) and the block's guard are
    plain Python on modules: torch.compile traces both with no graph break."""
    _, conv = pair("llama", lora_dropout=0.1)
    layer = conv.base_model.model.model.layers[0]
    q = layer.self_attn.q_proj
    guard = layer._ckpt_ops_state.guard

    def f(x):
        guard.check(layer)
        base, found = lora_mod.read(q, "wq", "self_attn.q_proj", x)
        spec, a, b = found[0]
        return x * spec.scale * spec.p + base.weight.sum() + a.sum() + b.sum()

    torch._dynamo.reset()
    x = torch.randn(3)
    explained = torch._dynamo.explain(f)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x))


def test_retain_graph_twice_gives_equal_lora_gradients():
    _, conv = pair("llama", lora_dropout=0.1)
    ids, am, labels = batch()
    loss = conv(input_ids=ids, attention_mask=am, labels=labels).loss
    lora = [p for n, p in conv.named_parameters() if "lora_" in n]
    g1 = torch.autograd.grad(loss, lora, retain_graph=True)
    g2 = torch.autograd.grad(loss, lora)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


class _GemmCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("proj, fused_full", [("q_proj", 8), ("o_proj", 8), ("up_proj", 8), ("down_proj", 7)])
def test_gemms_per_adapter_projection_as_documented(proj, fused_full):
    """ckpt_ops.lora's table: GEMMs one adapter on `proj` adds to a step (the layer input needs a
    gradient): eager + PEFT 6, PEFT + HF checkpointing 8, ckpt_ops "full" 8 on replayed projections
    and 7 on down_proj, "selective" 7. Counted at the dispatcher (mm/addmm/bmm), as the difference
    of a 1-layer model with and without that adapter."""
    ids, am, labels = batch()

    def gemms(kind, targets):
        m = peft.get_peft_model(llama(num_hidden_layers=1), lora_cfg("llama", target_modules=targets)).train()
        if kind in ("full", "selective"):
            ckpt_ops.convert(m, recompute=kind)
        elif kind == "hf":
            m.gradient_checkpointing_enable()
        m.enable_input_require_grads()
        with _GemmCount() as c:
            m(input_ids=ids, attention_mask=am, labels=labels).loss.backward()
        return c.n

    added = {k: gemms(k, ["v_proj", proj]) - gemms(k, ["v_proj"]) for k in ("eager", "hf", "full", "selective")}
    assert added == {"eager": 6, "hf": 8, "full": fused_full, "selective": 7}, added


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_under_cpu_bf16_autocast(arch):
    """HF Trainer's bf16=True flow: an fp32 model and fp32 adapters, the forward under
    torch.autocast("cpu", bfloat16). Fused (the adapters' GEMMs in bf16 too, gradients in fp32),
    with DESIGN 4's low-precision rule against the fp32 truth (no autocast): every LoRA gradient
    within 2x the error of eager PEFT under the same autocast."""
    from conftest import assert_low_precision_ok

    eager = peft.get_peft_model(MODELS[arch](), lora_cfg(arch)).train()
    conv = ckpt_ops.convert(copy.deepcopy(eager))
    ids, am, labels = batch()

    def step(m, amp):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = m(input_ids=ids, attention_mask=am, labels=labels, use_cache=False).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    (l_t, g_t), (l_e, g_e), (l_c, g_c) = step(eager, False), step(eager, True), step(conv, True)
    assert set(g_c) == set(g_e) == set(g_t) and all("lora_" in n and g.dtype == torch.float32 for n, g in g_c.items())
    assert_low_precision_ok(l_c, l_e, l_t, "loss", floor=1e-3)  # the scalar loss: see the bf16 test
    for n in g_t:
        assert_low_precision_ok(g_c[n], g_e[n], g_t[n], n)
    assert report(conv)["fused_calls"][KIND[arch]] == 2 and not report(conv)["fallbacks"], report(conv)
