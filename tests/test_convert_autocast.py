"""ckpt_ops.convert under torch.autocast (issue 10 item 3): every fused family trains fused under
CPU bf16 autocast (and fp16, the CUDA policy's other dtype, on the same code path), with the error
of the unconverted model under the same autocast (DESIGN §4's 2x rule against the fp32 truth:
the unconverted model in fp32 without autocast), and keeps at most what HF's own activation
checkpointing keeps (saved-tensor hooks, DESIGN §5). The CUDA-only dtype decisions, which cannot
run here, are unit-tested as the pure functions the fused path calls.

Sizes: hidden 64, seq 64, batch 4, 2 layers, MLP width 4 x hidden, so activations, not weights,
dominate what the unconverted model saves (the 0.15 bound needs that)."""
import copy
import types

import pytest
import torch
import torch.nn.functional as F

import ckpt_ops
from ckpt_ops import _amp

T = pytest.importorskip("transformers")
from conftest import assert_low_precision_ok, rel_err  # noqa: E402
from test_convert import batch  # noqa: E402
import eager_ref  # noqa: E402

T.logging.set_verbosity_error()
B, S = 4, 64
DECODER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97, max_position_embeddings=S, attn_implementation="sdpa")
FAMILIES = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=S, vocab_size=97,
                                                   attn_implementation="sdpa", attn_pdrop=0.0, resid_pdrop=0.0,
                                                   embd_pdrop=0.0)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**DECODER)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER, sliding_window=None)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)),  # q/k/v biases
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**DECODER, head_dim=16)),  # (1 + w) RMSNorm in fp32, GeGLU
}


def make(family, dtype=torch.float32):
    torch.manual_seed(0)
    return FAMILIES[family]().to(dtype).train()


