"""Graph breaks of torch.compile on converted vs unconverted tiny HF models (issue 10 item 6).

    CKPT_OPS_SKIP_CUDA=1 python bench/compile_graph_breaks.py

For each fused family: torch._dynamo.explain(model)(input_ids, attention_mask (right padding),
labels) -> graph count, graph-break count and the distinct break reasons."""
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("TRITON_INTERPRET", "1")

import ckpt_ops  # noqa: E402
from test_convert import batch, gpt2, llama  # noqa: E402
from test_convert_families import make  # noqa: E402

FAMILIES = {"gpt2": lambda: gpt2().train(), "llama": lambda: llama().train(),
            **{f: (lambda f=f: make(f, num_hidden_layers=2)) for f in ("mistral", "qwen2", "phi3", "gemma")}}


def explain(model, ids, am, labels):
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(input_ids=ids, attention_mask=am, labels=labels)
    reasons = sorted({str(r.reason).splitlines()[0][:110] for r in e.break_reasons})
    return e.graph_count, e.graph_break_count, reasons


def main(names):
    ids, am, labels = batch()
    for name in names:
        ref = FAMILIES[name]()
        conv = ckpt_ops.convert(copy.deepcopy(ref))
        for tag, m in (("unconverted", ref), ("converted", conv)):
            g, b, r = explain(m, ids, am, labels)
            print(f"{name:8s} {tag:12s} graphs {g:2d} breaks {b:2d}  {r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
