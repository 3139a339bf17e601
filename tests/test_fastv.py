"""FastV on every model form: inspect facts, keep=1 identity, the reference, backends, batch rows."""
from __future__ import annotations

import numpy as np
import pytest

import prunec
from conftest import case, load, run, torch_outputs
from fastv_reference import fastv_reference
from zoo import CASES, EXPORTERS

FORMS = ("torch",) + EXPORTERS


def query_of(c):
    return "last" if c.causal else ("cls" if c.prefix else "mean")


def span_of(c):
    return tuple(int(x) for x in c.span.split(":")) if c.span else None


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_inspect_facts(name, form):
    c = case(name)
    facts = load(name, form).facts()
    assert facts.depth == c.depth
    assert [s.layer for s in facts.sites] == list(range(c.depth))  # one site per layer
    assert len({id(s) for s in facts.streams}) == c.depth
    assert facts.prefix == c.prefix
    assert facts.causal == c.causal


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_keep_one_is_identity(name, form):
    c = case(name)
    model = load(name, form)
    pruned = prunec.passes.FastV(keep=1.0, layer=1, span=c.span)(model)
    for a, b in zip(run(model, c.inputs), run(pruned, c.inputs), strict=True):
        assert a.shape == b.shape
        rel = np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)
        assert rel <= 1e-5


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, form):
    c = case(name)
    model = load(name, form)
    pruned = prunec.passes.FastV(keep=0.25, layer=2, span=c.span)(model)
    ref_out, ref_idx = fastv_reference(c.module, c.inputs, keep=0.25, layer=2, query=query_of(c),
                                       span=span_of(c), prefix=c.prefix)
    kept = pruned.kept_indices(**c.inputs) if form == "torch" else pruned.kept_indices(c.inputs)
    assert list(kept) == ["fastv_l2"]
    np.testing.assert_array_equal(kept["fastv_l2"], ref_idx.numpy())
    n = model.facts().num_tokens
    assert ref_idx.shape[1] < n
    ref = torch_outputs(ref_out)
    got = run(pruned, c.inputs)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", list(CASES))
def test_backends_keep_identical_indices(name, exporter):
    c = case(name)
    inputs = c.make_inputs(3, 7)
    torch_model = prunec.passes.FastV(keep=0.25, layer=1, span=c.span)(load(name, "torch", inputs))
    onnx_model = prunec.passes.FastV(keep=0.25, layer=1, span=c.span)(load(name, exporter))
    a = torch_model.kept_indices(**inputs)
    b = onnx_model.kept_indices(inputs)
    np.testing.assert_array_equal(a["fastv_l1"], b["fastv_l1"])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(CASES))
def test_batch_rows_are_independent(name, form):
    c = case(name)
    batch = c.make_inputs(3, 11)
    fastv = prunec.passes.FastV(keep=0.25, layer=1, span=c.span)
    pruned = fastv(load(name, form, batch))
    together = run(pruned, batch)
    for row in range(3):
        single = {k: v[row:row + 1] for k, v in batch.items()}
        alone_model = pruned if form != "torch" else fastv(load(name, form, single))
        alone = run(alone_model, single)
        for a, b in zip(together, alone, strict=True):
            if a.ndim == 0 or a.shape[0] != 3:
                continue
            np.testing.assert_allclose(a[row:row + 1], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,form", [("hf_llama", "torch"), ("hf_llama", "dynamo18"), ("hf_llama_eager", "torch"),
                                       ("hf_llama_eager", "dynamo18")])
def test_decoder_default_span_keeps_first_and_last(name, form):
    """Without a span a decoder keeps its attention sink (token 0) and its last token (FastV's
    query); eager Llama is found on the torch path (casts / dropout / asserts after the softmax)."""
    c = case(name)
    model = load(name, form)
    pruned = prunec.passes.FastV(keep=0.1, layer=2)(model)
    ref_out, ref_idx = fastv_reference(c.module, c.inputs, keep=0.1, layer=2, query="last", causal=True)
    idx = (pruned.kept_indices(**c.inputs) if form == "torch" else pruned.kept_indices(c.inputs))["fastv_l2"]
    n = c.inputs["input_ids"].shape[1]
    assert (idx[:, 0] == 0).all() and (idx[:, -1] == n - 1).all()
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    ref = torch_outputs(ref_out)
    got = run(pruned, c.inputs)
    assert [a.shape for a in got] == [b.shape for b in ref]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_query_token_is_never_pruned():
    model = load("hf_llama", "torch")
    n = case("hf_llama").inputs["input_ids"].shape[1]
    inputs = case("hf_llama").inputs
    idx = prunec.passes.FastV(count=1, layer=1, span=f"0:{n}")(model).kept_indices(**inputs)["fastv_l1"]
    assert idx.shape[1] == 2 and (idx[:, -1] == n - 1).all()  # the span shrinks to 0:n-1; the query stays
    with pytest.raises(prunec.PruneError, match="query token 5 lies inside the span"):
        prunec.passes.FastV(keep=0.5, layer=1, span="2:10", query="5")(model)