def step(model, ids, am, labels, amp=None):
    """One training step (forward under torch.autocast("cpu", amp) when amp is a dtype, backward
    outside, as HF Trainer / accelerate do): (loss, logits, per-token losses, {name: grad})."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = model(input_ids=ids, attention_mask=am, labels=labels, use_cache=False)
    out.loss.backward()
    logits = out.logits.detach()
    tok = F.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                          ignore_index=-100, reduction="none")[labels[:, 1:].reshape(-1) != -100]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), logits, tok, grads


def assert_like_eager_autocast(conv, eager, truth, name):
    """DESIGN §4's low-precision rule for a whole training step of `conv` (converted, autocast),
    `eager` (unconverted, same autocast) and `truth` (unconverted, fp32, no autocast)."""
    (lc, oc, tc, gc), (le, oe, te, ge), (lt, ot, tt, gt) = conv, eager, truth
    assert oc.dtype == oe.dtype, f"{name}: logits dtype {oc.dtype}, unconverted {oe.dtype}"
    assert_low_precision_ok(oc, oe, ot, f"{name}: logits", floor=1e-6)
    assert_low_precision_ok(tc, te, tt, f"{name}: per-token losses", floor=1e-6)
    # The loss is one mean of n per-token losses: eager's actual error is a single draw that may
    # cancel to ~0, so 2x is taken of its typical size, max(actual, ||token errors|| / n) (the
    # RMS of a mean of n independent errors).
    err = abs(float(lc) - float(lt))
    typical = max(abs(float(le) - float(lt)), float((te - tt).norm()) / tt.numel())
    assert err <= 2 * typical + 1e-7 * abs(float(lt)), f"{name}: loss error {err:.3g} > 2 x eager's {typical:.3g}"
    assert gc.keys() == ge.keys() == gt.keys() and gt
    for n in gt:
        assert gc[n].dtype == ge[n].dtype, f"{name}: {n} grad dtype {gc[n].dtype} != {ge[n].dtype}"
        assert torch.isfinite(gc[n]).all(), n
        assert_low_precision_ok(gc[n], ge[n], gt[n], f"{name}: {n}", floor=1e-6)


def assert_fused(conv, family, n_layers=2):
    rep = ckpt_ops.conversion_report(conv)
    kind = type(conv.transformer.h[0] if family == "gpt2" else conv.model.layers[0]).__name__
    assert rep["fused_calls"].get(kind) == n_layers and rep["fused_calls"].get("norm") == 1, rep
    assert not rep["fallbacks"], rep  # in particular no "autocast" fallback
    assert [s for _, _, s in rep["layers"]] == ["fused"] * n_layers


def step_bytes(model, ids, am, labels, amp=torch.bfloat16):
    with torch.autocast("cpu", dtype=amp):
        return ckpt_ops.saved_bytes(model, input_ids=ids, attention_mask=am, labels=labels, use_cache=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_fused_under_bf16_autocast(family):
    ref = make(family)
    conv = ckpt_ops.convert(copy.deepcopy(ref), strict=True)
    ids, am, labels = batch(b=B, s=S)  # right padding: the last 3 tokens of row 1
    truth = step(ref, ids, am, labels)
    eager = step(ref, ids, am, labels, torch.bfloat16)
    fused = step(conv, ids, am, labels, torch.bfloat16)
    assert rel_err(eager[1], truth[1]) > 1e-4, "autocast had no effect on the unconverted model"
    assert_like_eager_autocast(fused, eager, truth, family)
    assert_fused(conv, family)

    hf_ckpt = make(family)
    hf_ckpt.gradient_checkpointing_enable()
    b_plain, b_hf, b_conv = (step_bytes(m, ids, am, labels) for m in (make(family), hf_ckpt, conv))
    assert b_conv <= b_hf, (b_conv, b_hf)
    assert b_conv <= 0.15 * b_plain, (b_conv, b_plain)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fp16_autocast_same_code_path(family):
    """fp16 (CUDA's usual autocast dtype) through the same policy code, on CPU."""
    ref = make(family)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=B, s=S)
    truth = step(ref, ids, am, labels)
    eager = step(ref, ids, am, labels, torch.float16)
    fused = step(conv, ids, am, labels, torch.float16)
    assert fused[1].dtype == torch.float16
    assert_like_eager_autocast(fused, eager, truth, family + " fp16")
    assert_fused(conv, family)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bf16_weights_under_bf16_autocast(family):
    """A model cast to bf16 and trained under autocast: the residual stream is bf16 as the model
    makes it (the block's output dtype); the fused block keeps its own sums in fp32 (never less
    accurate) and saves the bf16 x itself, not an fp32 copy. Gemma stays on its exact fallback
    (its (1 + w) norms are fp32-only, see test_convert_families)."""
    ref = make(family, torch.bfloat16)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=B, s=S)
    truth = step(make(family), ids, am, labels)
    eager = step(ref, ids, am, labels, torch.bfloat16)
    fused = step(conv, ids, am, labels, torch.bfloat16)
    assert_like_eager_autocast(fused, eager, truth, family + " bf16 weights")
    assert_fused(conv, family)
    hf_ckpt = make(family, torch.bfloat16)
    hf_ckpt.gradient_checkpointing_enable()
    assert step_bytes(conv, ids, am, labels) <= step_bytes(hf_ckpt, ids, am, labels)


def test_gemma_bf16_weights_under_autocast_fall_back_with_their_reason():
    ref = make("gemma", torch.bfloat16)
    conv = ckpt_ops.convert(copy.deepcopy(ref))
    ids, am, labels = batch(b=2, s=12)
    la, lb = (step(m, ids, am, labels, torch.bfloat16)[0] for m in (ref, conv))
    assert torch.equal(la, lb)  # the exact fallback: torch's own code throughout
    rep = ckpt_ops.conversion_report(conv)
    assert not rep["fused_calls"] and rep["fallbacks"] and all("(1 + weight) RMSNorm" in k for k in rep["fallbacks"])


