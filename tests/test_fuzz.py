"""Fuzz: seeded random small transformers (forms_corpus.random_graph: timm ViT with/without
CLS, 0–4 registers, token/avg/no pooling, fused or eager attention, pre-norm or not; HF BERT
with padding; HF Llama with GQA and padding; depth 2–4; exported by torch.export, dynamo
opset 18 or TorchScript opsets 14/17, fp32 or fp16) × a random pass with random options.
Each case must be correct by forms_corpus.check (identity at keep=1 / r=0, the plain-PyTorch
reference on the unmodified model, batch rows) or a one-line refusal: never WRONG, never a
crash. The test collects every case and fails listing the failure families with counts.

Default: 40 cases over 12 graphs (exports reused; about 15 s, so the default suite stays near
15 minutes on 2 cores); ``--fuzz-n N`` runs N cases over
max(12, N/15) graphs (200: about 2.5 minutes, 600: about 8).
``python tests/test_fuzz.py N`` prints the summary, refusal families included.
"""
from __future__ import annotations

import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

import forms_corpus as fc  # noqa: E402

DEFAULT_N = 40


def family(outcome, spec, graph) -> str:
    """A failure family: status, pass, model family and the message with numbers and names elided."""
    detail = re.sub(r"'[^']*'", "'…'", outcome.detail)
    detail = re.sub(r"[-+]?\d[\d.e+-]*", "#", detail)[:110]
    fam = graph.family + (f"/{graph.pool}" if graph.pool else "")
    return f"{outcome.status} {spec.name} on {fam}: {detail}"


def run_fuzz(n: int, graphs_n: int | None = None, log=None):
    """Returns [(case index, graph, spec, outcome)]."""
    import torch

    torch.set_num_threads(1)
    graphs_n = graphs_n or max(12, n // 15)
    graphs = {}
    results = []
    for i in range(n):
        seed = i % graphs_n
        if seed not in graphs:
            graphs[seed] = fc.random_graph(seed)
        g = graphs[seed]
        rng = random.Random(10_000 + i)
        s = fc.random_spec(g, rng)
        if s is None:
            continue
        t = time.time()
        o = fc.check(g.case.name, g.lossy_form, s.name, s=s, inputs=g.case.make_inputs(3, 100 + i), loader=g.loader,
                     module=g.case.module)
        results.append((i, g, s, o))
        if log:
            log(f"{i:4d} {o.status:8s} {time.time() - t:5.1f}s {s.name} {s.opts} | {g.desc} | {o.detail[:150]}")
    return results


def summary(results, statuses=("WRONG", "crash")) -> str:
    fams = Counter(family(o, s, g) for _, g, s, o in results if o.status in statuses)
    lines = [f"{c:4d}  {f}" for f, c in fams.most_common()]
    examples = {}
    for i, g, s, o in results:
        if o.status in statuses:
            examples.setdefault(family(o, s, g), f"case {i}: {s.name} {s.opts} on {g.desc}: {o.detail[:200]}")
    return "\n".join(lines) + "\n\nfirst case of each family:\n" + "\n".join(examples.values())


def test_fuzz(request):
    n = request.config.getoption("--fuzz-n") or DEFAULT_N
    results = run_fuzz(n)
    counts = Counter(o.status for *_, o in results)
    assert len(results) >= 0.9 * n, counts  # the draws give a reference to almost every case
    assert counts["works"] >= n // 3, counts  # mostly real checks, not refusals
    bad = sum(o.status in ("WRONG", "crash") for *_, o in results)
    if bad:
        pytest.fail(f"{bad} of {len(results)} cases wrong or crashing ({dict(counts)}):\n" + summary(results),
                    pytrace=False)


def _vit(form, name, **kw):
    """A timm ViT (depth 2, pool none: the tokens are the output) as a fuzz Graph in ``form``."""
    import torch
    from timm.models.vision_transformer import VisionTransformer

    import zoo

    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                          global_pool="", num_classes=0, **kw).eval()
    for t in (m.cls_token, m.reg_token):
        if t is not None:
            torch.nn.init.normal_(t, std=0.02)
    c = zoo.Case(name, m, {"x": zoo._images(3, 0)}, prefix=m.num_prefix_tokens, depth=2,
                 make_inputs=lambda b, s=1: {"x": zoo._images(b, s)})
    return fc.Graph(0, c, form, name, "timm", "none")


def _check(g, spec):
    c = g.case
    return fc.check(c.name, g.lossy_form, spec.name, s=spec, inputs=c.make_inputs(3, 5), loader=g.loader,
                    module=c.module)


@pytest.mark.parametrize("form", ["dynamo18", "torchscript17"])
def test_evit_at_block_0_with_the_position_embedding_before_the_prefix_concat(form):
    """no_embed_class=True: CLS and registers enter block 0 without a position embedding. With
    timm's init (CLS at std 1e-6) LayerNorm's eps flattens the CLS token, block 0's CLS attention
    is uniform up to rounding, and EViT's order is a float tie (the fuzz's 'WRONG' on ONNX was
    that tie, not a rewrite error); with a CLS token that is not ~0 it matches the reference."""
    from merge_reference import evit_reduce

    g = _vit(form, f"evit0_{form}", reg_tokens=1, no_embed_class=True)
    p = g.case.prefix
    s = fc.Spec("evit", dict(keep="0.5", layers="0"), dict(keep="1.0", layers="0"),
                fc._merge_ref(g.case, {0: evit_reduce(0.5, p)}, False, False), compare_indices=False)
    o = _check(g, s)
    assert o.status == "works", str(o)


@pytest.mark.parametrize("cls", [False, True])
def test_zero_tprune_start_weight_goes_to_a_cls_token_not_a_register(cls):
    """Zero-TPrune's uniform start gives the CLS token √N: registers without a CLS token get none."""
    import prunec
    from reference import reference_run, zero_tprune_choice

    g = _vit("torch", f"ztp_cls{int(cls)}", class_token=cls, reg_tokens=2, no_embed_class=True)
    x = g.case.make_inputs(3, 5)
    assert prunec.load(g.case.module, x).facts().cls_first is cls
    p, m = g.case.prefix, g.case.module
    opts = dict(keep=0.5, layer="1", iters=5, similar=0.5)  # (here the start weight on token 0 changes the choice)
    s = fc.Spec("zero-tprune", opts, dict(opts, keep=1.0),
                lambda x: reference_run(m, x, 1, zero_tprune_choice(0, 0.5, 5, 0.5, 0 if cls else None, None, p)))
    o = _check(g, s)
    assert o.status == "works", str(o)


if __name__ == "__main__":
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_N
    t0 = time.time()
    res = run_fuzz(n, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(dict(Counter(o.status for *_, o in res)), f"{time.time() - t0:.0f} s")
    print("\nWRONG / crash families:\n" + summary(res))
    print("\nrefusal families:\n" + summary(res, ("refused",)))
