"""Every pass on the graph forms users ship (tests/forms_corpus.py): dynamo opsets 18/23,
TorchScript opsets 14/16/17, ORT-optimized, dynamic int8, QDQ, fp16, and the torch path.

Each cell is ``forms_corpus.check``: it must work (identity, the plain-PyTorch reference
with the same kept indices, batch rows), or be a one-line refusal listed in
EXPECTED_REFUSALS with its reason; WRONG and crash always fail. Cells failing on today's
code are ``xfail(strict=True)`` naming the issue-12 item (KNOWN_BUGS): when a fix lands the
cell passes, the strict xfail fails, and the entry is removed.

The default run is a representative subset (DEFAULT); ``--forms-all`` (or
PRUNEC_FORMS_ALL=1) runs every model × form × pass (about 15 minutes on 2 cores).
"""
from __future__ import annotations

import os
import re

import pytest

import forms_corpus as fc

# (model, form, pass) patterns: "*" any, "a|b" alternatives.
EXPECTED_REFUSALS = {
    ("hf_llama", "*", "cls-attn"): ("needs a CLS token", "a causal decoder has no [CLS] token to score by"),
}

OPSET14 = "issue 12, opset 14-23: merges emit ScatterND/ScatterElements(reduction=add), valid from opset 16"
ORT_OPT = ("issue 12, ORT-optimized graphs: the residual stream through SkipLayerNormalization is not found "
           "(packed com.microsoft.Attention after fusion)")
QDQ = "issue 12, quantized graphs: QDQ graph has 'no attention found' (scoring does not read through Q/DQ)"
FP16_SORT = "issue 12, graph hygiene: ORT's fp16 converter writes an unsorted graph and clone() crashes"
FP16_MERGE = ("issue 12, fp16: the rewrite mixes float and float16 constants (fails onnx.checker); only fastv, "
              "cls-attn, random and pool work on fp16 graphs")
INT8_MASK = ("issue 12, dynamic int8: the rewritten BERT graph does not run (attention mask Add not gathered "
             "through DynamicQuantizeLinear/MatMulInteger)")
INT8_LLAMA = "issue 12, dynamic int8: the rewritten Llama graph fails onnx.checker / ORT (token shapes)"

KNOWN_BUGS = [
    (("*", "torchscript14", "tome|evit|ppt|visionzip"), OPSET14),
    (("*", "ort_opt", "*"), ORT_OPT),
    (("*", "qdq", "*"), QDQ),
    (("timm_vit|hf_vit", "fp16", "*"), FP16_SORT),
    (("hf_bert", "fp16", "divprune|zero-tprune|tome|evit|ppt|visionzip"), FP16_MERGE),
    (("hf_llama", "fp16", "divprune"), FP16_MERGE),
    (("hf_bert", "int8_dynamic", "fastv|divprune|zero-tprune|random|tome|evit|ppt"), INT8_MASK),
    (("hf_llama", "int8_dynamic", "fastv|divprune|random|pool"), INT8_LLAMA),
]

DEFAULT = (
    [("timm_vit", "torchscript14", p) for p in fc.PASSES]
    + [("hf_bert", "torchscript16", p) for p in ("divprune", "tome", "evit", "visionzip")]
    + [("hf_bert", "int8_dynamic", p) for p in ("fastv", "cls-attn", "tome", "visionzip")]
    + [("hf_vit", "int8_dynamic", p) for p in ("zero-tprune", "ppt")]
    + [("timm_vit", "fp16", p) for p in ("fastv", "tome")]
    + [("timm_vit", "qdq", p) for p in ("fastv", "tome")]
    + [("hf_vit", "ort_opt", p) for p in ("fastv", "tome")]
)


def _match(pattern, cell) -> bool:
    return all(p == "*" or v in p.split("|") for p, v in zip(pattern, cell))


def known_bug(cell) -> str | None:
    return next((reason for pattern, reason in KNOWN_BUGS if _match(pattern, cell)), None)


def expected_refusal(cell):
    return next((v for pattern, v in EXPECTED_REFUSALS.items() if _match(pattern, cell)), None)


def pytest_generate_tests(metafunc):
    if "cell" not in metafunc.fixturenames:
        return
    full = metafunc.config.getoption("--forms-all") or os.environ.get("PRUNEC_FORMS_ALL") == "1"
    cells = [(m, f, p) for m in fc.MODELS for f in fc.FORMS for p in fc.PASSES] if full else DEFAULT
    params = []
    for cell in cells:
        reason = known_bug(cell)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(cell, id="-".join(cell), marks=marks))
    metafunc.parametrize("cell", params)


def test_form(cell):
    model, form, pname = cell
    o = fc.check(model, form, pname)
    if o.status == "n/a" and o.unavailable:
        pytest.skip(o.detail)
    refusal = expected_refusal(cell)
    if refusal is not None:
        assert o.status == "refused" and re.search(refusal[0], o.detail), \
            f"expected a refusal ({refusal[1]}), got {o}"
        return
    if o.status == "n/a":
        pytest.skip(o.detail)
    assert o.status != "refused", f"refused, and not an expected refusal: {o.detail}"
    assert o.status in ("works", "works*"), str(o)


def test_known_bug_and_refusal_tables_name_real_cells():
    for pattern, _ in KNOWN_BUGS + list(EXPECTED_REFUSALS.items()):
        for part, names in zip(pattern, (fc.MODELS, fc.FORMS, fc.PASSES)):
            assert part == "*" or all(p in names for p in part.split("|")), pattern


SAME_OBJECT = "issue 12, silent wrong 5: a merge that merges nothing returns its input object (the CLI says 'wrote')"


@pytest.mark.parametrize("pname", [pytest.param(p, marks=[pytest.mark.xfail(strict=True, reason=SAME_OBJECT)]
                                                if p in ("tome", "evit", "ppt", "visionzip") else [])
                                   for p in fc.PASSES])
def test_zero_reduction_returns_a_new_model(pname):
    """keep=1 / r=0 is the identity numerically (test_form), and still a new model, not the input."""
    import prunec

    x = fc.case("timm_vit").make_inputs(3, fc.SEED)
    model = fc.load("timm_vit", "torchscript14", x)
    same = prunec.passes.get(pname)(**fc.spec("timm_vit", pname, x).identity)(model)
    assert same is not model