# ------------------------------------------------------------------------------------------------
# The segments keep x only under autocast (not the cast weight copies): the analytic budget
# ------------------------------------------------------------------------------------------------
D = 64


def _segments():
    torch.manual_seed(0)
    return {
        "mlp": ckpt_ops.nn.MLP(D, 4 * D, activation="swiglu", norm="rmsnorm", residual=True, bias=False),
        "attention": ckpt_ops.nn.Attention(D, 4, 2, norm="layernorm", rope=True, residual=True),
        "block_gpt2": ckpt_ops.nn.TransformerBlock(D, 4, style="gpt2"),
        "block_llama": ckpt_ops.nn.TransformerBlock(D, 4, style="llama"),
    }


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(_segments()))
def test_segment_saves_only_x_under_autocast(name, xdtype):
    mod = _segments()[name]
    x = torch.randn(B, S, D, dtype=xdtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ckpt_ops.saved_bytes(mod, x) == x.numel() * x.element_size()
        out = mod(x)
    out.float().square().sum().backward()
    assert x.grad.dtype == xdtype
    assert all(p.grad.dtype == p.dtype == torch.float32 for p in mod.parameters())


def test_none_keeps_the_gemm_operands_in_the_gemm_dtype():
    """At "none" under autocast the norm's output is kept as the bf16 copy the GEMMs read (as
    eager's linear keeps it): the norm's backward needs only x and its row statistics, so an fp32
    copy would be M*D*2 bytes more and a cast more in backward. Exact count, swiglu + RMSNorm:
    x (fp32) + rstd (fp32 a row) + n (bf16) + h, g, a (bf16)."""
    torch.manual_seed(0)
    m = ckpt_ops.nn.MLP(D, 4 * D, activation="swiglu", norm="rmsnorm", residual=True, bias=False,
                        recompute="none")
    x = torch.randn(B, S, D, requires_grad=True)
    M, H = B * S, 4 * D
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ckpt_ops.saved_bytes(m, x) == M * D * 4 + M * 4 + M * D * 2 + 3 * M * H * 2
        out = m(x)
    out.float().square().sum().backward()
    xe, x64 = (x.detach().clone().requires_grad_(), x.detach().double().requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_ref.mlp(m, xe).float().square().sum().backward()
    eager_ref.mlp(copy.deepcopy(m).double(), x64).square().sum().backward()
    assert_low_precision_ok(x.grad, xe.grad, x64.grad, "dx")


@pytest.mark.parametrize("cls", [ckpt_ops.nn.LayerNorm, ckpt_ops.nn.RMSNorm])
def test_norm_under_cpu_autocast_follows_torch(cls):
    """torch's CPU autocast has no norm on its lists: a bf16 input normalises to bf16 (fp32
    inside), fp32 parameters. The fused norm returns that dtype and values within one bf16
    rounding, and saves the bf16 input itself plus fp32 row statistics."""
    torch.manual_seed(0)
    mod = cls(D)
    ref = (torch.nn.LayerNorm if cls is ckpt_ops.nn.LayerNorm else torch.nn.RMSNorm)(D)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(B * S, D, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, eout = mod(x), ref(x)
        n_stats = 2 if cls is ckpt_ops.nn.LayerNorm else 1
        assert ckpt_ops.saved_bytes(mod, x) == x.numel() * 2 + B * S * 4 * n_stats
    assert out.dtype == eout.dtype == torch.bfloat16
    truth = F.layer_norm(x.double(), (D,)) if cls is ckpt_ops.nn.LayerNorm else F.rms_norm(x.double(), (D,))
    assert_low_precision_ok(out, eout, truth, cls.__name__, floor=1e-6)


# ------------------------------------------------------------------------------------------------
# CUDA's dtype decisions (no GPU here: the pure functions the fused path calls)
# ------------------------------------------------------------------------------------------------
def test_norm_dtype_policy_per_device():
    bf, h, f = torch.bfloat16, torch.float16, torch.float32
    for dt in (bf, h):
        assert _amp.norm_dtype("cuda", dt, "layer_norm") == f    # CUDA autocast's fp32 list
        assert _amp.norm_dtype("cpu", dt, "layer_norm") == dt    # on no CPU list
        assert _amp.norm_dtype("cpu", dt, "rms_norm") == dt
        assert _amp.norm_dtype("cuda", dt, "rms_norm") is None   # not known: convert falls back
    for dev in ("cpu", "cuda"):
        assert _amp.norm_dtype(dev, f, "layer_norm") == f and _amp.norm_dtype(dev, torch.float64, "rms_norm") \
            == torch.float64
    assert _amp.out_dtype(f, h, True) == f and _amp.out_dtype(h, h, True) == h and _amp.out_dtype(f, h, False) == h


def _fake_cuda(monkeypatch, dtype):
    """Pretend torch.autocast("cuda", float16) is on (it cannot be enabled without a GPU)."""
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda dev=None: dev == "cuda")
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda dev: torch.float16)
    return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype)


