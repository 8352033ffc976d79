"""ckpt_ops.plan: budgets are met when measured after apply, monotone, deterministic; bad budgets
raise with the minimum stated. Costs use time="flops" (deterministic) unless the test is about
the timing probe."""
import pytest
import torch

import ckpt_ops
from ckpt_ops import planner
from ckpt_ops._probe import spans_off

B, S, D, H = 2, 32, 32, 2
BUDGETS = [0.06, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]


def stack(n=6, style="gpt2", dropout=0.1, dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.ModuleList(ckpt_ops.nn.TransformerBlock(D, H, style=style, dropout=dropout, dtype=dtype,
                                                            num_kv_heads=1 if style == "llama" else None)
                               for _ in range(n))


def run(layers, x):
    for m in layers:
        x = m(x)
    return x


def measured_alive(layers, p, x):
    """M measured on the applied stack (saved-tensor hooks): the forward's saved bytes with the
    outer segments in place, plus the largest saved bytes of one segment's layers run alone at
    their levels (what its replay keeps during its backward)."""
    x = x.detach().requires_grad_()
    mods = torch.nn.ModuleList(layers)  # passed along so that their parameters are not counted
    fwd = ckpt_ops.saved_bytes(lambda t, _m: run(layers, t), x, mods)
    replay = 0
    with spans_off():
        for s, e in p.segments:
            h = run(layers[:s], x).detach().requires_grad_()
            replay = max(replay, ckpt_ops.saved_bytes(lambda t, _m: run(layers[s:e], t), h, mods))
    return fwd + replay


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def costed(request):
    layers = stack(style=request.param)
    x = torch.randn(B, S, D)
    return layers, x, planner.measure_costs(layers, x, time="flops")


def test_plans_never_exceed_budget_measured_after_apply(costed):
    layers, x, costs = costed
    eager = sum(c.eager_bytes for c in costs)
    seen_segments = False
    for b in BUDGETS:
        try:
            p = ckpt_ops.plan(layers, x, budget=b, costs=costs)
        except ValueError as e:
            assert b == BUDGETS[0] and "minimum achievable" in str(e)
            continue
        p.apply(layers)
        got = measured_alive(layers, p, x)
        assert got <= b * eager, (b, got, b * eager)
        assert got == p.predicted_bytes  # the prediction is the measurement (no shared tensors here)
        seen_segments |= bool(p.segments)
    ckpt_ops.plan(layers, x, budget=1.0, costs=costs).apply(layers)  # restore: no spans
    min_bytes = planner._min_units(costs, 1)
    p = ckpt_ops.plan(layers, x, budget=min_bytes, costs=costs)  # the minimum itself is accepted
    assert p.segments and p.predicted_bytes == min_bytes
    p.apply(layers)
    assert measured_alive(layers, p, x) == min_bytes
    ckpt_ops.plan(layers, x, budget=1.0, costs=costs).apply(layers)


def test_monotone_and_budget_one_is_all_none(costed):
    layers, x, costs = costed
    times = []
    for b in BUDGETS[1:]:
        times.append(ckpt_ops.plan(layers, x, budget=b, costs=costs).predicted_ms)
    assert all(t2 <= t1 + 1e-9 for t1, t2 in zip(times, times[1:])), times
    p = ckpt_ops.plan(layers, x, budget=1.0, costs=costs)
    assert p.levels == ["none"] * len(layers) and p.segments == []
    small = ckpt_ops.plan(layers, x, budget=0.1, costs=costs)
    assert "full" in small.levels and small.predicted_ms > p.predicted_ms


def test_deterministic(costed):
    layers, x, costs = costed
    again = planner.measure_costs(layers, x, time="flops")
    assert again == costs
    for b in (0.2, 0.5):
        p1, p2 = ckpt_ops.plan(layers, x, budget=b, costs=costs), ckpt_ops.plan(layers, x, budget=b, costs=again)
        assert (p1.levels, p1.segments) == (p2.levels, p2.segments)


def test_applied_plan_computes_the_same(costed):
    """Levels + outer segments change what is kept, never the result: bitwise equal to the same
    levels without segments, with dropout on."""
    layers, x, costs = costed
    p = ckpt_ops.plan(layers, x, budget=planner._min_units(costs, 1), costs=costs)
    assert p.segments

    def grads():
        xx = x.detach().requires_grad_()
        torch.manual_seed(5)
        out = run(layers, xx)
        out.pow(2).sum().backward()
        g = [xx.grad] + [q.grad.clone() for q in layers.parameters()]
        layers.zero_grad(set_to_none=True)
        return [out.detach()] + g

    p.apply(layers)
    with_spans = grads()
    ckpt_ops.sequential.remove_spans(list(layers))
    plain = grads()
    assert all(torch.equal(a, b) for a, b in zip(with_spans, plain))
    ckpt_ops.plan(layers, x, budget=1.0, costs=costs).apply(layers)


def test_bad_budgets(costed):
    layers, x, costs = costed
    eager = sum(c.eager_bytes for c in costs)
    for bad in (-0.5, 0.0, -3, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            ckpt_ops.plan(layers, x, budget=bad, costs=costs)
    for bad in ("5 parsecs", "MB", "12 MBs", "-1MB"):
        with pytest.raises(ValueError, match="budget"):
            ckpt_ops.plan(layers, x, budget=bad, costs=costs)
    with pytest.raises(ValueError, match=r"minimum achievable (\d+) bytes") as e:
        ckpt_ops.plan(layers, x, budget=0.01, costs=costs)
    stated = int(str(e.value).split("minimum achievable ")[1].split(" bytes")[0])
    assert stated == planner._min_units(costs, 1) < eager * 0.1
    with pytest.raises(ValueError, match="minimum"):
        ckpt_ops.plan(layers, x, budget=stated - 1, costs=costs)
    assert planner.parse_budget("6GiB", 1) == 6 * 2**30
    assert planner.parse_budget("500MB", 1) == 500 * 10**6
    assert planner.parse_budget("0.5 kib", 1) == 512
    assert planner.parse_budget(0.25, 1000) == 250


def test_print_table(costed):
    layers, x, costs = costed
    text = str(ckpt_ops.plan(layers, x, budget=0.06, costs=costs) if planner._min_units(costs, 1) <= 0.06 * sum(
        c.eager_bytes for c in costs) else ckpt_ops.plan(layers, x, budget=0.1, costs=costs))
    assert text.splitlines()[0].split()[:4] == ["layer", "level", "segment", "saved"]
    assert len(text.splitlines()) == 2 + len(layers) + 1 and "predicted:" in text


def test_user_sequential_gets_segments():
    """An nn.Sequential of plain layers has no levels: the plan checkpoints spans of it."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.GELU(),
                                                    torch.nn.Linear(4 * D, D), torch.nn.Dropout(0.1))
                                for _ in range(6)])
    x = torch.randn(B, S, D)
    costs = planner.measure_costs(seq, x, time="flops")
    assert all(c.levels == ("-",) for c in costs)
    eager = sum(c.eager_bytes for c in costs)
    assert eager == ckpt_ops.saved_bytes(seq, x.requires_grad_())
    torch.manual_seed(3)
    ref = seq(x)
    for b in (0.3, 0.6):
        p = ckpt_ops.plan(seq, x, budget=b, costs=costs)
        assert p.segments
        p.apply(seq)
        assert measured_alive(list(seq), p, x) <= b * eager
        torch.manual_seed(3)
        assert torch.equal(seq(x), ref)
    ckpt_ops.sequential.remove_spans(list(seq))


def test_timing_probe_measures_every_level():
    layers = stack(2)
    x = torch.randn(B, S, D)
    costs = planner.measure_costs(layers, x, reps=1)
    for c in costs:
        assert set(c.step_ms) == set(ckpt_ops.block.LEVELS) and all(v > 0 for v in c.step_ms.values())
        assert all(c.fwd_ms[lv] > 0 for lv in c.levels)
    assert costs[0].step_ms == costs[1].step_ms  # equal layers share one timing
    with pytest.raises(ValueError, match="time"):
        planner.measure_costs(layers, x, time="guess")


def test_converted_hf_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=S, n_embd=D, n_layer=8, n_head=H, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, 64, (B, S))
    ref_model = ckpt_ops.convert(model, inplace=False)  # the same weights, per-layer "full"
    ckpt_ops.convert(model)
    costs = planner.measure_costs(model, input_ids=ids, time="flops")
    assert [c.name for c in costs] == [f"transformer.h.{i}" for i in range(8)]
    eager = sum(c.eager_bytes for c in costs)
    assert eager > sum(c.saved["none"] for c in costs) > sum(c.saved["full"] for c in costs)
    p = ckpt_ops.plan(model, input_ids=ids, budget=planner._min_units(costs, 1), costs=costs)
    assert p.segments and set(p.levels) == {"full"}
    p.apply(model)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref = ref_model(input_ids=ids, labels=ids).loss
    ref.backward()
    assert torch.equal(loss, ref)
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a.grad, b.grad), n
    assert ckpt_ops.conversion_report(model)["fallbacks"] == {}


def test_memory_report():
    layers = stack(4, dropout=0.0)
    for m, lv in zip(layers, ("full", "keep_attn", "selective", "none")):
        m.recompute = lv
    x = torch.randn(B, S, D)
    xb = x.numel() * 4
    rep = ckpt_ops.memory_report(layers, x, reps=1)
    assert [r.level for r in rep.layers] == ["full", "keep_attn", "selective", "none"]
    costs = planner.measure_costs(layers, x, time="flops")
    for r, c in zip(rep.layers, costs):
        assert r.saved_bytes == c.saved[r.level] and r.eager_bytes == c.saved["none"]
        assert r.checkpoint_bytes == xb  # torch.utils.checkpoint keeps the layer input
        assert r.step_ms > 0 and r.eager_ms > 0 and r.checkpoint_ms > 0
    full, none = rep.layers[0], rep.layers[3]
    assert full.saved_bytes == xb  # "full" without dropout keeps exactly the block input
    assert full.recompute_gflops > 0 and none.recompute_gflops == 0
    assert full.checkpoint_recompute_gflops > 0  # checkpoint replays the block's GEMMs
    assert rep.model_saved_bytes == sum(r.saved_bytes for r in rep.layers)
    text = str(rep)
    assert "x eager" in text and "x torch.utils.checkpoint" in text and len(text.splitlines()) == 2 + 4 + 2
    p = ckpt_ops.plan(layers, x, budget=planner._min_units(costs, 1), costs=costs)
    p.apply(layers)
    rep2 = ckpt_ops.memory_report(layers, x, reps=1)
    assert rep2.segments == p.segments and rep2.model_saved_bytes < rep.model_saved_bytes
    ckpt_ops.sequential.remove_spans(list(layers))


def test_convert_with_memory_budget():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=H, num_key_value_heads=1, max_position_embeddings=S)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 64, (B, S))
    want = planner.plan(ckpt_ops.convert(model, inplace=False), input_ids=ids, budget=0.3, time="flops")
    ckpt_ops.convert(model, memory_budget=0.3, example_inputs={"input_ids": ids})  # time="measure" inside
    layers = model.model.layers
    got = [m._ckpt_ops_state.recompute for m in layers]
    assert len(got) == 3 and sum(c.saved[lv] for c, lv in zip(want.costs, got)) <= 0.3 * want.eager_bytes
    with pytest.raises(ValueError, match="example_inputs"):
        ckpt_ops.convert(model, memory_budget=0.3)