def test_cuda_gemm_dtype_and_cast_plan(monkeypatch):
    x = _fake_cuda(monkeypatch, torch.float32)
    assert _amp.gemm_dtype(x) == torch.float16
    assert _amp.gemm_dtype(types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64)) is None
    w, nw, xb = torch.randn(4, 4), torch.randn(4), torch.randn(2, 4).bfloat16()
    c = _amp.cast_inputs(torch.float16, {"x": xb, "nw": nw, "wq": w, "bq": None})
    assert c["x"].dtype == torch.float32 and c["nw"] is nw and c["wq"].dtype == torch.float16 and c["bq"] is None
    kept = _amp.originals({"x": c["x"], "wq": c["wq"], "n": c["wq"] * 1}, c, {"x": xb, "nw": nw, "wq": w, "bq": None})
    assert kept["x"] is xb and kept["wq"] is w and kept["n"].dtype == torch.float16  # intermediates stay
    again = _amp.recast(torch.float16, {"a_x": xb, "m_w1": w, "a_qkv": kept["n"]})
    assert again["a_x"].dtype == torch.float32 and again["m_w1"].dtype == torch.float16
    assert again["a_qkv"] is kept["n"]


def test_cuda_norm_adapter_policy(monkeypatch):
    from ckpt_ops._convert_families import NormAdapter, Unservable

    policy = NormAdapter._autocast_policy
    ln, rms = torch.nn.LayerNorm(8), torch.nn.RMSNorm(8)
    hf_rms = T.models.llama.modeling_llama.LlamaRMSNorm(8)
    x16 = _fake_cuda(monkeypatch, torch.float16)
    assert not isinstance(policy(ln, x16), torch.autocast)  # upcast: the fused norm's autocast path
    with pytest.raises(Unservable, match="RMSNorm on a torch.float16 input under cuda autocast"):
        policy(rms, x16)
    hf = policy(hf_rms, x16)  # HF's own RMSNorm: autocast plays no part, switched off
    assert isinstance(hf, torch.autocast) and not hf._enabled
    x32 = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert isinstance(policy(rms, x32), torch.autocast)  # fp32 in, fp32 out: as without autocast


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_no_grad_forward_under_autocast_equals_the_training_forward(family):
    """Under torch.no_grad() the fused layers cast outside any Function (nothing is saved): the
    same kernels on the same casts, so the logits are the grad-mode forward's bit for bit."""
    conv = ckpt_ops.convert(make(family))
    ids, am, _ = batch(b=B, s=S)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = conv(input_ids=ids, attention_mask=am, use_cache=False).logits
        with torch.no_grad():
            b = conv(input_ids=ids, attention_mask=am, use_cache=False).logits
    assert torch.equal(a, b)
    assert not ckpt_ops.conversion_report(conv)["fallbacks"]
